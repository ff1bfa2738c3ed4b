//! Postgres backend: several worker processes share one database.
//!
//! # Schema
//!
//! Every object lives in one schema ([`PostgresOptions::schema`], `fluxo` by
//! default), so several applications, or test runs, can share a database
//! without seeing each other. The schema is created and migrated when a
//! store opens; the migrations are embedded in the crate and applied once
//! even when several processes open the store at the same time.
//!
//! # Durability
//!
//! Every change is committed before the call returns. With the server's
//! default `synchronous_commit = on`, a commit has been flushed to the
//! server's write-ahead log when it returns: a completed step, a start, a
//! signal or a cancel that returned `Ok` survives a crash of the worker, of
//! Postgres, or of the machine it runs on (and, with synchronous replication
//! configured on the server, the loss of that machine). With
//! `synchronous_commit = off` (on the server, or for the store's own
//! connections with [`PostgresOptions::synchronous_commit`]) a commit
//! returns before its flush: a crash of Postgres or of its machine may lose
//! the changes of the last few hundred milliseconds (at most three times
//! `wal_writer_delay`), though never corrupts the database and never keeps
//! half of a commit. Workers then redo the lost steps, as after any lost
//! lease. It saves a flush per commit.
//!
//! # Several processes
//!
//! Workers coordinate through the database only. Claims lock the rows they
//! hand out and skip rows other claims hold (`FOR UPDATE SKIP LOCKED`), so
//! concurrent workers never wait for each other nor share an instance. Lease
//! expiry and every other time are taken from the server's clock, so workers
//! on hosts whose clocks disagree still agree on when a lease ends.
//!
//! Most operations are one statement, so one round trip and one WAL flush;
//! [`Store::commit_batch`] writes a whole group of commits in one
//! transaction, usually with one statement, and instances started at the
//! same time are inserted together by one statement (one flush and one
//! notification for all; one that Postgres refuses fails alone). A step's
//! own commit (one journal entry, nothing else) has a statement of its own
//! with scalar parameters, which the server binds and runs for less than
//! the general commit statement's arrays (about 4 % of a sequential step
//! on a local server). Statements are prepared once per connection: behind
//! PgBouncer, use session pooling (or a PgBouncer that tracks prepared
//! statements in transaction pooling).
//!
//! Commits are made on a connection the store keeps for them, out of the
//! pool: a pooled connection is tested with a round trip to the server each
//! time it goes back to the pool, which on a local server cost a commit
//! about 15 % of its latency. A connection that breaks is replaced on the
//! next commit; a commit made while another holds it uses the pool.
//!
//! # Notifications
//!
//! Everything that makes work runnable at once (a new instance, a signal, a
//! cancel request, a released instance, a child finishing, a parked instance
//! due already) sends a notification on the channel `<schema>_work` when it
//! commits. [`Store::work_notifications`] listens on it with one connection
//! of its own, so idle workers in every process start at once instead of
//! waiting for their next poll.

mod commit_conn;
mod creates;
mod listener;
mod migrate;
mod sql;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Write as _;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::query::Query;
use sqlx::{Connection, PgConnection, Postgres, Row};

use self::commit_conn::{CommitConnection, Conn};
use self::creates::{CreateStatements, Creates};
use self::listener::Notifier;
use self::sql::{Kind, Shape, Statements, RECORD_COLUMNS};
use super::*;

/// The schema used when none is given.
pub const DEFAULT_SCHEMA: &str = "fluxo";

/// The longest schema name: the notification channel, `<schema>_work`, must
/// fit in a Postgres identifier (63 bytes).
const MAX_SCHEMA_LEN: usize = 58;

/// The longest lease handed out (about 100 years); longer ones are cut to it.
const MAX_LEASE_MS: Millis = 100 * 365 * 24 * 3_600_000;

/// How often a commit or a group of commits is tried again when Postgres
/// aborted it to break a deadlock (nothing of it was written).
const DEADLOCK_RETRIES: usize = 3;

/// How to open a [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connection URL, e.g. `postgres://user:password@host:5432/database`.
    /// Ignored by [`PostgresStore::from_pool`].
    pub url: String,
    /// Schema holding every object of the store; created when missing.
    /// Lower-case ASCII letters, digits and `_`, starting with a letter or
    /// `_`, at most 58 bytes, not starting with `pg_`. Default `fluxo`.
    pub schema: String,
    /// Most connections the store's pool opens. Default 10. Ignored by
    /// [`PostgresStore::from_pool`]. Work notifications use one more
    /// connection of their own.
    pub max_connections: u32,
    /// `application_name` of the store's connections, as shown in
    /// `pg_stat_activity`. `None`: the one in the URL, or `fluxo`. Ignored
    /// by [`PostgresStore::from_pool`] (except for the notification
    /// connection, which copies the pool's settings).
    pub application_name: Option<String>,
    /// `false` sets `synchronous_commit = off` on the store's connections
    /// (see the module docs on durability). Default `true`: the server's
    /// setting applies. Ignored by [`PostgresStore::from_pool`].
    pub synchronous_commit: bool,
    /// How long an operation waits for a connection (opening one included)
    /// before failing. Default 30 seconds. Ignored by
    /// [`PostgresStore::from_pool`].
    pub acquire_timeout: Duration,
}

