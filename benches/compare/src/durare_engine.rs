//! The workloads on durare: `#[durare::workflow]` / `#[durare::step]`
//! started directly on the engine (each run on its own task in this
//! process), `recv` for the signal, `recover()` after a crash.

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use durare::{DurableContext, DurableEngine, ListFilter, StateProvider, WorkflowOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::common::{self, Backend, CellResult, Spec, Workload};
use crate::fluxo_engine::parked_metrics;

#[durare::step]
async fn noop(ctx: &DurableContext, i: u32) -> durare::Result<u32> {
    common::gate().await;
    common::step_body(i);
    Ok(i)
}

/// `n` sequential no-op steps.
#[durare::workflow]
async fn chain(ctx: DurableContext, n: u32) -> durare::Result<u32> {
    let mut last = 0;
    for i in 0..n {
        last = noop(&ctx, i).await?;
    }
    Ok(last)
}

/// One step, then waits for a message on topic `wake`.
#[durare::workflow]
async fn parked(ctx: DurableContext, i: u32) -> durare::Result<u32> {
    noop(&ctx, i).await?;
    let v: Option<u32> = ctx.recv("wake", Duration::from_secs(7 * 24 * 3600)).await?;
    Ok(v.unwrap_or(0))
}

async fn open(spec: &Spec, r: &mut CellResult) -> Result<DurableEngine> {
    let t = &spec.target;
    let provider: Arc<dyn StateProvider> = match t.backend {
        Backend::Memory => {
            r.note("durare memory: InMemoryProvider");
            Arc::new(durare::InMemoryProvider::new())
        }
        Backend::SqliteFull | Backend::SqliteNormal => {
            // As `SqliteProvider::connect` configures its pool (WAL, foreign
            // keys, 5 s busy timeout, 5 connections), with the synchronous
            // level of this run instead of its fixed NORMAL.
            let sync = if t.synchronous_full() {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            };
            let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", t.path().display()))?
                .create_if_missing(true)
                .foreign_keys(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(sync)
                .busy_timeout(Duration::from_secs(5));
            let pool = SqlitePoolOptions::new()
                .max_connections(5)
                .connect_with(opts)
                .await?;
            let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&pool)
                .await?;
            r.note(format!(
                "durare {}: SqliteProvider::from_pool with synchronous={sync:?} (PRAGMA synchronous reads {level}), WAL",
                t.backend.name()
            ));
            Arc::new(durare::SqliteProvider::from_pool(pool))
        }
        Backend::Postgres => {
            r.note("durare postgres: PostgresProvider::connect (server's synchronous_commit)");
            Arc::new(
                durare::PostgresProvider::connect(t.url())
                    .await
                    .context("connecting to Postgres")?,
            )
        }
        other => bail!("durare has no {} backend", other.name()),
    };
    Ok(DurableEngine::new(provider).await?)
}

pub async fn run(spec: &Spec) -> Result<CellResult> {
    let p = &spec.params;
    let mut r = CellResult::default();
    let engine = Arc::new(open(spec, &mut r).await?);
    match (spec.workload, spec.mode.as_str()) {
        (Workload::Sequential, _) => {
            engine
                .start_with(Chain, p.seq_steps, WorkflowOptions::default())
                .await?
                .await?;
            let mut runs = common::SequentialRuns::new(spec);
            while runs.next().is_some() {
                engine
                    .start_with(Chain, p.seq_steps, WorkflowOptions::default())
                    .await?
                    .await?;
                runs.finished();
            }
            runs.report(&mut r);
        }
        (Workload::Throughput, _) => {
            engine
                .start_with(Chain, p.tp_steps, WorkflowOptions::default())
                .await?
                .await?;
            let mut runs = common::ThroughputRuns::new(p);
            while runs.next().is_some() {
                runs.batch(None, |_| {
                    let engine = engine.clone();
                    let steps = p.tp_steps;
                    async move {
                        engine
                            .start_with(Chain, steps, WorkflowOptions::default())
                            .await?
                            .await
                    }
                })
                .await?;
            }
            runs.report(&mut r);
        }
        (Workload::History, _) => {
            // Warm-up, as in the sequential workload.
            engine
                .start_with(Chain, p.seq_steps, WorkflowOptions::default())
                .await?
                .await?;
            common::probe_record(p.hist_steps as usize);
            let h = engine
                .start_with(Chain, p.hist_steps, WorkflowOptions::default())
                .await?;
            let end = common::deadline(p.budget_s);
            match tokio::time::timeout_at(end.into(), h.result()).await {
                Ok(out) => {
                    out?;
                }
                Err(_) => r.note(format!(
                    "durare: history run stopped at the {} s budget",
                    p.budget_s
                )),
            }
            common::probe_stop_recording();
            common::history_metrics(&mut r, p.hist_steps, p.hist_window);
        }
        (Workload::Parked, _) => {
            if spec.target.backend.is_sqlite() || spec.target.backend == Backend::Memory {
                r.note("durare parked: a waiting recv holds its task and re-reads the database every 25 ms (no push wake-up on this backend)");
            }
            let h = engine
                .start_with(Parked, u32::MAX, WorkflowOptions::with_id("warm"))
                .await?;
            engine.send("warm", 0u32, "wake").await?;
            h.await?;
            let before = common::settle_rss(Duration::from_secs(5)).await;
            let end = common::deadline(p.budget_s);
            let base = common::steps_run();
            let t = Instant::now();
            let (handles, err) = common::start_concurrently(p.parked, common::STARTERS, end, |i| {
                let engine = engine.clone();
                async move {
                    engine
                        .start_with(Parked, i, WorkflowOptions::with_id(format!("p-{i}")))
                        .await
                }
            })
            .await;
            if let Some(e) = err {
                r.note(format!("durare parked: a start failed: {e}"));
            }
            let started = handles.len() as u64;
            while common::steps_run() - base < started && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let reached = (common::steps_run() - base).min(started);
            r.set("park_s", t.elapsed().as_secs_f64());
            let after = common::settle_rss(Duration::from_secs(20)).await;
            parked_metrics(&mut r, p.parked, reached, before, after);
            let t = Instant::now();
            for h in &handles {
                engine.send(h.id(), 1u32, "wake").await?;
            }
            match wait_all_finished(&engine, end + Duration::from_secs_f64(p.budget_s)).await {
                Ok(()) => r.set("wake_all_s", t.elapsed().as_secs_f64()),
                Err(e) => r.note(format!("durare parked: wake-all: {e:#}")),
            }
        }
        (Workload::Recovery, "load") => {
            common::close_gate();
            for i in 0..p.rec_workflows {
                engine
                    .start_with(
                        Chain,
                        p.rec_steps,
                        WorkflowOptions::with_id(format!("rec-{i}")),
                    )
                    .await?;
            }
            crate::child::kill_midway(p).await;
        }
        (Workload::Recovery, "resume") => {
            let n = engine.recover().await?;
            r.set("recovered", n as f64);
            r.note("durare recovery: recover() re-dispatches every PENDING workflow of this application version at once (no lease to wait for)");
            let end = common::deadline(p.budget_s);
            wait_all_finished(&engine, end).await?;
            crate::child::resume_done(&mut r);
        }
        (w, m) => bail!("durare: no {} mode {m}", w.name()),
    }
    let _ = engine.shutdown(Duration::from_secs(1)).await;
    Ok(r)
}

/// Polls until no workflow is PENDING.
async fn wait_all_finished(engine: &DurableEngine, end: Instant) -> Result<()> {
    let filter = ListFilter {
        status: vec!["PENDING".to_owned()],
        limit: Some(1),
        load_input: false,
        load_output: false,
        ..Default::default()
    };
    loop {
        if engine.list_workflows(&filter).await?.is_empty() {
            return Ok(());
        }
        if Instant::now() >= end {
            bail!("workflows still pending at the budget's end");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
