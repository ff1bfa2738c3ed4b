//! The engine's own cost per step, on the in-memory store: no storage
//! latency, so what is left is the engine (journaling, encoding, the commit
//! path, scheduling). Prints µs and heap allocations per step.
//!
//! ```sh
//! cargo bench --bench step_overhead -- sequential   # 5 workflows of N steps (N=100000)
//! cargo bench --bench step_overhead -- throughput   # 20 rounds of 1,000 workflows x 10 steps, 100 in flight
//! # instructions per step, which a noisy machine does not blur:
//! N=20000 valgrind --tool=callgrind target/release/deps/step_overhead-* sequential
//! # under a `fmt` subscriber at `info`, as a service that logs would run it:
//! LOG=info cargo bench --bench step_overhead -- sequential
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fluxo::prelude::*;
use tokio::sync::Semaphore;

#[path = "common/sequential.rs"]
mod workflow;
use workflow::Sequential;

/// Counts heap allocations, to report them per step.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Starts a workflow of `steps` steps and waits for its result.
async fn run_sequential(fluxo: &Fluxo, steps: u32) {
    Sequential::start(fluxo, steps)
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `LOG=info` (or any level): run under a `fmt` subscriber at that
    // level, writing to nowhere, as a service that logs would.
    if let Ok(level) = std::env::var("LOG") {
        let level: tracing::Level = level.parse().expect("LOG: a tracing level");
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(std::io::sink)
            .init();
    }
    let mode = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_else(|| "sequential".to_owned());
    match mode.as_str() {
        "sequential" => sequential().await,
        "throughput" => throughput().await,
        other => eprintln!("unknown mode {other:?}: sequential or throughput"),
    }
}

async fn sequential() {
    let n: u32 = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let fluxo = Fluxo::in_memory();
    fluxo.register(Sequential).unwrap();
    let worker = fluxo.worker().spawn();
    run_sequential(&fluxo, 100).await;
    for _ in 0..5 {
        let allocations = ALLOCATIONS.load(Ordering::Relaxed);
        let t = Instant::now();
        run_sequential(&fluxo, n).await;
        let elapsed = t.elapsed();
        println!(
            "sequential: {:.3} µs per step, {:.1} allocations per step",
            elapsed.as_secs_f64() * 1e6 / f64::from(n),
            (ALLOCATIONS.load(Ordering::Relaxed) - allocations) as f64 / f64::from(n),
        );
    }
    worker.shutdown().await;
}

async fn throughput() {
    const WORKFLOWS: u32 = 1_000;
    const STEPS: u32 = 10;
    for _ in 0..20 {
        let fluxo = Fluxo::in_memory();
        fluxo.register(Sequential).unwrap();
        let worker = fluxo.worker().concurrency(100).spawn();
        run_sequential(&fluxo, STEPS).await;
        let in_flight = Arc::new(Semaphore::new(100));
        let t = Instant::now();
        let mut runs = Vec::new();
        for _ in 0..WORKFLOWS {
            let permit = Arc::clone(&in_flight).acquire_owned().await.unwrap();
            let fluxo = fluxo.clone();
            runs.push(tokio::spawn(async move {
                run_sequential(&fluxo, STEPS).await;
                drop(permit);
            }));
        }
        for run in runs {
            run.await.unwrap();
        }
        println!(
            "throughput: {:.0} steps/s",
            f64::from(WORKFLOWS * STEPS) / t.elapsed().as_secs_f64()
        );
        worker.shutdown().await;
    }
}