impl PostgresOptions {
    /// Default options for the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresOptions {
            url: url.into(),
            schema: DEFAULT_SCHEMA.to_owned(),
            max_connections: 10,
            application_name: None,
            synchronous_commit: true,
            acquire_timeout: Duration::from_secs(30),
        }
    }

    /// Sets the schema.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets the size of the connection pool. The store holds one more
    /// connection, out of the pool, for its commits (see the module docs),
    /// and the notification listener one of its own.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }

    /// Sets the `application_name` of the store's connections.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// Sets whether commits wait for their WAL flush (see the module docs).
    pub fn synchronous_commit(mut self, on: bool) -> Self {
        self.synchronous_commit = on;
        self
    }

    /// Sets how long an operation waits for a connection.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }
}

/// A [`Store`] in a Postgres database. Cheap to clone: clones share the
/// pool and the notification listener, which stops with the last clone.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    schema: String,
    sql: Statements,
    /// The connection commits are made on, out of the pool.
    commit_conn: CommitConnection,
    /// Concurrent creates, written in groups.
    creates: Creates,
    /// The notification listener, started by the first
    /// [`Store::work_notifications`] call.
    notifier: Mutex<Option<Notifier>>,
    /// Groups the one group statement could not write.
    #[cfg(test)]
    group_fallbacks: std::sync::atomic::AtomicUsize,
    /// Drops the schema with the last clone (test stores only).
    _cleanup: Option<DropSchema>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the database at `url` with default options, creating and
    /// migrating the `fluxo` schema as needed.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Self::connect_with(PostgresOptions::new(url)).await
    }

    /// Connects with the given options, creating and migrating the schema
    /// as needed.
    pub async fn connect_with(options: PostgresOptions) -> StoreResult<Self> {
        validate_schema(&options.schema)?;
        let pool = open_pool(&options).await?;
        Self::open(pool, options.schema, None).await
    }

    /// Uses a pool the service already has, creating and migrating
    /// `options.schema` as needed. Only the schema is taken from `options`;
    /// the pool keeps its own settings.
    pub async fn from_pool(pool: PgPool, options: PostgresOptions) -> StoreResult<Self> {
        validate_schema(&options.schema)?;
        Self::open(pool, options.schema, None).await
    }

    async fn open(pool: PgPool, schema: String, cleanup: Option<DropSchema>) -> StoreResult<Self> {
        migrate::run(&pool, &schema).await?;
        let sql = Statements::new(&schema);
        let creates = Creates::new(
            pool.clone(),
            CreateStatements {
                one: sql.create.as_str().into(),
                many: sql.create_many.as_str().into(),
            },
        );
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                sql,
                creates,
                commit_conn: CommitConnection::default(),
                pool,
                schema,
                notifier: Mutex::new(None),
                #[cfg(test)]
                group_fallbacks: Default::default(),
                _cleanup: cleanup,
            }),
        })
    }

    /// The schema holding the store.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The connection pool the store uses.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The notification channel of the store's schema.
    pub fn channel(&self) -> &str {
        &self.inner.sql.channel
    }

    fn sql(&self) -> &Statements {
        &self.inner.sql
    }

    /// Turns a failed database call into a store error. A lost connection
    /// usually means the pool's other idle connections are gone too (the
    /// server restarted, or an administrator ended them): they are tested
    /// and replaced now, so that the next operations do not fail on them one
    /// after the other.
    async fn fail(&self, e: sqlx::Error) -> StoreError {
        fail_on(&self.inner.pool, e).await
    }

    /// Applies one commit in its own transaction.
    async fn commit_one(&self, c: &Commit) -> StoreResult<CommitOutcome> {
        let mut attempt = 0;
        loop {
            let result = async {
                let mut conn = self.commit_conn().await?;
                let health = conn.health();
                let result = if needs_own_cancel_statement(c) {
                    in_transaction(&mut conn, self.sql(), c).await
                } else {
                    // One statement: its own transaction.
                    apply(&mut conn, self.sql(), c).await
                };
                if let Err(e) = &result {
                    health.check(e);
                }
                result
            }
            .await;
            match result {
                Ok(outcome) => return outcome,
                Err(e) if must_retry(&e) && attempt < DEADLOCK_RETRIES => {
                    attempt += 1;
                    tracing::debug!(error = %e, instance = %c.instance_id, "commit retried");
                }
                Err(e) => return Err(self.fail(e).await),
            }
        }
    }

    /// The connection to commit on: the store's own, unless another commit
    /// is using it.
    async fn commit_conn(&self) -> Result<Conn<'_>, sqlx::Error> {
        self.inner.commit_conn.get(&self.inner.pool).await
    }

    /// Applies several commits in one transaction (one WAL flush for all).
    async fn commit_group(&self, commits: &[Commit]) -> Vec<StoreResult<CommitOutcome>> {
        if fits_one_statement(commits) {
            if let Some(results) = self.try_one_statement(commits).await {
                return results;
            }
        }
        // Commits whose statement failed: they are left out of the next
        // attempt, and the failure is their result.
        let mut settled: Vec<Option<StoreResult<CommitOutcome>>> =
            commits.iter().map(|_| None).collect();
        let mut retries = 0;
        loop {
            match self.try_group(commits, &settled).await {
                Group::Done(results) => {
                    return settled
                        .into_iter()
                        .zip(results)
                        .map(|(settled, result)| {
                            settled.or(result).unwrap_or_else(|| {
                                Err(StoreError::Conflict("commit was not applied".to_owned()))
                            })
                        })
                        .collect();
                }
                Group::Exclude(i, e) => {
                    tracing::debug!(error = %e, instance = %commits[i].instance_id,
                        "a commit of a group failed; writing the others without it");
                    settled[i] = Some(Err(e));
                }
                Group::Retry(e) if retries < DEADLOCK_RETRIES => {
                    retries += 1;
                    tracing::debug!(error = %e, "group commit retried");
                }
                Group::Retry(e) | Group::Failed(e) => {
                    let mut failed = all_failed(self.fail(e).await, commits.len()).into_iter();
                    return settled
                        .into_iter()
                        .map(|settled| {
                            let failed = failed.next();
                            settled.or(failed).unwrap_or_else(|| {
                                Err(StoreError::Conflict("commit was not applied".to_owned()))
                            })
                        })
                        .collect();
                }
            }
        }
    }

    /// Writes a group with the one `batch` statement (plus a wake-up of
    /// parents in the group, and a look at the commits it did not apply).
    /// `None` when it failed before committing: nothing was written, and
    /// the commits are worth applying one statement each, which tells which
    /// one fails.
    async fn try_one_statement(
        &self,
        commits: &[Commit],
    ) -> Option<Vec<StoreResult<CommitOutcome>>> {
        let sql = self.sql();
        let mut conn = self.commit_conn().await.ok()?;
        let health = conn.health();
        let mut tx = match conn.begin().await {
            Ok(tx) => tx,
            Err(e) => {
                health.check(&e);
                return None;
            }
        };
        let written = async {
            let rows = batch_query(sql, commits).fetch_all(&mut *tx).await?;
            let in_group: HashSet<&str> = commits.iter().map(|c| c.instance_id.as_ref()).collect();
            let mut applied = HashMap::with_capacity(rows.len());
            let mut parents = Vec::new();
            for row in &rows {
                let id: String = row.try_get(0)?;
                let inbox_seq: i64 = row.try_get(1)?;
                let cancel_requested: bool = row.try_get(2)?;
                let parent: Option<String> = row.try_get(3)?;
                let kind: i32 = row.try_get(4)?;
                let inbox_seq = u64::try_from(inbox_seq).map_err(|_| {
                    sqlx::Error::Decode(format!("inbox sequence is negative: {inbox_seq}").into())
                })?;
                if kind == Kind::Finish as i32 {
                    parents.extend(parent.filter(|p| in_group.contains(p.as_str())));
                }
                applied.insert(id, (inbox_seq, cancel_requested));
            }
            if !parents.is_empty() {
                sqlx::query(&sql.wake_many)
                    .bind(parents)
                    .execute(&mut *tx)
                    .await?;
            }
            let mut results = Vec::with_capacity(commits.len());
            for c in commits {
                results.push(match applied.get(c.instance_id.as_ref()) {
                    Some(&(inbox_seq, cancel_requested)) => {
                        Ok(outcome(c, inbox_seq, cancel_requested))
                    }
                    None => diagnose(&mut tx, sql, c).await?,
                });
            }
            Ok::<_, sqlx::Error>(results)
        }
        .await;
        let results = match written {
            Ok(results) => results,
            Err(e) => {
                tracing::debug!(error = %e, "group statement failed; writing the commits one by one");
                // Dropping an unfinished transaction rolls it back as well.
                let _ = tx.rollback().await;
                health.check(&e);
                drop(conn);
                if connection_lost(&e) {
                    // Nothing was committed; the commits go on other
                    // connections, which must not be dead ones.
                    drop_dead_connections(&self.inner.pool).await;
                }
                #[cfg(test)]
                self.inner
                    .group_fallbacks
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return None;
            }
        };
        match tx.commit().await {
            Ok(()) => Some(results),
            Err(e) => {
                health.check(&e);
                drop(conn);
                Some(all_failed(self.fail(e).await, commits.len()))
            }
        }
    }

    /// One attempt at a group: everything not settled yet, in one
    /// transaction. A commit that is fenced out or refused writes nothing
    /// by itself (its statement matches no row); a statement that fails
    /// aborts the transaction, which is then rolled back and the attempt
    /// reports which commit failed.
    async fn try_group(
        &self,
        commits: &[Commit],
        settled: &[Option<StoreResult<CommitOutcome>>],
    ) -> Group {
        let mut conn = match self.commit_conn().await {
            Ok(conn) => conn,
            Err(e) => return Group::Failed(e),
        };
        let health = conn.health();
        let group = self.try_group_on(&mut conn, commits, settled).await;
        if let Group::Retry(e) | Group::Failed(e) = &group {
            health.check(e);
        }
        group
    }

    /// [`Self::try_group`] on `conn`.
    async fn try_group_on(
        &self,
        conn: &mut PgConnection,
        commits: &[Commit],
        settled: &[Option<StoreResult<CommitOutcome>>],
    ) -> Group {
        let mut tx = match conn.begin().await {
            Ok(tx) => tx,
            Err(e) => return Group::Failed(e),
        };
        let mut results = Vec::with_capacity(commits.len());
        for (i, c) in commits.iter().enumerate() {
            if settled[i].is_some() {
                results.push(None);
                continue;
            }
            match apply(&mut tx, self.sql(), c).await {
                Ok(result) => results.push(Some(result)),
                Err(e) => {
                    let rolled_back = tx.rollback().await;
                    return if must_retry(&e) {
                        Group::Retry(e)
                    } else if connection_lost(&e) {
                        Group::Failed(e)
                    } else if let Err(rollback) = rolled_back {
                        Group::Failed(rollback)
                    } else {
                        Group::Exclude(i, db_err(e))
                    };
                }
            }
        }
        match tx.commit().await {
            Ok(()) => Group::Done(results),
            Err(e) if must_retry(&e) => Group::Retry(e),
            Err(e) => Group::Failed(e),
        }
    }
}

