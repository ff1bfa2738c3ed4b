//! Opening connections and migrating the schema.

use std::path::PathBuf;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::{db_err, Synchronous};
use crate::store::{StoreError, StoreResult};

/// The schema migrations, in order. `PRAGMA user_version` holds how many of
/// them a database file has applied.
pub(super) const MIGRATIONS: &[&str] = &[include_str!(
    "../../../migrations/sqlite/0001_initial_schema.sql"
)];

/// Prepared statements kept per connection; more than the store uses.
const STATEMENT_CACHE: usize = 64;

/// How to open a connection to the store's database.
#[derive(Debug, Clone)]
pub(super) struct Opener {
    /// `None`: a private in-memory database.
    pub(super) path: Option<PathBuf>,
    pub(super) synchronous: Synchronous,
    pub(super) busy_timeout: Duration,
}

impl Opener {
    /// Opens a connection with the store's settings.
    pub(super) fn open(&self) -> StoreResult<Connection> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = match &self.path {
            Some(path) => Connection::open_with_flags(path, flags),
            None => Connection::open_in_memory_with_flags(flags),
        }
        .map_err(db_err)?;
        conn.busy_timeout(self.busy_timeout).map_err(db_err)?;
        // The bundled SQLite enforces foreign keys by default; the schema
        // declares none, and later migrations must not change behaviour by
        // adding some.
        conn.pragma_update(None, "foreign_keys", false)
            .map_err(db_err)?;
        let level = match self.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", level)
            .map_err(db_err)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }

    /// Opens the first connection: switches a file to WAL (a property of
    /// the file, so once is enough for every connection) and brings the
    /// schema up to date.
    pub(super) fn open_and_migrate(&self) -> StoreResult<Connection> {
        let mut conn = self.open()?;
        if self.path.is_some() {
            let mode: String = conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
                .map_err(db_err)?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StoreError::Backend(
                    format!("SQLite refused WAL mode (journal_mode is {mode})").into(),
                ));
            }
        }
        migrate(&mut conn)?;
        Ok(conn)
    }
}

/// Applies the migrations the file lacks, under the write lock, so that
/// processes opening a fresh file together apply each one once.
fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let applied: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(db_err)?;
    let known = MIGRATIONS.len() as i64;
    if applied > known {
        return Err(StoreError::Unsupported(format!(
            "the SQLite database is at schema version {applied}, written by a newer Fluxo; \
             this build knows versions up to {known}"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied.max(0) as usize) {
        tx.execute_batch(sql).map_err(db_err)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(db_err)?;
    }
    tx.commit().map_err(db_err)
}
