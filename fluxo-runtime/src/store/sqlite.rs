//! SQLite backend: the embedded default, one file next to the service.
//!
//! # Durability
//!
//! The database runs in WAL mode. With [`Synchronous::Full`] (the default)
//! every commit is flushed to stable storage before it returns: a step whose
//! commit returned survives a crash of the process, of the operating system,
//! or a power loss. With [`Synchronous::Normal`] a commit survives a crash of
//! the process, but the last commits before a power loss or an operating
//! system crash may be lost (the database is never corrupted); it saves the
//! flush on every commit.
//!
//! # Several processes
//!
//! Several processes may open the same file (on a local file system; WAL does
//! not work over network file systems). Every write transaction takes the
//! write lock when it starts (`BEGIN IMMEDIATE`), so writers queue on the lock
//! instead of deadlocking on a lock upgrade, waiting up to
//! [`SqliteOptions::busy_timeout`]. Inside one process all writes go through
//! one connection, so they queue in the process instead of on the file lock;
//! reads use a separate pool and run concurrently with writes.
//!
//! # Schema
//!
//! The schema is embedded in the crate and migrated when a store opens
//! (under the write lock, so concurrent openers apply it once).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row, Sqlite};
use tokio::sync::{Mutex, MutexGuard};

use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How hard SQLite works to make each commit durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// `synchronous=FULL`: a commit is on stable storage when it returns and
    /// survives a power loss. Costs a flush per commit.
    #[default]
    Full,
    /// `synchronous=NORMAL`: a commit survives a crash of the process; the
    /// last commits may be lost on a power loss or an operating system crash.
    Normal,
}

/// How to open a [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Database file; created when missing.
    pub path: PathBuf,
    /// Durability of commits. Default [`Synchronous::Full`].
    pub synchronous: Synchronous,
    /// How long a write waits for the file's write lock held by another
    /// process before failing. Default 5 seconds.
    pub busy_timeout: Duration,
    /// Connections used for reads. Writes always use one connection of their
    /// own. Default 4.
    pub max_connections: u32,
}

impl SqliteOptions {
    /// Default options for the database file at `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        SqliteOptions {
            path: path.as_ref().to_path_buf(),
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            max_connections: 4,
        }
    }

    /// Sets the durability of commits.
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// Sets how long a write waits for another process's write lock.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Sets the number of connections used for reads.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }
}

/// A [`Store`] in a SQLite database file.
pub struct SqliteStore {
    /// The one connection every write of this process goes through, in
    /// arrival order.
    writer: Mutex<WriteSlot>,
    /// How to open the write connection again after a failure; `None` for an
    /// in-memory database, which lives and dies with its connection.
    reopen: Option<SqliteConnectOptions>,
    /// Connections for reads; `None` when reads share the write connection
    /// (in-memory database).
    readers: Option<SqlitePool>,
    location: String,
}

/// The write connection.
struct WriteSlot {
    /// `None` once the store is closed (or while a replacement failed).
    conn: Option<SqliteConnection>,
    /// Set after a backend failure: the connection may be out of step with
    /// its driver (SQLite rolls a transaction back by itself on some I/O
    /// errors, unknown to the driver), so it is replaced before its next use.
    replace: bool,
}

/// Exclusive use of the write connection.
struct Writer<'a> {
    slot: MutexGuard<'a, WriteSlot>,
    replaceable: bool,
}

impl Writer<'_> {
    fn conn(&mut self) -> StoreResult<&mut SqliteConnection> {
        self.slot.conn.as_mut().ok_or_else(closed)
    }

    /// Notes how a use of the connection ended.
    fn done<T>(&mut self, result: &StoreResult<T>) {
        if let Err(e) = result {
            self.failed_with(e);
        }
    }

    fn failed_with(&mut self, e: &StoreError) {
        if self.replaceable && matches!(e, StoreError::Backend(_)) {
            self.slot.replace = true;
        }
    }
}

/// A connection to read with.
enum Reader<'a> {
    Pool(PoolConnection<Sqlite>),
    Writer(Writer<'a>),
}

impl Reader<'_> {
    fn conn(&mut self) -> StoreResult<&mut SqliteConnection> {
        match self {
            Reader::Pool(conn) => Ok(&mut **conn),
            Reader::Writer(writer) => writer.conn(),
        }
    }
}