/// How an attempt at a group commit went.
enum Group {
    /// Committed; a result for every commit not settled before.
    Done(Vec<Option<StoreResult<CommitOutcome>>>),
    /// The statement of commit `i` failed; nothing was written.
    Exclude(usize, StoreError),
    /// Postgres aborted the transaction to break a deadlock (or a
    /// serialization failure); nothing was written.
    Retry(sqlx::Error),
    /// The connection or the transaction failed; the outcome of the commits
    /// is unknown.
    Failed(sqlx::Error),
}

/// The connection settings of the store's own pool.
fn connect_options(options: &PostgresOptions) -> StoreResult<PgConnectOptions> {
    let mut connect = PgConnectOptions::from_str(&options.url).map_err(|e| {
        invalid(format!(
            "invalid Postgres URL: {e} (expected postgres://user:password@host:port/database)"
        ))
    })?;
    if let Some(name) = &options.application_name {
        connect = connect.application_name(name);
    } else if connect.get_application_name().is_none() {
        connect = connect.application_name("fluxo");
    }
    if !options.synchronous_commit {
        connect = connect.options([("synchronous_commit", "off")]);
    }
    // Room for every commit shape and the other statements.
    Ok(connect.statement_cache_capacity(256))
}

async fn open_pool(options: &PostgresOptions) -> StoreResult<PgPool> {
    PgPoolOptions::new()
        .max_connections(options.max_connections.max(1))
        // The pool adds it to the clock: a year stands for longer ones.
        .acquire_timeout(
            options
                .acquire_timeout
                .min(Duration::from_secs(365 * 86_400)),
        )
        // A test per acquire would double the round trips of most
        // operations; dead connections are found when they fail instead.
        .test_before_acquire(false)
        .connect_with(connect_options(options)?)
        .await
        .map_err(db_err)
}

