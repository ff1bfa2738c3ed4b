//! Opening connections and migrating the schema.

use std::ffi::c_int;
use std::path::PathBuf;
use std::time::Duration;

use rusqlite::{ffi, Connection, OpenFlags, Transaction, TransactionBehavior};

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
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        migrate(&tx)?;
        if self.path.is_some() && self.synchronous == Synchronous::Full {
            presize_wal(&tx);
        }
        tx.commit().map_err(db_err)?;
        Ok(conn)
    }
}

/// Applies the migrations the file lacks. Runs under the write lock (in a
/// `BEGIN IMMEDIATE` transaction), so that processes opening a fresh file
/// together apply each one once.
fn migrate(tx: &Transaction<'_>) -> StoreResult<()> {
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
    Ok(())
}

/// The size the write-ahead log reaches between two automatic checkpoints
/// of a file Fluxo created (4 KiB pages, SQLite's default of 1,000 pages
/// per checkpoint, and their frame headers); it grows past it only when a
/// checkpoint cannot finish (a long read) or one transaction writes more.
pub(super) const WAL_BYTES: i64 = 4 << 20;

/// Extends the write-ahead log file, with zeros, to the size it reaches
/// between checkpoints anyway. For files at `synchronous=FULL`.
///
/// A commit at `FULL` flushes the log. While the log grows (a fresh file,
/// or the first checkpoint interval after the last connection closed,
/// which deletes the log), each flush also has the file system commit the
/// file's new size and blocks: a bare SQLite commit cost 1.4–1.7× what it
/// costs once the log, after a checkpoint, starts over and overwrites
/// blocks the file has (BENCHMARKS.md). Extending it up front gives every
/// commit the cheaper kind.
///
/// SQLite does the extending, through its own file controls on the log's
/// open file: a chunk size (which only arms the size hint for this
/// connection's handle) and a size hint, which writes one byte at the end
/// of every block past the file's end, then a flush. Nothing before the
/// end is written, and zeros past the log's end are never read as frames
/// (a frame of page 0 is invalid, and a zero header is no log), so the
/// extension, whole or cut short by a crash, is as harmless as the stale
/// frames a log that started over keeps. The caller holds the write lock:
/// no writer (and no restart of the log) runs meanwhile, and a connection
/// of ours keeps the file's shared lock, so no other process deletes or
/// truncates the log. Best effort: a file system that refuses (say, when
/// full) leaves the log partly or not extended, and commits work as
/// before.
///
/// The extension would also map the log into memory if SQLite were set up
/// with a memory-map size (`SQLITE_DEFAULT_MMAP_SIZE`, `SQLITE_CONFIG_MMAP_SIZE`),
/// which Fluxo does not do.
fn presize_wal(tx: &Transaction<'_>) {
    let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: the handle is live and used on its own thread; the file
    // control writes one pointer, to the log's open file, into `file`.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            tx.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_JOURNAL_POINTER,
            (&raw mut file).cast(),
        )
    };
    if rc != ffi::SQLITE_OK || file.is_null() {
        return;
    }
    // SAFETY: `file` is the log's open file, owned by the connection and
    // used here only on the connection's thread, under the write lock; its
    // methods are SQLite's own for this file, and the arguments are the
    // types the two file controls read (an `int` and an `i64`).
    let rc = unsafe {
        let Some(methods) = (*file).pMethods.as_ref() else {
            return;
        };
        let (Some(control), Some(sync)) = (methods.xFileControl, methods.xSync) else {
            return;
        };
        let mut chunk = WAL_BYTES as c_int;
        let mut size = WAL_BYTES;
        match control(file, ffi::SQLITE_FCNTL_CHUNK_SIZE, (&raw mut chunk).cast()) {
            ffi::SQLITE_OK => {
                match control(file, ffi::SQLITE_FCNTL_SIZE_HINT, (&raw mut size).cast()) {
                    ffi::SQLITE_OK => sync(file, ffi::SQLITE_SYNC_NORMAL),
                    rc => rc,
                }
            }
            rc => rc,
        }
    };
    if rc != ffi::SQLITE_OK {
        tracing::debug!(code = rc, "extending the SQLite write-ahead log failed");
    }
}