fn closed() -> StoreError {
    StoreError::backend(sqlx::Error::PoolClosed)
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (or creates) the database file at `path` with default options.
    pub async fn open(path: impl AsRef<Path>) -> StoreResult<Self> {
        Self::open_with(SqliteOptions::new(path)).await
    }

    /// Opens (or creates) a database file.
    pub async fn open_with(options: SqliteOptions) -> StoreResult<Self> {
        let connect = SqliteConnectOptions::new()
            .filename(&options.path)
            .create_if_missing(true)
            .foreign_keys(false)
            .busy_timeout(options.busy_timeout)
            .synchronous(match options.synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            });
        // WAL is a property of the file: switching once, on the connection
        // that migrates, is enough for every other connection.
        let mut conn =
            SqliteConnection::connect_with(&connect.clone().journal_mode(SqliteJournalMode::Wal))
                .await
                .map_err(db_err)?;
        migrate(&mut conn).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .test_before_acquire(false)
            .connect_lazy_with(connect.clone());
        Ok(SqliteStore {
            writer: Mutex::new(WriteSlot {
                conn: Some(conn),
                replace: false,
            }),
            reopen: Some(connect),
            readers: Some(readers),
            location: options.path.display().to_string(),
        })
    }

    /// Opens a private in-memory database, gone when the store is dropped.
    /// For tests.
    pub async fn in_memory() -> StoreResult<Self> {
        let connect = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(false);
        let mut conn = SqliteConnection::connect_with(&connect)
            .await
            .map_err(db_err)?;
        migrate(&mut conn).await?;
        Ok(SqliteStore {
            writer: Mutex::new(WriteSlot {
                conn: Some(conn),
                replace: false,
            }),
            reopen: None,
            readers: None,
            location: ":memory:".to_owned(),
        })
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        let conn = {
            let mut slot = self.writer.lock().await;
            slot.replace = false;
            slot.conn.take()
        };
        if let Some(conn) = conn {
            if let Err(e) = conn.close().await {
                tracing::debug!(error = %e, "closing the write connection failed");
            }
        }
        if let Some(readers) = &self.readers {
            readers.close().await;
        }
    }

    /// Waits for the write connection.
    async fn writer(&self) -> StoreResult<Writer<'_>> {
        let mut slot = self.writer.lock().await;
        if slot.replace {
            if let Some(options) = &self.reopen {
                if let Some(old) = slot.conn.take() {
                    // It is being replaced because it failed: its own error
                    // when closing adds nothing.
                    let _ = old.close().await;
                }
                slot.conn = Some(
                    SqliteConnection::connect_with(options)
                        .await
                        .map_err(db_err)?,
                );
            }
            slot.replace = false;
        }
        Ok(Writer {
            slot,
            replaceable: self.reopen.is_some(),
        })
    }

    /// A connection for reads.
    async fn reader(&self) -> StoreResult<Reader<'_>> {
        match &self.readers {
            Some(pool) => Ok(Reader::Pool(pool.acquire().await.map_err(db_err)?)),
            None => Ok(Reader::Writer(self.writer().await?)),
        }
    }

    async fn commit_one(&self, commit: &Commit, now: Millis) -> StoreResult<CommitOutcome> {
        let mut w = self.writer().await?;
        let result = commit_tx(w.conn()?, commit, now).await;
        w.done(&result);
        result
    }

    async fn commit_group(&self, commits: &[Commit], now: Millis) -> GroupResult {
        let mut w = match self.writer().await {
            Ok(w) => w,
            Err(e) => return GroupResult::Failed(e),
        };
        let conn = match w.conn() {
            Ok(conn) => conn,
            Err(e) => return GroupResult::Failed(e),
        };
        let result = group_tx(conn, commits, now).await;
        if let GroupResult::Failed(e) | GroupResult::Retry(e) = &result {
            w.failed_with(e);
        }
        result
    }
}

/// How a group commit went.
enum GroupResult {
    /// Committed; one result per commit.
    Done(Vec<StoreResult<CommitOutcome>>),
    /// Failed in a way that fails every commit of the group.
    Failed(StoreError),
    /// One commit failed half-way (but not the database), so the
    /// transaction was rolled back and nothing was written: the commits are
    /// worth applying one by one.
    Retry(StoreError),
}

async fn begin(conn: &mut SqliteConnection) -> StoreResult<sqlx::Transaction<'_, Sqlite>> {
    conn.begin_with("BEGIN IMMEDIATE").await.map_err(db_err)
}

async fn commit_tx(
    conn: &mut SqliteConnection,
    commit: &Commit,
    now: Millis,
) -> StoreResult<CommitOutcome> {
    let mut tx = begin(conn).await?;
    // An error half-way drops the transaction, which rolls it back.
    match apply_commit(&mut tx, commit, now).await? {
        Ok(CommitOutcome::LeaseLost) => {
            tx.rollback().await.map_err(db_err)?;
            Ok(CommitOutcome::LeaseLost)
        }
        Ok(outcome) => {
            tx.commit().await.map_err(db_err)?;
            Ok(outcome)
        }
        Err(e) => {
            tx.rollback().await.map_err(db_err)?;
            Err(e)
        }
    }
}

async fn group_tx(conn: &mut SqliteConnection, commits: &[Commit], now: Millis) -> GroupResult {
    let mut tx = match begin(conn).await {
        Ok(tx) => tx,
        Err(e) => return GroupResult::Failed(e),
    };
    let mut out = Vec::with_capacity(commits.len());
    for c in commits {
        match apply_commit(&mut tx, c, now).await {
            Ok(r) => out.push(r),
            Err(e) => {
                return match tx.rollback().await {
                    // A commit of the group is at fault (a journal conflict):
                    // the others deserve their own transactions.
                    Ok(()) if !matches!(e, StoreError::Backend(_)) => GroupResult::Retry(e),
                    Ok(()) => GroupResult::Failed(e),
                    Err(rollback) => GroupResult::Failed(db_err(rollback)),
                };
            }
        }
    }
    match tx.commit().await {
        Ok(()) => GroupResult::Done(out),
        Err(e) => GroupResult::Failed(db_err(e)),
    }
}

async fn migrate(conn: &mut SqliteConnection) -> StoreResult<()> {
    // Under the write lock, so that processes opening a fresh file together
    // apply each migration once.
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
    MIGRATOR.run(&mut *tx).await.map_err(StoreError::backend)?;
    tx.commit().await.map_err(db_err)
}

// ---------------------------------------------------------------------------
// Statements

/// The columns [`record_from_row`] decodes, in order.
macro_rules! record_columns {
    () => {
        "id, workflow, version, status, input, output, failure, parent_id, \
         cancel_requested, history_format, created_at, updated_at"
    };
}

/// Number of columns in `record_columns!()`.
const RECORD_COLUMNS: usize = 12;

/// The fenced update that opens every commit: it checks the lease and the
/// journal position and applies the transition in one statement. Parameters:
/// ?1 id, ?2 lease token, ?3 number of events, ?4 now, ?5 first event id or
/// NULL, then the transition's own.
macro_rules! fenced_update {
    ($set:literal) => {
        concat!(
            "UPDATE instances SET next_event_id = next_event_id + ?3, updated_at = ?4",
            $set,
            " WHERE id = ?1 AND lease_token = ?2 AND lease_owner IS NOT NULL \
             AND status = 'running' AND (?5 IS NULL OR next_event_id = ?5) \
             RETURNING inbox_seq, cancel_requested, parent_id"
        )
    };
}

const FENCE_NONE: &str = fenced_update!("");
/// ?6 seen inbox sequence, ?7 wake-up time.
const FENCE_PARK: &str = fenced_update!(
    ", lease_owner = CASE WHEN inbox_seq = ?6 THEN NULL ELSE lease_owner END, \
     ready_at = CASE WHEN inbox_seq = ?6 THEN ?7 ELSE ready_at END"
);
const FENCE_RELEASE: &str = fenced_update!(", lease_owner = NULL, ready_at = ?4");
/// ?6 status, ?7 output, ?8 failure.
const FENCE_FINISH: &str =
    fenced_update!(", status = ?6, output = ?7, failure = ?8, lease_owner = NULL, ready_at = NULL");