fn validate_schema(schema: &str) -> StoreResult<()> {
    let valid = !schema.is_empty()
        && schema.len() <= MAX_SCHEMA_LEN
        && !schema.starts_with("pg_")
        && schema
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid schema name {schema:?}: use lower-case ASCII letters, digits and '_', \
             starting with a letter or '_', at most {MAX_SCHEMA_LEN} bytes, not starting with 'pg_'"
        )))
    }
}

/// An error in how the store was set up.
fn invalid(message: String) -> StoreError {
    StoreError::backend(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        message,
    ))
}

// ---------------------------------------------------------------------------
// Conversions

/// [`PostgresStore::fail`] on `pool`: a store error for `e`, after
/// replacing the pool's dead connections if `e` means the connection went.
async fn fail_on(pool: &PgPool, e: sqlx::Error) -> StoreError {
    if connection_lost(&e) {
        drop_dead_connections(pool).await;
    }
    db_err(e)
}

/// Tests the idle connections of `pool` and closes those that are gone.
async fn drop_dead_connections(pool: &PgPool) {
    let mut healthy = Vec::new();
    for _ in 0..pool.num_idle() {
        let Some(mut conn) = pool.try_acquire() else {
            break;
        };
        if conn.ping().await.is_err() {
            conn.close_on_drop();
        } else {
            healthy.push(conn);
        }
    }
}

fn db_err(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt(e.to_string()),
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            StoreError::Conflict(d.message().to_owned())
        }
        e => StoreError::backend(e),
    }
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Whether Postgres aborted the transaction to break a deadlock or a
/// serialization conflict: nothing was written, and trying again is safe.
fn must_retry(e: &sqlx::Error) -> bool {
    matches!(sqlstate(e).as_deref(), Some("40P01" | "40001"))
}

/// Whether the connection is gone (closed, reset, or ended by the server).
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(_) => sqlstate(e).is_some_and(|code| {
            // 08: connection exception; 57P01-57P03: the server is shutting
            // down or the backend was terminated.
            code.starts_with("08") || code.starts_with("57P")
        }),
        _ => false,
    }
}

/// A u64 as stored. Values beyond `i64::MAX` never occur in the database, so
/// they become -1, which matches nothing.
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(-1)
}

fn millis(d: Duration) -> Millis {
    duration_millis(d).min(MAX_LEASE_MS)
}

fn col<'r, T>(row: &'r PgRow, index: usize) -> StoreResult<T>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(index).map_err(db_err)
}

fn u64_col(row: &PgRow, index: usize, what: &str) -> StoreResult<u64> {
    let v: i64 = col(row, index)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {v}")))
}

fn u32_col(row: &PgRow, index: usize, what: &str) -> StoreResult<u32> {
    let v: i64 = col(row, index)?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {v}")))
}

