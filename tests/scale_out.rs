//! Scale-out with real processes: several worker processes share one store,
//! one is killed with SIGKILL while halfway through an instance, and every
//! workflow still completes exactly once with a dense journal, the killed
//! worker's instances taken over by the others after their leases expire.

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
async fn work(instance: String, i: u32) -> Result<(u32, u32), StepError> {
    tokio::time::sleep(Duration::from_millis(10)).await;
    if i == STEPS / 2 {
        // Tells the parent, when it listens, that `instance` is halfway.
        println!("{HALFWAY}{instance}");
    }
    Ok((i, std::process::id()))
}

/// What a worker prints, followed by an instance id, when it runs the
/// middle step of that instance.
const HALFWAY: &str = "halfway ";

#[fluxo::workflow]
async fn scale_flow(ctx: WorkflowContext, steps: u32) -> Result<Vec<(u32, u32)>, WorkflowError> {
    let mut done = Vec::new();
    for i in 0..steps {
        done.push(work(ctx.id().to_owned(), i).await?);
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

fn spawn_worker(target: &Target, stdout: std::process::Stdio) -> Child {
    let (kind, at) = target.to_env();
    common::spawn_test_process_with(
        "scale_worker_process",
        &[("FLUXO_SCALE_BACKEND", kind), ("FLUXO_SCALE_TARGET", at)],
        stdout,
    )
}

/// The instances worker `child` announces it is halfway through, read from
/// its stdout on a thread of their own.
fn halfway_announcements(child: &mut Child) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().expect("the worker's stdout is piped");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        // Read to the end whatever the bytes, so that the pipe never fills.
        for line in std::io::BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            if let Some(id) = line.strip_prefix(HALFWAY) {
                if tx.send(id.to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    rx
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

/// Whether worker process `pid` is halfway through instance `id`: it
/// journaled at least half of its steps, and two or more steps are left to
/// run, so that another worker finishes it even if a commit `pid` sent
/// before it was stopped lands after this check.
async fn is_halfway(fluxo: &Fluxo, id: &str, pid: u32) -> bool {
    let history = fluxo.history(id).await.unwrap();
    // For each step journaled: whether `pid` ran it.
    let steps: Vec<bool> = history
        .iter()
        .filter_map(|e| match &e.event {
            Event::StepCompleted { output, .. } => Some(output[1] == pid),
            _ => None,
        })
        .collect();
    let by_pid = steps.iter().filter(|by| **by).count();
    by_pid >= STEPS as usize / 2 && steps.len() + 2 <= STEPS as usize
}

async fn run_scale_out(target: Target, store: Arc<dyn Store>, processes: usize, workflows: usize) {
    let fluxo = Fluxo::from_store(Arc::clone(&store));
    let mut handles = Vec::with_capacity(workflows);
    for _ in 0..workflows {
        handles.push(ScaleFlow::start(&fluxo, STEPS).await.unwrap());
    }
    // The first worker is the one killed; it tells which instances it is
    // halfway through.
    let mut workers = Workers(
        (0..processes)
            .map(|n| {
                let stdout = if n == 0 {
                    std::process::Stdio::piped()
                } else {
                    std::process::Stdio::null()
                };
                spawn_worker(&target, stdout)
            })
            .collect(),
    );
    let mut halfway = halfway_announcements(&mut workers.0[0]);

    // Kill the victim once it is halfway through an instance. It is stopped
    // while the instance's journal is checked, so it cannot finish the
    // instance between the check and the kill. The announcements come in
    // bursts (it runs many instances at once); the newest are checked first,
    // as the older ones may be done by then.
    let started = Instant::now();
    let victim = workers.0[0].id();
    let target_id = 'found: loop {
        let left = Duration::from_secs(120).saturating_sub(started.elapsed());
        let first = tokio::time::timeout(left, halfway.recv())
            .await
            .expect("the victim never was halfway through an instance")
            .expect("the victim exited");
        send_signal(victim, "STOP");
        let mut ids = vec![first];
        while let Ok(id) = halfway.try_recv() {
            ids.push(id);
        }
        for id in ids.into_iter().rev() {
            if is_halfway(&fluxo, &id, victim).await {
                break 'found id;
            }
        }
        send_signal(victim, "CONT");
    };
    workers.0[0].kill().unwrap();
    workers.0[0].wait().unwrap();
    let at_kill = fluxo
        .list(fluxo::store::ListFilter {
            status: Some(WorkflowStatus::Completed),
            limit: Some(workflows),
            ..Default::default()
        })
        .await
        .unwrap()
        .len();
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
        if h.id() == target_id {
            assert!(
                pids.contains(&victim) && pids.iter().any(|p| *p != victim),
                "the instance the victim was killed halfway through was finished by another \
                 worker (steps ran by {pids:?}, victim {victim})"
            );
        }
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
