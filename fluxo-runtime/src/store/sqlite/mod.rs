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
//! reads use connections of their own and run concurrently with writes.
//!
//! # Threads
//!
//! Each connection lives on a thread of its own (`fluxo-sqlite-write-0`, and
//! `fluxo-sqlite-read-N` for reads), which runs whole jobs: a commit, with
//! every statement of its transaction, is one hand-off from the async
//! runtime to the write thread and one back. A third kind of thread,
//! `fluxo-sqlite-checkpoint`, copies the write-ahead log back into the
//! database file on a connection of its own, so that a commit does not wait
//! for that every thousand log pages as it would by default; the commit
//! after it only checkpoints what was committed while it ran. SQLite is
//! compiled into the crate (no system library needed).
//!
//! # Schema
//!
//! The schema is embedded in the crate and migrated when a store opens
//! (under the write lock, so concurrent openers apply it once). The file's
//! `PRAGMA user_version` counts the migrations applied; a file written by a
//! newer Fluxo, with migrations this build does not know, is refused with
//! [`StoreError::Unsupported`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::FromSql;
use rusqlite::{params, Connection, OptionalExtension, Params, Row, TransactionBehavior};

use super::*;

mod checkpoint;
mod creates;
mod open;
mod threads;

use checkpoint::Checkpointer;
use creates::Creates;
use open::Opener;
use threads::{Slot, Threads};

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
    /// Connections used for reads, each on a thread of its own, all opened
    /// with the store. Writes always use one connection of their own.
    /// Default 4.
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
    /// The thread of the one connection every write of this process goes
    /// through, in arrival order.
    writer: Threads,
    /// Threads of the connections for reads; `None` when reads share the
    /// write connection (in-memory database).
    readers: Option<Threads>,
    /// Runs the checkpoints of what the write connection writes; `None`
    /// for an in-memory database, which has no log.
    checkpoints: Option<Arc<Checkpointer>>,
    /// Creates waiting to be inserted together.
    creates: Creates,
    location: String,
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
        let opener = Opener {
            path: Some(options.path.clone()),
            synchronous: options.synchronous,
            busy_timeout: options.busy_timeout,
            checkpoints: None,
        };
        let readers = options.max_connections.max(1) as usize;
        // Opening waits for the file's write lock to migrate: off the runtime.
        let (writer, readers, checkpoints) = tokio::task::spawn_blocking(move || {
            let checkpoints = Arc::new(Checkpointer::start(&opener)?);
            let write_opener = Opener {
                checkpoints: Some(Arc::clone(&checkpoints)),
                ..opener.clone()
            };
            let writer = write_opener.open_and_migrate()?;
            let readers = (0..readers)
                .map(|_| opener.open())
                .collect::<StoreResult<Vec<_>>>()?;
            Ok::<_, StoreError>((
                Threads::start("sqlite-write", vec![writer], Some(write_opener))?,
                Threads::start("sqlite-read", readers, Some(opener))?,
                checkpoints,
            ))
        })
        .await
        .map_err(StoreError::backend)??;
        Ok(SqliteStore {
            writer,
            readers: Some(readers),
            checkpoints: Some(checkpoints),
            creates: Creates::default(),
            location: options.path.display().to_string(),
        })
    }

    /// Opens a private in-memory database, gone when the store is dropped.
    /// For tests.
    pub async fn in_memory() -> StoreResult<Self> {
        let opener = Opener {
            path: None,
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            checkpoints: None,
        };
        // The database lives and dies with its only connection, which is
        // never replaced.
        let conn = opener.open_and_migrate()?;
        Ok(SqliteStore {
            writer: Threads::start("sqlite-memory", vec![conn], None)?,
            readers: None,
            checkpoints: None,
            creates: Creates::default(),
            location: ":memory:".to_owned(),
        })
    }

    /// Closes every connection once the work already queued is done; later
    /// calls fail.
    pub async fn close(&self) {
        self.writer.close().await;
        if let Some(readers) = &self.readers {
            readers.close().await;
        }
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.close().await;
        }
    }

    /// Runs `f` on the write connection.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        self.writer.run(f).await
    }

    /// Runs `f` on a read connection.
    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        self.readers.as_ref().unwrap_or(&self.writer).run(f).await
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

fn begin(conn: &mut Connection) -> StoreResult<rusqlite::Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)
}

fn commit_tx(conn: &mut Connection, commit: &Commit, now: Millis) -> StoreResult<CommitOutcome> {
    let tx = begin(conn)?;
    // An error half-way drops the transaction, which rolls it back.
    match apply_commit(&tx, commit, now)? {
        Ok(CommitOutcome::LeaseLost) => {
            tx.rollback().map_err(db_err)?;
            Ok(CommitOutcome::LeaseLost)
        }
        Ok(outcome) => {
            tx.commit().map_err(db_err)?;
            Ok(outcome)
        }
        Err(e) => {
            tx.rollback().map_err(db_err)?;
            Err(e)
        }
    }
}

fn group_tx(conn: &mut Connection, commits: &[Commit], now: Millis) -> GroupResult {
    let tx = match begin(conn) {
        Ok(tx) => tx,
        Err(e) => return GroupResult::Failed(e),
    };
    let mut out = Vec::with_capacity(commits.len());
    for c in commits {
        match apply_commit(&tx, c, now) {
            Ok(r) => out.push(r),
            Err(e) => {
                return match tx.rollback() {
                    // A commit of the group is at fault (a journal conflict):
                    // the others deserve their own transactions.
                    Ok(()) if !matches!(e, StoreError::Backend(_)) => GroupResult::Retry(e),
                    Ok(()) => GroupResult::Failed(e),
                    Err(rollback) => GroupResult::Failed(db_err(rollback)),
                };
            }
        }
    }
    match tx.commit() {
        Ok(()) => GroupResult::Done(out),
        Err(e) => GroupResult::Failed(db_err(e)),
    }
}

