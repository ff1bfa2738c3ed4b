//! Group creation: instances started concurrently (many callers of
//! `start`) are inserted by one statement, so they share one transaction,
//! one WAL flush and one notification instead of taking one each, as
//! concurrent instances' commits do.
//!
//! Every create goes to a writer task, which takes all the creates queued
//! by then and writes them as a group; creates that arrive meanwhile
//! queue for the next one. Up to [`MAX_GROUPS_IN_FLIGHT`] groups are
//! written at a time, so one insert that waits (on a lock another session
//! holds, say) does not hold up every start. A lone create is written with
//! the single-row statement, as before grouping.
//!
//! When Postgres refuses the group statement (an input it cannot store,
//! say), nothing of it was written and each create of the group is
//! written on its own, so the one it refuses fails alone. When the
//! statement fails otherwise (no connection, the connection lost), every
//! create of the group gets the error, as each would have alone.
//!
//! The writer runs on the Tokio runtime of the first create (and on the
//! current one again if that runtime has shut down), and ends when the
//! store's last clone is dropped.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use sqlx::{PgPool, Row as _};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::{connection_lost, fail_on, must_retry, DEADLOCK_RETRIES};
use crate::store::{NewInstance, StoreError, StoreResult};

/// The most creates written by one statement.
const MAX_GROUP: usize = 512;

/// The most groups being written at once: enough that one insert that
/// waits holds up only its own group, few enough that groups stay large.
const MAX_GROUPS_IN_FLIGHT: usize = 2;

/// A create and where its outcome goes: `true` if it was created, `false`
/// if an instance with its id exists.
type Request = (NewInstance, oneshot::Sender<StoreResult<bool>>);

/// The two statements a writer uses.
#[derive(Clone)]
pub(super) struct CreateStatements {
    /// One instance: `$1`..`$5` are id, workflow, version, input, parent;
    /// a row when it was created.
    pub one: Arc<str>,
    /// Many: the same parameters as arrays; a row per instance created,
    /// its id first.
    pub many: Arc<str>,
}

/// The queue of creates for the store's writer task.
pub(super) struct Creates {
    /// What the writer writes with.
    group: Group,
    writer: Mutex<Option<mpsc::UnboundedSender<Request>>>,
}

/// How often the group statement wrote a group, and how often Postgres
/// refused it (its creates then written one by one).
#[derive(Default)]
pub(super) struct GroupCounts {
    /// Groups written by the group statement.
    pub written: AtomicUsize,
    /// Groups the group statement was refused for.
    pub refused: AtomicUsize,
}

impl Creates {
    /// Creates written with the statements `sql` on connections of `pool`.
    pub(super) fn new(pool: PgPool, sql: CreateStatements) -> Self {
        Creates {
            group: Group {
                pool,
                sql,
                counts: Arc::default(),
            },
            writer: Mutex::new(None),
        }
    }

    /// How the group statement fared.
    #[cfg(test)]
    pub(super) fn counts(&self) -> &GroupCounts {
        &self.group.counts
    }

    /// Inserts `new`, grouped with the creates queued alongside it:
    /// `true` if it was created, `false` if an instance with its id exists.
    pub(super) async fn create(&self, new: NewInstance) -> StoreResult<bool> {
        let (reply, result) = oneshot::channel();
        if let Err((new, _)) = self.queue((new, reply)) {
            // No Tokio runtime to run a writer on: written here, alone.
            return insert_one(&self.group.pool, &self.group.sql.one, &new).await;
        }
        result.await.unwrap_or_else(|_| {
            Err(StoreError::Backend(
                "the Postgres create writer stopped before answering (its runtime shut down)"
                    .into(),
            ))
        })
    }

    /// Hands `request` to the writer, starting one if there is none or the
    /// runtime of the last one has shut down; gives it back outside a
    /// Tokio runtime.
    fn queue(&self, request: Request) -> Result<(), Request> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(request);
        };
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let request = match writer.as_ref() {
            Some(tx) => match tx.send(request) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(request)) => request,
            },
            None => request,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // Cannot fail: `rx` is alive.
        let _ = tx.send(request);
        runtime.spawn(write_creates(self.group.clone(), rx));
        *writer = Some(tx);
        Ok(())
    }
}

/// What writing a group takes.
#[derive(Clone)]
struct Group {
    pool: PgPool,
    sql: CreateStatements,
    counts: Arc<GroupCounts>,
}

