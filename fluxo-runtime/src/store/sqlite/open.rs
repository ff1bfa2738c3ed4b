//! Opening connections and migrating the schema.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::checkpoint::{Checkpointer, CHECKPOINT_PAGES, INLINE_PAGES};
use super::{db_err, Synchronous};
use crate::store::{StoreError, StoreResult};

/// The schema migrations, in order. `PRAGMA user_version` holds how many of
/// them a database file has applied.
pub(super) const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/sqlite/0001_initial_schema.sql"),
    include_str!("../../../migrations/sqlite/0002_journal_end_from_the_journal.sql"),
];

/// Prepared statements kept per connection; more than the store uses.
const STATEMENT_CACHE: usize = 64;

/// How to open a connection to the store's database.
#[derive(Debug, Clone)]
pub(super) struct Opener {
    /// `None`: a private in-memory database.
    pub(super) path: Option<PathBuf>,
    pub(super) synchronous: Synchronous,
    pub(super) busy_timeout: Duration,
    /// Set on the write connection's opener: the thread that runs the
    /// checkpoints of what it writes.
    pub(super) checkpoints: Option<Arc<Checkpointer>>,
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
        // SQLite takes at most `i32::MAX` milliseconds (some 24 days).
        let busy = self
            .busy_timeout
            .min(Duration::from_millis(i32::MAX as u64));
        conn.busy_timeout(busy).map_err(db_err)?;
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
        if let Some(checkpoints) = &self.checkpoints {
            // After this, `PRAGMA wal_autocheckpoint` must not be set on
            // `conn`: it would replace the hook.
            checkpoints.watch(&conn)?;
        }
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
        // Only a `FULL` commit flushes the log; at `NORMAL` growing it
        // costs nothing a commit waits for.
        if self.path.is_some() && self.synchronous == Synchronous::Full {
            if let Err(e) = presize_wal(&mut conn, append_zeros) {
                tracing::warn!(error = %e, "SQLite: could not grow the write-ahead log");
            }
        }
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

/// Bytes in a write-ahead log's header.
const WAL_HEADER: i64 = 32;

/// Bytes in front of each page in a write-ahead log.
const WAL_FRAME_HEADER: i64 = 24;

/// The most [`presize_wal`] grows a log to.
const WAL_PRESIZE_MAX: i64 = 64 << 20;

/// Grows the write-ahead log to the most it holds between checkpoints,
/// with zeros, once, so that commits overwrite blocks the file already has.
///
/// A commit that appends to the log must also make the file's new size
/// durable, which on ext4 costs a journal commit on top of the data flush:
/// 1.4–2 × a commit that overwrites (see BENCHMARKS.md; less where SQLite
/// flushes with `fsync`, which writes the timestamps every time anyway).
/// SQLite starts the log over after each checkpoint but only ever grows it
/// by appending, so a fresh database, and every database once its last
/// connection closed (which deletes the log), would pay that for its first
/// thousand pages. Postgres zero-fills its WAL segments for the same
/// reason (`wal_init_zero`).
///
/// The zeros are never taken for frames: SQLite reads a log up to its
/// first frame whose page number, salt or checksum is wrong, and rewrites
/// the header when it starts the log over. Nothing else changes the file
/// meanwhile: writing frames, restarting or truncating the log all need
/// the write lock, held here, and deleting it at the last close needs an
/// exclusive lock on the database, which this connection's shared lock
/// keeps out. SQLite holds no POSIX lock on the log file itself, so
/// opening and closing it here releases none.
///
/// Growing the log only saves time, so the caller logs a failure (the
/// write lock busy past the timeout, a full disk) and opens the store
/// anyway; a path that is not UTF-8 is logged here and skipped.
///
/// `grow` appends the zeros ([`append_zeros`]; tests pass one that fails).
fn presize_wal(
    conn: &mut Connection,
    grow: impl FnOnce(&std::path::Path, u64) -> std::io::Result<()>,
) -> StoreResult<()> {
    let page_size: i64 = conn
        .pragma_query_value(None, "page_size", |row| row.get(0))
        .map_err(db_err)?;
    // The log grows until the write connection checkpoints itself (see
    // `checkpoint`), and past that by up to one commit's pages; a quarter
    // of the checkpoint interval more covers a large group commit.
    let frames = INLINE_PAGES + CHECKPOINT_PAGES / 4;
    let target = (WAL_HEADER + frames * (page_size + WAL_FRAME_HEADER)).min(WAL_PRESIZE_MAX) as u64;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let path = match tx.path() {
        // A temporary database: no log file of its own to grow.
        Some("") => return Ok(()),
        Some(path) => path,
        None => {
            tracing::warn!(
                "SQLite: the database's path is not UTF-8; its write-ahead log is not grown"
            );
            return Ok(());
        }
    };
    let wal = PathBuf::from(format!("{path}-wal"));
    grow(&wal, target).map_err(|e| {
        StoreError::Backend(format!("growing the write-ahead log {}: {e}", wal.display()).into())
    })?;
    tx.commit().map_err(db_err)
}

/// Appends zeros to the file at `path` up to `target` bytes and flushes
/// it; on failure, cuts it back to its old length. A missing file is left
/// alone (SQLite makes the log on its first write).
fn append_zeros(path: &std::path::Path, target: u64) -> std::io::Result<()> {
    let mut file = match OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let old = file.metadata()?.len();
    if old >= target {
        return Ok(());
    }
    let zeros = vec![0u8; 256 * 1024];
    let grown = (|| {
        file.seek(SeekFrom::Start(old))?;
        let mut len = old;
        while len < target {
            let n = zeros.len().min((target - len) as usize);
            file.write_all(&zeros[..n])?;
            len += n as u64;
        }
        file.sync_all()
    })();
    if grown.is_err() {
        let _ = file.set_len(old);
    }
    grown
}

#[cfg(test)]
mod tests {
    use super::{append_zeros, presize_wal};
    use crate::store::sqlite::tests::{Files, TempDb};

