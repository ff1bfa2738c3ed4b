//! The workloads on Fluxo: `#[fluxo::workflow]` / `#[fluxo::step]`, a worker
//! in the same process, typed handles.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use fluxo::prelude::*;
use fluxo::store::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use fluxo::store::{InstanceStatus, ListFilter};

use crate::common::{self, Backend, CellResult, Spec, Workload};

#[fluxo::step]
async fn noop(i: u32) -> Result<u32, StepError> {
    common::gate().await;
    common::step_body(i);
    Ok(i)
}

/// `n` sequential no-op steps.
#[fluxo::workflow]
async fn chain(_ctx: WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
    let mut last = 0;
    for i in 0..n {
        last = noop(i).await?;
    }
    Ok(last)
}

#[fluxo::signal]
#[derive(Serialize, Deserialize)]
struct Wake {
    v: u32,
}

/// One step, then waits for a `Wake` signal.
#[fluxo::workflow(signals(Wake))]
async fn parked(ctx: WorkflowContext, i: u32) -> Result<u32, WorkflowError> {
    noop(i).await?;
    let w = ctx.wait::<Wake>().await;
    Ok(w.v)
}

async fn open(spec: &Spec) -> Result<(Fluxo, String)> {
    let t = &spec.target;
    let (fluxo, durability) = match t.backend {
        Backend::Memory => (Fluxo::in_memory(), "in-memory store".to_owned()),
        Backend::SqliteFull | Backend::SqliteNormal => {
            let sync = if t.synchronous_full() {
                Synchronous::Full
            } else {
                Synchronous::Normal
            };
            let store = SqliteStore::open_with(SqliteOptions::new(t.path()).synchronous(sync))
                .await
                .context("opening the SQLite store")?;
            (
                Fluxo::with_store(store),
                format!("SqliteOptions::synchronous({sync:?}), WAL"),
            )
        }
        Backend::Postgres => {
            let store = fluxo::store::postgres::PostgresStore::connect_with(
                fluxo::store::postgres::PostgresOptions::new(t.url()),
            )
            .await
            .context("connecting to Postgres")?;
            (
                Fluxo::with_store(store),
                "PostgresOptions default: synchronous_commit as on the server".to_owned(),
            )
        }
        #[cfg(feature = "redis")]
        Backend::Redis => {
            let store = fluxo::store::redis::RedisStore::connect_with(
                fluxo::store::redis::RedisOptions::new(t.url()).prefix(&t.tag),
            )
            .await
            .context("connecting to Redis")?;
            (Fluxo::with_store(store), "Redis store defaults".to_owned())
        }
        #[cfg(feature = "mongodb")]
        Backend::Mongodb => {
            let store = fluxo::store::mongodb::MongoStore::connect_with(
                fluxo::store::mongodb::MongoOptions::new(t.url()).database(&t.tag),
            )
            .await
            .context("connecting to MongoDB")?;
            (
                Fluxo::with_store(store),
                "MongoDB store defaults".to_owned(),
            )
        }
        #[allow(unreachable_patterns)]
        other => bail!(
            "this build of the harness has no Fluxo {} backend",
            other.name()
        ),
    };
    fluxo.register(Chain)?;
    fluxo.register(Parked)?;
    Ok((fluxo, durability))
}

