//! Scale-out with real processes: several worker processes share one store,
//! one is killed with SIGKILL mid-run, and every workflow still completes
//! exactly once with a dense journal, the killed worker's instances taken
//! over by the others after their leases expire.

use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fluxo::history::Event;
use fluxo::prelude::*;
use fluxo::store::Store;

mod common;

const STEPS: u32 = 10;
const LEASE: Duration = Duration::from_secs(2);

#[fluxo::step(retry(max_attempts = 5, initial = "20ms"))]
async fn work(i: u32) -> Result<(u32, u32), StepError> {
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok((i, std::process::id()))
}

#[fluxo::workflow]
async fn scale_flow(_ctx: WorkflowContext, steps: u32) -> Result<Vec<(u32, u32)>, WorkflowError> {
    let mut done = Vec::new();
    for i in 0..steps {
        done.push(work(i).await?);
    }
    Ok(done)
}

/// Which store the processes share.
#[derive(Clone, Debug)]
enum Target {
    Sqlite(std::path::PathBuf),
    /// URL and schema.
    #[cfg(feature = "postgres")]
    Postgres(String, String),
    /// URL and key prefix.
    #[cfg(feature = "redis")]
    Redis(String, String),
    /// URL and database.
    #[cfg(feature = "mongodb")]
    Mongodb(String, String),
}

impl Target {
    fn to_env(&self) -> (String, String) {
        match self {
            Target::Sqlite(p) => ("sqlite".into(), p.display().to_string()),
            #[cfg(feature = "postgres")]
            Target::Postgres(url, schema) => ("postgres".into(), format!("{schema} {url}")),
            #[cfg(feature = "redis")]
            Target::Redis(url, prefix) => ("redis".into(), format!("{prefix} {url}")),
            #[cfg(feature = "mongodb")]
            Target::Mongodb(url, database) => ("mongodb".into(), format!("{database} {url}")),
        }
    }

    fn from_env() -> Option<Target> {
        let kind = std::env::var("FLUXO_SCALE_BACKEND").ok()?;
        let at = std::env::var("FLUXO_SCALE_TARGET").ok()?;
        match kind.as_str() {
            "sqlite" => Some(Target::Sqlite(at.into())),
            #[cfg(feature = "postgres")]
            "postgres" => {
                let (schema, url) = at.split_once(' ')?;
                Some(Target::Postgres(url.into(), schema.into()))
            }
            #[cfg(feature = "redis")]
            "redis" => {
                let (prefix, url) = at.split_once(' ')?;
                Some(Target::Redis(url.into(), prefix.into()))
            }
            #[cfg(feature = "mongodb")]
            "mongodb" => {
                let (database, url) = at.split_once(' ')?;
                Some(Target::Mongodb(url.into(), database.into()))
            }
            _ => None,
        }
    }

    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Target::Sqlite(p) => {
                Arc::new(fluxo::store::sqlite::SqliteStore::open(p).await.unwrap())
            }
            #[cfg(feature = "postgres")]
            Target::Postgres(url, schema) => {
                use fluxo::store::postgres::{PostgresOptions, PostgresStore};
                let options = PostgresOptions::new(url.clone()).schema(schema.clone());
                Arc::new(PostgresStore::connect_with(options).await.unwrap())
            }
            #[cfg(feature = "redis")]
            Target::Redis(url, prefix) => {
                use fluxo::store::redis::{RedisOptions, RedisStore};
                let options = RedisOptions::new(url.clone()).prefix(prefix.clone());
                Arc::new(RedisStore::connect_with(options).await.unwrap())
            }
            #[cfg(feature = "mongodb")]
            Target::Mongodb(url, database) => {
                use fluxo::store::mongodb::{MongoOptions, MongoStore};
                let options = MongoOptions::new(url.clone()).database(database.clone());
                Arc::new(MongoStore::connect_with(options).await.unwrap())
            }
        }
    }
}

/// A worker process; started by the scale-out tests through this binary.
#[test]
#[ignore = "run as a child process by the scale-out tests"]
fn scale_worker_process() {
    let Some(target) = Target::from_env() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let fluxo = Fluxo::from_store(target.open().await);
        fluxo.register(ScaleFlow).unwrap();
        let _worker = fluxo
            .worker()
            .concurrency(50)
            .lease(LEASE)
            .poll_interval(Duration::from_millis(50))
            .spawn();
        // Runs until the parent kills it.
        std::future::pending::<()>().await;
    });
}

fn spawn_worker(target: &Target) -> Child {
    let (kind, at) = target.to_env();
    common::spawn_test_process(
        "scale_worker_process",
        &[("FLUXO_SCALE_BACKEND", kind), ("FLUXO_SCALE_TARGET", at)],
    )
}

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends `SIGSTOP`, `SIGCONT`, ... (by name) to process `pid`, through the
/// shell's `kill` builtin (no separate `kill` program needed).
fn send_signal(pid: u32, name: &str) {
    let status = std::process::Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "sh", name, &pid.to_string()])
        .status()
        .expect("run sh");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Whether a running instance has a step journaled by worker process `pid`.