/// Why a fenced update matched nothing.
const FENCE_DIAGNOSE: &str = "SELECT lease_token, lease_owner IS NOT NULL, status, next_event_id \
     FROM instances WHERE id = ?1";

const INSERT_EVENT: &str =
    "INSERT INTO history (instance_id, event_id, seq, kind, data, created_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

const DELETE_SIGNAL: &str = "DELETE FROM signals WHERE signal_id = ?1 AND instance_id = ?2";

const DELETE_INBOX: &str = "DELETE FROM signals WHERE instance_id = ?1";

const INSERT_INSTANCE: &str = "INSERT INTO instances \
     (id, workflow, version, status, input, parent_id, history_format, ready_at, created_at, updated_at) \
     VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?6, ?7, ?7, ?7) \
     ON CONFLICT (id) DO NOTHING";

/// Bumps the inbox of a running instance and makes it runnable.
const WAKE: &str =
    "UPDATE instances SET inbox_seq = inbox_seq + 1, ready_at = ?2, updated_at = ?2 \
     WHERE id = ?1 AND status = 'running'";

const REQUEST_CANCEL: &str = "UPDATE instances \
     SET cancel_requested = 1, inbox_seq = inbox_seq + 1, ready_at = ?2, updated_at = ?2 \
     WHERE id = ?1 AND status = 'running'";

const SELECT_STATUS: &str = "SELECT status FROM instances WHERE id = ?1";

const INSERT_SIGNAL: &str =
    "INSERT INTO signals (instance_id, name, payload, created_at) VALUES (?1, ?2, ?3, ?4)";

/// The oldest signal of a name and the inbox sequence, read together.
const NEXT_SIGNAL: &str = "SELECT i.inbox_seq, s.signal_id, s.payload FROM instances i \
     LEFT JOIN signals s ON s.signal_id = \
       (SELECT signal_id FROM signals WHERE instance_id = i.id AND name = ?2 \
        ORDER BY signal_id LIMIT 1) \
     WHERE i.id = ?1";

const RENEW: &str = "UPDATE instances SET lease_expires_at = ?2 WHERE lease_owner = ?1 \
     RETURNING id, cancel_requested";

/// Leases expired leases first, then due instances by wake-up time. ?1 owner,
/// ?2 lease expiry, ?3 now, ?4 JSON array of `workflow@version`, ?5 limit.
const CLAIM: &str = concat!(
    "UPDATE instances SET lease_token = lease_token + 1, lease_owner = ?1, lease_expires_at = ?2 \
     WHERE id IN (SELECT id FROM ( \
       SELECT id FROM (SELECT id FROM instances INDEXED BY instances_lease_expiry \
         WHERE lease_owner IS NOT NULL AND lease_expires_at <= ?3 AND status = 'running' \
           AND workflow || '@' || version IN (SELECT value FROM json_each(?4)) \
         ORDER BY lease_expires_at LIMIT ?5) \
       UNION ALL \
       SELECT id FROM (SELECT id FROM instances INDEXED BY instances_runnable \
         WHERE status = 'running' AND lease_owner IS NULL AND ready_at <= ?3 \
           AND workflow || '@' || version IN (SELECT value FROM json_each(?4)) \
         ORDER BY ready_at LIMIT ?5) \
     ) LIMIT ?5) \
     RETURNING ",
    record_columns!(),
    ", lease_token, next_event_id, inbox_seq"
);

/// ?1 now, ?2 JSON array of `workflow@version`.
const NEXT_WAKE: &str = "SELECT ready_at FROM instances INDEXED BY instances_runnable \
     WHERE status = 'running' AND lease_owner IS NULL AND ready_at > ?1 \
       AND workflow || '@' || version IN (SELECT value FROM json_each(?2)) \
     ORDER BY ready_at LIMIT 1";

const GET_INSTANCE: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM instances WHERE id = ?1"
);

const LIST_ALL: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM instances ORDER BY created_at DESC, rowid DESC LIMIT ?1"
);
const LIST_BY_WORKFLOW: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM instances WHERE workflow = ?2 ORDER BY created_at DESC, rowid DESC LIMIT ?1"
);
const LIST_BY_STATUS: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM instances WHERE status = ?2 ORDER BY created_at DESC, rowid DESC LIMIT ?1"
);
const LIST_BY_WORKFLOW_AND_STATUS: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM instances INDEXED BY instances_workflow_created WHERE workflow = ?2 AND status = ?3 \
     ORDER BY created_at DESC, rowid DESC LIMIT ?1"
);

/// The journal, with one row of NULLs for an instance without entries and
/// no row for an unknown instance.
const LOAD_HISTORY: &str = "SELECT h.event_id, h.seq, h.kind, h.data FROM instances i \
     LEFT JOIN history h ON h.instance_id = i.id WHERE i.id = ?1 ORDER BY h.event_id";

// ---------------------------------------------------------------------------
// Conversions

fn db_err(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(e.to_string()),
        e => StoreError::backend(e),
    }
}

/// A u64 as stored. Values beyond `i64::MAX` never occur in the database, so
/// they become -1, which matches nothing.
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(-1)
}

fn col<'r, T>(row: &'r SqliteRow, index: usize) -> StoreResult<T>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(index).map_err(db_err)
}

fn u64_col(row: &SqliteRow, index: usize, what: &str) -> StoreResult<u64> {
    let v: i64 = col(row, index)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {v}")))
}

fn u32_col(row: &SqliteRow, index: usize, what: &str) -> StoreResult<u32> {
    let v: i64 = col(row, index)?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {v}")))
}