fn record_from_row(row: &PgRow) -> StoreResult<InstanceRecord> {
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

fn claimed_from_row(row: &PgRow) -> StoreResult<ClaimedInstance> {
    Ok(ClaimedInstance {
        record: record_from_row(row)?,
        lease_token: u64_col(row, RECORD_COLUMNS, "lease token")?,
        next_event_id: u64_col(row, RECORD_COLUMNS + 1, "next event id")?,
        inbox_seq: u64_col(row, RECORD_COLUMNS + 2, "inbox sequence")?,
    })
}

// ---------------------------------------------------------------------------
// Commits

/// Whether the commit cancels an instance its own statement also writes
/// (itself, or a child it creates): a statement does not see its own
/// changes, so the cancel requests then go in a second statement.
fn needs_own_cancel_statement(c: &Commit) -> bool {
    c.cancel_instances
        .iter()
        .any(|id| **id == *c.instance_id || c.new_instances.iter().any(|n| n.id == *id))
}

fn shape_of(c: &Commit) -> Shape {
    let kind = match c.transition {
        Transition::None => Kind::None,
        Transition::Park { .. } => Kind::Park,
        Transition::Release => Kind::Release,
        Transition::Complete { .. } | Transition::Fail { .. } | Transition::Cancel { .. } => {
            Kind::Finish
        }
    };
    Shape {
        kind,
        events: !c.events.is_empty(),
        consume: c.consume_signal.is_some() && kind != Kind::Finish,
        children: !c.new_instances.is_empty(),
        cancels: !c.cancel_instances.is_empty() && !needs_own_cancel_statement(c),
    }
}

/// The commit statement of `c` with its parameters, in the order
/// [`Statements::commit`] numbers them.
fn commit_query<'q>(
    sql: &'q Statements,
    c: &'q Commit,
    shape: Shape,
) -> Query<'q, Postgres, PgArguments> {
    let mut q = sqlx::query(sql.commit(shape))
        .bind(c.instance_id.as_ref())
        .bind(sql_int(c.lease_token));
    if shape.events {
        q = q
            .bind(sql_int(c.events[0].event_id))
            .bind(
                c.events
                    .iter()
                    .map(|e| sql_int(e.event_id))
                    .collect::<Vec<_>>(),
            )
            .bind(c.events.iter().map(|e| sql_int(e.seq)).collect::<Vec<_>>())
            .bind(c.events.iter().map(|e| e.kind.as_ref()).collect::<Vec<_>>())
            .bind(
                c.events
                    .iter()
                    .map(|e| e.data.as_slice())
                    .collect::<Vec<_>>(),
            );
    }
    q = match &c.transition {
        Transition::None | Transition::Release => q,
        Transition::Park {
            wake_at,
            seen_inbox,
        } => q.bind(sql_int(*seen_inbox)).bind(*wake_at),
        Transition::Complete { output } => q
            .bind(InstanceStatus::Completed.as_str())
            .bind(Some(output.as_slice()))
            .bind(None::<&[u8]>),
        Transition::Fail { failure } => q
            .bind(InstanceStatus::Failed.as_str())
            .bind(None::<&[u8]>)
            .bind(Some(failure.as_slice())),
        Transition::Cancel { failure } => q
            .bind(InstanceStatus::Cancelled.as_str())
            .bind(None::<&[u8]>)
            .bind(Some(failure.as_slice())),
    };
    if shape.consume {
        q = q.bind(c.consume_signal.map(sql_int));
    }
    if shape.children {
        let n = &c.new_instances;
        q = q
            .bind(n.iter().map(|n| n.id.as_str()).collect::<Vec<_>>())
            .bind(n.iter().map(|n| n.workflow.as_str()).collect::<Vec<_>>())
            .bind(n.iter().map(|n| i64::from(n.version)).collect::<Vec<_>>())
            .bind(n.iter().map(|n| n.input.as_slice()).collect::<Vec<_>>())
            .bind(n.iter().map(|n| n.parent_id.as_deref()).collect::<Vec<_>>());
    }
    if shape.cancels {
        q = q.bind(
            c.cancel_instances
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
    }
    q
}

/// [`Statements::single_entry`] for `c`, whose one journal entry is `e`.
fn single_entry_query<'q>(
    sql: &'q Statements,
    c: &'q Commit,
    e: &'q StoredEvent,
) -> Query<'q, Postgres, PgArguments> {
    sqlx::query(&sql.single_entry)
        .bind(c.instance_id.as_ref())
        .bind(sql_int(c.lease_token))
        .bind(sql_int(e.event_id))
        .bind(sql_int(e.seq))
        .bind(e.kind.as_ref())
        .bind(e.data.as_slice())
}

fn consecutive(events: &[StoredEvent]) -> bool {
    events
        .iter()
        .zip(events.first().map_or(0, |e| e.event_id)..)
        .all(|(e, expected)| e.event_id == expected)
}

