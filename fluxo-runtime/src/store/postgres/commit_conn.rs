//! The connection commits are made on.
//!
//! A connection taken from the pool goes back to it through a task the pool
//! spawns, which pings the server before the connection is handed out
//! again: a round trip and two task wake-ups for every commit, a large part
//! of a commit's time on a local server. Commits instead keep one
//! connection of their own, out of the pool (beyond its maximum size). The
//! group-commit writer makes one commit, or one group, at a time, so this
//! one connection serves it; a commit made while it is busy takes a pooled
//! connection.
//!
//! A connection left mid-exchange (its future dropped) needs no ping: the
//! driver reads what is still due before its next statement, and a dropped
//! transaction is rolled back then. A connection that failed below SQL (the
//! server went away, the socket broke) is dropped, and the next commit
//! opens another.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

/// The commit path's own connection, opened on first use.
#[derive(Default)]
pub(super) struct CommitConnection {
    conn: Mutex<Option<PgConnection>>,
    /// Set when a commit found the connection broken: the next one opens
    /// another.
    broken: AtomicBool,
}

impl CommitConnection {
    /// This store's commit connection if no other commit uses it, else one
    /// from `pool`.
    pub(super) async fn get(&self, pool: &PgPool) -> Result<Conn<'_>, sqlx::Error> {
        let Ok(mut own) = self.conn.try_lock() else {
            return Ok(Conn::Pooled(pool.acquire().await?));
        };
        if self.broken.swap(false, Ordering::Relaxed) {
            *own = None;
        }
        if own.is_none() {
            *own = Some(pool.acquire().await?.detach());
        }
        match MutexGuard::try_map(own, Option::as_mut) {
            Ok(conn) => Ok(Conn::Own(conn, &self.broken)),
            // Cannot happen: it was opened above.
            Err(_) => Ok(Conn::Pooled(pool.acquire().await?)),
        }
    }
}

/// A connection to commit on.
pub(super) enum Conn<'a> {
    /// The store's commit connection, and its flag for a broken one.
    Own(MappedMutexGuard<'a, PgConnection>, &'a AtomicBool),
    /// A pooled one, while the commit connection is busy.
    Pooled(PoolConnection<Postgres>),
}

impl<'a> Conn<'a> {
    /// What tells this connection's owner that it broke; it does not borrow
    /// the connection, so a transaction on it may be open meanwhile.
    pub(super) fn health(&self) -> Health<'a> {
        match self {
            Conn::Own(_, broken) => Health(Some(broken)),
            // The pool tests a connection as it comes back, and drops a
            // broken one.
            Conn::Pooled(_) => Health(None),
        }
    }
}

/// See [`Conn::health`].
pub(super) struct Health<'a>(Option<&'a AtomicBool>);

impl Health<'_> {
    /// Drops the connection after this commit if `e` says it is broken, so
    /// that the next commit opens a fresh one instead of failing on it.
    pub(super) fn check(&self, e: &sqlx::Error) {
        if let Some(broken) = self.0 {
            if super::connection_lost(e) {
                broken.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl Deref for Conn<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match self {
            Conn::Own(conn, _) => conn,
            Conn::Pooled(conn) => conn,
        }
    }
}

impl DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Conn::Own(conn, _) => conn,
            Conn::Pooled(conn) => conn,
        }
    }
}