fn record_from_row(row: &SqliteRow) -> StoreResult<InstanceRecord> {
    let status: String = col(row, 3)?;
    Ok(InstanceRecord {
        id: col(row, 0)?,
        workflow: col(row, 1)?,
        version: u32_col(row, 2, "workflow version")?,
        status: InstanceStatus::parse(&status)?,
        input: col(row, 4)?,
        output: col(row, 5)?,
        failure: col(row, 6)?,
        parent_id: col(row, 7)?,
        cancel_requested: col(row, 8)?,
        history_format: u32_col(row, 9, "history format")?,
        created_at: col(row, 10)?,
        updated_at: col(row, 11)?,
    })
}

fn workflow_keys(workflows: &[(String, u32)]) -> StoreResult<String> {
    let keys: Vec<String> = workflows.iter().map(|(w, v)| format!("{w}@{v}")).collect();
    serde_json::to_string(&keys).map_err(StoreError::backend)
}

fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

// ---------------------------------------------------------------------------
// Commits

/// Applies one commit inside an open write transaction.
///
/// `Ok(result)` means the transaction is still consistent: the commit was
/// applied entirely, or (for `LeaseLost` and errors in `result`) nothing of
/// it was written. `Err` means it failed half-way and the transaction must be
/// rolled back.
async fn apply_commit(
    conn: &mut SqliteConnection,
    c: &Commit,
    now: Millis,
) -> StoreResult<StoreResult<CommitOutcome>> {
    let first = c.events.first().map(|e| e.event_id);
    let consecutive = c
        .events
        .iter()
        .zip(first.unwrap_or(0)..)
        .all(|(e, expected)| e.event_id == expected);
    if !consecutive {
        return clean(diagnose(conn, c).await);
    }

    let id = c.instance_id.as_str();
    let token = sql_int(c.lease_token);
    let count = sql_int(c.events.len() as u64);
    let first = first.map(sql_int);
    let mut finished = false;
    let mut seen_inbox = None;
    let fence = match &c.transition {
        Transition::None => sqlx::query(FENCE_NONE)
            .bind(id)
            .bind(token)
            .bind(count)
            .bind(now)
            .bind(first),
        Transition::Park {
            wake_at,
            seen_inbox: seen,
        } => {
            seen_inbox = Some(*seen);
            sqlx::query(FENCE_PARK)
                .bind(id)
                .bind(token)
                .bind(count)
                .bind(now)
                .bind(first)
                .bind(sql_int(*seen))
                .bind(*wake_at)
        }
        Transition::Release => sqlx::query(FENCE_RELEASE)
            .bind(id)
            .bind(token)
            .bind(count)
            .bind(now)
            .bind(first),
        Transition::Complete { output } => {
            finished = true;
            sqlx::query(FENCE_FINISH)
                .bind(id)
                .bind(token)
                .bind(count)
                .bind(now)
                .bind(first)
                .bind(InstanceStatus::Completed.as_str())
                .bind(output.as_slice())
                .bind(None::<&[u8]>)
        }
        Transition::Fail { failure } | Transition::Cancel { failure } => {
            finished = true;
            let status = if matches!(c.transition, Transition::Fail { .. }) {
                InstanceStatus::Failed
            } else {
                InstanceStatus::Cancelled
            };
            sqlx::query(FENCE_FINISH)
                .bind(id)
                .bind(token)
                .bind(count)
                .bind(now)
                .bind(first)
                .bind(status.as_str())
                .bind(None::<&[u8]>)
                .bind(failure.as_slice())
        }
    };
    let Some(row) = fence.fetch_optional(&mut *conn).await.map_err(db_err)? else {
        return clean(diagnose(conn, c).await);
    };
    let inbox_seq = u64_col(&row, 0, "inbox sequence")?;
    let cancel_requested: bool = col(&row, 1)?;
    let parent_id: Option<String> = col(&row, 2)?;

    for e in &c.events {
        sqlx::query(INSERT_EVENT)
            .bind(id)
            .bind(sql_int(e.event_id))
            .bind(sql_int(e.seq))
            .bind(e.kind.as_str())
            .bind(e.data.as_slice())
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(|err| match err {
                sqlx::Error::Database(d) if d.is_unique_violation() => {
                    StoreError::Conflict(format!(
                        "instance {id:?}: journal entry {} is already stored",
                        e.event_id
                    ))
                }
                other => db_err(other),
            })?;
    }
    if finished {
        // A finished instance takes no more signals: its inbox goes, the
        // consumed signal with it.
        sqlx::query(DELETE_INBOX)
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    } else if let Some(sid) = c.consume_signal {
        sqlx::query(DELETE_SIGNAL)
            .bind(sql_int(sid))
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    }
    for new in &c.new_instances {
        insert_instance(&mut *conn, new, now).await?;
    }
    for target in &c.cancel_instances {
        // A child that does not exist (any more) or has finished needs no
        // cancelling.
        sqlx::query(REQUEST_CANCEL)
            .bind(target.as_str())
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    }
    if finished {
        if let Some(parent) = parent_id {
            sqlx::query(WAKE)
                .bind(parent)
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(db_err)?;
        }
    }
    Ok(Ok(match seen_inbox {
        Some(seen) if seen != inbox_seq => CommitOutcome::InboxChanged {
            inbox_seq,
            cancel_requested,
        },
        _ => CommitOutcome::Applied { cancel_requested },
    }))
}

/// Sorts the result of a step that wrote nothing: a backend failure may have
/// ended the transaction (SQLite rolls back by itself on some I/O errors), so
/// it is treated as a failure half-way.
fn clean(result: StoreResult<CommitOutcome>) -> StoreResult<StoreResult<CommitOutcome>> {
    match result {
        Err(e @ StoreError::Backend(_)) => Err(e),
        other => Ok(other),
    }
}

/// Explains, without writing, why a commit cannot be applied.
async fn diagnose(conn: &mut SqliteConnection, c: &Commit) -> StoreResult<CommitOutcome> {
    let row = sqlx::query(FENCE_DIAGNOSE)
        .bind(c.instance_id.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_err)?
        .ok_or_else(|| StoreError::NotFound(c.instance_id.clone()))?;
    let token = u64_col(&row, 0, "lease token")?;
    let leased: bool = col(&row, 1)?;
    let status: String = col(&row, 2)?;
    let status = InstanceStatus::parse(&status)?;
    if token != c.lease_token || !leased || status.is_finished() {
        return Ok(CommitOutcome::LeaseLost);
    }
    let next = u64_col(&row, 3, "next event id")?;
    if let Some((e, expected)) = c
        .events
        .iter()
        .zip(next..)
        .find(|(e, expected)| e.event_id != *expected)
    {
        return Err(StoreError::Conflict(format!(
            "instance {:?}: journal entry {} written where {} was expected",
            c.instance_id, e.event_id, expected
        )));
    }
    Err(StoreError::Conflict(format!(
        "instance {:?}: the journal changed during the commit",
        c.instance_id
    )))
}

