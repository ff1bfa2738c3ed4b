//! The workloads on duroxide: an orchestration that schedules activities
//! one after the other, `schedule_wait` for the signal, the in-process
//! `Runtime` with its dispatchers, and a `Client` on the same provider.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use duroxide::providers::sqlite::SqliteProvider;
use duroxide::providers::Provider;
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::runtime::{self, RuntimeOptions};
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};

use crate::common::{self, Backend, CellResult, Spec, Workload};
use crate::fluxo_engine::parked_metrics;

fn activities() -> ActivityRegistry {
    ActivityRegistry::builder()
        .register("Noop", |_ctx: ActivityContext, input: String| async move {
            let i: u32 = input
                .parse()
                .map_err(|e| format!("bad input {input:?}: {e}"))?;
            common::gate().await;
            common::step_body(i);
            Ok(input)
        })
        .build()
}

fn orchestrations() -> OrchestrationRegistry {
    OrchestrationRegistry::builder()
        // `n` sequential no-op activities.
        .register(
            "Chain",
            |ctx: OrchestrationContext, input: String| async move {
                let n: u32 = input
                    .parse()
                    .map_err(|e| format!("bad input {input:?}: {e}"))?;
                let mut last = String::new();
                for i in 0..n {
                    last = ctx.schedule_activity("Noop", i.to_string()).await?;
                }
                Ok(last)
            },
        )
        // One activity, then waits for the external event `wake`.
        .register(
            "Parked",
            |ctx: OrchestrationContext, input: String| async move {
                ctx.schedule_activity("Noop", input).await?;
                Ok(ctx.schedule_wait("wake").await)
            },
        )
        .build()
}

/// Sets `PRAGMA synchronous` on every connection of the provider's pool
/// (the provider has no option for it) and reads it back.
async fn force_synchronous(pool: &sqlx::SqlitePool, level: Option<&str>) -> Result<Vec<i64>> {
    let mut conns = Vec::new();
    for _ in 0..pool.options().get_max_connections() {
        conns.push(pool.acquire().await?);
    }
    let mut levels = Vec::new();
    for c in conns.iter_mut() {
        if let Some(level) = level {
            sqlx::query(&format!("PRAGMA synchronous = {level}"))
                .execute(&mut **c)
                .await?;
        }
        levels.push(
            sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&mut **c)
                .await?,
        );
    }
    Ok(levels)
}

async fn open(spec: &Spec, r: &mut CellResult) -> Result<Arc<dyn Provider>> {
    let t = &spec.target;
    Ok(match t.backend {
        Backend::Memory => {
            r.note("duroxide memory: SqliteProvider::new_in_memory (SQLite in memory, synchronous=OFF)");
            Arc::new(SqliteProvider::new_in_memory().await?)
        }
        Backend::SqliteFull | Backend::SqliteNormal => {
            let url = format!("sqlite:{}?mode=rwc", t.path().display());
            let provider = SqliteProvider::new(&url, None).await?;
            let opened = force_synchronous(provider.get_pool(), None).await?;
            let want = if t.synchronous_full() {
                "FULL"
            } else {
                "NORMAL"
            };
            let set = force_synchronous(provider.get_pool(), Some(want)).await?;
            r.note(format!(
                "duroxide {}: SqliteProvider::new opens its 5 connections with `PRAGMA synchronous = WAL` \
                 (not a valid level; SQLite reads {opened:?}, i.e. NORMAL) and has no option for it; \
                 the harness set synchronous={want} on each pooled connection after opening \
                 (reads {set:?}; a connection the pool opens later would be NORMAL again)",
                t.backend.name()
            ));
            Arc::new(provider)
        }
        Backend::Postgres => {
            r.note("duroxide postgres: duroxide-pg PostgresProvider::new (server's synchronous_commit)");
            Arc::new(
                duroxide_pg::PostgresProvider::new(t.url())
                    .await
                    .context("connecting to Postgres")?,
            )
        }
        other => bail!("duroxide has no {} backend", other.name()),
    })
}

async fn wait_done(client: &Client, id: &str, timeout: Duration) -> Result<String> {
    match client.wait_for_orchestration(id, timeout).await? {
        OrchestrationStatus::Completed { output, .. } => Ok(output),
        OrchestrationStatus::Failed { details, .. } => {
            bail!("orchestration {id} failed: {}", details.display_message())
        }
        other => bail!("orchestration {id}: {other:?}"),
    }
}

