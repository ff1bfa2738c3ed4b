//! Engine overhead per step: one workflow of 100 sequential no-op steps
//! (latency), and 100 such workflows at once (throughput), on the in-memory
//! backend, on SQLite (`synchronous=FULL` and `NORMAL`) and, with
//! `--features postgres`, on Postgres (`synchronous_commit=on`,
//! `FLUXO_TEST_POSTGRES_URL`), with `--features redis` on Redis
//! (`FLUXO_TEST_REDIS_URL`), with `--features mongodb` on MongoDB
//! (`FLUXO_TEST_MONGODB_URL`).
//!
//! `cargo bench --bench engine`

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fluxo::prelude::*;
use fluxo::store::Store;

mod common;
use common::{backends, bench_dir, runtime};
#[path = "common/sequential.rs"]
mod workflow;
use workflow::Sequential;

const STEPS: u32 = 100;

fn setup(rt: &tokio::runtime::Runtime, store: Arc<dyn Store>) -> (Fluxo, fluxo::Worker) {
    let _guard = rt.enter();
    let fluxo = Fluxo::from_store(store);
    fluxo.register(Sequential).unwrap();
    let worker = fluxo.worker().concurrency(128).spawn();
    (fluxo, worker)
}

fn bench_sequential(c: &mut Criterion) {
    let rt = runtime();
    let dir = bench_dir();
    let mut group = c.benchmark_group("sequential_100_steps");
    group.throughput(Throughput::Elements(STEPS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, store) in backends(&rt, &dir) {
        let (fluxo, worker) = setup(&rt, store);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.to_async(&rt).iter(|| async {
                let h = Sequential::start(&fluxo, STEPS).await.unwrap();
                assert_eq!(h.result().await.unwrap(), STEPS - 1);
            })
        });
        rt.block_on(worker.shutdown());
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// 100 workflows of 100 steps in flight at once (10 on MongoDB): steps per
/// second, where group commit shows.
fn bench_concurrent(c: &mut Criterion) {
    const WORKFLOWS: u32 = 100;
    let rt = runtime();
    let dir = bench_dir();
    let mut group = c.benchmark_group("concurrent_100x100_steps");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    for (name, store) in backends(&rt, &dir) {
        // The MongoDB-compatible test server takes a few hundred writes a
        // second: fewer workflows keep a run within minutes. The figure is
        // a rate (steps per second) either way.
        let workflows = if name == "mongodb" { 10 } else { WORKFLOWS };
        group.throughput(Throughput::Elements((workflows * STEPS) as u64));
        let (fluxo, worker) = setup(&rt, store);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.to_async(&rt).iter(|| async {
                let mut handles = Vec::new();
                for _ in 0..workflows {
                    handles.push(Sequential::start(&fluxo, STEPS).await.unwrap());
                }
                for h in handles {
                    assert_eq!(h.result().await.unwrap(), STEPS - 1);
                }
            })
        });
        rt.block_on(worker.shutdown());
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench_sequential, bench_concurrent);
criterion_main!(benches);
