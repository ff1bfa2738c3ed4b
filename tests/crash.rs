//! Crash recovery with real processes: a worker process is killed with
//! SIGKILL in the middle of a workflow, a new process resumes it, and no step
//! whose journal entry was committed runs again.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use fluxo::history::Event;
use fluxo::prelude::*;
use fluxo::store::sqlite::SqliteStore;

mod common;

const STEPS: u32 = 10;
const WORKFLOW_ID: &str = "crash-test-order";

#[fluxo::step(retry(max_attempts = 3, initial = "50ms"))]
async fn slow_step(i: u32, log: &str) -> Result<u32, StepError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    writeln!(f, "{i}")?;
    f.sync_all()?;
    tokio::time::sleep(Duration::from_millis(150)).await;
    Ok(i * i)
}

#[fluxo::workflow]
async fn crash_flow(_ctx: WorkflowContext, log: String) -> Result<u32, WorkflowError> {
    let mut sum = 0;
    for i in 0..STEPS {
        sum += slow_step(i, &log).await?;
    }
    Ok(sum)
}

/// The worker process: started by `kill_9_mid_workflow_then_resume` through
/// this test binary; does nothing in a normal test run.
#[test]
#[ignore = "run as a child process by kill_9_mid_workflow_then_resume"]
fn crash_worker_process() {
    let (Ok(db), Ok(log)) = (
        std::env::var("FLUXO_CRASH_DB"),
        std::env::var("FLUXO_CRASH_LOG"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let fluxo = Fluxo::sqlite(&db).await.unwrap();
        fluxo.register(CrashFlow).unwrap();
        // A stable worker id, as a deployment gives each process: the
        // restarted process takes over its predecessor's lease at once, so
        // the long lease never has to expire.
        let worker = fluxo
            .worker()
            .id("crash-test-node")
            .lease(Duration::from_secs(600))
            .poll_interval(Duration::from_millis(20))
            .spawn();
        let h = CrashFlow::start_with(&fluxo, log, StartOptions::new().id(WORKFLOW_ID))
            .await
            .unwrap();
        h.result().await.unwrap();
        worker.shutdown().await;
    });
}

fn spawn_worker(db: &Path, log: &Path) -> Child {
    common::spawn_test_process(
        "crash_worker_process",
        &[
            ("FLUXO_CRASH_DB", db.display().to_string()),
            ("FLUXO_CRASH_LOG", log.display().to_string()),
        ],
    )
}

fn executions(log: &Path) -> Vec<u32> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut counts = vec![0; STEPS as usize];
    for line in text.lines() {
        counts[line.trim().parse::<usize>().unwrap()] += 1;
    }
    counts
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn kill_9_mid_workflow_then_resume() {
    let db: PathBuf = common::temp_db_path();
    let log = db.with_extension("log");

    // 1. A worker process starts the workflow; kill -9 it after step 3 began.
    let mut first = spawn_worker(&db, &log);
    wait_until("step 3 to start", Duration::from_secs(60), || {
        executions(&log).iter().filter(|&&n| n > 0).count() >= 4
    });
    first.kill().expect("SIGKILL the worker");
    let status = first.wait().unwrap();
    assert!(!status.success(), "the worker was killed, not finished");

    // 2. What the journal held at the moment of the crash.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let committed: Vec<u64> = rt.block_on(async {
        let store = SqliteStore::open(&db).await.unwrap();
        let fluxo = Fluxo::with_store(store);
        let h = fluxo.history(WORKFLOW_ID).await.unwrap();
        h.iter()
            .filter(|e| matches!(e.event, Event::StepCompleted { .. }))
            .map(|e| e.seq)
            .collect()
    });
    assert!(
        committed.len() >= 3,
        "steps 0..3 were journaled: {committed:?}"
    );
    assert!(
        committed.len() < STEPS as usize,
        "the crash came mid-workflow"
    );

    // 3. A new process under the same worker id resumes the instance at
    //    once (the old 10-minute lease never expires in this test).
    let mut second = spawn_worker(&db, &log);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            second.kill().ok();
            panic!("resumed worker did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "the resumed worker completed the workflow"
    );

    // 4. The outcome and the journal.
    rt.block_on(async {
        let fluxo = Fluxo::sqlite(&db).await.unwrap();
        let h = CrashFlow::handle(&fluxo, WORKFLOW_ID);
        let expected: u32 = (0..STEPS).map(|i| i * i).sum();
        assert_eq!(h.result().await.unwrap(), expected);
        let history = fluxo.history(WORKFLOW_ID).await.unwrap();
        let seqs: Vec<u64> = history
            .iter()
            .filter(|e| matches!(e.event, Event::StepCompleted { .. }))
            .map(|e| e.seq)
            .collect();
        assert_eq!(
            seqs,
            (0..STEPS as u64).collect::<Vec<_>>(),
            "every step journaled once, in order"
        );
        for (i, e) in history.iter().enumerate() {
            assert_eq!(e.event_id, i as u64, "no gap or duplicate in the journal");
        }
    });
    let runs = executions(&log);
    for (i, n) in runs.iter().enumerate() {
        if committed.contains(&(i as u64)) {
            assert_eq!(
                *n, 1,
                "step {i} was journaled before the crash and must not run again: {runs:?}"
            );
        } else {
            assert!((1..=2).contains(n), "step {i} ran {n} times: {runs:?}");
        }
    }
    let _ = std::fs::remove_file(&db);
    let _ = std::fs::remove_file(&log);
}