/// The writer task: takes the queued creates a group at a time, with up
/// to [`MAX_GROUPS_IN_FLIGHT`] groups being written, until the store is
/// dropped.
async fn write_creates(group: Group, mut rx: mpsc::UnboundedReceiver<Request>) {
    let slots = Arc::new(Semaphore::new(MAX_GROUPS_IN_FLIGHT));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut queued = Vec::new();
        if rx.recv_many(&mut queued, MAX_GROUP).await == 0 {
            return;
        }
        tokio::spawn(group.clone().write(queued, slot));
    }
}

impl Group {
    /// Writes `queued`, then frees its `slot`.
    async fn write(self, mut queued: Vec<Request>, slot: OwnedSemaphorePermit) {
        // A caller that gave up did not start its instance, as a dropped
        // statement would not have.
        queued.retain(|(_, reply)| !reply.is_closed());
        // The first create of an id goes in the group; another create of
        // the same id is written after it, and finds it there.
        let mut ids = HashSet::new();
        let (group, later): (Vec<Request>, Vec<Request>) = queued
            .into_iter()
            .partition(|(new, _)| ids.insert(new.id.clone()));
        if group.len() > 1 {
            self.write_group(group).await;
        } else {
            self.write_one_by_one(group).await;
        }
        self.write_one_by_one(later).await;
        drop(slot);
    }

    async fn write_group(&self, group: Vec<Request>) {
        let mut attempt = 0;
        let error = loop {
            match insert_many(&self.pool, &self.sql.many, &group).await {
                Ok(created) => {
                    self.counts.written.fetch_add(1, Ordering::Relaxed);
                    for (new, reply) in group {
                        let _ = reply.send(Ok(created.contains(new.id.as_str())));
                    }
                    return;
                }
                Err(e) if must_retry(&e) && attempt < DEADLOCK_RETRIES => {
                    attempt += 1;
                    tracing::debug!(error = %e, "group create retried");
                }
                Err(e) => break e,
            }
        };
        if refused(&error) {
            // Nothing of the group was written: each on its own, so that
            // only the create Postgres refuses fails.
            self.counts.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %error, creates = group.len(),
                "group create refused; writing the creates one by one");
            return self.write_one_by_one(group).await;
        }
        // The same failure for every create of the group.
        let first = fail_on(&self.pool, error).await;
        let message = first.to_string();
        let mut first = Some(first);
        for (_, reply) in group {
            let e = first
                .take()
                .unwrap_or_else(|| StoreError::Backend(message.clone().into()));
            let _ = reply.send(Err(e));
        }
    }

    async fn write_one_by_one(&self, creates: Vec<Request>) {
        for (new, reply) in creates {
            let _ = reply.send(insert_one(&self.pool, &self.sql.one, &new).await);
        }
    }
}

/// Whether Postgres refused a statement as such (so it wrote nothing), as
/// opposed to failing to run it or losing the connection on the way.
fn refused(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(_)) && !connection_lost(e) && !must_retry(e)
}

/// Inserts one instance: `true` if it was created.
async fn insert_one(pool: &PgPool, sql: &str, new: &NewInstance) -> StoreResult<bool> {
    let row = sqlx::query(sql)
        .bind(new.id.as_str())
        .bind(new.workflow.as_str())
        .bind(i64::from(new.version))
        .bind(new.input.as_slice())
        .bind(new.parent_id.as_deref())
        .fetch_optional(pool)
        .await;
    match row {
        Ok(row) => Ok(row.is_some()),
        Err(e) => Err(fail_on(pool, e).await),
    }
}

/// The ids of the instances of `group` the group statement created.
async fn insert_many(
    pool: &PgPool,
    sql: &str,
    group: &[Request],
) -> Result<HashSet<String>, sqlx::Error> {
    let news = group.iter().map(|(new, _)| new);
    let rows = sqlx::query(sql)
        .bind(news.clone().map(|n| n.id.as_str()).collect::<Vec<_>>())
        .bind(
            news.clone()
                .map(|n| n.workflow.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            news.clone()
                .map(|n| i64::from(n.version))
                .collect::<Vec<_>>(),
        )
        .bind(news.clone().map(|n| n.input.as_slice()).collect::<Vec<_>>())
        .bind(news.map(|n| n.parent_id.as_deref()).collect::<Vec<_>>())
        .fetch_all(pool)
        .await?;
    rows.iter().map(|row| row.try_get::<String, _>(0)).collect()
}
