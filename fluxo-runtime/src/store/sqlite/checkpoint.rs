//! Checkpoints off the commit path.
//!
//! In WAL mode SQLite appends every commit to the write-ahead log and, once
//! the log holds [`CHECKPOINT_PAGES`] pages, copies them back into the
//! database file: a checkpoint. It flushes the log, writes the pages and
//! flushes the database file. By default the connection that committed
//! runs it inside that commit, so every few hundred steps one step waits
//! milliseconds for it.
//!
//! Here the write connection only looks at the log's length after each
//! commit (a WAL hook, which replaces SQLite's own checkpointing on that
//! connection) and, past [`CHECKPOINT_PAGES`], wakes a thread of the
//! store's own that checkpoints on a connection of its own. It runs a
//! `PASSIVE` checkpoint, which takes no lock a commit waits for and copies
//! what no reader still needs, and then flushes the database file itself
//! if SQLite did not (SQLite flushes it only when the copy reached the
//! log's end, and commits land while it copies).
//!
//! The log only starts over at a commit that finds all of it copied. So
//! once the thread is done, the write connection checkpoints what is
//! left, inside its next commit: the pages of the commits made meanwhile,
//! and a flush of the log and of the database file. The commit after that
//! starts the log over (unless a read still uses its end).
//!
//! From [`INLINE_PAGES`] on (the thread has ended, or a read holds an old
//! snapshot) the write connection checkpoints inside every commit, as
//! SQLite would from its own interval on. While the thread copies, such a
//! checkpoint finds the thread's lock and does nothing: the log then grows
//! until the thread is done.
//!
//! Nothing may set `PRAGMA wal_autocheckpoint` on the write connection: it
//! would replace the hook.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;

use rusqlite::{ffi, Connection};

use super::db_err;
use super::open::Opener;
use crate::store::{StoreError, StoreResult};

/// Log pages at which the checkpoint thread is woken: SQLite's own
/// default checkpoint interval.
pub(super) const CHECKPOINT_PAGES: i64 = 1000;

/// Log pages at which the write connection checkpoints itself.
pub(super) const INLINE_PAGES: i64 = 2 * CHECKPOINT_PAGES;

/// Where the current checkpoint is, as the write connection's hook sees it.
const IDLE: u8 = 0;
/// The thread was asked to checkpoint and has not finished.
const COPYING: u8 = 1;
/// The thread finished: the write connection copies the rest.
const COPIED: u8 = 2;

