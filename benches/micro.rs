//! Micro-level regressions: encoding and decoding one journal entry,
//! replaying a 1,000-entry history, and the store calls every step makes
//! (claim, append) on each backend this build has.
//!
//! `cargo bench --bench micro` (memory and SQLite); add
//! `--features postgres,redis,mongodb` for the server backends (URLs as for
//! the tests).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use fluxo::history::Event;
use fluxo::prelude::*;
use fluxo::store::{
    ClaimRequest, ClaimedInstance, Commit, NewInstance, Store, StoredEvent, Transition,
};

mod common;
use common::{backends, bench_dir, runtime, unique_suffix};

const HISTORY: u32 = 1_000;

fn step_completed() -> Event {
    Event::StepCompleted {
        name: "charge_card".into(),
        output: serde_json::json!({ "charge_id": "ch_3MmlLrLkdIwHu7ix", "amount": 1999, "currency": "eur" }),
    }
}

fn bench_journal(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal_entry");
    let event = step_completed();
    group.bench_function("encode", |b| b.iter(|| event.to_stored(7, 7)));
    let stored = event.to_stored(7, 7);
    group.bench_function("decode", |b| {
        b.iter(|| Event::from_stored(&stored).unwrap())
    });
    group.finish();
}

#[fluxo::step]
async fn noop(i: u32) -> Result<u32, StepError> {
    Ok(i)
}

#[fluxo::signal]
#[derive(Serialize, Deserialize)]
struct Go;

/// `n` steps, then waits for `Go`.
#[fluxo::workflow(signals(Go))]
async fn long_then_wait(ctx: WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
    let mut last = 0;
    for i in 0..n {
        last = noop(i).await?;
    }
    ctx.wait::<Go>().await;
    Ok(last)
}

/// An instance with 1,000 journaled steps, parked and evicted from the
/// worker's memory, is signalled: the time until its result covers loading
/// the journal, decoding and replaying 1,000 entries, one signal commit and
/// the completion.
fn bench_replay(c: &mut Criterion) {
    let rt = runtime();
    let dir = bench_dir();
    let mut group = c.benchmark_group("replay_1000_entries");
    group.sample_size(10);
    for (name, store) in backends(&rt, &dir) {
        if name == "mongodb" {
            // The MongoDB test server writes a few hundred entries a second:
            // building each 1,000-entry history would take minutes.
            continue;
        }
        let fluxo = Fluxo::from_store(store);
        fluxo.register(LongThenWait).unwrap();
        let worker = {
            let _guard = rt.enter();
            fluxo.worker().max_cached(0).spawn()
        };
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let fluxo = fluxo.clone();
                let worker = &worker;
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let h = LongThenWait::start(&fluxo, HISTORY).await.unwrap();
                        // Not timed: wait until it is parked and evicted.
                        loop {
                            let journal = fluxo.history(h.id()).await.unwrap().len();
                            if journal >= HISTORY as usize && worker.live_instances() == 0 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        let t = Instant::now();
                        h.signal(Go).await.unwrap();
                        assert_eq!(h.result().await.unwrap(), HISTORY - 1);
                        total += t.elapsed();
                    }
                    total
                }
            })
        });
        rt.block_on(worker.shutdown());
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn claim_request(workflow: &str) -> ClaimRequest {
    ClaimRequest {
        owner: "bench".into(),
        workflows: vec![(workflow.to_owned(), 1)],
        limit: 1,
        lease: Duration::from_secs(60),
    }
}

/// Creates an instance of `workflow` and claims it.
async fn create_and_claim(store: &dyn Store, workflow: &str) -> ClaimedInstance {
    let new = NewInstance {
        id: format!("i-{}", unique_suffix()),
        workflow: workflow.to_owned(),
        version: 1,
        input: b"null".to_vec(),
        parent_id: None,
    };
    store.create_instance(new).await.unwrap();
    let mut batch = store.claim(&claim_request(workflow)).await.unwrap();
    assert_eq!(batch.claimed.len(), 1);
    batch.claimed.remove(0)
}

/// The store calls of a workflow's life: creating and claiming an
/// instance; appending one journal entry to a claimed instance (the commit
/// of one step).
fn bench_store(c: &mut Criterion) {
    let rt = runtime();
    let dir = bench_dir();
    let mut group = c.benchmark_group("store");
    group.sample_size(20);
    for (name, store) in backends(&rt, &dir) {
        let workflow = format!("bench-{}", unique_suffix());
        group.bench_function(BenchmarkId::new("create_and_claim", name), |b| {
            b.to_async(&rt).iter(|| {
                let store = Arc::clone(&store);
                let workflow = workflow.clone();
                async move {
                    create_and_claim(&*store, &workflow).await;
                }
            })
        });

        // One claimed instance whose journal grows by one entry per commit.
        let workflow = format!("bench-{}", unique_suffix());
        let claimed = rt.block_on(create_and_claim(&*store, &workflow));
        let entry = step_completed().to_stored(0, 0);
        let next = std::sync::atomic::AtomicU64::new(0);
        group.bench_function(BenchmarkId::new("append_one_entry", name), |b| {
            b.to_async(&rt).iter(|| {
                let event_id = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let commit = Commit {
                    instance_id: claimed.record.id.as_str().into(),
                    lease_token: claimed.lease_token,
                    events: vec![StoredEvent {
                        event_id,
                        seq: event_id,
                        ..entry.clone()
                    }]
                    .into(),
                    transition: Transition::None,
                    ..Commit::default()
                };
                let store = Arc::clone(&store);
                async move {
                    store.commit(commit).await.unwrap();
                }
            })
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench_journal, bench_replay, bench_store);
criterion_main!(benches);