/// [`apply`] inside a transaction of its own, for a commit that takes more
/// than one statement.
async fn in_transaction(
    conn: &mut PgConnection,
    sql: &Statements,
    c: &Commit,
) -> Result<StoreResult<CommitOutcome>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    match apply(&mut tx, sql, c).await {
        Ok(outcome) => {
            tx.commit().await?;
            Ok(outcome)
        }
        Err(e) => {
            // Best effort: the error at hand is the one to report.
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// Applies one commit on `conn` (in a transaction or not).
///
/// `Err` means a statement failed: inside a transaction, the transaction is
/// aborted. `Ok` carries the commit's result: applied entirely, or (for
/// `LeaseLost` and errors) nothing of it written.
async fn apply(
    conn: &mut PgConnection,
    sql: &Statements,
    c: &Commit,
) -> Result<StoreResult<CommitOutcome>, sqlx::Error> {
    if !consecutive(&c.events) {
        return diagnose(conn, sql, c).await;
    }
    let shape = shape_of(c);
    let query = match c.events.as_slice() {
        [e] if shape == Shape::SINGLE_ENTRY => single_entry_query(sql, c, e),
        _ => commit_query(sql, c, shape),
    };
    let Some(row) = query.fetch_optional(&mut *conn).await? else {
        return diagnose(conn, sql, c).await;
    };
    let decoded = u64_col(&row, 0, "inbox sequence")
        .and_then(|inbox_seq| Ok((inbox_seq, col::<bool>(&row, 1)?)));
    let (inbox_seq, cancel_requested) = match decoded {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    if !shape.cancels && !c.cancel_instances.is_empty() {
        sqlx::query(&sql.cancel_many)
            .bind(
                c.cancel_instances
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *conn)
            .await?;
    }
    Ok(Ok(outcome(c, inbox_seq, cancel_requested)))
}

/// The outcome of an applied commit: a park is refused when the inbox moved.
fn outcome(c: &Commit, inbox_seq: u64, cancel_requested: bool) -> CommitOutcome {
    match c.transition {
        Transition::Park { seen_inbox, .. } if seen_inbox != inbox_seq => {
            CommitOutcome::InboxChanged {
                inbox_seq,
                cancel_requested,
            }
        }
        _ => CommitOutcome::Applied { cancel_requested },
    }
}

/// Whether a group can be written by the one `batch` statement: commits to
/// distinct instances, without children or cancel requests, with
/// consecutive journal entries.
fn fits_one_statement(commits: &[Commit]) -> bool {
    let mut ids = HashSet::with_capacity(commits.len());
    commits.iter().all(|c| {
        c.new_instances.is_empty()
            && c.cancel_instances.is_empty()
            && consecutive(&c.events)
            && ids.insert(c.instance_id.as_ref())
    })
}

/// The `batch` statement for a group, with one row of parameters per commit
/// and the journal entries of all of them.
fn batch_query<'q>(sql: &'q Statements, commits: &'q [Commit]) -> Query<'q, Postgres, PgArguments> {
    let n = commits.len();
    let mut ids = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut firsts = Vec::with_capacity(n);
    let mut counts = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut seen = Vec::with_capacity(n);
    let mut wakes = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut outputs = Vec::with_capacity(n);
    let mut failures = Vec::with_capacity(n);
    let mut consumes = Vec::with_capacity(n);
    let events = commits.iter().map(|c| c.events.len()).sum();
    let mut event_instances = Vec::with_capacity(events);
    let mut event_ids = Vec::with_capacity(events);
    let mut event_seqs = Vec::with_capacity(events);
    let mut event_kinds = Vec::with_capacity(events);
    let mut event_data = Vec::with_capacity(events);
    for c in commits {
        ids.push(c.instance_id.as_ref());
        tokens.push(sql_int(c.lease_token));
        firsts.push(c.events.first().map(|e| sql_int(e.event_id)));
        counts.push(c.events.len() as i64);
        let (kind, park, finish) = match &c.transition {
            Transition::None => (Kind::None, None, None),
            Transition::Park {
                wake_at,
                seen_inbox,
            } => (Kind::Park, Some((sql_int(*seen_inbox), *wake_at)), None),
            Transition::Release => (Kind::Release, None, None),
            Transition::Complete { output } => (
                Kind::Finish,
                None,
                Some((InstanceStatus::Completed, Some(output.as_slice()), None)),
            ),
            Transition::Fail { failure } => (
                Kind::Finish,
                None,
                Some((InstanceStatus::Failed, None, Some(failure.as_slice()))),
            ),
            Transition::Cancel { failure } => (
                Kind::Finish,
                None,
                Some((InstanceStatus::Cancelled, None, Some(failure.as_slice()))),
            ),
        };
        kinds.push(kind as i32);
        seen.push(park.map(|(seen, _)| seen));
        wakes.push(park.and_then(|(_, wake)| wake));
        statuses.push(finish.map(|(status, _, _)| status.as_str()));
        outputs.push(finish.and_then(|(_, output, _)| output));
        failures.push(finish.and_then(|(_, _, failure)| failure));
        consumes.push(c.consume_signal.map(sql_int));
        for e in &c.events {
            event_instances.push(c.instance_id.as_ref());
            event_ids.push(sql_int(e.event_id));
            event_seqs.push(sql_int(e.seq));
            event_kinds.push(e.kind.as_ref());
            event_data.push(e.data.as_slice());
        }
    }
    sqlx::query(&sql.batch)
        .bind(ids)
        .bind(tokens)
        .bind(firsts)
        .bind(counts)
        .bind(kinds)
        .bind(seen)
        .bind(wakes)
        .bind(statuses)
        .bind(outputs)
        .bind(failures)
        .bind(consumes)
        .bind(event_instances)
        .bind(event_ids)
        .bind(event_seqs)
        .bind(event_kinds)
        .bind(event_data)
}

/// Explains, without writing, why a commit cannot be applied.
async fn diagnose(
    conn: &mut PgConnection,
    sql: &Statements,
    c: &Commit,
) -> Result<StoreResult<CommitOutcome>, sqlx::Error> {
    let row = sqlx::query(&sql.diagnose)
        .bind(c.instance_id.as_ref())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        None => Err(StoreError::NotFound(c.instance_id.to_string())),
        Some(row) => explain(&row, c),
    })
}

fn explain(row: &PgRow, c: &Commit) -> StoreResult<CommitOutcome> {
    let token = u64_col(row, 0, "lease token")?;
    let leased: bool = col(row, 1)?;
    let status: String = col(row, 2)?;
    let status = InstanceStatus::parse(&status)?;
    if token != c.lease_token || !leased || status.is_finished() {
        return Ok(CommitOutcome::LeaseLost);
    }
    let next = u64_col(row, 3, "next event id")?;
    Err(journal_conflict(c, next))
}

#[async_trait]
impl Store for PostgresStore {
    fn backend_name(&self) -> &'static str {
        "postgres"
    }

    async fn create_instance(&self, new: NewInstance) -> StoreResult<CreateOutcome> {
        let id = new.id.clone();
        if self.inner.creates.create(new).await? {
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
        let row = match sqlx::query(&self.sql().get)
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await
        {
            Ok(row) => row,
            Err(e) => return Err(self.fail(e).await),
        };
        row.as_ref().map(record_from_row).transpose()
    }

    async fn list_instances(&self, filter: ListFilter) -> StoreResult<Vec<InstanceRecord>> {
        let limit = i64::try_from(filter.limit.unwrap_or(100)).unwrap_or(i64::MAX);
        let status = filter.status.map(InstanceStatus::as_str);
        let sql = self.sql();
        let query = match (filter.workflow.as_deref(), status) {
            (None, None) => sqlx::query(&sql.list_all).bind(limit),
            (Some(w), None) => sqlx::query(&sql.list_by_workflow).bind(limit).bind(w),
            (None, Some(s)) => sqlx::query(&sql.list_by_status).bind(limit).bind(s),
            (Some(w), Some(s)) => sqlx::query(&sql.list_by_both).bind(limit).bind(w).bind(s),
        };
        let rows = match query.fetch_all(&self.inner.pool).await {
            Ok(rows) => rows,
            Err(e) => return Err(self.fail(e).await),
        };
        rows.iter().map(record_from_row).collect()
    }

    async fn load_history(&self, id: &str) -> StoreResult<Vec<StoredEvent>> {
        let rows = match sqlx::query(&self.sql().load_history)
            .bind(id)
            .fetch_all(&self.inner.pool)
            .await
        {
            Ok(rows) => rows,
            Err(e) => return Err(self.fail(e).await),
        };
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
                kind: col::<String>(row, 2)?.into(),
                data: col(row, 3)?,
            });
        }
        Ok(events)
    }

    async fn claim(&self, req: &ClaimRequest) -> StoreResult<ClaimBatch> {
        if req.workflows.is_empty() {
            return Ok(ClaimBatch::default());
        }
        let names: Vec<&str> = req.workflows.iter().map(|(w, _)| w.as_str()).collect();
        let versions: Vec<i64> = req.workflows.iter().map(|(_, v)| i64::from(*v)).collect();
        let rows = match sqlx::query(&self.sql().claim)
            .bind(req.owner.as_str())
            .bind(millis(req.lease))
            .bind(names)
            .bind(versions)
            .bind(i64::try_from(req.limit).unwrap_or(i64::MAX))
            .fetch_all(&self.inner.pool)
            .await
        {
            Ok(rows) => rows,
            Err(e) => return Err(self.fail(e).await),
        };
        let mut batch = ClaimBatch::default();
        for row in &rows {
            batch.next_wake = col(row, RECORD_COLUMNS + 3)?;
            if col::<Option<String>>(row, 0)?.is_some() {
                batch.claimed.push(claimed_from_row(row)?);
            }
        }
        batch.claimed.sort_by_key(|c| c.record.created_at);
        Ok(batch)
    }

    async fn renew_leases(
        &self,
        owner: &str,
        ids: &[String],
        lease: Duration,
    ) -> StoreResult<Vec<String>> {
        match sqlx::query_scalar(&self.sql().renew)
            .bind(owner)
            .bind(millis(lease))
            .bind(ids)
            .fetch_all(&self.inner.pool)
            .await
        {
            Ok(ids) => Ok(ids),
            Err(e) => Err(self.fail(e).await),
        }
    }

    async fn end_leases(&self, owner: &str) -> StoreResult<()> {
        match sqlx::query(&self.sql().end_leases)
            .bind(owner)
            .execute(&self.inner.pool)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(e).await),
        }
    }

    async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        self.commit_one(&commit).await
    }

    async fn commit_batch(&self, commits: Vec<Commit>) -> Vec<StoreResult<CommitOutcome>> {
        if commits.len() <= 1 {
            let mut out = Vec::with_capacity(commits.len());
            for c in &commits {
                out.push(self.commit_one(c).await);
            }
            return out;
        }
        self.commit_group(&commits).await
    }

    async fn send_signal(&self, id: &str, name: &str, payload: Vec<u8>) -> StoreResult<u64> {
        let row = match sqlx::query(&self.sql().send_signal)
            .bind(id)
            .bind(name)
            .bind(payload.as_slice())
            .fetch_optional(&self.inner.pool)
            .await
        {
            Ok(row) => row,
            Err(e) => return Err(self.fail(e).await),
        };
        match row {
            Some(row) => u64_col(&row, 0, "signal id"),
            // Unknown or finished: nothing was written.
            None => Err(StoreError::Finished {
                id: id.to_owned(),
                status: self.status_of(id).await?,
            }),
        }
    }

    async fn next_signal(&self, id: &str, name: &str) -> StoreResult<(Option<InboxSignal>, u64)> {
        let row = match sqlx::query(&self.sql().next_signal)
            .bind(id)
            .bind(name)
            .fetch_optional(&self.inner.pool)
            .await
        {
            Ok(row) => row,
            Err(e) => return Err(self.fail(e).await),
        };
        let row = row.ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
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
        let row = match sqlx::query(&self.sql().request_cancel)
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await
        {
            Ok(row) => row,
            Err(e) => return Err(self.fail(e).await),
        };
        match row {
            Some(_) => Ok(InstanceStatus::Running),
            // Unknown or finished: nothing was written.
            None => self.status_of(id).await,
        }
    }

    async fn continue_as_new(
        &self,
        id: &str,
        lease_token: u64,
        input: Vec<u8>,
    ) -> StoreResult<CommitOutcome> {
        let token = i64::try_from(lease_token).unwrap_or(i64::MAX);
        let row: Option<(bool, bool)> = match sqlx::query_as(&self.sql().continue_as_new)
            .bind(input)
            .bind(id)
            .bind(token)
            .fetch_optional(&self.inner.pool)
            .await
        {
            Ok(row) => row,
            Err(e) => return Err(self.fail(e).await),
        };
        match row {
            Some((cancel_requested, _)) => Ok(CommitOutcome::Applied { cancel_requested }),
            None => self.status_of(id).await.map(|_| CommitOutcome::LeaseLost),
        }
    }

    fn work_notifications(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        let mut notifier = self
            .inner
            .notifier
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if notifier.is_none() {
            *notifier = Notifier::start(
                (*self.inner.pool.connect_options()).clone(),
                self.inner.sql.channel.clone(),
            );
        }
        notifier.as_ref().map(Notifier::subscribe)
    }

    fn prefers_batches(&self) -> bool {
        true
    }
}