/// Writes `commits` on the write thread: one transaction for all, or, when
/// one of them spoils the group, one transaction each.
fn commit_batch_on(slot: &mut Slot, commits: &[Commit]) -> Vec<StoreResult<CommitOutcome>> {
    let one_by_one = |slot: &mut Slot| {
        commits
            .iter()
            .map(|c| slot.with_conn(|conn| commit_tx(conn, c, now_millis())))
            .collect()
    };
    if commits.len() <= 1 {
        return one_by_one(slot);
    }
    let group = match slot.conn() {
        Ok(conn) => group_tx(conn, commits, now_millis()),
        Err(e) => GroupResult::Failed(e),
    };
    match group {
        GroupResult::Done(out) => out,
        GroupResult::Failed(e) => {
            slot.note_error(&e);
            all_failed(e, commits.len())
        }
        GroupResult::Retry(e) => {
            // Nothing of the group was written: apply the commits one by
            // one so that only the failing one fails.
            tracing::debug!(error = %e, "group commit failed; committing one by one");
            one_by_one(slot)
        }
    }
}

// ---------------------------------------------------------------------------
// Statements

/// The last journal entry's `$column` of the `instances` row at hand, or
/// `$otherwise` when its journal is empty.
///
/// A step's commit adds its entry without touching the instance's row (one
/// page written instead of two: `FENCE_ENTRIES`), so the journal's end
/// and the time of the last step are read from the journal itself, one seek
/// of its primary key.
macro_rules! journal_end {
    ($column:literal, $otherwise:literal) => {
        concat!(
            "COALESCE((SELECT h.",
            $column,
            " FROM history h WHERE h.instance_id = instances.id \
             ORDER BY h.event_id DESC LIMIT 1), ",
            $otherwise,
            ")"
        )
    };
}

/// The number of journal entries of the `instances` row at hand: its next
/// event id.
macro_rules! next_event_id {
    () => {
        journal_end!("event_id + 1", "0")
    };
}

/// The columns [`record_from_row`] decodes, in order. `updated_at` is the
/// later of the row's own stamp and its last journal entry's.
macro_rules! record_columns {
    () => {
        concat!(
            "id, workflow, version, status, input, output, failure, parent_id, \
             cancel_requested, history_format, created_at, \
             MAX(updated_at, ",
            journal_end!("created_at", "updated_at"),
            ")"
        )
    };
}

/// Number of columns in `record_columns!()`.
const RECORD_COLUMNS: usize = 12;

/// The lease and journal checks that open every commit: the instance is
/// running under lease token ?2 and, when the commit adds entries, its
/// journal ends right before the first (?3 first event id, or NULL).
macro_rules! fence {
    () => {
        concat!(
            "id = ?1 AND lease_token = ?2 AND lease_owner IS NOT NULL \
             AND status = 'running' AND (?3 IS NULL OR ",
            next_event_id!(),
            " = ?3)"
        )
    };
}

/// The fence of a commit that only adds journal entries (a step's): read,
/// not written, so that the commit writes the journal's page alone. It
/// holds until the transaction ends: every write transaction takes the
/// file's write lock when it begins. Parameters as in `fence!`.
const FENCE_ENTRIES: &str = concat!(
    "SELECT inbox_seq, cancel_requested, parent_id FROM instances WHERE ",
    fence!()
);

/// The fence of every other commit, which applies its transition in the
/// same statement. Parameters as in `fence!`, then ?4 now and the
/// transition's own.
macro_rules! fenced_update {
    ($set:literal) => {
        concat!(
            "UPDATE instances SET updated_at = ?4",
            $set,
            " WHERE ",
            fence!(),
            " RETURNING inbox_seq, cancel_requested, parent_id"
        )
    };
}

const FENCE_NONE: &str = fenced_update!("");
/// ?5 seen inbox sequence, ?6 wake-up time.
const FENCE_PARK: &str = fenced_update!(
    ", lease_owner = CASE WHEN inbox_seq = ?5 THEN NULL ELSE lease_owner END, \
     ready_at = CASE WHEN inbox_seq = ?5 THEN ?6 ELSE ready_at END"
);
const FENCE_RELEASE: &str = fenced_update!(", lease_owner = NULL, ready_at = ?4");
/// ?5 status, ?6 output, ?7 failure.
const FENCE_FINISH: &str =
    fenced_update!(", status = ?5, output = ?6, failure = ?7, lease_owner = NULL, ready_at = NULL");

/// Why a fence matched nothing.
const FENCE_DIAGNOSE: &str = concat!(
    "SELECT lease_token, lease_owner IS NOT NULL, status, ",
    next_event_id!(),
    " FROM instances WHERE id = ?1"
);

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

/// ?1 owner, ?2 lease expiry, ?3 JSON array of instance ids.
const RENEW: &str = "UPDATE instances SET lease_expires_at = ?2 \
     WHERE id IN (SELECT value FROM json_each(?3)) AND lease_owner = ?1 \
     RETURNING id, cancel_requested";

/// ?1 owner, ?2 now.
const END_LEASES: &str = "UPDATE instances SET lease_expires_at = ?2 WHERE lease_owner = ?1";

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
    ", lease_token, ",
    next_event_id!(),
    ", inbox_seq"
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

fn db_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::Error as E;
    match e {
        E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::Utf8Error(_)
        | E::InvalidColumnIndex(_)
        | E::InvalidColumnName(_)
        | E::InvalidColumnType(..) => StoreError::Corrupt(e.to_string()),
        e => StoreError::backend(e),
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    use rusqlite::ffi;
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                || f.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE
    )
}

/// A u64 as stored. Values beyond `i64::MAX` never occur in the database, so
/// they become -1, which matches nothing.
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(-1)
}

fn col<T: FromSql>(row: &Row<'_>, index: usize) -> StoreResult<T> {
    row.get(index).map_err(db_err)
}

fn u64_col(row: &Row<'_>, index: usize, what: &str) -> StoreResult<u64> {
    let v: i64 = col(row, index)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {v}")))
}

fn u32_col(row: &Row<'_>, index: usize, what: &str) -> StoreResult<u32> {
    let v: i64 = col(row, index)?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {v}")))
}

