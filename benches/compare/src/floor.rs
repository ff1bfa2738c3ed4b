//! The floor of one sequential durable step: a bare commit of the same
//! shape as an engine's step commit, with no engine around it, measured
//! right before a sequential cell on the same storage at the same
//! durability. The table shows it next to each engine's per-step latency,
//! and their ratio (how far the engine is from its store's own commit).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use rusqlite::{params, Connection};
use sqlx::Connection as _;

use crate::common;

/// How many commits a probe times.
pub const COMMITS: usize = 200;

/// Commits a SQLite probe makes before it times any.
const WARM_UP: usize = 1_200;

/// µs per SQLite transaction that reads a run's row (the fence) and
/// inserts one journal row, on a fresh file in `dir`, in WAL mode at
/// `synchronous=FULL` or `NORMAL`: the commit a sequential step cannot do
/// without (one page written), with this bundled SQLite (fdatasync build).
pub fn sqlite(dir: &Path, full: bool) -> Result<f64> {
    let path = dir.join("floor-probe.db");
    common::remove_sqlite_files(&path);
    let out = (|| {
        let conn = Connection::open(&path)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
        conn.pragma_update(None, "synchronous", if full { "FULL" } else { "NORMAL" })?;
        conn.execute_batch(
            "CREATE TABLE runs (id TEXT PRIMARY KEY, next INTEGER NOT NULL);
             CREATE TABLE journal (run TEXT NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL,
                                   PRIMARY KEY (run, n)) WITHOUT ROWID;
             INSERT INTO runs VALUES ('r', 0);",
        )?;
        let mut conn = conn;
        let step = |conn: &mut Connection, n: i64| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.prepare_cached("SELECT next FROM runs WHERE id = 'r'")?
                .query_row([], |_| Ok(()))?;
            tx.prepare_cached("INSERT INTO journal VALUES ('r', ?1, ?2)")?
                .execute(params![n, &[0x5au8; 48][..]])?;
            tx.commit()
        };
        // Warm up past the first automatic checkpoint (1,000 pages, one
        // page a commit), then checkpoint: the next commit starts the log
        // over, and the timed ones (some 200 pages) then overwrite blocks
        // the file has, with no checkpoint among them. That is SQLite's
        // cheapest commit: while the log still grows, each flush also
        // commits the file's new size. An engine's step, timed over many,
        // also pays its share of the checkpoints and, on a fresh file, of
        // the growing log; this floor does not.
        for n in 0..WARM_UP as i64 {
            step(&mut conn, n)?;
        }
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        let t = Instant::now();
        for n in WARM_UP as i64..(WARM_UP + COMMITS) as i64 {
            step(&mut conn, n)?;
        }
        Ok::<_, rusqlite::Error>(t.elapsed().as_secs_f64() * 1e6 / COMMITS as f64)
    })()
    .context("SQLite floor probe");
    common::remove_sqlite_files(&path);
    out
}

/// What a sequential step's commit costs Postgres at `url` (the server's
/// `synchronous_commit`), with no engine around it, each timed over the
/// same connection in alternating blocks.
pub struct PostgresFloor {
    /// µs per autocommit INSERT of one row: one durable round trip, the
    /// least any step on Postgres costs.
    pub insert_us: f64,
    /// µs per fenced step commit: one autocommit statement that updates
    /// the run's row only under its lease token and inserts the journal
    /// row, the least a step costs when a stale worker's commit must be
    /// refused (what every engine here does in some form).
    pub fenced_us: f64,
}

/// Measures a [`PostgresFloor`].
pub async fn postgres(url: &str) -> Result<PostgresFloor> {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .context("Postgres floor probe: connecting")?;
    // Tables of their own (not temporary ones: those skip the WAL, so
    // their commits flush nothing).
    let tables = Tables::new();
    let timed = async {
        for create in tables.create() {
            sqlx::query(&create).execute(&mut conn).await?;
        }
        timed_commits(&mut conn, &tables).await
    }
    .await;
    // Also after a failure half-way: what was created goes.
    for drop in tables.drop() {
        sqlx::query(&drop).execute(&mut conn).await.ok();
    }
    conn.close().await.ok();
    timed
}