impl PostgresStore {
    /// The status of an instance, or `NotFound`.
    async fn status_of(&self, id: &str) -> StoreResult<InstanceStatus> {
        let status: Option<String> = match sqlx::query_scalar(&self.sql().status)
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await
        {
            Ok(status) => status,
            Err(e) => return Err(self.fail(e).await),
        };
        match status {
            Some(s) => InstanceStatus::parse(&s),
            None => Err(StoreError::NotFound(id.to_owned())),
        }
    }
}

// ---------------------------------------------------------------------------
// Test support

/// The server the tests use when `FLUXO_TEST_POSTGRES_URL` is not set.
const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A store in a fresh schema of the test server, for tests.
///
/// The server is `FLUXO_TEST_POSTGRES_URL` (default
/// `postgres://postgres@127.0.0.1:5432/postgres`). The schema is
/// `fluxo_test_<random>`, and the connections' `application_name` is the
/// same name; the schema is dropped when the last clone of the store is
/// dropped. When the server cannot be reached, the test is skipped: this
/// prints a `SKIPPED` line to stderr and returns `None`; but when `CI` is
/// set it panics instead, so that CI cannot pass without Postgres. It also
/// panics when the server is reached but the store cannot be opened.
#[doc(hidden)]
pub async fn test_store_from_env() -> Option<PostgresStore> {
    let url =
        std::env::var("FLUXO_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.to_owned());
    let name = format!(
        "fluxo_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    );
    let options = PostgresOptions::new(url.clone())
        .schema(name.clone())
        .application_name(name.clone())
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10));
    if let Err(reason) = test_server_reachable(&options).await {
        if std::env::var_os("CI").is_some() {
            panic!(
                "the Postgres tests need a server: cannot connect to {url} ({reason}); \
                 set FLUXO_TEST_POSTGRES_URL to a reachable server"
            );
        }
        // Written to the process's stderr directly, past the test
        // harness's capture, so that a skip is seen in every run.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: Postgres test: cannot connect to {url} ({reason}); \
             set FLUXO_TEST_POSTGRES_URL to a reachable server to run it"
        );
        return None;
    }
    let pool = match open_pool(&options).await {
        Ok(pool) => pool,
        Err(e) => panic!("connecting to the Postgres test server {url} failed: {e}"),
    };
    let cleanup = DropSchema {
        options: (*pool.connect_options()).clone(),
        schema: name.clone(),
    };
    match PostgresStore::open(pool, name, Some(cleanup)).await {
        Ok(store) => Some(store),
        Err(e) => panic!("opening a Postgres store on {url} failed: {e}"),
    }
}