async fn insert_instance(
    conn: &mut SqliteConnection,
    new: &NewInstance,
    now: Millis,
) -> StoreResult<bool> {
    let done = sqlx::query(INSERT_INSTANCE)
        .bind(new.id.as_str())
        .bind(new.workflow.as_str())
        .bind(i64::from(new.version))
        .bind(new.input.as_slice())
        .bind(new.parent_id.as_deref())
        .bind(i64::from(HISTORY_FORMAT))
        .bind(now)
        .execute(conn)
        .await
        .map_err(db_err)?;
    Ok(done.rows_affected() == 1)
}

/// The status of an instance, or `NotFound`.
async fn status_of(conn: &mut SqliteConnection, id: &str) -> StoreResult<InstanceStatus> {
    let status: Option<String> = sqlx::query_scalar(SELECT_STATUS)
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(db_err)?;
    match status {
        Some(s) => InstanceStatus::parse(&s),
        None => Err(StoreError::NotFound(id.to_owned())),
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend_name(&self) -> &'static str {
        "sqlite"
    }

    /// One transaction (one WAL flush) for many instances' commits.
    fn prefers_batches(&self) -> bool {
        true
    }

    async fn create_instance(&self, new: NewInstance) -> StoreResult<CreateOutcome> {
        let created = {
            let mut w = self.writer().await?;
            let result = insert_instance(w.conn()?, &new, now_millis()).await;
            w.done(&result);
            result?
        };
        if created {
            return Ok(CreateOutcome::Created);
        }
        // Instances are never deleted: the one in the way is still there.
        match self.get_instance(&new.id).await? {
            Some(existing) => Ok(CreateOutcome::Existing(existing)),
            None => Err(StoreError::Conflict(format!(
                "instance {:?} could neither be created nor read",
                new.id
            ))),
        }
    }

    async fn get_instance(&self, id: &str) -> StoreResult<Option<InstanceRecord>> {
        let mut r = self.reader().await?;
        let row = sqlx::query(GET_INSTANCE)
            .bind(id)
            .fetch_optional(r.conn()?)
            .await
            .map_err(db_err)?;
        row.as_ref().map(record_from_row).transpose()
    }

    async fn list_instances(&self, filter: ListFilter) -> StoreResult<Vec<InstanceRecord>> {
        let limit = i64::try_from(filter.limit.unwrap_or(100)).unwrap_or(i64::MAX);
        let status = filter.status.map(InstanceStatus::as_str);
        let query = match (filter.workflow.as_deref(), status) {
            (None, None) => sqlx::query(LIST_ALL).bind(limit),
            (Some(w), None) => sqlx::query(LIST_BY_WORKFLOW).bind(limit).bind(w),
            (None, Some(s)) => sqlx::query(LIST_BY_STATUS).bind(limit).bind(s),
            (Some(w), Some(s)) => sqlx::query(LIST_BY_WORKFLOW_AND_STATUS)
                .bind(limit)
                .bind(w)
                .bind(s),
        };
        let mut r = self.reader().await?;
        let rows = query.fetch_all(r.conn()?).await.map_err(db_err)?;
        rows.iter().map(record_from_row).collect()
    }

    async fn load_history(&self, id: &str) -> StoreResult<Vec<StoredEvent>> {
        let mut r = self.reader().await?;
        let rows = sqlx::query(LOAD_HISTORY)
            .bind(id)
            .fetch_all(r.conn()?)
            .await
            .map_err(db_err)?;
        if rows.is_empty() {
            return Err(StoreError::NotFound(id.to_owned()));
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(event_id) = col::<Option<i64>>(row, 0)? else {
                // The instance exists but has no journal yet.
                continue;
            };
            events.push(StoredEvent {
                event_id: u64::try_from(event_id).map_err(|_| {
                    StoreError::Corrupt(format!("journal entry id is negative: {event_id}"))
                })?,
                seq: u64_col(row, 1, "operation sequence")?,
                kind: col(row, 2)?,
                data: col(row, 3)?,
            });
        }
        Ok(events)
    }

    async fn claim(&self, req: &ClaimRequest) -> StoreResult<ClaimBatch> {
        if req.workflows.is_empty() {
            return Ok(ClaimBatch::default());
        }
        let mut w = self.writer().await?;
        let result = claim_tx(w.conn()?, req).await;
        w.done(&result);
        result
    }

    async fn renew_leases(&self, owner: &str, lease: Duration) -> StoreResult<Vec<String>> {
        let expires = now_millis().saturating_add(millis(lease));
        let rows = {
            let mut w = self.writer().await?;
            let result = sqlx::query(RENEW)
                .bind(owner)
                .bind(expires)
                .fetch_all(w.conn()?)
                .await
                .map_err(db_err);
            w.done(&result);
            result?
        };
        let mut cancelled = Vec::new();
        for row in &rows {
            if col::<bool>(row, 1)? {
                cancelled.push(col(row, 0)?);
            }
        }
        Ok(cancelled)
    }

    async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        self.commit_one(&commit, now_millis()).await
    }

    async fn commit_batch(&self, commits: Vec<Commit>) -> Vec<StoreResult<CommitOutcome>> {
        if commits.len() <= 1 {
            let mut out = Vec::with_capacity(commits.len());
            for c in &commits {
                out.push(self.commit_one(c, now_millis()).await);
            }
            return out;
        }
        match self.commit_group(&commits, now_millis()).await {
            GroupResult::Done(out) => out,
            GroupResult::Failed(e) => {
                let message = e.to_string();
                let mut out = Vec::with_capacity(commits.len());
                out.push(Err(e));
                out.extend(
                    (1..commits.len())
                        .map(|_| Err(StoreError::backend(std::io::Error::other(message.clone())))),
                );
                out
            }
            GroupResult::Retry(e) => {
                // Nothing of the group was written: apply the commits one by
                // one so that only the failing one fails.
                tracing::debug!(error = %e, "group commit failed; committing one by one");
                let mut out = Vec::with_capacity(commits.len());
                for c in &commits {
                    out.push(self.commit_one(c, now_millis()).await);
                }
                out
            }
        }
    }

    async fn send_signal(&self, id: &str, name: &str, payload: Vec<u8>) -> StoreResult<u64> {
        let mut w = self.writer().await?;
        let result = send_signal_tx(w.conn()?, id, name, &payload).await;
        w.done(&result);
        result
    }

    async fn next_signal(&self, id: &str, name: &str) -> StoreResult<(Option<InboxSignal>, u64)> {
        let mut r = self.reader().await?;
        let row = sqlx::query(NEXT_SIGNAL)
            .bind(id)
            .bind(name)
            .fetch_optional(r.conn()?)
            .await
            .map_err(db_err)?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let inbox_seq = u64_col(&row, 0, "inbox sequence")?;
        let signal = match col::<Option<i64>>(&row, 1)? {
            Some(sid) => Some(InboxSignal {
                signal_id: u64::try_from(sid)
                    .map_err(|_| StoreError::Corrupt(format!("signal id is negative: {sid}")))?,
                payload: col(&row, 2)?,
            }),
            None => None,
        };
        Ok((signal, inbox_seq))
    }

    async fn request_cancel(&self, id: &str) -> StoreResult<InstanceStatus> {
        let mut w = self.writer().await?;
        let result = request_cancel_tx(w.conn()?, id).await;
        w.done(&result);
        result
    }

    async fn continue_as_new(
        &self,
        id: &str,
        lease_token: u64,
        input: Vec<u8>,
    ) -> StoreResult<CommitOutcome> {
        let mut w = self.writer().await?;
        let result = continue_as_new_tx(w.conn()?, id, lease_token, &input).await;
        w.done(&result);
        result
    }
}

