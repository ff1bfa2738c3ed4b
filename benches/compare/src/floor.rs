//! The floor of one sequential durable step: a bare commit of the same
//! shape as an engine's step commit, with no engine around it, measured
//! right before a sequential cell on the same storage at the same
//! durability. The table shows it next to each engine's per-step latency,
//! and their ratio (how far the engine is from its store's own commit).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result};
use rusqlite::{params, Connection};
use sqlx::Connection as _;

use crate::common;

/// How many commits a probe times.
pub const COMMITS: usize = 200;

/// Commits a SQLite probe makes before it times any.
const WARM_UP: usize = 1_200;

/// µs per SQLite transaction of one UPDATE and one INSERT (a step's
/// journal row and its instance's counter) on a fresh file in `dir`, in
/// WAL mode at `synchronous=FULL` or `NORMAL`: the commit a sequential
/// step cannot do without, with this bundled SQLite (fdatasync build).
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
            tx.prepare_cached("UPDATE runs SET next = next + 1 WHERE id = 'r'")?
                .execute([])?;
            tx.prepare_cached("INSERT INTO journal VALUES ('r', ?1, ?2)")?
                .execute(params![n, &[0x5au8; 48][..]])?;
            tx.commit()
        };
        // Warm up past the first automatic checkpoints (1,000 pages each,
        // about two pages a commit), then checkpoint: the next commit
        // starts the log over, and the timed ones (some 400 pages) then
        // overwrite blocks the file has, with no checkpoint among them.
        // That is SQLite's cheapest commit: while the log still grows,
        // each flush also commits the file's new size. An engine's step,
        // timed over many, also pays its share of the checkpoints and, on
        // a fresh file, of the growing log; this floor does not.
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

/// µs per autocommit INSERT of one row through one sqlx connection to the
/// Postgres at `url` (the server's `synchronous_commit`): one durable round
/// trip, the least a sequential step on Postgres costs.
pub async fn postgres(url: &str) -> Result<f64> {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .context("Postgres floor probe: connecting")?;
    // A table of its own (not a temporary one: those skip the WAL, so
    // their commits flush nothing).
    let table = format!("fluxo_compare_floor_{}", std::process::id());
    sqlx::query(&format!(
        "CREATE TABLE {table} (n BIGINT PRIMARY KEY, data BYTEA NOT NULL)"
    ))
    .execute(&mut conn)
    .await?;
    let timed = timed_inserts(&mut conn, &table).await;
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .await
        .ok();
    conn.close().await.ok();
    timed
}

async fn timed_inserts(conn: &mut sqlx::PgConnection, table: &str) -> Result<f64> {
    let sql = format!("INSERT INTO {table} VALUES ($1, $2)");
    let insert = |n: i64| sqlx::query(&sql).bind(n).bind(&[0x5au8; 48][..]);
    for n in 0..COMMITS as i64 {
        insert(n).execute(&mut *conn).await?;
    }
    let t = Instant::now();
    for n in COMMITS as i64..2 * COMMITS as i64 {
        insert(n).execute(&mut *conn).await?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / COMMITS as f64)
}
