//! What the benches share: the runtime and every backend this build has.

use std::sync::Arc;

use fluxo::store::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use fluxo::store::Store;

/// A Tokio runtime with 2 worker threads, as on the machines we measure.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A fresh directory for SQLite files.
pub fn bench_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fluxo-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every backend this build has, each on fresh storage.
pub fn backends(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> Vec<(&'static str, Arc<dyn Store>)> {
    let mut backends: Vec<(&str, Arc<dyn Store>)> =
        vec![("memory", Arc::new(fluxo::store::memory::MemoryStore::new()))];
    for (name, sync) in [
        ("sqlite-full", Synchronous::Full),
        ("sqlite-normal", Synchronous::Normal),
    ] {
        let path = dir.join(format!("{name}-{}.db", unique_suffix()));
        let opts = SqliteOptions::new(path).synchronous(sync);
        let store = rt.block_on(SqliteStore::open_with(opts)).unwrap();
        backends.push((name, Arc::new(store)));
    }
    #[cfg(feature = "postgres")]
    if let Some(store) = rt.block_on(fluxo::store::postgres::test_store_from_env()) {
        backends.push(("postgres", Arc::new(store)));
    }
    #[cfg(feature = "redis")]
    if let Some(store) = rt.block_on(fluxo::store::redis::test_store_from_env()) {
        backends.push(("redis", Arc::new(store)));
    }
    #[cfg(feature = "mongodb")]
    if let Some(store) = rt.block_on(fluxo::store::mongodb::test_store_from_env()) {
        backends.push(("mongodb", Arc::new(store)));
    }
    backends
}

/// A suffix that makes names unique.
pub fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