fn record_from_row(row: &Row<'_>) -> StoreResult<InstanceRecord> {
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

/// Runs a cached statement and decodes its first row, if any.
fn fetch_optional<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    decode: impl FnOnce(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Option<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let mut rows = stmt.query(params).map_err(db_err)?;
    match rows.next().map_err(db_err)? {
        Some(row) => decode(row).map(Some),
        None => Ok(None),
    }
}

/// Runs a cached statement and decodes every row.
fn fetch_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    mut decode: impl FnMut(&Row<'_>) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let mut rows = stmt.query(params).map_err(db_err)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(db_err)? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// Runs a cached statement that returns no rows; the number of rows changed.
fn execute(conn: &Connection, sql: &str, params: impl Params) -> StoreResult<usize> {
    conn.prepare_cached(sql)
        .map_err(db_err)?
        .execute(params)
        .map_err(db_err)
}

fn workflow_keys(workflows: &[(String, u32)]) -> StoreResult<String> {
    let keys: Vec<String> = workflows.iter().map(|(w, v)| format!("{w}@{v}")).collect();
    serde_json::to_string(&keys).map_err(StoreError::backend)
}

// ---------------------------------------------------------------------------
// Commits

/// Applies one commit inside an open write transaction.
///
/// `Ok(result)` means the transaction is still consistent: the commit was
/// applied entirely, or (for `LeaseLost` and errors in `result`) nothing of
/// it was written. `Err` means it failed half-way and the transaction must be
/// rolled back.
fn apply_commit(
    conn: &Connection,
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
        return clean(diagnose(conn, c));
    }

    let id = c.instance_id.as_ref();
    let token = sql_int(c.lease_token);
    let first = first.map(sql_int);
    let entries_only =
        c.consume_signal.is_none() && c.new_instances.is_empty() && c.cancel_instances.is_empty();
    let mut finished = false;
    let mut seen_inbox = None;
    let fence_row = |row: &Row<'_>| -> StoreResult<(u64, bool, Option<String>)> {
        Ok((
            u64_col(row, 0, "inbox sequence")?,
            col(row, 1)?,
            col(row, 2)?,
        ))
    };
    let fenced = match &c.transition {
        Transition::None if entries_only => {
            fetch_optional(conn, FENCE_ENTRIES, params![id, token, first], fence_row)
        }
        Transition::None => {
            fetch_optional(conn, FENCE_NONE, params![id, token, first, now], fence_row)
        }
        Transition::Park {
            wake_at,
            seen_inbox: seen,
        } => {
            seen_inbox = Some(*seen);
            fetch_optional(
                conn,
                FENCE_PARK,
                params![id, token, first, now, sql_int(*seen), wake_at],
                fence_row,
            )
        }
        Transition::Release => fetch_optional(
            conn,
            FENCE_RELEASE,
            params![id, token, first, now],
            fence_row,
        ),
        Transition::Complete { output } => {
            finished = true;
            fetch_optional(
                conn,
                FENCE_FINISH,
                params![
                    id,
                    token,
                    first,
                    now,
                    InstanceStatus::Completed.as_str(),
                    output.as_slice(),
                    None::<&[u8]>
                ],
                fence_row,
            )
        }
        Transition::Fail { failure } | Transition::Cancel { failure } => {
            finished = true;
            let status = if matches!(c.transition, Transition::Fail { .. }) {
                InstanceStatus::Failed
            } else {
                InstanceStatus::Cancelled
            };
            fetch_optional(
                conn,
                FENCE_FINISH,
                params![
                    id,
                    token,
                    first,
                    now,
                    status.as_str(),
                    None::<&[u8]>,
                    failure.as_slice()
                ],
                fence_row,
            )
        }
    }?;
    let Some((inbox_seq, cancel_requested, parent_id)) = fenced else {
        return clean(diagnose(conn, c));
    };

    if !c.events.is_empty() {
        let mut insert = conn.prepare_cached(INSERT_EVENT).map_err(db_err)?;
        for e in &c.events {
            insert
                .execute(params![
                    id,
                    sql_int(e.event_id),
                    sql_int(e.seq),
                    e.kind.as_ref(),
                    e.data.as_slice(),
                    now
                ])
                .map_err(|err| {
                    if is_unique_violation(&err) {
                        StoreError::Conflict(format!(
                            "instance {id:?}: journal entry {} is already stored",
                            e.event_id
                        ))
                    } else {
                        db_err(err)
                    }
                })?;
        }
    }
    if finished {
        // A finished instance takes no more signals: its inbox goes, the
        // consumed signal with it.
        execute(conn, DELETE_INBOX, params![id])?;
    } else if let Some(sid) = c.consume_signal {
        execute(conn, DELETE_SIGNAL, params![sql_int(sid), id])?;
    }
    for new in &c.new_instances {
        insert_instance(conn, new, now)?;
    }
    for target in &c.cancel_instances {
        // A child that does not exist (any more) or has finished needs no
        // cancelling.
        execute(conn, REQUEST_CANCEL, params![target.as_str(), now])?;
    }
    if finished {
        if let Some(parent) = parent_id {
            execute(conn, WAKE, params![parent, now])?;
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
fn diagnose(conn: &Connection, c: &Commit) -> StoreResult<CommitOutcome> {
    let (token, leased, status, next) = fetch_optional(
        conn,
        FENCE_DIAGNOSE,
        params![c.instance_id.as_ref()],
        |row| {
            let status: String = col(row, 2)?;
            Ok((
                u64_col(row, 0, "lease token")?,
                col::<bool>(row, 1)?,
                InstanceStatus::parse(&status)?,
                u64_col(row, 3, "next event id")?,
            ))
        },
    )?
    .ok_or_else(|| StoreError::NotFound(c.instance_id.to_string()))?;
    if token != c.lease_token || !leased || status.is_finished() {
        return Ok(CommitOutcome::LeaseLost);
    }
    Err(journal_conflict(c, next))
}

fn insert_instance(conn: &Connection, new: &NewInstance, now: Millis) -> StoreResult<bool> {
    let inserted = execute(
        conn,
        INSERT_INSTANCE,
        params![
            new.id.as_str(),
            new.workflow.as_str(),
            i64::from(new.version),
            new.input.as_slice(),
            new.parent_id.as_deref(),
            i64::from(HISTORY_FORMAT),
            now
        ],
    )?;
    Ok(inserted == 1)
}

/// The status of an instance, or `NotFound`.
fn status_of(conn: &Connection, id: &str) -> StoreResult<InstanceStatus> {
    let status: Option<String> = conn
        .prepare_cached(SELECT_STATUS)
        .map_err(db_err)?
        .query_row(params![id], |row| row.get(0))
        .optional()
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

    fn commits_here(&self) -> bool {
        true
    }

    fn try_commit_here(&self, commit: &Commit) -> Option<StoreResult<CommitOutcome>> {
        self.writer
            .try_run_here(|conn| commit_tx(conn, commit, now_millis()))
    }

    async fn create_instance(&self, new: NewInstance) -> StoreResult<CreateOutcome> {
        let id = new.id.clone();
        let created = self.creates.create(&self.writer, new).await?;
        if created {
            return Ok(CreateOutcome::Created);
        }
        // Instances are never deleted: the one in the way is still there.
        match self.get_instance(&id).await? {
            Some(existing) => Ok(CreateOutcome::Existing(existing)),
            None => Err(StoreError::Conflict(format!(
                "instance {id:?} could neither be created nor read"
            ))),
        }
    }

    async fn get_instance(&self, id: &str) -> StoreResult<Option<InstanceRecord>> {
        let id = id.to_owned();
        self.read(move |conn| fetch_optional(conn, GET_INSTANCE, params![id], record_from_row))
            .await
    }

    async fn list_instances(&self, filter: ListFilter) -> StoreResult<Vec<InstanceRecord>> {
        let limit = i64::try_from(filter.limit.unwrap_or(100)).unwrap_or(i64::MAX);
        let status = filter.status.map(InstanceStatus::as_str);
        self.read(move |conn| match (filter.workflow.as_deref(), status) {
            (None, None) => fetch_all(conn, LIST_ALL, params![limit], record_from_row),
            (Some(w), None) => {
                fetch_all(conn, LIST_BY_WORKFLOW, params![limit, w], record_from_row)
            }
            (None, Some(s)) => fetch_all(conn, LIST_BY_STATUS, params![limit, s], record_from_row),
            (Some(w), Some(s)) => fetch_all(
                conn,
                LIST_BY_WORKFLOW_AND_STATUS,
                params![limit, w, s],
                record_from_row,
            ),
        })
        .await
    }

    async fn load_history(&self, id: &str) -> StoreResult<Vec<StoredEvent>> {
        let id = id.to_owned();
        self.read(move |conn| {
            let rows = fetch_all(conn, LOAD_HISTORY, params![id], |row| {
                let Some(event_id) = col::<Option<i64>>(row, 0)? else {
                    // The instance exists but has no journal yet.
                    return Ok(None);
                };
                Ok(Some(StoredEvent {
                    event_id: u64::try_from(event_id).map_err(|_| {
                        StoreError::Corrupt(format!("journal entry id is negative: {event_id}"))
                    })?,
                    seq: u64_col(row, 1, "operation sequence")?,
                    kind: col::<String>(row, 2)?.into(),
                    data: col(row, 3)?,
                }))
            })?;
            if rows.is_empty() {
                return Err(StoreError::NotFound(id));
            }
            Ok(rows.into_iter().flatten().collect())
        })
        .await
    }

    async fn claim(&self, req: &ClaimRequest) -> StoreResult<ClaimBatch> {
        if req.workflows.is_empty() {
            return Ok(ClaimBatch::default());
        }
        let keys = workflow_keys(&req.workflows)?;
        let owner = req.owner.clone();
        let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
        let lease = req.lease;
        self.write(move |conn| claim_tx(conn, &owner, &keys, limit, lease))
            .await
    }

    async fn renew_leases(
        &self,
        owner: &str,
        ids: &[String],
        lease: Duration,
    ) -> StoreResult<Vec<String>> {
        let expires = now_millis().saturating_add(duration_millis(lease));
        let owner = owner.to_owned();
        let ids = serde_json::to_string(ids).map_err(StoreError::backend)?;
        let rows = self
            .write(move |conn| {
                fetch_all(conn, RENEW, params![owner, expires, ids], |row| {
                    Ok((col::<String>(row, 0)?, col::<bool>(row, 1)?))
                })
            })
            .await?;
        let mut cancelled: Vec<String> = rows
            .into_iter()
            .filter(|(_, cancelled)| *cancelled)
            .map(|(id, _)| id)
            .collect();
        cancelled.sort();
        Ok(cancelled)
    }

    async fn end_leases(&self, owner: &str) -> StoreResult<()> {
        let owner = owner.to_owned();
        self.write(move |conn| execute(conn, END_LEASES, params![owner, now_millis()]))
            .await
            .map(drop)
    }

    async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        self.write(move |conn| commit_tx(conn, &commit, now_millis()))
            .await
    }

    async fn commit_batch(&self, commits: Vec<Commit>) -> Vec<StoreResult<CommitOutcome>> {
        let n = commits.len();
        match self
            .writer
            .run_on_slot(move |slot| commit_batch_on(slot, &commits))
            .await
        {
            Ok(out) => out,
            // The write thread is gone: every commit fails alike.
            Err(e) => all_failed(e, n),
        }
    }

    async fn send_signal(&self, id: &str, name: &str, payload: Vec<u8>) -> StoreResult<u64> {
        let (id, name) = (id.to_owned(), name.to_owned());
        self.write(move |conn| send_signal_tx(conn, &id, &name, &payload))
            .await
    }

    async fn next_signal(&self, id: &str, name: &str) -> StoreResult<(Option<InboxSignal>, u64)> {
        let (id, name) = (id.to_owned(), name.to_owned());
        self.read(move |conn| {
            fetch_optional(conn, NEXT_SIGNAL, params![id, name], |row| {
                let inbox_seq = u64_col(row, 0, "inbox sequence")?;
                let signal = match col::<Option<i64>>(row, 1)? {
                    Some(sid) => Some(InboxSignal {
                        signal_id: u64::try_from(sid).map_err(|_| {
                            StoreError::Corrupt(format!("signal id is negative: {sid}"))
                        })?,
                        payload: col(row, 2)?,
                    }),
                    None => None,
                };
                Ok((signal, inbox_seq))
            })?
            .ok_or(StoreError::NotFound(id))
        })
        .await
    }

    async fn request_cancel(&self, id: &str) -> StoreResult<InstanceStatus> {
        let id = id.to_owned();
        self.write(move |conn| request_cancel_tx(conn, &id)).await
    }

    async fn continue_as_new(
        &self,
        id: &str,
        lease_token: u64,
        input: Vec<u8>,
    ) -> StoreResult<CommitOutcome> {
        let id = id.to_owned();
        self.write(move |conn| continue_as_new_tx(conn, &id, lease_token, &input))
            .await
    }
}

fn continue_as_new_tx(
    conn: &mut Connection,
    id: &str,
    lease_token: u64,
    input: &[u8],
) -> StoreResult<CommitOutcome> {
    let tx = begin(conn)?;
    let restarted = fetch_optional(
        &tx,
        "UPDATE instances SET input = ?1, lease_owner = NULL, ready_at = ?2, \
         updated_at = ?2 WHERE id = ?3 AND lease_token = ?4 AND lease_owner IS NOT NULL \
         AND status = 'running' RETURNING cancel_requested",
        params![input, now_millis(), id, sql_int(lease_token)],
        |row| col::<bool>(row, 0),
    )?;
    let Some(cancel_requested) = restarted else {
        return status_of(&tx, id).map(|_| CommitOutcome::LeaseLost);
    };
    execute(
        &tx,
        "DELETE FROM history WHERE instance_id = ?1",
        params![id],
    )?;
    tx.commit().map_err(db_err)?;
    Ok(CommitOutcome::Applied { cancel_requested })
}

fn claim_tx(
    conn: &mut Connection,
    owner: &str,
    keys: &str,
    limit: i64,
    lease: Duration,
) -> StoreResult<ClaimBatch> {
    let now = now_millis();
    let expires = now.saturating_add(duration_millis(lease));
    let tx = begin(conn)?;
    let mut claimed = fetch_all(
        &tx,
        CLAIM,
        params![owner, expires, now, keys, limit],
        |row| {
            Ok(ClaimedInstance {
                record: record_from_row(row)?,
                lease_token: u64_col(row, RECORD_COLUMNS, "lease token")?,
                next_event_id: u64_col(row, RECORD_COLUMNS + 1, "next event id")?,
                inbox_seq: u64_col(row, RECORD_COLUMNS + 2, "inbox sequence")?,
            })
        },
    )?;
    let next_wake = fetch_optional(&tx, NEXT_WAKE, params![now, keys], |row| {
        col::<Millis>(row, 0)
    })?;
    tx.commit().map_err(db_err)?;
    claimed.sort_by_key(|c| c.record.created_at);
    Ok(ClaimBatch {
        claimed,
        next_wake,
        more: false,
    })
}

fn send_signal_tx(conn: &mut Connection, id: &str, name: &str, payload: &[u8]) -> StoreResult<u64> {
    let now = now_millis();
    let tx = begin(conn)?;
    if execute(&tx, WAKE, params![id, now])? == 0 {
        // Unknown or finished: nothing was written.
        let status = status_of(&tx, id)?;
        return Err(StoreError::Finished {
            id: id.to_owned(),
            status,
        });
    }
    execute(&tx, INSERT_SIGNAL, params![id, name, payload, now])?;
    let signal_id = tx.last_insert_rowid();
    tx.commit().map_err(db_err)?;
    u64::try_from(signal_id).map_err(|_| StoreError::Corrupt("negative signal id".to_owned()))
}

fn request_cancel_tx(conn: &mut Connection, id: &str) -> StoreResult<InstanceStatus> {
    let tx = begin(conn)?;
    if execute(&tx, REQUEST_CANCEL, params![id, now_millis()])? == 0 {
        // Unknown or finished: nothing was written.
        return status_of(&tx, id);
    }
    tx.commit().map_err(db_err)?;
    Ok(InstanceStatus::Running)
}

#[cfg(test)]
mod tests {
    use std::ops::Deref;
    use std::path::PathBuf;

    use super::*;
    use crate::store::test_fixtures::{self, claim_request, event, new_instance};

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

    /// The database's path with `suffix` (`-wal`, `-shm`) appended.
    fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    }

    fn remove_db(path: &Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(with_suffix(path, suffix));
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

    const LEASE: Duration = Duration::from_secs(60);

    async fn started(store: &SqliteStore, workflow: &str) -> ClaimedInstance {
        let new = new_instance(workflow);
        store.create_instance(new).await.expect("create");
        let mut batch = store
            .claim(&claim_request(workflow, 10, LEASE))
            .await
            .expect("claim");
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
            let req = claim_request(&wf, 7, LEASE);
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
                instance_id: c.record.id.as_str().into(),
                lease_token: c.lease_token,
                events: vec![event(0), event(1)].into(),
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
        let batch = store
            .claim(&claim_request(wf, 10, LEASE))
            .await
            .expect("claim");
        assert_eq!(batch.claimed.len(), 1);
        assert_eq!(batch.claimed[0].next_event_id, 2);
        // Signal ids keep increasing across restarts even when the newest was consumed.
        let commit = Commit {
            instance_id: id.as_str().into(),
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

    /// Removes a database's files when dropped.
    pub(super) struct Files(pub(super) PathBuf);

    impl Drop for Files {
        fn drop(&mut self) {
            remove_db(&self.0);
        }
    }

    fn wal_len(db: &Path) -> u64 {
        std::fs::metadata(with_suffix(db, "-wal")).map_or(0, |m| m.len())
    }

    /// The size [`open::presize_wal`] grows a log to, from the database's
    /// page size and SQLite's default checkpoint interval: the write
    /// connection checkpoints itself at twice that, and a quarter of it
    /// more covers a large commit past that point.
    fn grown_wal_len(conn: &rusqlite::Connection) -> u64 {
        let page: u64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .unwrap();
        let pages: u64 = conn
            .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
            .unwrap();
        32 + (2 * pages + pages / 4) * (page + 24)
    }

    /// At `FULL` the log is grown with zeros on open and commits overwrite
    /// them; at `NORMAL` (no flush per commit) it is left to grow.
    #[tokio::test]
    async fn the_write_ahead_log_is_grown_on_open_at_full_only() {
        let db = TempDb::new().await;
        let grown = grown_wal_len(&rusqlite::Connection::open(&db.path).unwrap());
        assert!(grown > 4 << 20, "{grown}");
        assert_eq!(wal_len(&db.path), grown);
        let c = started(&db, "grown").await;
        let commit = Commit {
            instance_id: c.record.id.as_str().into(),
            lease_token: c.lease_token,
            events: vec![event(0), event(1), event(2)].into(),
            ..Commit::default()
        };
        db.commit(commit).await.expect("commit");
        assert_eq!(wal_len(&db.path), grown, "commits overwrite the zeros");
        assert_eq!(
            db.load_history(&c.record.id).await.expect("history"),
            vec![event(0), event(1), event(2)]
        );

        let normal = Files(TempDb::path());
        let store =
            SqliteStore::open_with(SqliteOptions::new(&normal.0).synchronous(Synchronous::Normal))
                .await
                .expect("open");
        assert!(wal_len(&normal.0) < 1 << 20, "{}", wal_len(&normal.0));
        store.close().await;
    }

    /// A store's write connection hands its checkpoints to the store's
    /// checkpoint thread: once its commits fill the log past the
    /// checkpoint interval, that thread copies it into the database file,
    /// with no commit after them. (SQLite's own checkpointing would copy
    /// it inside the commit that filled it.)
    #[tokio::test]
    async fn a_store_checkpoints_on_its_own_thread() {
        let db = TempDb::new().await;
        let c = started(&db, "checkpointed").await;
        let before = std::fs::metadata(&db.path).unwrap().len();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut id = 0;
        while checkpoint::tests::log_pages(&db.path) < checkpoint::CHECKPOINT_PAGES {
            // Entries of 40 KiB (ten pages) of bytes that do not compress.
            let mut entry = event(id);
            entry.data = (0..40 << 10)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let commit = Commit {
                instance_id: c.record.id.as_str().into(),
                lease_token: c.lease_token,
                events: vec![entry].into(),
                ..Commit::default()
            };
            db.commit(commit).await.expect("commit");
            id += 1;
        }
        checkpoint::tests::copied(db.checkpoints.as_ref().expect("a file has a checkpointer"))
            .await;
        let after = std::fs::metadata(&db.path).unwrap().len();
        assert!(after > before + (2 << 20), "{before} -> {after}");
    }

    /// Stores opening one fresh file at the same time take the write lock
    /// in turn: every one opens, the log is grown once to its size, and
    /// each sees what another wrote.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn stores_opening_one_fresh_file_together_all_open_and_share_it() {
        let file = Arc::new(Files(TempDb::path()));
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let file = Arc::clone(&file);
                tokio::spawn(async move { SqliteStore::open(&file.0).await })
            })
            .collect();
        let mut stores = Vec::new();
        for open in opens {
            stores.push(open.await.expect("join").expect("open"));
        }
        let grown = grown_wal_len(&rusqlite::Connection::open(&file.0).unwrap());
        assert_eq!(wal_len(&file.0), grown);
        let c = started(&stores[0], "together").await;
        let commit = Commit {
            instance_id: c.record.id.as_str().into(),
            lease_token: c.lease_token,
            events: vec![event(0)].into(),
            ..Commit::default()
        };
        stores[0].commit(commit).await.expect("commit");
        for store in &stores {
            assert_eq!(
                store.load_history(&c.record.id).await.expect("history"),
                vec![event(0)]
            );
        }
        assert_eq!(wal_len(&file.0), grown);
        for store in &stores {
            store.close().await;
        }
    }

    /// A log a killed process left, with commits in its frames only, is
    /// read whole when a store opens the file and grows the log behind
    /// those frames, and the file passes SQLite's integrity check.
    #[tokio::test]
    async fn a_killed_process_log_is_recovered_then_grown() {
        let killed = Files(TempDb::path());
        let copy = Files(TempDb::path());
        let conn = rusqlite::Connection::open(&killed.0).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch("CREATE TABLE kept (n INTEGER NOT NULL)")
            .unwrap();
        for n in 0..200 {
            conn.execute("INSERT INTO kept VALUES (?1)", [n]).unwrap();
        }
        // What the process leaves if killed now: the database and a log
        // that ends with its last frame.
        let frames_end = wal_len(&killed.0);
        assert!(frames_end > 0);
        for suffix in ["", "-wal"] {
            std::fs::copy(with_suffix(&killed.0, suffix), with_suffix(&copy.0, suffix))
                .expect("copy");
        }
        drop(conn);

        let store = SqliteStore::open(&copy.0).await.expect("open the copy");
        let check = rusqlite::Connection::open(&copy.0).unwrap();
        assert_eq!(wal_len(&copy.0), grown_wal_len(&check));
        let (count, sum): (i64, i64) = check
            .query_row("SELECT count(*), sum(n) FROM kept", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((count, sum), (200, (0..200).sum()));
        let ok: String = check
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        // The store works on the file.
        let c = started(&store, "recovered").await;
        assert_eq!(
            store.load_history(&c.record.id).await.expect("history"),
            vec![]
        );
        drop(check);
        store.close().await;
    }

    #[tokio::test]
    async fn duplicate_journal_row_is_a_conflict_and_writes_nothing() {
        let db = TempDb::new().await;
        let a = started(&db, "dup-a").await;
        let b = started(&db, "dup-b").await;
        let c = started(&db, "dup-c").await;
        // A journal row the instance's counter does not know about.
        let stray = b.record.id.clone();
        db.write(move |conn| {
            execute(
                conn,
                INSERT_EVENT,
                params![stray, 1_i64, 1_i64, "stray", &b"x"[..], 0_i64],
            )
        })
        .await
        .expect("insert a stray row");
        let commit = |c: &ClaimedInstance, events: Vec<StoredEvent>| Commit {
            instance_id: c.record.id.as_str().into(),
            lease_token: c.lease_token,
            events: events.into(),
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
        raw(
            &db,
            &format!(
                "UPDATE instances SET status = 'sleeping' WHERE id = '{}'",
                c.record.id
            ),
        )
        .await;
        match db.get_instance(&c.record.id).await {
            Err(StoreError::Corrupt(_)) => {}
            other => panic!("expected Corrupt, got {other:?}"),
        }
        raw(
            &db,
            &format!(
                "UPDATE instances SET status = 'running', version = -1 WHERE id = '{}'",
                c.record.id
            ),
        )
        .await;
        match db.list_instances(ListFilter::default()).await {
            Err(StoreError::Corrupt(_)) => {}
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    async fn raw(db: &SqliteStore, sql: &str) {
        let sql = sql.to_owned();
        db.write(move |conn| conn.execute_batch(&sql).map_err(db_err))
            .await
            .expect("raw statement");
    }

    /// A backend failure mid-commit leaves the store usable, on the same
    /// data (a file store replaces its write connection, an in-memory store
    /// keeps its only one).
    async fn recovers_from_a_failed_commit(db: &SqliteStore) {
        let c = started(db, "recover").await;
        raw(db, "ALTER TABLE history RENAME TO history_moved").await;
        let commit = |events: Vec<StoredEvent>| Commit {
            instance_id: c.record.id.as_str().into(),
            lease_token: c.lease_token,
            events: events.into(),
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
        let sql = format!("EXPLAIN QUERY PLAN {sql}");
        let details = db
            .read(move |conn| {
                // Every parameter NULL: the plan does not depend on values.
                let count = conn.prepare(&sql).map_err(db_err)?.parameter_count();
                let nulls = rusqlite::params_from_iter(vec![rusqlite::types::Null; count]);
                fetch_all(conn, &sql, nulls, |row| col::<String>(row, 3))
            })
            .await
            .expect("explain");
        details.join("\n")
    }

    #[tokio::test]
    async fn a_file_from_a_newer_schema_is_refused() {
        let db = TempDb::new().await;
        raw(&db, "PRAGMA user_version = 99").await;
        db.close().await;
        match SqliteStore::open(&db.path).await {
            Err(StoreError::Unsupported(message)) => {
                assert!(message.contains("schema version 99"), "{message}")
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    /// A fresh file in WAL mode with the first schema version, at
    /// `user_version` 1, after `sql`; its path.
    fn file_at_version_1(sql: &str) -> PathBuf {
        let path = TempDb::path();
        let conn = Connection::open(&path).expect("create");
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("wal");
        conn.execute_batch(open::MIGRATIONS[0]).expect("schema");
        conn.pragma_update(None, "user_version", 1)
            .expect("user_version");
        conn.execute_batch(sql).expect("old data");
        path
    }

    /// A file created by the sqlx-based releases: the same tables, their
    /// migration table, `user_version` 0.
    #[tokio::test]
    async fn a_file_from_the_sqlx_based_store_opens() {
        let path = file_at_version_1(
            "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT);
             INSERT INTO _sqlx_migrations VALUES (1, 'initial schema');
             PRAGMA user_version = 0;
             INSERT INTO instances (id, workflow, version, status, input, history_format, \
               ready_at, created_at, updated_at) VALUES ('old', 'wf', 1, 'running', x'00', 1, 0, 0, 0);",
        );
        let store = SqliteStore::open(&path).await.expect("open");
        let old = store.get_instance("old").await.expect("get").expect("kept");
        assert_eq!(old.workflow, "wf");
        let c = started(&store, "after-upgrade").await;
        assert_eq!(c.next_event_id, 0);
        store.close().await;
        remove_db(&path);
    }

    /// A step's commit adds its journal entry and leaves the instance's row
    /// alone: one page in the log instead of two. What the row no longer
    /// records is read from the journal: where it ends, and when it last
    /// changed.
    #[tokio::test]
    async fn a_step_commit_writes_the_journal_page_alone() {
        let db = TempDb::new().await;
        let c = started(&db, "wf").await;
        let created = db.get_instance(&c.record.id).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = checkpoint::tests::log_pages(&db.path);
        let step = test_fixtures::commit(&c, vec![event(0)], Transition::None);
        assert_eq!(
            db.commit(step).await.unwrap(),
            CommitOutcome::Applied {
                cancel_requested: false
            }
        );
        assert_eq!(checkpoint::tests::log_pages(&db.path) - before, 1);

        let after = db.get_instance(&c.record.id).await.unwrap().unwrap();
        assert!(
            after.updated_at >= created.updated_at + 20,
            "the step is the last change: {} then {}",
            created.updated_at,
            after.updated_at
        );
        let listed = db.list_instances(ListFilter::default()).await.unwrap();
        assert_eq!(listed[0].updated_at, after.updated_at);
        // The next commit continues the journal where the step left it.
        let gap = test_fixtures::commit(&c, vec![event(2)], Transition::None);
        assert!(matches!(db.commit(gap).await, Err(StoreError::Conflict(_))));
        let next = test_fixtures::commit(&c, vec![event(1)], Transition::Release);
        db.commit(next).await.unwrap();
        let again = db
            .claim(&claim_request("wf", 10, LEASE))
            .await
            .unwrap()
            .claimed;
        assert_eq!(again[0].next_event_id, 2);
    }

    /// A file at schema version 1 kept the journal's length on the
    /// instance's row; after the upgrade it is read from the journal, and
    /// an instance in flight goes on where it was.
    #[tokio::test]
    async fn a_file_at_schema_version_1_opens_with_its_instances_in_flight() {
        let path = file_at_version_1(
            "INSERT INTO instances (id, workflow, version, status, input, history_format, \
               ready_at, next_event_id, created_at, updated_at) \
               VALUES ('old', 'wf', 1, 'running', x'00', 1, 0, 2, 0, 5);
             INSERT INTO history (instance_id, event_id, seq, kind, data, created_at) \
               VALUES ('old', 0, 0, 'k', x'00', 3), ('old', 1, 1, 'k', x'01', 4);",
        );
        let store = SqliteStore::open(&path).await.expect("open");
        let old = store.get_instance("old").await.expect("get").expect("kept");
        assert_eq!(old.updated_at, 5);
        let mut claimed = store
            .claim(&claim_request("wf", 10, LEASE))
            .await
            .expect("claim")
            .claimed;
        assert_eq!(claimed.len(), 1);
        let c = claimed.remove(0);
        assert_eq!(c.next_event_id, 2);
        let step = test_fixtures::commit(&c, vec![event(2)], Transition::None);
        store.commit(step).await.expect("the journal goes on");
        assert_eq!(store.load_history("old").await.expect("load").len(), 3);
        store.close().await;
        remove_db(&path);
    }

    /// A commit on the caller's thread is the same fenced transaction as
    /// one on the write thread: applied under the lease, refused with a
    /// stale token, and not made at all while a job holds the connection.
    #[tokio::test]
    async fn commits_here_are_fenced_and_wait_for_no_job() {
        let db = TempDb::new().await;
        assert!(db.commits_here());
        let c = started(&db, "here").await;
        let commit = |token, events: Vec<StoredEvent>| Commit {
            instance_id: c.record.id.as_str().into(),
            lease_token: token,
            events: events.into(),
            ..Commit::default()
        };
        let applied = db.try_commit_here(&commit(c.lease_token, vec![event(0)]));
        assert!(
            matches!(applied, Some(Ok(CommitOutcome::Applied { .. }))),
            "{applied:?}"
        );
        let stale = db.try_commit_here(&commit(c.lease_token - 1, vec![event(1)]));
        assert!(
            matches!(stale, Some(Ok(CommitOutcome::LeaseLost))),
            "{stale:?}"
        );

        // A job on the write thread holds the connection until released.
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let job = db.write(move |_conn| {
            held_tx.send(()).expect("test waits");
            release_rx.recv().expect("test releases");
            Ok(())
        });
        let check = async {
            held_rx.await.expect("job started");
            let busy = db.try_commit_here(&commit(c.lease_token, vec![event(1)]));
            release_tx.send(()).expect("job waits");
            busy
        };
        let (job, busy) = tokio::join!(job, check);
        job.expect("job");
        assert!(busy.is_none(), "{busy:?}");
        assert_eq!(
            db.load_history(&c.record.id).await.expect("history"),
            vec![event(0)]
        );

        db.close().await;
        match db.try_commit_here(&commit(c.lease_token, vec![event(1)])) {
            Some(Err(StoreError::Backend(_))) => {}
            other => panic!("expected a closed store's error, got {other:?}"),
        }
    }

    /// A backend failure in a commit on the caller's thread replaces the
    /// write connection as on the write thread.
    #[tokio::test]
    async fn commits_here_recover_from_a_failed_commit() {
        let db = TempDb::new().await;
        let c = started(&db, "here-recover").await;
        raw(&db, "ALTER TABLE history RENAME TO history_moved").await;
        let commit = Commit {
            instance_id: c.record.id.as_str().into(),
            lease_token: c.lease_token,
            events: vec![event(0)].into(),
            ..Commit::default()
        };
        match db.try_commit_here(&commit) {
            Some(Err(StoreError::Backend(_))) => {}
            other => panic!("expected a backend error, got {other:?}"),
        }
        raw(&db, "ALTER TABLE history_moved RENAME TO history").await;
        let applied = db.try_commit_here(&commit);
        assert!(
            matches!(applied, Some(Ok(CommitOutcome::Applied { .. }))),
            "{applied:?}"
        );
        assert_eq!(
            db.load_history(&c.record.id).await.expect("history"),
            vec![event(0)]
        );
    }

    /// Concurrent creates are inserted together; each still gets its own
    /// answer, a duplicate id among them included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_creates_each_get_their_answer() {
        let db = TempDb::new().await;
        let mut news: Vec<_> = (0..64)
            .map(|i| new_instance(&format!("together-{i}")))
            .collect();
        let mut twin = new_instance("together-twin");
        twin.id = news[0].id.clone();
        news.push(twin);
        let outcomes =
            futures::future::join_all(news.iter().cloned().map(|n| db.create_instance(n))).await;
        let created = outcomes
            .iter()
            .filter(|o| matches!(o, Ok(CreateOutcome::Created)))
            .count();
        let existing: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                Ok(CreateOutcome::Existing(record)) => Some(record.id.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(created, 64, "{outcomes:?}");
        assert_eq!(existing, vec![news[0].id.clone()]);
        for new in &news[..64] {
            let record = db
                .get_instance(&new.id)
                .await
                .expect("read")
                .expect("created");
            assert_eq!(record.workflow, new.workflow);
        }
    }

    #[tokio::test]
    async fn closing_twice_and_batches_after_closing() {
        let db = TempDb::new().await;
        db.close().await;
        db.close().await;
        assert!(db.commit_batch(Vec::new()).await.is_empty());
    }

    #[tokio::test]
    async fn reopening_a_file_keeps_its_schema_version() {
        let db = TempDb::new().await;
        db.close().await;
        let again = SqliteStore::open(&db.path).await.expect("reopen");
        let version = again
            .read(|conn| {
                conn.pragma_query_value(None, "user_version", |row| row.get::<_, i64>(0))
                    .map_err(db_err)
            })
            .await
            .expect("user_version");
        assert_eq!(version, open::MIGRATIONS.len() as i64);
        again.close().await;
    }

    #[tokio::test]
    async fn statements_use_the_indexes() {
        let db = SqliteStore::in_memory().await.expect("open");
        for (name, sql) in [
            ("claim", CLAIM),
            ("next_wake", NEXT_WAKE),
            ("renew", RENEW),
            ("end_leases", END_LEASES),
            ("fence", FENCE_PARK),
            ("fence_entries", FENCE_ENTRIES),
            ("fence_diagnose", FENCE_DIAGNOSE),
            ("get_instance", GET_INSTANCE),
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
                // Tables are scanned only along an index (the listings);
                // `json_each` and subqueries are not tables.
                let full_scan = line.starts_with("SCAN ")
                    && !line.contains("INDEX")
                    && !line.starts_with("SCAN (subquery");
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