pub async fn run(spec: &Spec) -> Result<CellResult> {
    let p = &spec.params;
    let (fluxo, durability) = open(spec).await?;
    let mut r = CellResult::default();
    r.note(format!(
        "fluxo {}: {durability}",
        spec.target.backend.name()
    ));
    match (spec.workload, spec.mode.as_str()) {
        (Workload::Sequential, _) => {
            let worker = fluxo.worker().spawn();
            // Warm-up: connections, statements, caches.
            Chain::start(&fluxo, p.seq_steps).await?.result().await?;
            let mut runs = common::SequentialRuns::new(spec);
            while runs.next().is_some() {
                Chain::start(&fluxo, p.seq_steps).await?.result().await?;
                runs.finished();
            }
            runs.report(&mut r);
            worker.shutdown().await;
        }
        (Workload::Throughput, _) => {
            let worker = fluxo.worker().concurrency(p.tp_in_flight as usize).spawn();
            Chain::start(&fluxo, p.tp_steps).await?.result().await?;
            let mut runs = common::ThroughputRuns::new(p);
            while runs.next().is_some() {
                runs.batch(None, |_| {
                    let fluxo = fluxo.clone();
                    let steps = p.tp_steps;
                    async move { Chain::start(&fluxo, steps).await?.result().await }
                })
                .await?;
            }
            runs.report(&mut r);
            worker.shutdown().await;
        }
        (Workload::History, _) => {
            let worker = fluxo.worker().spawn();
            // Warm-up, as in the sequential workload.
            Chain::start(&fluxo, p.seq_steps).await?.result().await?;
            common::probe_record(p.hist_steps as usize);
            let h = Chain::start(&fluxo, p.hist_steps).await?;
            let end = common::deadline(p.budget_s);
            match tokio::time::timeout_at(end.into(), h.result()).await {
                Ok(out) => {
                    out?;
                }
                Err(_) => r.note(format!(
                    "fluxo: history run stopped at the {} s budget",
                    p.budget_s
                )),
            }
            common::probe_stop_recording();
            common::history_metrics(&mut r, p.hist_steps, p.hist_window);
            worker.shutdown().await;
        }
        (Workload::Parked, _) => {
            let mut builder = fluxo.worker();
            match spec.variant.as_deref() {
                None => r.note("fluxo parked: default worker (max_cached 10,000)"),
                Some("cache-all") => {
                    builder = builder.max_cached(p.parked as usize);
                    r.note(format!("fluxo parked: max_cached({})", p.parked));
                }
                Some("evicted") => {
                    builder = builder.max_cached(0);
                    r.note("fluxo parked: max_cached(0), every parked instance evicted");
                }
                Some(v) => bail!("unknown Fluxo variant {v}"),
            }
            let worker = builder.spawn();
            // Warm-up round trip so the baseline includes the engine's fixed cost.
            let h = Parked::start(&fluxo, u32::MAX).await?;
            h.signal(Wake { v: 0 }).await?;
            h.result().await?;
            let before = common::settle_rss(Duration::from_secs(5)).await;
            let end = common::deadline(p.budget_s);
            let base = common::steps_run();
            let t = Instant::now();
            let (handles, err) = common::start_concurrently(p.parked, common::STARTERS, end, |i| {
                let fluxo = fluxo.clone();
                async move { Parked::start(&fluxo, i).await }
            })
            .await;
            if let Some(e) = err {
                r.note(format!("fluxo parked: a start failed: {e}"));
            }
            let started = handles.len() as u64;
            while common::steps_run() - base < started && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let reached = (common::steps_run() - base).min(started);
            r.set("park_s", t.elapsed().as_secs_f64());
            let after = common::settle_rss(Duration::from_secs(20)).await;
            parked_metrics(&mut r, p.parked, reached, before, after);
            r.set("cached_instances", worker.live_instances() as f64);
            // Wake them all and wait for every one to finish.
            let t = Instant::now();
            for h in &handles {
                h.signal(Wake { v: 1 }).await?;
            }
            match wait_all_finished(&fluxo, end + Duration::from_secs_f64(p.budget_s)).await {
                Ok(()) => r.set("wake_all_s", t.elapsed().as_secs_f64()),
                Err(e) => r.note(format!(
                    "fluxo parked {}: wake-all: {e:#}",
                    spec.variant.as_deref().unwrap_or("default")
                )),
            }
            worker.shutdown().await;
        }
        (Workload::Recovery, "load") => {
            common::close_gate();
            let _worker = recovery_worker(&fluxo, spec).spawn();
            for i in 0..p.rec_workflows {
                Chain::start_with(
                    &fluxo,
                    p.rec_steps,
                    StartOptions::new().id(format!("rec-{i}")),
                )
                .await?;
            }
            crate::child::kill_midway(p).await;
        }
        (Workload::Recovery, "resume") => {
            let worker = recovery_worker(&fluxo, spec).spawn();
            r.note("fluxo recovery: worker concurrency 100, default lease 30 s; both processes run under one stable worker id (WorkerBuilder::id), so the new process ends the dead one's leases and resumes at once; variant random-id: random worker ids (the dead process's instances are claimable once their 30 s leases expire); variant lease-5s: random ids and WorkerBuilder::lease(5 s) in both processes");
            let end = common::deadline(p.budget_s);
            wait_all_finished(&fluxo, end).await?;
            crate::child::resume_done(&mut r);
            worker.shutdown().await;
        }
        (w, m) => bail!("fluxo: no {} mode {m}", w.name()),
    }
    #[cfg(feature = "mongodb")]
    if spec.target.backend == Backend::Mongodb {
        // This run's database on the shared server goes away with the run.
        let store = fluxo::store::mongodb::MongoStore::connect_with(
            fluxo::store::mongodb::MongoOptions::new(spec.target.url()).database(&spec.target.tag),
        )
        .await?;
        store.client().database(&spec.target.tag).drop().await?;
    }
    Ok(r)
}

fn recovery_worker(fluxo: &Fluxo, spec: &Spec) -> fluxo::WorkerBuilder {
    let builder = fluxo
        .worker()
        .concurrency(spec.params.tp_in_flight as usize);
    match spec.variant.as_deref() {
        Some("lease-5s") => builder.lease(Duration::from_secs(5)),
        Some("random-id") => builder,
        // The deployment the README recommends: a stable id per process.
        _ => builder.id("recovery-node"),
    }
}

/// Polls until no instance is running.
async fn wait_all_finished(fluxo: &Fluxo, end: Instant) -> Result<()> {
    let filter = ListFilter {
        status: Some(InstanceStatus::Running),
        limit: Some(1),
        ..Default::default()
    };
    loop {
        if fluxo.list(filter.clone()).await?.is_empty() {
            return Ok(());
        }
        if Instant::now() >= end {
            bail!("instances still running at the budget's end");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn parked_metrics(r: &mut CellResult, target: u32, reached: u64, before: u64, after: u64) {
    r.set("target", target as f64);
    r.set("parked", reached as f64);
    r.set("rss_before_mib", before as f64 / 1024.0);
    r.set("rss_after_mib", after as f64 / 1024.0);
    if reached > 0 {
        r.set(
            "kib_per_wf",
            (after as f64 - before as f64).max(0.0) / reached as f64,
        );
    }
}