/// Whether the test server answers, tried once per process: when it does
/// not, every test would otherwise wait for the pool's connect timeout.
async fn test_server_reachable(options: &PostgresOptions) -> Result<(), String> {
    static UNREACHABLE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(reason) = UNREACHABLE.get() {
        return Err(reason.clone());
    }
    let reason = match connect_options(options) {
        Err(e) => e.to_string(),
        Ok(connect) => {
            match tokio::time::timeout(Duration::from_secs(5), PgConnection::connect_with(&connect))
                .await
            {
                Ok(Ok(conn)) => {
                    // Only the answer mattered.
                    let _ = conn.close().await;
                    return Ok(());
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer within 5 s".to_owned(),
            }
        }
    };
    Err(UNREACHABLE.get_or_init(|| reason).clone())
}

/// Drops a schema when dropped, from a thread of its own (dropping happens
/// outside async code, and the test's runtime may be shutting down).
struct DropSchema {
    options: PgConnectOptions,
    schema: String,
}

impl Drop for DropSchema {
    fn drop(&mut self) {
        let options = self.options.clone();
        let schema = std::mem::take(&mut self.schema);
        let dropper = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::warn!(error = %e, schema, "cannot drop the test schema");
                    return;
                }
            };
            runtime.block_on(async {
                let dropped = async {
                    let mut conn = PgConnection::connect_with(&options).await?;
                    // A connection of the dropped store still in a
                    // transaction must not hold this up for long.
                    sqlx::raw_sql(&format!(
                        "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                    ))
                    .execute(&mut conn)
                    .await?;
                    conn.close().await
                };
                if let Err(e) = dropped.await {
                    tracing::warn!(error = %e, schema, "cannot drop the test schema");
                }
            });
        });
        // The thread reports its own failures.
        let _ = dropper.join();
    }
}
