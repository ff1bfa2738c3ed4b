//! Group creation: instances started concurrently (many callers of
//! `start`) are inserted in one transaction, so they share one flush
//! instead of taking one each, as concurrent instances' commits do.
//!
//! A create joins the waiting list; the first one to find no job queued
//! queues one for the write thread. When that job runs it takes every
//! create waiting by then, inserts them in one transaction and answers
//! each once the transaction is committed. Creates that arrive while it
//! runs queue the next job.

use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::threads::{Answer, Slot, Threads};
use super::{begin, db_err, insert_instance};
use crate::store::{now_millis, NewInstance, StoreError, StoreResult};

/// `true`: created; `false`: an instance with that id already exists.
type Reply = oneshot::Sender<StoreResult<bool>>;

/// The creates waiting for the write thread.
#[derive(Default)]
pub(super) struct Creates {
    inner: Arc<Mutex<Waiting>>,
}

#[derive(Default)]
struct Waiting {
    creates: Vec<(NewInstance, Reply)>,
    /// A job that will take `creates` is queued and has not taken them yet.
    job_queued: bool,
}

impl Creates {
    /// Inserts `new` with the creates waiting alongside it: `true` if it
    /// was created, `false` if an instance with its id exists.
    pub(super) async fn create(&self, writer: &Threads, new: NewInstance) -> StoreResult<bool> {
        let (reply, result) = oneshot::channel();
        let queue_job = {
            let mut waiting = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            waiting.creates.push((new, reply));
            !std::mem::replace(&mut waiting.job_queued, true)
        };
        if queue_job {
            let inner = Arc::clone(&self.inner);
            if let Err(e) = writer.submit(move |slot| insert_waiting(slot, &inner)) {
                // Closed: nothing will take the waiting creates; fail them
                // all (this one among them).
                let mut waiting = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
                waiting.job_queued = false;
                for (_, reply) in waiting.creates.drain(..) {
                    let _ = reply.send(Err(StoreError::Backend(e.to_string().into())));
                }
            }
        }
        result.await.map_err(|_| {
            StoreError::Backend("a SQLite connection thread failed while creating".into())
        })?
    }
}

/// The job on the write thread: inserts every create waiting now, and
/// answers each once the connection is free.
fn insert_waiting(slot: &mut Slot, inner: &Mutex<Waiting>) -> Answer {
    let creates: Vec<_> = {
        let mut waiting = inner.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.job_queued = false;
        std::mem::take(&mut waiting.creates)
    };
    // A caller that gave up did not start its instance, as a dropped
    // transaction would not have.
    let (news, replies): (Vec<_>, Vec<_>) = creates
        .into_iter()
        .filter(|(_, reply)| !reply.is_closed())
        .unzip();
    let now = now_millis();
    let grouped = match news.len() {
        0 | 1 => None,
        _ => slot
            .conn()
            .ok()
            .and_then(|conn| insert_all(conn, &news, now).ok()),
    };
    let outcomes: Vec<StoreResult<bool>> = match grouped {
        Some(created) => created.into_iter().map(Ok).collect(),
        // One create alone, or the group failed (and wrote nothing): each
        // in a transaction of its own, so only a failing one fails.
        None => news
            .iter()
            .map(|new| slot.with_conn(|conn| insert_instance(conn, new, now)))
            .collect(),
    };
    Box::new(move || {
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
    })
}

/// Inserts every create in one transaction.
fn insert_all(
    conn: &mut Connection,
    news: &[NewInstance],
    now: crate::store::Millis,
) -> StoreResult<Vec<bool>> {
    let tx = begin(conn)?;
    let created = news
        .iter()
        .map(|new| insert_instance(&tx, new, now))
        .collect::<StoreResult<Vec<_>>>()?;
    tx.commit().map_err(db_err)?;
    Ok(created)
}