async fn continue_as_new_tx(
    conn: &mut SqliteConnection,
    id: &str,
    lease_token: u64,
    input: &[u8],
) -> StoreResult<CommitOutcome> {
    let mut tx = begin(conn).await?;
    let row: Option<(i64,)> = sqlx::query_as(
        "UPDATE instances SET input = ?1, next_event_id = 0, lease_owner = NULL, ready_at = ?2, \
         updated_at = ?2 WHERE id = ?3 AND lease_token = ?4 AND lease_owner IS NOT NULL \
         AND status = 'running' RETURNING cancel_requested",
    )
    .bind(input)
    .bind(now_millis())
    .bind(id)
    .bind(sql_int(lease_token))
    .fetch_optional(&mut *tx)
    .await
    .map_err(db_err)?;
    let Some((cancel_requested,)) = row else {
        return match status_of(&mut tx, id).await {
            Err(e) => Err(e),
            Ok(_) => Ok(CommitOutcome::LeaseLost),
        };
    };
    sqlx::query("DELETE FROM history WHERE instance_id = ?1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    Ok(CommitOutcome::Applied {
        cancel_requested: cancel_requested != 0,
    })
}

async fn claim_tx(conn: &mut SqliteConnection, req: &ClaimRequest) -> StoreResult<ClaimBatch> {
    let keys = workflow_keys(&req.workflows)?;
    let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
    let now = now_millis();
    let expires = now.saturating_add(millis(req.lease));
    let mut tx = begin(conn).await?;
    let rows = sqlx::query(CLAIM)
        .bind(req.owner.as_str())
        .bind(expires)
        .bind(now)
        .bind(keys.as_str())
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
    let next_wake: Option<Millis> = sqlx::query_scalar(NEXT_WAKE)
        .bind(now)
        .bind(keys.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_err)?;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in &rows {
        claimed.push(ClaimedInstance {
            record: record_from_row(row)?,
            lease_token: u64_col(row, RECORD_COLUMNS, "lease token")?,
            next_event_id: u64_col(row, RECORD_COLUMNS + 1, "next event id")?,
            inbox_seq: u64_col(row, RECORD_COLUMNS + 2, "inbox sequence")?,
        });
    }
    tx.commit().await.map_err(db_err)?;
    claimed.sort_by_key(|c| c.record.created_at);
    Ok(ClaimBatch {
        claimed,
        next_wake,
        more: false,
    })
}

async fn send_signal_tx(
    conn: &mut SqliteConnection,
    id: &str,
    name: &str,
    payload: &[u8],
) -> StoreResult<u64> {
    let now = now_millis();
    let mut tx = begin(conn).await?;
    let woken = sqlx::query(WAKE)
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    if woken.rows_affected() == 0 {
        // Unknown or finished: nothing was written.
        let status = status_of(&mut tx, id).await?;
        return Err(StoreError::Finished {
            id: id.to_owned(),
            status,
        });
    }
    let inserted = sqlx::query(INSERT_SIGNAL)
        .bind(id)
        .bind(name)
        .bind(payload)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    u64::try_from(inserted.last_insert_rowid())
        .map_err(|_| StoreError::Corrupt("negative signal id".to_owned()))
}

async fn request_cancel_tx(conn: &mut SqliteConnection, id: &str) -> StoreResult<InstanceStatus> {
    let mut tx = begin(conn).await?;
    let done = sqlx::query(REQUEST_CANCEL)
        .bind(id)
        .bind(now_millis())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    if done.rows_affected() == 0 {
        // Unknown or finished: nothing was written.
        return status_of(&mut tx, id).await;
    }
    tx.commit().await.map_err(db_err)?;
    Ok(InstanceStatus::Running)
}

#[cfg(test)]
mod tests {
    use std::ops::Deref;
    use std::path::PathBuf;

    use super::*;

    /// A store in a fresh file under the temporary directory, removed on drop.
    pub(super) struct TempDb {
        store: SqliteStore,
        path: PathBuf,
    }