    #[test]
    fn zeros_go_after_the_bytes_already_there_and_a_missing_file_stays_missing() {
        let file = Files(TempDb::path());
        let path = &file.0;
        append_zeros(path, 4096).unwrap();
        assert!(!path.exists());

        std::fs::write(path, b"frames").unwrap();
        append_zeros(path, 600_000).unwrap();
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(bytes.len(), 600_000);
        assert_eq!(&bytes[..6], b"frames");
        assert!(bytes[6..].iter().all(|&b| b == 0));
        // Written, not a hole: later writes overwrite blocks the file has.
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            assert!(std::fs::metadata(path).unwrap().blocks() * 512 >= 600_000);
        }
        // Already long enough: left as it is.
        append_zeros(path, 10).unwrap();
        assert_eq!(std::fs::metadata(path).unwrap().len(), 600_000);
    }

    /// A log that cannot be grown is an error for the caller to log, and
    /// leaves the connection out of any transaction and the write lock
    /// free.
    #[test]
    fn a_failed_growth_ends_its_transaction() {
        let file = Files(TempDb::path());
        let mut conn = rusqlite::Connection::open(&file.0).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE t (x)").unwrap();
        let e = presize_wal(
            &mut conn,
            |_, _| Err(std::io::ErrorKind::StorageFull.into()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("growing the write-ahead log"), "{e}");
        assert!(conn.is_autocommit());
        let other = rusqlite::Connection::open(&file.0).unwrap();
        other
            .execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1); COMMIT")
            .unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_write_that_fails_is_reported() {
        // Every write to /dev/full fails with "no space left on device".
        let full = std::path::Path::new("/dev/full");
        if !full.exists() {
            eprintln!("no /dev/full here: skipped");
            return;
        }
        let e = append_zeros(full, 4096).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
    }

    /// The child process of [`a_write_that_fails_part_way_is_cut_back`].
    #[cfg(target_os = "linux")]
    const CUT_BACK_CHILD: &str = "store::sqlite::open::tests::grow_under_a_file_size_limit";

    /// A growth whose writes fail part-way leaves the file as it was: the
    /// zeros written before the failure are cut off again. The writes fail
    /// at the process's file-size limit, which is process-wide, so the
    /// growth runs in a child process of its own.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_write_that_fails_part_way_is_cut_back() {
        let file = Files(TempDb::path());
        let frames = vec![7u8; 10_000];
        std::fs::write(&file.0, &frames).unwrap();
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", CUT_BACK_CHILD, "--ignored", "--nocapture"])
            .args(["--test-threads=1"])
            .env("FLUXO_TEST_GROW_UNDER_LIMIT", &file.0)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&child.stdout);
        assert!(
            child.status.success() && stdout.contains("1 passed"),
            "the child did not run its test: {}\n{stdout}\n{}",
            child.status,
            String::from_utf8_lossy(&child.stderr)
        );
        let bytes = std::fs::read(&file.0).unwrap();
        assert_eq!(bytes.len(), frames.len(), "cut back to its old length");
        assert!(bytes == frames, "its old bytes kept");
    }

    #[cfg(target_os = "linux")]
    #[test]
    #[ignore = "run as a child process by a_write_that_fails_part_way_is_cut_back"]
    fn grow_under_a_file_size_limit() {
        let Some(path) = std::env::var_os("FLUXO_TEST_GROW_UNDER_LIMIT") else {
            return;
        };
        // No file of this process may grow past 300,000 bytes: the second
        // 256 KiB write of zeros stops there. Past the limit a write fails
        // with EFBIG instead of the signal ending the process.
        // SAFETY: plain libc calls with valid arguments, made while this
        // process runs nothing else.
        unsafe {
            assert_ne!(libc::signal(libc::SIGXFSZ, libc::SIG_IGN), libc::SIG_ERR);
            let mut limit = std::mem::zeroed::<libc::rlimit>();
            assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
            limit.rlim_cur = 300_000;
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
        }
        let path = std::path::Path::new(&path);
        let e = append_zeros(path, 1_000_000).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}");
    }
}
