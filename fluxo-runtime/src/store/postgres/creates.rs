//! Group creation: instances started concurrently (many callers of
//! `start`) are inserted by one statement, so they share one transaction,
//! one WAL flush and one notification instead of taking one each, as
//! concurrent instances' commits do.
//!
//! Every create goes to a writer task, which takes all the creates queued
//! by then and writes them at once; creates that arrive while it writes
//! queue for the next group. A lone create is written with the
//! single-row statement, as before grouping. If the group statement fails
//! (an input Postgres refuses, say), each create of the group is written
//! on its own, so one bad create fails alone.
//!
//! The writer is spawned on the runtime of the first create, and again on
//! the current one if that runtime has gone away. It ends when the store's
//! last clone is dropped.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::store::NewInstance;

/// The most creates written by one statement.
const MAX_GROUP: usize = 512;

/// Whether the instance was created (`false`: one with its id exists).
type Reply = oneshot::Sender<Result<bool, sqlx::Error>>;

type Request = (NewInstance, Reply);

/// The two statements a writer uses.
#[derive(Clone)]
pub(super) struct CreateStatements {
    /// One instance: `$1`..`$5` are id, workflow, version, input, parent;
    /// a row when it was created.
    pub one: Arc<str>,
    /// Many: the same parameters as arrays; one row per created instance,
    /// its id first.
    pub many: Arc<str>,
}

/// The queue of creates for the store's writer task.
pub(super) struct Creates {
    pool: PgPool,
    sql: CreateStatements,
    writer: Mutex<Option<mpsc::UnboundedSender<Request>>>,
    /// Groups written by the group statement, and groups it failed to
    /// write (tests read them).
    #[cfg(test)]
    pub groups: Arc<GroupCounts>,
}

/// How the group statement fared.
#[cfg(test)]
#[derive(Default)]
pub(super) struct GroupCounts {
    pub written: std::sync::atomic::AtomicUsize,
    pub failed: std::sync::atomic::AtomicUsize,
}

impl Creates {
    pub(super) fn new(pool: PgPool, sql: CreateStatements) -> Self {
        Creates {
            pool,
            sql,
            writer: Mutex::new(None),
            #[cfg(test)]
            groups: Default::default(),
        }
    }

    /// Inserts `new`, grouped with the creates queued alongside it:
    /// `true` if it was created, `false` if an instance with its id exists;
    /// `None` when the writer went away before answering (its runtime
    /// shut down).
    pub(super) async fn create(&self, new: NewInstance) -> Option<Result<bool, sqlx::Error>> {
        let (reply, result) = oneshot::channel();
        if let Err((new, _)) = self.queue((new, reply)) {
            // No Tokio runtime to run a writer on: written here, alone.
            return Some(insert_one(&self.pool, &self.sql.one, &new).await);
        }
        result.await.ok()
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
        #[cfg(test)]
        let groups = Arc::clone(&self.groups);
        runtime.spawn(write_creates(
            self.pool.clone(),
            self.sql.clone(),
            rx,
            #[cfg(test)]
            groups,
        ));
        *writer = Some(tx);
        Ok(())
    }
}

/// The writer task: writes the queued creates, a group at a time, until
/// the store is dropped.
async fn write_creates(
    pool: PgPool,
    sql: CreateStatements,
    mut rx: mpsc::UnboundedReceiver<Request>,
    #[cfg(test)] groups: Arc<GroupCounts>,
) {
    let mut queued = Vec::new();
    while rx.recv_many(&mut queued, MAX_GROUP).await > 0 {
        // A caller that gave up did not start its instance, as a dropped
        // statement would not have.
        queued.retain(|(_, reply): &Request| !reply.is_closed());
        // The first create of an id goes in the group; another create of
        // the same id is written after it, and finds it there.
        let mut ids = HashSet::new();
        let (group, later): (Vec<Request>, Vec<Request>) = queued
            .drain(..)
            .partition(|(new, _)| ids.insert(new.id.clone()));
        if group.len() > 1 {
            match insert_many(&pool, &sql.many, &group).await {
                Ok(created) => {
                    #[cfg(test)]
                    groups
                        .written
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    for (new, reply) in group {
                        let _ = reply.send(Ok(created.contains(new.id.as_str())));
                    }
                }
                Err(e) => {
                    #[cfg(test)]
                    groups
                        .failed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(error = %e, creates = group.len(),
                        "group create failed; writing the creates one by one");
                    for (new, reply) in group {
                        let _ = reply.send(insert_one(&pool, &sql.one, &new).await);
                    }
                }
            }
        } else {
            for (new, reply) in group {
                let _ = reply.send(insert_one(&pool, &sql.one, &new).await);
            }
        }
        for (new, reply) in later {
            let _ = reply.send(insert_one(&pool, &sql.one, &new).await);
        }
    }
}

async fn insert_one(pool: &PgPool, sql: &str, new: &NewInstance) -> Result<bool, sqlx::Error> {
    let row = sqlx::query(sql)
        .bind(new.id.as_str())
        .bind(new.workflow.as_str())
        .bind(i64::from(new.version))
        .bind(new.input.as_slice())
        .bind(new.parent_id.as_deref())
        .fetch_optional(pool)
        .await?;
    Ok(row.is_some())
}

/// The ids of the instances of `group` the group statement created.
async fn insert_many(
    pool: &PgPool,
    sql: &str,
    group: &[Request],
) -> Result<HashSet<String>, sqlx::Error> {
    use sqlx::Row as _;
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