async fn has_partial_work(fluxo: &Fluxo, pid: u32) -> bool {
    let running = fluxo
        .list(fluxo::store::ListFilter {
            status: Some(WorkflowStatus::Running),
            ..Default::default()
        })
        .await
        .unwrap();
    for instance in running {
        let Ok(history) = fluxo.history(&instance.id).await else {
            continue; // finished and changed meanwhile
        };
        // For each step journaled: whether `pid` ran it.
        let steps: Vec<bool> = history
            .iter()
            .filter_map(|e| match &e.event {
                Event::StepCompleted { output, .. } => Some(output[1] == pid),
                _ => None,
            })
            .collect();
        // Steps left to run, so that another worker's finishing it shows.
        if steps.contains(&true) && steps.len() < STEPS as usize {
            return true;
        }
    }
    false
}

async fn run_scale_out(target: Target, store: Arc<dyn Store>, processes: usize, workflows: usize) {
    let fluxo = Fluxo::from_store(Arc::clone(&store));
    let mut handles = Vec::with_capacity(workflows);
    for _ in 0..workflows {
        handles.push(ScaleFlow::start(&fluxo, STEPS).await.unwrap());
    }
    let mut workers = Workers((0..processes).map(|_| spawn_worker(&target)).collect());

    // Kill one worker once about a quarter of the workflows are done.
    let started = Instant::now();
    let completed = || async {
        fluxo
            .list(fluxo::store::ListFilter {
                status: Some(WorkflowStatus::Completed),
                limit: Some(workflows),
                ..Default::default()
            })
            .await
            .unwrap()
            .len()
    };
    let victim = workers.0[0].id();
    while completed().await < workflows / 4 {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Kill when the victim has instances with some steps journaled and
    // some not. It is stopped while that is checked, so it cannot finish
    // them between the check and the kill.
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the victim never had unfinished work"
        );
        send_signal(victim, "STOP");
        if has_partial_work(&fluxo, victim).await {
            break;
        }
        send_signal(victim, "CONT");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    workers.0[0].kill().unwrap();
    workers.0[0].wait().unwrap();
    let at_kill = completed().await;
    assert!(
        at_kill < workflows,
        "the kill came mid-run ({at_kill}/{workflows} done)"
    );

    // Every workflow completes, with the right result.
    let mut taken_over = 0;
    let mut by_victim = 0;
    for h in &handles {
        let out = h.result_timeout(Duration::from_secs(180)).await.unwrap();
        let order: Vec<u32> = out.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, (0..STEPS).collect::<Vec<_>>());
        let pids: Vec<u32> = out.iter().map(|(_, p)| *p).collect();
        if pids.contains(&victim) {
            by_victim += 1;
            if pids.iter().any(|p| *p != victim) {
                taken_over += 1;
            }
        }
        // Each step journaled once, positions dense.
        let history = fluxo.history(h.id()).await.unwrap();
        for (n, e) in history.iter().enumerate() {
            assert_eq!(e.event_id, n as u64, "gap or duplicate in {}", h.id());
        }
        let seqs: Vec<u64> = history
            .iter()
            .filter(|e| matches!(e.event, Event::StepCompleted { .. }))
            .map(|e| e.seq)
            .collect();
        assert_eq!(
            seqs,
            (0..STEPS as u64).collect::<Vec<_>>(),
            "journal of {}",
            h.id()
        );
    }
    assert!(
        taken_over > 0,
        "some instances the killed worker had started were finished by another \
         (killed at {at_kill} done; {by_victim} touched by it, none taken over)"
    );
    eprintln!(
        "scale-out: {workflows} workflows x {STEPS} steps on {processes} processes, killed one at {at_kill} done, \
         {by_victim} touched by it, {taken_over} of those taken over, {:?} in all",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_sqlite_file() {
    let target = Target::Sqlite(common::temp_db_path());
    let store = target.open().await;
    run_scale_out(target, store, 2, 200).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_one_postgres() {
    let Some(store) = fluxo::store::postgres::test_store_from_env().await else {
        return;
    };
    let url = std::env::var("FLUXO_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let target = Target::Postgres(url, store.schema().to_owned());
    run_scale_out(target, Arc::new(store), 3, 1_000).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_one_redis() {
    let Some(store) = fluxo::store::redis::test_store_from_env().await else {
        return;
    };
    let url =
        std::env::var("FLUXO_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let target = Target::Redis(url, store.prefix().to_owned());
    run_scale_out(target, Arc::new(store), 3, 1_000).await;
}

#[cfg(feature = "mongodb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_on_one_mongodb() {
    let Some(store) = fluxo::store::mongodb::test_store_from_env().await else {
        return;
    };
    let url = std::env::var("FLUXO_TEST_MONGODB_URL")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:27017/?directConnection=true".into());
    let target = Target::Mongodb(url, store.database_name().to_owned());
    // The MongoDB-compatible test server takes a few hundred writes per
    // second, so fewer workflows than on the other servers.
    run_scale_out(target, Arc::new(store), 3, 150).await;
}