pub async fn run(spec: &Spec) -> Result<CellResult> {
    let p = &spec.params;
    let mut r = CellResult::default();
    let store = open(spec, &mut r).await?;
    let mut options = RuntimeOptions {
        dispatcher_min_poll_interval: Duration::from_millis(p.duroxide_poll_ms),
        ..Default::default()
    };
    if matches!(
        spec.workload,
        Workload::Throughput | Workload::Recovery | Workload::Parked
    ) {
        options.orchestration_concurrency = p.duroxide_concurrency;
        options.worker_concurrency = p.duroxide_concurrency;
    }
    r.note(format!(
        "duroxide runtime: dispatcher_min_poll_interval {} ms (default 100), orchestration/worker concurrency {}/{}",
        p.duroxide_poll_ms, options.orchestration_concurrency, options.worker_concurrency
    ));
    let rt = runtime::Runtime::start_with_options(
        store.clone(),
        activities(),
        orchestrations(),
        options,
    )
    .await;
    let client = Client::new(store.clone());
    let budget = Duration::from_secs_f64(p.budget_s);
    match (spec.workload, spec.mode.as_str()) {
        (Workload::Sequential, _) => {
            client
                .start_orchestration("warm", "Chain", p.seq_steps.to_string())
                .await?;
            wait_done(&client, "warm", budget).await?;
            let mut runs = common::SequentialRuns::new(spec);
            while let Some(i) = runs.next() {
                let id = format!("seq-{i}");
                client
                    .start_orchestration(&id, "Chain", p.seq_steps.to_string())
                    .await?;
                wait_done(&client, &id, budget).await?;
                runs.finished();
            }
            runs.report(&mut r);
        }
        (Workload::Throughput, _) => {
            client
                .start_orchestration("warm", "Chain", p.tp_steps.to_string())
                .await?;
            wait_done(&client, "warm", budget).await?;
            let end = common::deadline(p.budget_s);
            let mut runs = common::ThroughputRuns::new(p);
            while let Some(run) = runs.next() {
                let started = runs
                    .batch(Some(end), |i| {
                        let client = client.clone();
                        let steps = p.tp_steps;
                        async move {
                            let id = format!("tp-{run}-{i}");
                            client
                                .start_orchestration(&id, "Chain", steps.to_string())
                                .await?;
                            wait_done(&client, &id, budget).await
                        }
                    })
                    .await?;
                if started < p.tp_workflows {
                    r.note(format!(
                        "duroxide throughput: stopped starting at the {} s budget after {started} workflows",
                        p.budget_s
                    ));
                }
            }
            runs.report(&mut r);
        }
        (Workload::History, _) => {
            // Warm-up, as in the sequential workload.
            client
                .start_orchestration("warm", "Chain", p.seq_steps.to_string())
                .await?;
            wait_done(&client, "warm", budget).await?;
            common::probe_record(p.hist_steps as usize);
            client
                .start_orchestration("hist", "Chain", p.hist_steps.to_string())
                .await?;
            match wait_done(&client, "hist", budget).await {
                Ok(_) => {}
                Err(e) => r.note(format!(
                    "duroxide: history run stopped at the {} s budget ({e})",
                    p.budget_s
                )),
            }
            common::probe_stop_recording();
            common::history_metrics(&mut r, p.hist_steps, p.hist_window);
        }
        (Workload::Parked, _) => {
            r.note("duroxide parked: orchestrations are not kept in memory between turns; each event replays the history");
            client
                .start_orchestration("warm", "Parked", "4294967295")
                .await?;
            client.raise_event("warm", "wake", "0").await?;
            wait_done(&client, "warm", budget).await?;
            let before = common::settle_rss(Duration::from_secs(5)).await;
            let end = common::deadline(p.budget_s);
            let base = common::steps_run();
            let t = Instant::now();
            let (ids, err) = common::start_concurrently(p.parked, common::STARTERS, end, |i| {
                let client = client.clone();
                async move {
                    let id = format!("p-{i}");
                    client
                        .start_orchestration(id.clone(), "Parked", i.to_string())
                        .await
                        .map(|_| id)
                }
            })
            .await;
            if let Some(e) = err {
                r.note(format!("duroxide parked: a start failed: {e}"));
            }
            let started = ids.len() as u64;
            while common::steps_run() - base < started && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let reached = (common::steps_run() - base).min(started);
            r.set("park_s", t.elapsed().as_secs_f64());
            let after = common::settle_rss(Duration::from_secs(20)).await;
            parked_metrics(&mut r, p.parked, reached, before, after);
            if reached == started {
                let t = Instant::now();
                for id in &ids {
                    client
                        .raise_event(id.clone(), "wake", "1")
                        .await
                        .with_context(|| format!("waking {id}"))?;
                }
                match wait_completed(&client, started as usize + 1, end + budget).await {
                    Ok(()) => r.set("wake_all_s", t.elapsed().as_secs_f64()),
                    Err(e) => r.note(format!("duroxide parked: wake-all: {e:#}")),
                }
            } else {
                r.note(format!(
                    "duroxide parked: {reached} of {started} started orchestrations reached the wait within the {} s budget",
                    p.budget_s
                ));
            }
        }
        (Workload::Recovery, "load") => {
            common::close_gate();
            for i in 0..p.rec_workflows {
                client
                    .start_orchestration(format!("rec-{i}"), "Chain", p.rec_steps.to_string())
                    .await?;
            }
            crate::child::kill_midway(p).await;
        }
        (Workload::Recovery, "resume") => {
            r.note("duroxide recovery: work items locked by the killed process are retried when their locks expire (orchestrator 5 s, worker 30 s by default)");
            let end = common::deadline(p.budget_s);
            wait_completed(&client, p.rec_workflows as usize, end).await?;
            crate::child::resume_done(&mut r);
        }
        (w, m) => bail!("duroxide: no {} mode {m}", w.name()),
    }
    rt.shutdown(Some(1000)).await;
    Ok(r)
}

/// Polls until `n` orchestrations are completed.
async fn wait_completed(client: &Client, n: usize, end: Instant) -> Result<()> {
    loop {
        let done = client.list_instances_by_status("Completed").await?.len();
        if done >= n {
            return Ok(());
        }
        if Instant::now() >= end {
            let failed = client.list_instances_by_status("Failed").await?;
            let running = client.list_instances_by_status("Running").await?;
            bail!(
                "{done} of {n} orchestrations completed at the budget's end ({} failed, running: {:?})",
                failed.len(),
                running.iter().take(5).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
