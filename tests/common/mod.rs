//! Shared helpers for integration tests: backends and execution counters.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use fluxo::store::Store;

fn counts() -> std::sync::MutexGuard<'static, HashMap<String, u32>> {
    static COUNTS: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    COUNTS.get_or_init(Default::default).lock().unwrap()
}

/// Counts how often something ran, keyed by e.g. `"<workflow id>/<step>"`.
/// Returns the new count.
pub fn bump(key: impl Into<String>) -> u32 {
    let mut m = counts();
    let n = m.entry(key.into()).or_default();
    *n += 1;
    *n
}

/// Reads a counter.
pub fn count(key: &str) -> u32 {
    counts().get(key).copied().unwrap_or(0)
}

/// A fresh in-memory store.
pub async fn memory_store() -> Option<Arc<dyn Store>> {
    Some(Arc::new(fluxo::store::memory::MemoryStore::new()))
}

/// A fresh SQLite store in a new temporary file.
#[cfg(feature = "sqlite")]
pub async fn sqlite_store() -> Option<Arc<dyn Store>> {
    let path = temp_db_path();
    let store = fluxo::store::sqlite::SqliteStore::open(&path).await;
    Some(Arc::new(store.expect("open sqlite")))
}

/// A store in a fresh schema of the Postgres test server
/// (`FLUXO_TEST_POSTGRES_URL`); `None` (with a loud message) when the server
/// is unreachable outside CI.
#[cfg(feature = "postgres")]
pub async fn postgres_store() -> Option<Arc<dyn Store>> {
    let store = fluxo::store::postgres::test_store_from_env().await?;
    Some(Arc::new(store))
}

/// A store under a fresh key prefix of the Redis test server
/// (`FLUXO_TEST_REDIS_URL`); `None` (with a loud message) when the server
/// is unreachable outside CI.
#[cfg(feature = "redis")]
pub async fn redis_store() -> Option<Arc<dyn Store>> {
    let store = fluxo::store::redis::test_store_from_env().await?;
    Some(Arc::new(store))
}

/// A store on a fresh database of the MongoDB test server
/// (`FLUXO_TEST_MONGODB_URL`); `None` (with a loud message) when the server
/// is unreachable outside CI.
#[cfg(feature = "mongodb")]
pub async fn mongodb_store() -> Option<Arc<dyn Store>> {
    let store = fluxo::store::mongodb::test_store_from_env().await?;
    Some(Arc::new(store))
}

/// A unique path for a temporary SQLite file.
pub fn temp_db_path() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("fluxo-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}.db", uuid_like()))
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{t}-{n}", std::process::id())
}

fn gates() -> std::sync::MutexGuard<'static, HashMap<String, Arc<tokio::sync::Notify>>> {
    static GATES: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Notify>>>> = OnceLock::new();
    GATES.get_or_init(Default::default).lock().unwrap()
}

/// Waits until [`open_gate`] is called with the same name.
pub async fn wait_gate(name: &str) {
    let n = gates().entry(name.to_owned()).or_default().clone();
    n.notified().await;
}

/// Releases one waiter of [`wait_gate`] (or the next one to come).
pub fn open_gate(name: &str) {
    let n = gates().entry(name.to_owned()).or_default().clone();
    n.notify_one();
}

/// Starts this test binary again as a child process running only the
/// (ignored) test `test_name`, with `env` set. Its stdout is dropped.
pub fn spawn_test_process(test_name: &str, env: &[(&str, String)]) -> std::process::Child {
    spawn_test_process_with(test_name, env, std::process::Stdio::null())
}

/// [`spawn_test_process`] with the child's stdout going to `stdout`.
pub fn spawn_test_process_with(
    test_name: &str,
    env: &[(&str, String)],
    stdout: std::process::Stdio,
) -> std::process::Child {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        test_name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .stdout(stdout)
    .stderr(std::process::Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn a worker process")
}

fn logs() -> std::sync::MutexGuard<'static, HashMap<String, Vec<String>>> {
    static LOGS: OnceLock<Mutex<HashMap<String, Vec<String>>>> = OnceLock::new();
    LOGS.get_or_init(Default::default).lock().unwrap()
}

/// Appends `what` to the ordered log of `key`.
pub fn push_log(key: &str, what: &str) {
    logs()
        .entry(key.to_owned())
        .or_default()
        .push(what.to_owned());
}

/// The ordered log of `key`.
pub fn log_of(key: &str) -> Vec<String> {
    logs().get(key).cloned().unwrap_or_default()
}

/// Instantiates the tests of `crate::suite` once per backend: a module per
/// backend, a `#[tokio::test]` per name, each with a fresh store from that
/// backend (`None`: its server is unreachable outside CI, so the test is
/// skipped with a loud message). Adding a backend is one line here.
#[allow(unused_macros)] // test binaries without a per-backend suite
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        backend_tests!(@backend memory, crate::common::memory_store; $($name),*);
        #[cfg(feature = "sqlite")]
        backend_tests!(@backend sqlite, crate::common::sqlite_store; $($name),*);
        #[cfg(feature = "postgres")]
        backend_tests!(@backend postgres, crate::common::postgres_store; $($name),*);
        #[cfg(feature = "redis")]
        backend_tests!(@backend redis, crate::common::redis_store; $($name),*);
        #[cfg(feature = "mongodb")]
        backend_tests!(@backend mongodb, crate::common::mongodb_store; $($name),*);
    };
    (@backend $backend:ident, $make:path; $($name:ident),*) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(store) = $make().await {
                        crate::suite::$name(store).await
                    }
                }
            )*
        }
    };
}