/// The probe's tables, named after this process.
struct Tables {
    rows: String,
    runs: String,
    journal: String,
}

impl Tables {
    /// Names unique to this process.
    fn new() -> Self {
        let pid = std::process::id();
        Tables {
            rows: format!("fluxo_compare_floor_{pid}"),
            runs: format!("fluxo_compare_floor_runs_{pid}"),
            journal: format!("fluxo_compare_floor_journal_{pid}"),
        }
    }

    /// Statements creating the tables: one for the bare inserts, a run's
    /// row and its journal for the fenced commits.
    fn create(&self) -> [String; 3] {
        [
            format!(
                "CREATE TABLE {} (n BIGINT PRIMARY KEY, data BYTEA NOT NULL)",
                self.rows
            ),
            format!(
                "CREATE TABLE {} (id TEXT PRIMARY KEY, token BIGINT NOT NULL, \
                   next BIGINT NOT NULL, updated_at BIGINT NOT NULL)",
                self.runs
            ),
            format!(
                "CREATE TABLE {} (run TEXT NOT NULL, n BIGINT NOT NULL, data BYTEA NOT NULL, \
                   PRIMARY KEY (run, n))",
                self.journal
            ),
        ]
    }

    /// Statements dropping the tables (those that exist).
    fn drop(&self) -> [String; 3] {
        [&self.rows, &self.runs, &self.journal].map(|t| format!("DROP TABLE IF EXISTS {t}"))
    }
}

/// Blocks of each kind of commit, alternated so that a drift of the disk
/// weighs on both alike.
const BLOCKS: usize = 4;

/// Times [`COMMITS`] bare inserts and as many fenced commits, in
/// [`BLOCKS`] alternating blocks after one untimed block of each.
async fn timed_commits(conn: &mut sqlx::PgConnection, t: &Tables) -> Result<PostgresFloor> {
    // A run id as long as an engine's (a UUID).
    let run = "0b5cf1d2-4c5e-4f7e-9a53-7d2f0c6f1e2a";
    sqlx::query(&format!("INSERT INTO {} VALUES ($1, 1, 0, 0)", t.runs))
        .bind(run)
        .execute(&mut *conn)
        .await?;
    let insert_sql = format!("INSERT INTO {} VALUES ($1, $2)", t.rows);
    let fenced_sql = format!(
        "WITH f AS (UPDATE {} SET next = next + 1, updated_at = $3 \
           WHERE id = $1 AND token = $2 RETURNING id, next) \
         INSERT INTO {} (run, n, data) SELECT f.id, f.next, $4 FROM f",
        t.runs, t.journal
    );
    let data = &[0x5au8; 48][..];
    let (mut n, mut insert, mut fenced) = (0i64, Duration::ZERO, Duration::ZERO);
    // The first block of each warms up (statements, caches) untimed.
    for block in 0..=BLOCKS {
        let t0 = Instant::now();
        for _ in 0..COMMITS / BLOCKS {
            n += 1;
            sqlx::query(&insert_sql)
                .bind(n)
                .bind(data)
                .execute(&mut *conn)
                .await?;
        }
        let t1 = Instant::now();
        for _ in 0..COMMITS / BLOCKS {
            let done = sqlx::query(&fenced_sql)
                .bind(run)
                .bind(1i64)
                .bind(n)
                .bind(data)
                .execute(&mut *conn)
                .await?;
            anyhow::ensure!(done.rows_affected() == 1, "the fenced commit wrote nothing");
        }
        if block > 0 {
            insert += t1 - t0;
            fenced += t1.elapsed();
        }
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6 / COMMITS as f64;
    Ok(PostgresFloor {
        insert_us: us(insert),
        fenced_us: us(fenced),
    })
}
