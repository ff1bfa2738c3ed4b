//! Engine overhead per step: one workflow of 100 sequential no-op steps, on
//! the in-memory backend and on SQLite (`synchronous=FULL` and `NORMAL`).
//!
//! `cargo bench --bench engine`

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fluxo::prelude::*;
use fluxo::store::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use fluxo::store::Store;

const STEPS: u32 = 100;

#[fluxo::step]
async fn noop(i: u32) -> Result<u32, StepError> {
    Ok(i)
}

#[fluxo::workflow]
async fn sequential(_ctx: WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
    let mut last = 0;
    for i in 0..n {
        last = noop(i).await?;
    }
    Ok(last)
}

fn setup(rt: &tokio::runtime::Runtime, store: Arc<dyn Store>) -> (Fluxo, fluxo::Worker) {
    let _guard = rt.enter();
    let fluxo = Fluxo::from_store(store);
    fluxo.register(Sequential).unwrap();
    let worker = fluxo.worker().concurrency(16).spawn();
    (fluxo, worker)
}

fn bench_sequential(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("fluxo-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let mut backends: Vec<(&str, Arc<dyn Store>)> =
        vec![("memory", Arc::new(fluxo::store::memory::MemoryStore::new()))];
    for (name, sync) in [
        ("sqlite-full", Synchronous::Full),
        ("sqlite-normal", Synchronous::Normal),
    ] {
        let opts = SqliteOptions::new(dir.join(format!("{name}.db"))).synchronous(sync);
        let store = rt.block_on(SqliteStore::open_with(opts)).unwrap();
        backends.push((name, Arc::new(store)));
    }

    let mut group = c.benchmark_group("sequential_100_steps");
    group.throughput(Throughput::Elements(STEPS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, store) in backends {
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

criterion_group!(benches, bench_sequential);
criterion_main!(benches);