    impl TempDb {
        pub(super) fn path() -> PathBuf {
            std::env::temp_dir().join(format!("fluxo-test-{}.db", uuid::Uuid::new_v4().simple()))
        }

        pub(super) async fn new() -> Self {
            let path = Self::path();
            let store = SqliteStore::open(&path)
                .await
                .expect("open a temporary database");
            TempDb { store, path }
        }
    }

    impl Deref for TempDb {
        type Target = SqliteStore;

        fn deref(&self) -> &SqliteStore {
            &self.store
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            remove_db(&self.path);
        }
    }

    fn remove_db(path: &Path) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }

    mod file {
        crate::store_conformance_tests!(async { super::TempDb::new().await });
    }

    mod in_memory {
        crate::store_conformance_tests!(async {
            Box::new(
                super::SqliteStore::in_memory()
                    .await
                    .expect("open an in-memory database"),
            )
        });
    }

    fn new_instance(workflow: &str) -> NewInstance {
        NewInstance {
            id: uuid::Uuid::new_v4().to_string(),
            workflow: workflow.to_owned(),
            version: 1,
            input: b"in".to_vec(),
            parent_id: None,
        }
    }

    fn claim_request(workflow: &str) -> ClaimRequest {
        ClaimRequest {
            owner: uuid::Uuid::new_v4().to_string(),
            workflows: vec![(workflow.to_owned(), 1)],
            limit: 10,
            lease: Duration::from_secs(60),
        }
    }

    fn event(event_id: u64) -> StoredEvent {
        StoredEvent {
            event_id,
            seq: event_id,
            kind: "step_completed".to_owned(),
            data: vec![event_id as u8],
        }
    }

    async fn started(store: &SqliteStore, workflow: &str) -> ClaimedInstance {
        let new = new_instance(workflow);
        store.create_instance(new).await.expect("create");
        let mut batch = store.claim(&claim_request(workflow)).await.expect("claim");
        assert_eq!(batch.claimed.len(), 1);
        batch.claimed.remove(0)
    }

    #[tokio::test]
    async fn whole_suite_on_one_shared_file() {
        let db = TempDb::new().await;
        conformance::run_all(&*db).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_stores_on_one_file_behave_as_one() {
        let db = TempDb::new().await;
        let other = SqliteStore::open(&db.path)
            .await
            .expect("open the same file again");
        tokio::join!(conformance::run_all(&*db), conformance::run_all(&other));

        // Claims from both never hand out the same instance.
        let wf = uuid::Uuid::new_v4().to_string();
        for _ in 0..30 {
            db.create_instance(new_instance(&wf)).await.expect("create");
        }
        let mut claims = Vec::new();
        for i in 0..6 {
            let store: &SqliteStore = if i % 2 == 0 { &db } else { &other };
            let mut req = claim_request(&wf);
            req.limit = 7;
            claims.push(async move { store.claim(&req).await.expect("claim") });
        }
        let batches = futures::future::join_all(claims).await;
        let mut seen = std::collections::HashSet::new();
        for c in batches.iter().flat_map(|b| &b.claimed) {
            assert!(
                seen.insert(c.record.id.clone()),
                "{} claimed twice",
                c.record.id
            );
        }
        assert_eq!(seen.len(), 30);
        other.close().await;
    }

    #[tokio::test]
    async fn data_survives_reopening() {
        let path = TempDb::path();
        let wf = "reopen";
        let (id, sid) = {
            let store = SqliteStore::open_with(
                SqliteOptions::new(&path)
                    .synchronous(Synchronous::Normal)
                    .busy_timeout(Duration::from_secs(1))
                    .max_connections(2),
            )
            .await
            .expect("open");
            let c = started(&store, wf).await;
            let commit = Commit {
                instance_id: c.record.id.clone(),
                lease_token: c.lease_token,
                events: vec![event(0), event(1)],
                transition: Transition::Park {
                    wake_at: None,
                    seen_inbox: c.inbox_seq,
                },
                ..Commit::default()
            };
            assert_eq!(
                store.commit(commit).await.expect("commit"),
                CommitOutcome::Applied {
                    cancel_requested: false
                }
            );
            let sid = store
                .send_signal(&c.record.id, "go", b"payload".to_vec())
                .await
                .expect("signal");
            store.close().await;
            (c.record.id, sid)
        };
        let store = SqliteStore::open(&path).await.expect("reopen");
        assert_eq!(
            store.load_history(&id).await.expect("history"),
            vec![event(0), event(1)]
        );
        let (signal, _) = store.next_signal(&id, "go").await.expect("next_signal");
        assert_eq!(
            signal.map(|s| (s.signal_id, s.payload)),
            Some((sid, b"payload".to_vec()))
        );
        let batch = store.claim(&claim_request(wf)).await.expect("claim");
        assert_eq!(batch.claimed.len(), 1);
        assert_eq!(batch.claimed[0].next_event_id, 2);
        // Signal ids keep increasing across restarts even when the newest was consumed.
        let commit = Commit {
            instance_id: id.clone(),
            lease_token: batch.claimed[0].lease_token,
            consume_signal: Some(sid),
            ..Commit::default()
        };
        store.commit(commit).await.expect("commit");
        let next = store.send_signal(&id, "go", vec![]).await.expect("signal");
        assert!(next > sid, "signal ids must not be reused");
        store.close().await;
        remove_db(&path);
    }

    #[tokio::test]
    async fn duplicate_journal_row_is_a_conflict_and_writes_nothing() {
        let db = TempDb::new().await;
        let a = started(&db, "dup-a").await;
        let b = started(&db, "dup-b").await;
        let c = started(&db, "dup-c").await;
        // A journal row the instance's counter does not know about.
        sqlx::query(INSERT_EVENT)
            .bind(b.record.id.as_str())
            .bind(1_i64)
            .bind(1_i64)
            .bind("stray")
            .bind(&b"x"[..])
            .bind(0_i64)
            .execute(db.writer().await.expect("writer").conn().expect("open"))
            .await
            .expect("insert a stray row");
        let commit = |c: &ClaimedInstance, events: Vec<StoredEvent>| Commit {
            instance_id: c.record.id.clone(),
            lease_token: c.lease_token,
            events,
            transition: Transition::Complete { output: vec![] },
            ..Commit::default()
        };
        match db.commit(commit(&b, vec![event(0), event(1)])).await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(
            db.load_history(&b.record.id).await.expect("history").len(),
            1
        );
        let results = db
            .commit_batch(vec![
                commit(&a, vec![event(0)]),
                commit(&b, vec![event(0), event(1)]),
                commit(&c, vec![event(0)]),
            ])
            .await;
        assert!(
            matches!(results[0], Ok(CommitOutcome::Applied { .. })),
            "{:?}",
            results[0]
        );
        assert!(
            matches!(results[1], Err(StoreError::Conflict(_))),
            "{:?}",
            results[1]
        );
        assert!(
            matches!(results[2], Ok(CommitOutcome::Applied { .. })),
            "{:?}",
            results[2]
        );
        let b_now = db
            .get_instance(&b.record.id)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(
            b_now.status,
            InstanceStatus::Running,
            "the failed commit wrote nothing"
        );
        for id in [&a.record.id, &c.record.id] {
            let r = db.get_instance(id).await.expect("get").expect("exists");
            assert_eq!(r.status, InstanceStatus::Completed);
        }
    }

    #[tokio::test]
    async fn undecodable_rows_are_corrupt() {
        let db = SqliteStore::in_memory().await.expect("open");
        let c = started(&db, "corrupt").await;
        sqlx::query("UPDATE instances SET status = 'sleeping' WHERE id = ?1")
            .bind(c.record.id.as_str())
            .execute(db.writer().await.expect("writer").conn().expect("open"))
            .await
            .expect("update");
        match db.get_instance(&c.record.id).await {
            Err(StoreError::Corrupt(_)) => {}
            other => panic!("expected Corrupt, got {other:?}"),
        }
        sqlx::query("UPDATE instances SET status = 'running', version = -1 WHERE id = ?1")
            .bind(c.record.id.as_str())
            .execute(db.writer().await.expect("writer").conn().expect("open"))
            .await
            .expect("update");
        match db.list_instances(ListFilter::default()).await {
            Err(StoreError::Corrupt(_)) => {}
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    async fn raw(db: &SqliteStore, sql: &str) {
        let mut w = db.writer().await.expect("writer");
        sqlx::query(sql)
            .execute(w.conn().expect("open"))
            .await
            .expect("raw statement");
    }

    /// A backend failure mid-commit leaves the store usable, on the same
    /// data (a file store replaces its write connection, an in-memory store
    /// keeps its only one).
    async fn recovers_from_a_failed_commit(db: &SqliteStore) {
        let c = started(db, "recover").await;
        raw(db, "ALTER TABLE history RENAME TO history_moved").await;
        let commit = |events| Commit {
            instance_id: c.record.id.clone(),
            lease_token: c.lease_token,
            events,
            ..Commit::default()
        };
        match db.commit(commit(vec![event(0)])).await {
            Err(StoreError::Backend(_)) => {}
            other => panic!("expected a backend error, got {other:?}"),
        }
        raw(db, "ALTER TABLE history_moved RENAME TO history").await;
        assert_eq!(
            db.commit(commit(vec![event(0)])).await.expect("commit"),
            CommitOutcome::Applied {
                cancel_requested: false
            }
        );
        assert_eq!(
            db.load_history(&c.record.id).await.expect("history"),
            vec![event(0)]
        );
    }

    #[tokio::test]
    async fn file_store_recovers_from_a_failed_commit() {
        let db = TempDb::new().await;
        recovers_from_a_failed_commit(&db).await;
    }

    #[tokio::test]
    async fn memory_store_recovers_from_a_failed_commit() {
        let db = SqliteStore::in_memory().await.expect("open");
        recovers_from_a_failed_commit(&db).await;
    }

    #[tokio::test]
    async fn closed_store_fails_cleanly() {
        let db = TempDb::new().await;
        db.close().await;
        match db.create_instance(new_instance("closed")).await {
            Err(StoreError::Backend(_)) => {}
            other => panic!("expected a backend error, got {other:?}"),
        }
        match db.get_instance("x").await {
            Err(StoreError::Backend(_)) => {}
            other => panic!("expected a backend error, got {other:?}"),
        }
    }

    async fn plan(db: &SqliteStore, sql: &str) -> String {
        let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
            .fetch_all(db.writer().await.expect("writer").conn().expect("open"))
            .await
            .expect("explain");
        let details: Vec<String> = rows
            .iter()
            .map(|r| r.try_get::<String, _>(3).expect("plan detail"))
            .collect();
        details.join("\n")
    }

    #[tokio::test]
    async fn statements_use_the_indexes() {
        let db = SqliteStore::in_memory().await.expect("open");
        for (name, sql) in [
            ("claim", CLAIM),
            ("next_wake", NEXT_WAKE),
            ("renew", RENEW),
            ("fence", FENCE_PARK),
            ("next_signal", NEXT_SIGNAL),
            ("load_history", LOAD_HISTORY),
            ("list_all", LIST_ALL),
            ("list_by_workflow", LIST_BY_WORKFLOW),
            ("list_by_status", LIST_BY_STATUS),
            ("list_by_both", LIST_BY_WORKFLOW_AND_STATUS),
            ("delete_inbox", DELETE_INBOX),
            ("delete_signal", DELETE_SIGNAL),
            ("wake", WAKE),
        ] {
            let plan = plan(&db, sql).await;
            println!("--- {name}\n{plan}");
            for line in plan.lines() {
                let full_scan = ["instances", "signals", "history"]
                    .iter()
                    .any(|t| line.starts_with(&format!("SCAN {t}")) && !line.contains("INDEX"));
                assert!(!full_scan, "{name} must not scan a table:\n{plan}");
                assert!(
                    !line.contains("TEMP B-TREE"),
                    "{name} must not sort:\n{plan}"
                );
            }
        }
        let claim = plan(&db, CLAIM).await;
        assert!(claim.contains("instances_runnable"), "{claim}");
        assert!(claim.contains("instances_lease_expiry"), "{claim}");
    }
}