/// What the write connection's hook and the checkpoint thread share.
#[derive(Default)]
struct Shared {
    /// [`IDLE`], [`COPYING`] or [`COPIED`]. The thread runs a checkpoint
    /// while it is [`COPYING`].
    phase: AtomicU8,
    /// Set when the store closes: the thread ends.
    closed: Mutex<bool>,
    /// Wakes the thread, under `closed`'s lock.
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, bool> {
        self.closed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stop(&self) {
        *self.lock() = true;
        self.wake.notify_one();
    }

    /// Asks the thread for a checkpoint.
    fn request(&self) {
        self.phase.store(COPYING, Ordering::Release);
        // Under the lock, so that a thread about to wait sees the phase or
        // the wake-up.
        let _closed = self.lock();
        self.wake.notify_one();
    }
}

/// The checkpoint thread of a store's database file.
pub(super) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl Checkpointer {
    /// Starts the thread, with a connection opened by `opener`.
    pub(super) fn start(opener: &Opener) -> StoreResult<Self> {
        let conn = opener.open()?;
        let db = opener.path.clone();
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("fluxo-sqlite-checkpoint".to_owned())
                .spawn(move || run(&conn, db.as_deref(), &shared))
                .map_err(StoreError::backend)?
        };
        Ok(Checkpointer {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hands the checkpoints of `conn`, the store's write connection, to
    /// this thread. Called on every connection that writes, also when it
    /// is reopened.
    pub(super) fn watch(&self, conn: &Connection) -> StoreResult<()> {
        let shared = Arc::into_raw(Arc::clone(&self.shared));
        // SAFETY: `db` is the open handle of `conn`, used on this thread
        // only while `conn` is borrowed. The client data owns one count of
        // `shared`, released by `release` when SQLite closes the
        // connection, after which the hook is never called; so the hook's
        // argument lives as long as it may be called.
        unsafe {
            let db = conn.handle();
            let rc = ffi::sqlite3_set_clientdata(
                db,
                CLIENT_DATA.as_ptr(),
                shared as *mut c_void,
                Some(release),
            );
            if rc != ffi::SQLITE_OK {
                // On failure SQLite has already called `release`.
                return Err(StoreError::Backend(
                    format!("SQLite: could not attach the checkpoint hook (code {rc})").into(),
                ));
            }
            ffi::sqlite3_wal_hook(db, Some(after_commit), shared as *mut c_void);
        }
        Ok(())
    }

    /// Whether the thread finished a checkpoint the write connection asked
    /// for and the write connection has not yet copied the rest.
    #[cfg(test)]
    pub(super) fn copied(&self) -> bool {
        self.shared.phase.load(Ordering::Acquire) == COPIED
    }

    /// Ends the thread, once the checkpoint it may be running is done, and
    /// waits for it (off the async runtime).
    pub(super) async fn close(&self) {
        self.shared.stop();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Checkpointer {
    /// Ends the thread without waiting for it.
    fn drop(&mut self) {
        self.shared.stop();
    }
}

impl fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpointer").finish_non_exhaustive()
    }
}

/// The name the write connection's share of [`Shared`] is kept under.
const CLIENT_DATA: &CStr = c"fluxo.checkpoint";

/// Releases the write connection's share of [`Shared`] when SQLite closes it.
unsafe extern "C" fn release(shared: *mut c_void) {
    // SAFETY: `shared` came from `Arc::into_raw` in `Checkpointer::watch`
    // and is released once, here.
    drop(unsafe { Arc::from_raw(shared as *const Shared) });
}

/// The write connection's WAL hook: runs after each commit that wrote to
/// the log, with the log's length in pages, once the write lock is free.
unsafe extern "C" fn after_commit(
    shared: *mut c_void,
    db: *mut ffi::sqlite3,
    name: *const c_char,
    pages: c_int,
) -> c_int {
    // SAFETY: `shared` is kept alive by the connection's client data (see
    // `Checkpointer::watch`).
    let shared = unsafe { &*(shared as *const Shared) };
    let pages = i64::from(pages);
    let copy_here = match shared.phase.load(Ordering::Acquire) {
        IDLE if pages >= INLINE_PAGES => true,
        IDLE if pages >= CHECKPOINT_PAGES => {
            shared.request();
            false
        }
        COPIED => {
            shared.phase.store(IDLE, Ordering::Release);
            // A short log was started over since the thread copied it.
            pages >= CHECKPOINT_PAGES
        }
        _ => pages >= INLINE_PAGES,
    };
    if copy_here {
        // SAFETY: SQLite passes its open handle and the database's name;
        // checkpointing from the hook is allowed (SQLite's own hook does).
        // A busy checkpoint is tried again after a later commit.
        unsafe {
            ffi::sqlite3_wal_checkpoint_v2(
                db,
                name,
                ffi::SQLITE_CHECKPOINT_PASSIVE,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
        }
    }
    ffi::SQLITE_OK
}

/// The thread: one `PASSIVE` checkpoint per request, until closed.
fn run(conn: &Connection, db: Option<&Path>, shared: &Shared) {
    loop {
        {
            let mut closed = shared.lock();
            while shared.phase.load(Ordering::Acquire) != COPYING && !*closed {
                closed = shared
                    .wake
                    .wait(closed)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if *closed {
                return;
            }
        }
        let phase = match checkpoint(conn, db) {
            Ok(Pass::Busy) => IDLE,
            Ok(Pass::Copied) => COPIED,
            Err(e) => {
                tracing::debug!(error = %e, "SQLite: a background checkpoint failed");
                // The write connection then copies the log itself.
                COPIED
            }
        };
        shared.phase.store(phase, Ordering::Release);
    }
}

/// How a checkpoint pass of the thread ended.
enum Pass {
    /// Another connection (of another process) was checkpointing: nothing
    /// was copied, and the next commit asks again.
    Busy,
    /// What no reader still needed was copied and is on stable storage.
    Copied,
}

/// Copies what it can of the log into the database file at `db`, and
/// flushes it there.
fn checkpoint(conn: &Connection, db: Option<&Path>) -> StoreResult<Pass> {
    // A connection finds the log when it first reads the database; opened
    // on a fresh file, this one has not yet, and a checkpoint without the
    // log does nothing.
    conn.query_row("PRAGMA schema_version", [], |_| Ok(()))
        .map_err(db_err)?;
    let (busy, log, copied): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .map_err(db_err)?;
    if busy != 0 {
        return Ok(Pass::Busy);
    }
    // SQLite flushes the database file only when it copied up to the
    // log's end; when commits landed meanwhile, the pages it wrote would
    // be flushed by the write connection's checkpoint, inside a commit.
    // Flushing any descriptor of the file flushes them all.
    if copied < log {
        if let Some(db) = db {
            std::fs::File::open(db)
                .and_then(|file| file.sync_data())
                .map_err(|e| {
                    StoreError::Backend(
                        format!("flushing the database file {}: {e}", db.display()).into(),
                    )
                })?;
        }
    }
    Ok(Pass::Copied)
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::store::sqlite::tests::{Files, TempDb};
    use crate::store::sqlite::Synchronous;

    /// A checkpointer and the write connection it watches, on a fresh file.
    struct Setup {
        checkpoints: Arc<Checkpointer>,
        conn: Connection,
        file: Files,
    }

    fn setup() -> Setup {
        let file = Files(TempDb::path());
        let opener = Opener {
            path: Some(file.0.clone()),
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(5),
            checkpoints: None,
        };
        let checkpoints = Arc::new(Checkpointer::start(&opener).unwrap());
        let conn = Opener {
            checkpoints: Some(Arc::clone(&checkpoints)),
            ..opener
        }
        .open_and_migrate()
        .unwrap();
        conn.execute_batch("CREATE TABLE blobs (b BLOB NOT NULL)")
            .unwrap();
        Setup {
            checkpoints,
            conn,
            file,
        }
    }

    /// Pages in the log of the database at `db`, read from its
    /// shared-memory index (the `mxFrame` field of the index header, at
    /// byte 16 in native byte order; see SQLite's "WAL-mode file format"),
    /// so that reading it does not checkpoint.
    pub(in crate::store::sqlite) fn log_pages(db: &std::path::Path) -> i64 {
        let mut shm = db.as_os_str().to_owned();
        shm.push("-shm");
        let index = std::fs::read(shm).unwrap();
        i64::from(u32::from_ne_bytes(index[16..20].try_into().unwrap()))
    }

    impl Setup {
        /// Commits rows of 40 KiB (ten pages each) until the log holds at
        /// least `pages` pages, and returns the log's length in pages.
        fn write_until(&self, pages: i64) -> i64 {
            loop {
                self.conn
                    .execute("INSERT INTO blobs (b) VALUES (zeroblob(40960))", [])
                    .unwrap();
                let now = self.log_pages();
                if now >= pages {
                    return now;
                }
            }
        }

        fn log_pages(&self) -> i64 {
            log_pages(&self.file.0)
        }

        fn db_len(&self) -> u64 {
            std::fs::metadata(&self.file.0).unwrap().len()
        }
    }

    /// Waits until the thread finished a checkpoint it was asked for.
    pub(in crate::store::sqlite) async fn copied(checkpoints: &Checkpointer) {
        let start = Instant::now();
        while !checkpoints.copied() {
            assert!(start.elapsed() < Duration::from_secs(10), "no checkpoint");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Past `CHECKPOINT_PAGES` the thread copies the log into the database
    /// file, with no commit to run it; the next commit starts the log over.
    #[tokio::test]
    async fn the_thread_copies_the_log_and_the_next_commit_starts_it_over() {
        let s = setup();
        let before = s.db_len();
        s.write_until(CHECKPOINT_PAGES);
        copied(&s.checkpoints).await;
        assert!(
            s.db_len() > before + (2 << 20),
            "{before} -> {}",
            s.db_len()
        );
        let pages = s.write_until(0);
        assert!(pages <= 20, "the log started over: {pages} pages");
    }

    /// When the thread could not copy all of the log (a reader still used
    /// its end), the write connection copies the rest after its next
    /// commit, and the commit after that starts the log over.
    #[tokio::test]
    async fn the_write_connection_copies_what_the_thread_left() {
        let s = setup();
        s.write_until(CHECKPOINT_PAGES / 2);
        let mut reader = Connection::open(&s.file.0).unwrap();
        let snapshot = reader.transaction().unwrap();
        let rows: i64 = snapshot
            .query_row("SELECT count(*) FROM blobs", [], |row| row.get(0))
            .unwrap();
        let before = s.db_len();
        s.write_until(CHECKPOINT_PAGES);
        copied(&s.checkpoints).await;
        let partly = s.db_len();
        assert!(
            partly > before,
            "the thread copied up to the reader's snapshot"
        );
        snapshot.commit().unwrap();
        assert!(rows > 0);

        let pages = s.write_until(0);
        assert!(pages > CHECKPOINT_PAGES, "not started over yet: {pages}");
        assert!(s.db_len() > partly, "the write connection copied the rest");
        let pages = s.write_until(0);
        assert!(pages <= 20, "the log started over: {pages} pages");
    }

    /// Without the thread, the write connection copies nothing below
    /// `INLINE_PAGES`, and from there on checkpoints after its commits, so
    /// the log stays bounded.
    #[tokio::test]
    async fn without_the_thread_the_log_is_bounded_by_the_write_connection() {
        let s = setup();
        s.checkpoints.close().await;
        let before = s.db_len();
        let pages = s.write_until(INLINE_PAGES - 100);
        assert!(pages < INLINE_PAGES, "{pages}");
        assert_eq!(s.db_len(), before, "nothing copied below the bound");
        s.write_until(INLINE_PAGES);
        assert!(
            s.db_len() > before + (4 << 20),
            "{before} -> {}",
            s.db_len()
        );
        let pages = s.write_until(0);
        assert!(pages <= 20, "the log started over: {pages} pages");
    }

    /// Each watched connection holds one share of what the hook uses and
    /// gives it back when it closes; watching a connection again replaces
    /// its share.
    #[test]
    fn a_closed_connection_gives_back_its_share() {
        let Setup {
            checkpoints,
            conn,
            file: _file,
        } = setup();
        let with = Arc::strong_count(&checkpoints.shared);
        checkpoints.watch(&conn).unwrap();
        assert_eq!(Arc::strong_count(&checkpoints.shared), with);
        drop(conn);
        assert_eq!(Arc::strong_count(&checkpoints.shared), with - 1);
    }
}
