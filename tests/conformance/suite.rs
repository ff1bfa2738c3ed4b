//! The suite's tests; each takes a fresh store of the backend under test.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::Arc;
use std::time::Duration;

use fluxo::history::Event;
use fluxo::prelude::*;
use fluxo::store::{
    ClaimBatch, ClaimRequest, Commit, CommitOutcome, CreateOutcome, InboxSignal, InstanceRecord,
    ListFilter, NewInstance, Store, StoreError, StoreResult, StoredEvent, Transition,
};
use fluxo::{Error, Worker, WorkerBuilder};

use crate::common::{count, open_gate};
use crate::workflows::*;

const WAIT: Duration = Duration::from_secs(30);

fn fluxo_on(store: &Arc<dyn Store>) -> Fluxo {
    let fluxo = Fluxo::from_store(Arc::clone(store));
    register_all(&fluxo);
    fluxo
}

/// A worker with a short lease and poll interval, to configure further.
fn worker_builder(fluxo: &Fluxo) -> WorkerBuilder {
    fluxo
        .worker()
        .lease(Duration::from_secs(5))
        .poll_interval(Duration::from_millis(20))
}

fn worker(fluxo: &Fluxo) -> Worker {
    worker_builder(fluxo).spawn()
}

fn setup(store: &Arc<dyn Store>) -> (Fluxo, Worker) {
    let f = fluxo_on(store);
    let w = worker(&f);
    (f, w)
}

async fn step_events(fluxo: &Fluxo, id: &str) -> Vec<(u64, String)> {
    fluxo
        .history(id)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|h| match h.event {
            Event::StepCompleted { name, .. } => Some((h.seq, name)),
            _ => None,
        })
        .collect()
}

/// Journal positions are 0..n without gaps or duplicates.
async fn assert_journal_dense(fluxo: &Fluxo, id: &str) {
    let h = fluxo.history(id).await.unwrap();
    for (i, e) in h.iter().enumerate() {
        assert_eq!(
            e.event_id, i as u64,
            "journal of {id} has a gap or duplicate: {h:#?}"
        );
    }
}

pub async fn typed_result(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Greet::start(&fluxo, "ana".into()).await.unwrap();
    let out: String = h.result_timeout(WAIT).await.unwrap();
    assert_eq!(out, "hello ana");
    assert_eq!(h.status().await.unwrap(), WorkflowStatus::Completed);
    w.shutdown().await;
}

/// A worker started before any workflow was registered runs the ones
/// registered after it.
pub async fn workflows_registered_after_the_worker_starts_run(store: Arc<dyn Store>) {
    let fluxo = Fluxo::from_store(Arc::clone(&store));
    let w = worker(&fluxo);
    tokio::time::sleep(Duration::from_millis(50)).await;
    fluxo.register(Greet).unwrap();
    let h = Greet::start(&fluxo, "late".into()).await.unwrap();
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), "hello late");
    w.shutdown().await;
}

pub async fn steps_are_journaled_once(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Greet::start(&fluxo, "bo".into()).await.unwrap();
    h.result_timeout(WAIT).await.unwrap();
    assert_eq!(
        step_events(&fluxo, h.id()).await,
        vec![(0, "greet_step".to_owned())]
    );
    assert_eq!(count(&format!("{}/greet", h.id())), 1);
    assert_journal_dense(&fluxo, h.id()).await;
    w.shutdown().await;
}

pub async fn retries_until_success(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Retrying::start(&fluxo, 2).await.unwrap();
    assert_eq!(
        h.result_timeout(WAIT).await.unwrap(),
        3,
        "succeeds on attempt 3"
    );
    let failed_attempts = fluxo
        .history(h.id())
        .await
        .unwrap()
        .iter()
        .filter(|e| matches!(e.event, Event::StepAttemptFailed { .. }))
        .count();
    assert_eq!(failed_attempts, 2);
    w.shutdown().await;
}

pub async fn exhausted_retries_are_typed_errors(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Exhausting::start(&fluxo, ()).await.unwrap();
    let out = h.result_timeout(WAIT).await.unwrap();
    assert_eq!(out, "caught Boom; caught Declined; caught Timeout");
    assert_eq!(
        count(&format!("{}/always_fails", h.id())),
        2,
        "max_attempts = 2"
    );
    assert_eq!(
        count(&format!("{}/declined", h.id())),
        1,
        "non-retryable kind"
    );
    assert_eq!(
        count(&format!("{}/too_slow", h.id())),
        2,
        "timeouts are retried"
    );
    w.shutdown().await;
}

pub async fn workflow_failure_is_typed(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Failing::start(&fluxo, ()).await.unwrap();
    match h.result_timeout(WAIT).await {
        Err(Error::WorkflowFailed {
            error, workflow, ..
        }) => {
            assert_eq!(workflow, "failing");
            assert_eq!(error.kind(), "StepFailed");
            assert_eq!(error.step_error().unwrap().kind(), "Boom");
        }
        other => panic!("expected WorkflowFailed, got {other:?}"),
    }
    assert_eq!(h.status().await.unwrap(), WorkflowStatus::Failed);
    w.shutdown().await;
}

pub async fn a_panicking_step_is_a_failed_attempt(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    // Panics on its first two attempts of three, then returns its attempt.
    let h = PanickingStep::start(&fluxo, 2).await.unwrap();
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), 3);
    assert_eq!(count(&format!("{}/panics_first", h.id())), 3);
    let failed: Vec<StepError> = fluxo
        .history(h.id())
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event {
            Event::StepAttemptFailed { error, .. } => Some(error),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed.iter().all(|e| e.kind() == "Panic"), "{failed:?}");
    assert!(
        failed[0].message().contains("attempt 1 panics"),
        "{failed:?}"
    );
    // Panicking on every attempt: the step's error, once its retries ran out.
    let h = PanickingStep::start(&fluxo, 3).await.unwrap();
    match h.result_timeout(WAIT).await {
        Err(Error::WorkflowFailed { error, .. }) => {
            let step = error.step_error().expect("the step's error");
            assert_eq!(step.kind(), "Panic");
            assert!(step.message().contains("attempt 3 panics"), "{step:?}");
        }
        other => panic!("expected WorkflowFailed, got {other:?}"),
    }
    w.shutdown().await;
}

pub async fn a_panicking_workflow_fails_and_frees_its_slot(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let w = worker_builder(&fluxo).concurrency(1).spawn();
    let h = PanickingBody::start(&fluxo, "ana".into()).await.unwrap();
    match h.result_timeout(WAIT).await {
        Err(Error::WorkflowFailed { error, .. }) => {
            assert_eq!(error.kind(), "Panic");
            assert!(error.message().contains("the body panics"), "{error:?}");
        }
        other => panic!("expected WorkflowFailed, got {other:?}"),
    }
    assert_eq!(h.status().await.unwrap(), WorkflowStatus::Failed);
    assert_eq!(count(&format!("{}/greet", h.id())), 1);
    // The worker's one slot is free again.
    let next = Greet::start(&fluxo, "bo".into()).await.unwrap();
    assert_eq!(next.result_timeout(WAIT).await.unwrap(), "hello bo");
    w.shutdown().await;
}

/// Waits until instance `id` journals a timer; returns when it fires.
async fn timer_started(fluxo: &Fluxo, id: &str) -> fluxo::store::Millis {
    tokio::time::timeout(WAIT, async {
        loop {
            let history = fluxo.history(id).await.unwrap();
            let timer = history.into_iter().find_map(|e| match e.event {
                Event::TimerStarted { fire_at } => Some(fire_at),
                _ => None,
            });
            if let Some(at) = timer {
                return at;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the timer starts")
}

pub async fn a_panicking_cancellation_handler_lets_the_next_one_run(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = PanickingHandler::start(&fluxo, ()).await.unwrap();
    timer_started(&fluxo, h.id()).await;
    h.cancel().await.unwrap();
    match h.result_timeout(WAIT).await {
        Err(Error::Cancelled { .. }) => {}
        other => panic!("expected Cancelled, got {other:?}"),
    }
    assert_eq!(crate::common::log_of(h.id()), ["cleanup"]);
    w.shutdown().await;
}

pub async fn durations_too_long_for_the_clock_mean_forever(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let w = fluxo
        .worker()
        .concurrency(usize::MAX)
        .lease(Duration::MAX)
        .poll_interval(Duration::MAX)
        .cancel_grace(Duration::MAX)
        .shutdown_grace(Duration::MAX)
        .spawn();
    let h = Greet::start(&fluxo, "cy".into()).await.unwrap();
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), "hello cy");
    assert_eq!(count(&format!("{}/greet", h.id())), 1, "claimed once");
    // Timers past what a calendar holds, or than a clock can add, wait; a
    // cancel ends them.
    let far = SleepsPastTheCalendar::start(&fluxo, false).await.unwrap();
    let forever = SleepsPastTheCalendar::start(&fluxo, true).await.unwrap();
    for (h, fire_at) in [(&far, (1i64 << 43) * 1000), (&forever, i64::MAX)] {
        // The timer is journaled with its time, saturated where it must be.
        assert_eq!(timer_started(&fluxo, h.id()).await, fire_at);
        assert_eq!(h.status().await.unwrap(), WorkflowStatus::Running);
        h.cancel().await.unwrap();
        match h.result_timeout(WAIT).await {
            Err(Error::Cancelled { .. }) => {}
            other => panic!("expected Cancelled, got {other:?}"),
        }
    }
    // The worker still claims.
    let h = Greet::start(&fluxo, "di".into()).await.unwrap();
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), "hello di");
    // Nothing runs, so a grace of `Duration::MAX` ends at once.
    tokio::time::timeout(WAIT, w.shutdown())
        .await
        .expect("shutdown with nothing running");
}

pub async fn durable_retry_backoff_parks(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = DurableRetry::start(&fluxo, ()).await.unwrap();
    // The 1.2 s back-off parks the instance: its lease is released meanwhile.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.status().await.unwrap(), WorkflowStatus::Running);
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), 2);
    w.shutdown().await;
}

pub async fn short_and_long_durable_timers(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let short = Sleeper::start(&fluxo, 50).await.unwrap();
    let long = Sleeper::start(&fluxo, 1_500).await.unwrap();
    assert!(short.result_timeout(WAIT).await.unwrap() >= 50);
    assert!(long.result_timeout(WAIT).await.unwrap() >= 1_500);
    let h = fluxo.history(long.id()).await.unwrap();
    assert!(h
        .iter()
        .any(|e| matches!(e.event, Event::TimerStarted { .. })));
    assert!(h.iter().any(|e| matches!(e.event, Event::TimerFired)));
    w.shutdown().await;
}

pub async fn signals_before_and_after_the_wait(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    // The first signal arrives before any worker runs the instance.
    let h = Approval::start(&fluxo, ()).await.unwrap();
    h.signal(Approved { by: "ana".into() }).await.unwrap();
    let w = worker(&fluxo);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.status().await.unwrap(), WorkflowStatus::Running);
    h.signal(Approved { by: "bo".into() }).await.unwrap();
    assert_eq!(
        h.result_timeout(WAIT).await.unwrap(),
        "ana,bo",
        "arrival order"
    );
    w.shutdown().await;
}

pub async fn signal_timeout(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let quick = ApprovalTimeout::start(&fluxo, 100).await.unwrap();
    let parked = ApprovalTimeout::start(&fluxo, 1_300).await.unwrap();
    let answered = ApprovalTimeout::start(&fluxo, 60_000).await.unwrap();
    answered.signal(Approved { by: "cy".into() }).await.unwrap();
    assert_eq!(
        quick.result_timeout(WAIT).await.unwrap(),
        "gave up: timed out waiting for signal `Approved`"
    );
    assert_eq!(
        parked.result_timeout(WAIT).await.unwrap(),
        "gave up: timed out waiting for signal `Approved`"
    );
    assert_eq!(
        answered.result_timeout(WAIT).await.unwrap(),
        "approved by cy"
    );
    w.shutdown().await;
}

pub async fn parallel_steps(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Parallel::start(&fluxo, ()).await.unwrap();
    assert_eq!(
        h.result_timeout(WAIT).await.unwrap(),
        ["a", "b", "c", "d", "e", "f"]
    );
    // Sequence numbers follow issue order, whatever order steps finished in.
    let mut steps = step_events(&fluxo, h.id()).await;
    steps.sort();
    let expected: Vec<(u64, String)> = (0..6).map(|i| (i, "count_step".to_owned())).collect();
    assert_eq!(steps, expected);
    assert_journal_dense(&fluxo, h.id()).await;
    w.shutdown().await;
}

pub async fn child_workflows(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Parent::start(&fluxo, 21).await.unwrap();
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), "42 ChildFailed");
    let child = ChildDouble::handle(&fluxo, format!("{}/0", h.id()));
    assert_eq!(child.result().await.unwrap(), 42);
    w.shutdown().await;
}

pub async fn cancellation(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = WaitsForever::start(&fluxo, ()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.cancel().await.unwrap();
    match h.result_timeout(WAIT).await {
        Err(Error::Cancelled { .. }) => {}
        other => panic!("expected Cancelled, got {other:?}"),
    }
    assert_eq!(h.status().await.unwrap(), WorkflowStatus::Cancelled);
    // Cancelling again is a no-op; signalling is refused.
    h.cancel().await.unwrap();
    assert!(matches!(
        h.signal(Go).await,
        Err(Error::WorkflowFinished { .. })
    ));
    w.shutdown().await;
}

pub async fn cancellation_cascades_to_children(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = CancelParent::start(&fluxo, ()).await.unwrap();
    let child = WaitsForever::handle(&fluxo, format!("{}-child", h.id()));
    // Wait for the child to exist.
    for _ in 0..500 {
        if child.status().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.cancel().await.unwrap();
    assert!(matches!(
        h.result_timeout(WAIT).await,
        Err(Error::Cancelled { .. })
    ));
    assert!(matches!(
        child.result_timeout(WAIT).await,
        Err(Error::Cancelled { .. })
    ));
    w.shutdown().await;
}

pub async fn idempotent_start_by_id(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let id = format!("order-{}", uuid_suffix());
    let a = Greet::start_with(&fluxo, "ana".into(), StartOptions::new().id(&id))
        .await
        .unwrap();
    let b = Greet::start_with(&fluxo, "someone else".into(), StartOptions::new().id(&id))
        .await
        .unwrap();
    assert_eq!(a.id(), b.id());
    assert_eq!(
        b.result_timeout(WAIT).await.unwrap(),
        "hello ana",
        "the second start did not run"
    );
    assert_eq!(count(&format!("{id}/greet")), 1);
    // The same id for another workflow is an error.
    match Sleeper::start_with(&fluxo, 1, StartOptions::new().id(&id)).await {
        Err(Error::WorkflowMismatch { found, .. }) => assert_eq!(found, "greet"),
        other => panic!("expected WorkflowMismatch, got {other:?}"),
    }
    w.shutdown().await;
}

/// An instance started without an id gets a version 7 UUID, so ids sort by
/// start: instances started together sit together in a store's indexes.
pub async fn default_ids_sort_by_start(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let mut ids = Vec::new();
    for i in 0..20 {
        let h = Greet::start(&fluxo, format!("n{i}")).await.unwrap();
        ids.push(h.id().to_owned());
    }
    for id in &ids {
        let b = id.as_bytes();
        assert!(
            b.len() == 36 && b[14] == b'7' && matches!(b[19], b'8' | b'9' | b'a' | b'b'),
            "{id} is not a version 7 UUID"
        );
    }
    assert!(
        ids.windows(2).all(|p| p[0] < p[1]),
        "ids do not sort by start: {ids:?}"
    );
    for (i, id) in ids.iter().enumerate() {
        let h = Greet::handle(&fluxo, id);
        assert_eq!(h.result_timeout(WAIT).await.unwrap(), format!("hello n{i}"));
    }
    w.shutdown().await;
}

pub async fn non_determinism_is_detected(store: Arc<dyn Store>) {
    let v1 = Fluxo::from_store(Arc::clone(&store));
    v1.register(EvolvingV1).unwrap();
    let w1 = worker(&v1);
    let h = EvolvingV1::start(&v1, ()).await.unwrap();
    // Wait until step `a` is journaled and the instance waits for `Go`.
    for _ in 0..500 {
        if !step_events(&v1, h.id()).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    w1.shutdown().await;

    // A new deployment changed the code without changing the version.
    let v2 = Fluxo::from_store(Arc::clone(&store));
    v2.register(EvolvingV1Changed).unwrap();
    let w2 = worker(&v2);
    let h2 = EvolvingV1Changed::handle(&v2, h.id());
    h2.signal(Go).await.unwrap();
    match h2.result_timeout(WAIT).await {
        Err(Error::NonDeterminism(nd)) => {
            assert_eq!(nd.seq, 0);
            assert_eq!(nd.expected, "step `count_step`");
            assert_eq!(nd.found, "step `greet_step`");
            assert_eq!(nd.workflow, "evolving");
        }
        other => panic!("expected NonDeterminism, got {other:?}"),
    }
    w2.shutdown().await;
}

pub async fn undecodable_input(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let id = format!("bad-input-{}", uuid_suffix());
    store
        .create_instance(NewInstance {
            id: id.clone(),
            workflow: "greet".into(),
            version: 1,
            input: b"{not json".to_vec(),
            parent_id: None,
        })
        .await
        .unwrap();
    fluxo.store().get_instance(&id).await.unwrap().unwrap();
    let h = Greet::handle(&fluxo, &id);
    match h.result_timeout(WAIT).await {
        Err(Error::Decode(d)) => {
            assert_eq!(d.workflow, "greet");
            assert_eq!(d.what, "input");
            assert!(d.type_name.contains("String"), "{}", d.type_name);
        }
        other => panic!("expected Decode, got {other:?}"),
    }
    w.shutdown().await;
}

pub async fn undecodable_signal(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Approval::start(&fluxo, ()).await.unwrap();
    fluxo
        .signal_by_name(h.id(), "Approved", serde_json::json!({"nobody": 1}))
        .await
        .unwrap();
    match h.result_timeout(WAIT).await {
        Err(Error::Decode(d)) => {
            assert_eq!(d.seq, Some(0));
            assert_eq!(d.what, "signal `Approved`");
            assert!(d.type_name.ends_with("Approved"), "{}", d.type_name);
            assert!(
                d.to_string().contains("approval"),
                "names the workflow: {d}"
            );
        }
        other => panic!("expected Decode, got {other:?}"),
    }
    w.shutdown().await;
}

pub async fn api_errors(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    assert!(matches!(
        fluxo
            .start_by_name("no_such_flow", serde_json::json!(null), StartOptions::new())
            .await,
        Err(Error::UnknownWorkflow { .. })
    ));
    let missing = Greet::handle(&fluxo, "no-such-id");
    assert!(matches!(
        missing.result().await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        missing.cancel().await,
        Err(Error::NotFound { .. })
    ));
    let h = Greet::start(&fluxo, "x".into()).await.unwrap();
    h.result_timeout(WAIT).await.unwrap();
    match fluxo
        .signal_by_name(h.id(), "Approved", serde_json::json!({"by": "x"}))
        .await
    {
        Err(Error::WorkflowFinished { status, signal, .. }) => {
            assert_eq!(status, WorkflowStatus::Completed);
            assert_eq!(signal, "Approved");
        }
        other => panic!("expected WorkflowFinished, got {other:?}"),
    }
    // Start by name works for registered workflows.
    let id = fluxo
        .start_by_name("greet", serde_json::json!("by name"), StartOptions::new())
        .await
        .unwrap();
    assert_eq!(
        Greet::handle(&fluxo, id)
            .result_timeout(WAIT)
            .await
            .unwrap(),
        "hello by name"
    );
    w.shutdown().await;
}

pub async fn eviction_replays_without_rerunning_steps(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    // No cache: every park evicts, every wake replays from the journal.
    let w = fluxo
        .worker()
        .max_cached(0)
        .poll_interval(Duration::from_millis(20))
        .spawn();
    let h = Replayed::start(&fluxo, ()).await.unwrap();
    for _ in 0..500 {
        if fluxo.history(h.id()).await.unwrap().len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(w.live_instances(), 0, "the parked instance was evicted");
    h.signal(Go).await.unwrap();
    let (now, random, uuid, key) = h.result_timeout(WAIT).await.unwrap();
    assert_eq!(count(&format!("{}/one", h.id())), 1, "step one ran once");
    assert_eq!(count(&format!("{}/two", h.id())), 1);
    // Replayed values are the journaled ones.
    let values: Vec<serde_json::Value> = fluxo
        .history(h.id())
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event {
            Event::ValueRecorded { value, .. } => Some(value),
            _ => None,
        })
        .collect();
    assert_eq!(values.len(), 3);
    let journaled_now: chrono_like::Instant = serde_json::from_value(values[0].clone()).unwrap();
    assert_eq!(journaled_now.0, now.clone());
    assert_eq!(values[1], serde_json::json!(random));
    assert_eq!(values[2], serde_json::json!(uuid));
    assert_eq!(key, format!("{}:6", h.id()));
    w.shutdown().await;
}

mod chrono_like {
    /// Reads a journaled `now` and renders it like `DateTime::to_rfc3339`.
    pub struct Instant(pub String);
    impl<'de> serde::Deserialize<'de> for Instant {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let s = String::deserialize(d)?;
            // RFC 3339 as serialized by chrono: "2026-01-01T00:00:00.123456789Z"
            Ok(Instant(s.replace('Z', "+00:00")))
        }
    }
}

/// Waits (up to 5 s) until the gated step of instance `id` has started.
async fn gate_step_started(id: &str) {
    for _ in 0..500 {
        if count(&format!("{id}/gate")) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn lease_expiry_takeover_and_zombie_fencing(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    // A worker that stalls: it never renews its 300 ms lease.
    let zombie = fluxo
        .worker()
        .lease(Duration::from_millis(300))
        .renew_leases(false)
        .poll_interval(Duration::from_millis(20))
        .spawn();
    let gate = format!("gate-{}", uuid_suffix());
    let h = Gated::start(&fluxo, gate.clone()).await.unwrap();
    gate_step_started(h.id()).await;
    // A healthy worker (other Fluxo handle, as if another process) takes over
    // once the lease expires and completes the instance.
    let other = fluxo_on(&store);
    let healthy = worker(&other);
    let out = Gated::handle(&other, h.id())
        .result_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(out, 2, "the takeover ran the step again as attempt 2");
    let before = other.history(h.id()).await.unwrap();
    // The zombie now finishes its step; its write must not land.
    open_gate(&gate);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = other.history(h.id()).await.unwrap();
    assert_eq!(before, after, "the zombie's journal write was fenced off");
    assert_eq!(
        step_events(&other, h.id()).await,
        vec![(0, "gate_step".to_owned()), (1, "count_step".to_owned())]
    );
    assert_journal_dense(&other, h.id()).await;
    zombie.shutdown().await;
    healthy.shutdown().await;
}

pub async fn restart_under_the_same_worker_id_takes_over_at_once(store: Arc<dyn Store>) {
    // A crashed process with a stable id: it holds a 10-minute lease and
    // never renews it.
    let node = format!("node-{}", uuid_suffix());
    let fluxo = fluxo_on(&store);
    let crashed = fluxo
        .worker()
        .id(node.clone())
        .lease(Duration::from_secs(600))
        .renew_leases(false)
        .poll_interval(Duration::from_millis(20))
        .spawn();
    let gate = format!("gate-{}", uuid_suffix());
    let h = Gated::start(&fluxo, gate.clone()).await.unwrap();
    gate_step_started(h.id()).await;
    assert_eq!(count(&format!("{}/gate", h.id())), 1, "the step started");

    // Its replacement starts under the same id and finishes the instance
    // long before the old lease would expire.
    let restarted = fluxo_on(&store);
    let replacement = restarted
        .worker()
        .id(node)
        .lease(Duration::from_secs(600))
        .poll_interval(Duration::from_millis(20))
        .spawn();
    let out = Gated::handle(&restarted, h.id())
        .result_timeout(WAIT)
        .await
        .unwrap();
    assert_eq!(out, 2, "the replacement ran the step again as attempt 2");
    let before = restarted.history(h.id()).await.unwrap();
    open_gate(&gate);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        before,
        restarted.history(h.id()).await.unwrap(),
        "the old process's journal write was fenced off"
    );
    assert_journal_dense(&restarted, h.id()).await;
    crashed.shutdown().await;
    replacement.shutdown().await;
}

pub async fn a_full_worker_claims_again_when_a_slot_frees(store: Arc<dyn Store>) {
    // Queued before the worker starts, so no start wakes it; with one slot
    // and an hour between polls, only a freed slot can make it claim the
    // next instance.
    let fluxo = fluxo_on(&store);
    let mut handles = Vec::new();
    for i in 0..4 {
        handles.push(Greet::start(&fluxo, format!("queued-{i}")).await.unwrap());
    }
    let w = fluxo
        .worker()
        .concurrency(1)
        .poll_interval(Duration::from_secs(3600))
        .spawn();
    for (i, h) in handles.iter().enumerate() {
        let out: String = h.result_timeout(WAIT).await.unwrap();
        assert_eq!(out, format!("hello queued-{i}"));
    }
    w.shutdown().await;
}

/// What a [`Hooked`] store calls on each claim's result.
type ClaimHookFn = Box<dyn Fn(&mut ClaimBatch) + Send + Sync>;
/// What a [`Hooked`] store calls before each commit: an error is the
/// commit's answer, and the commit is not passed on.
type CommitHookFn = Box<dyn Fn(&Commit) -> StoreResult<()> + Send + Sync>;
/// What a [`Hooked`] store calls with the id of each instance it reads (a
/// caller waiting for a result reads it so) and the record it found.
type GetHookFn = Box<dyn Fn(&str, Option<&InstanceRecord>) + Send + Sync>;

/// A store that passes its calls to another, each claim's result through
/// one hook and each commit through another, also in a group commit (it
/// groups commits when the other store does). It keeps the trait's
/// defaults for the rest: every commit reaches a hook, and it cannot
/// continue a workflow as new.
struct Hooked {
    inner: Arc<dyn Store>,
    on_claim: ClaimHookFn,
    on_commit: CommitHookFn,
    on_get: GetHookFn,
}

impl Hooked {
    fn new(inner: &Arc<dyn Store>) -> Self {
        Hooked {
            inner: Arc::clone(inner),
            on_claim: Box::new(|_| {}),
            on_commit: Box::new(|_| Ok(())),
            on_get: Box::new(|_, _| {}),
        }
    }

    fn on_get(mut self, f: impl Fn(&str, Option<&InstanceRecord>) + Send + Sync + 'static) -> Self {
        self.on_get = Box::new(f);
        self
    }

    fn on_claim(mut self, f: impl Fn(&mut ClaimBatch) + Send + Sync + 'static) -> Self {
        self.on_claim = Box::new(f);
        self
    }

    fn on_commit(mut self, f: impl Fn(&Commit) -> StoreResult<()> + Send + Sync + 'static) -> Self {
        self.on_commit = Box::new(f);
        self
    }

    fn build(self) -> Arc<dyn Store> {
        Arc::new(self)
    }
}

#[async_trait::async_trait]
impl Store for Hooked {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    async fn create_instance(&self, new: NewInstance) -> StoreResult<CreateOutcome> {
        self.inner.create_instance(new).await
    }
    async fn get_instance(&self, id: &str) -> StoreResult<Option<InstanceRecord>> {
        let found = self.inner.get_instance(id).await;
        (self.on_get)(id, found.as_ref().ok().and_then(Option::as_ref));
        found
    }
    async fn list_instances(&self, filter: ListFilter) -> StoreResult<Vec<InstanceRecord>> {
        self.inner.list_instances(filter).await
    }
    async fn load_history(&self, id: &str) -> StoreResult<Vec<StoredEvent>> {
        self.inner.load_history(id).await
    }
    async fn claim(&self, req: &ClaimRequest) -> StoreResult<ClaimBatch> {
        let mut batch = self.inner.claim(req).await?;
        (self.on_claim)(&mut batch);
        Ok(batch)
    }
    async fn renew_leases(
        &self,
        owner: &str,
        ids: &[String],
        lease: Duration,
    ) -> StoreResult<Vec<String>> {
        self.inner.renew_leases(owner, ids, lease).await
    }
    async fn end_leases(&self, owner: &str) -> StoreResult<()> {
        self.inner.end_leases(owner).await
    }
    async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        (self.on_commit)(&commit)?;
        self.inner.commit(commit).await
    }
    fn prefers_batches(&self) -> bool {
        self.inner.prefers_batches()
    }
    async fn commit_batch(&self, commits: Vec<Commit>) -> Vec<StoreResult<CommitOutcome>> {
        // The hook's errors answer their commits; the rest go on together.
        let mut answers = Vec::with_capacity(commits.len());
        let mut passed = Vec::new();
        for commit in commits {
            match (self.on_commit)(&commit) {
                Ok(()) => {
                    answers.push(None);
                    passed.push(commit);
                }
                Err(e) => answers.push(Some(Err(e))),
            }
        }
        let mut written = self.inner.commit_batch(passed).await.into_iter();
        answers
            .into_iter()
            .map(|answer| {
                answer
                    .or_else(|| written.next())
                    .expect("one answer per commit")
            })
            .collect()
    }
    async fn send_signal(&self, id: &str, name: &str, payload: Vec<u8>) -> StoreResult<u64> {
        self.inner.send_signal(id, name, payload).await
    }
    async fn next_signal(&self, id: &str, name: &str) -> StoreResult<(Option<InboxSignal>, u64)> {
        self.inner.next_signal(id, name).await
    }
    async fn request_cancel(&self, id: &str) -> StoreResult<fluxo::WorkflowStatus> {
        self.inner.request_cancel(id).await
    }
}

/// Counts the commits that complete an instance and those that release
/// one, and tells whether a commit is among the first few of its kind.
#[derive(Clone, Default)]
struct FirstTries {
    completes: Arc<AtomicU32>,
    releases: Arc<AtomicU32>,
}

impl FirstTries {
    /// Counts `commit`; whether it is among the first `completes` commits
    /// that complete an instance or the first `releases` that release one.
    fn among_first(&self, commit: &Commit, completes: u32, releases: u32) -> bool {
        match commit.transition {
            Transition::Complete { .. } => self.completes.fetch_add(1, SeqCst) < completes,
            Transition::Release => self.releases.fetch_add(1, SeqCst) < releases,
            _ => false,
        }
    }
}

/// A worker over a store that counts the reads of one instance's record,
/// and that instance (a `Gated` workflow) held in its gate step.
struct HeldInGate {
    worker: Worker,
    handle: WorkflowHandle<Gated>,
    gate: String,
    /// Reads of the record.
    reads: Arc<AtomicU32>,
    /// Reads that found the instance finished.
    finished_reads: Arc<AtomicU32>,
}

async fn held_in_gate(store: &Arc<dyn Store>) -> HeldInGate {
    let reads = Arc::new(AtomicU32::new(0));
    let finished_reads = Arc::new(AtomicU32::new(0));
    let watched = Arc::new(std::sync::Mutex::new(String::new()));
    let (counted, counted_finished, id_of) = (
        Arc::clone(&reads),
        Arc::clone(&finished_reads),
        Arc::clone(&watched),
    );
    let hooked = Hooked::new(store)
        .on_get(move |id, found| {
            if *id_of.lock().unwrap() == id {
                counted.fetch_add(1, SeqCst);
                if found.is_some_and(|rec| rec.status.is_finished()) {
                    counted_finished.fetch_add(1, SeqCst);
                }
            }
        })
        .build();
    let (fluxo, worker) = setup(&hooked);
    let gate = format!("gate-{}", uuid_suffix());
    let handle = Gated::start(&fluxo, gate.clone()).await.unwrap();
    *watched.lock().unwrap() = handle.id().to_owned();
    gate_step_started(handle.id()).await;
    HeldInGate {
        worker,
        handle,
        gate,
        reads,
        finished_reads,
    }
}

pub async fn a_result_awaited_where_the_instance_runs_reads_the_store_seldom(
    store: Arc<dyn Store>,
) {
    // A caller waiting for an instance that a worker of its own client
    // runs hears of the finish from that worker: it reads the store every
    // 250 ms, not on the polling schedule for other processes' instances
    // (which reads it nine times in the 600 ms the step is held).
    let held = held_in_gate(&store).await;
    let waiting = tokio::spawn({
        let h = held.handle.clone();
        async move { h.result_timeout(WAIT).await }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    let while_held = held.reads.load(SeqCst);
    assert!(
        (1..=4).contains(&while_held),
        "read {while_held} times while the step was held"
    );
    open_gate(&held.gate);
    assert_eq!(waiting.await.unwrap().unwrap(), 1);
    held.worker.shutdown().await;
}

pub async fn a_result_awaited_where_the_instance_runs_is_handed_over(store: Arc<dyn Store>) {
    // The worker that records the end leaves it with the callers waiting
    // in its process: a caller that began waiting while the instance ran
    // here does not read the finished record from the store (its reads
    // every 250 ms while the instance runs find it unfinished). A caller
    // the machine was too busy to start before the end was committed
    // reads it as any later caller does: a few tries allow for that.
    for _ in 0..3 {
        let held = held_in_gate(&store).await;
        let waiting = tokio::spawn({
            let h = held.handle.clone();
            async move { h.result_timeout(WAIT).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        open_gate(&held.gate);
        assert_eq!(waiting.await.unwrap().unwrap(), 1);
        let handed_over = held.finished_reads.load(SeqCst) == 0;
        // A caller that comes later reads the store, and gets the same.
        assert_eq!(held.handle.result_timeout(WAIT).await.unwrap(), 1);
        assert!(held.finished_reads.load(SeqCst) >= 1);
        held.worker.shutdown().await;
        if handed_over {
            return;
        }
    }
    panic!("every waiting caller read the finished record from the store");
}

pub async fn a_result_awaited_before_its_instance_runs_here_reads_nothing_once_it_does(
    store: Arc<dyn Store>,
) {
    // A caller waiting for an instance that no worker runs yet polls the
    // store (another process may run it). Once a worker of its own client
    // claims it, the worker tells the caller, which reads nothing more
    // while the instance runs here (until 250 ms have passed: reads are
    // counted from its step's start until it is let go, well before that).
    // Without that word, its next poll after the claim reads the store once
    // more. A read that began just before the claim may still end after
    // it: a few tries allow for that.
    for _ in 0..3 {
        let second_id = Arc::new(std::sync::Mutex::new(String::new()));
        let let_go = Arc::new(AtomicBool::new(false));
        let reads_while_running = Arc::new(AtomicU32::new(0));
        let (id_of, done, counted) = (
            Arc::clone(&second_id),
            Arc::clone(&let_go),
            Arc::clone(&reads_while_running),
        );
        let hooked = Hooked::new(&store)
            .on_get(move |id, _| {
                if *id_of.lock().unwrap() == id
                    && count(&format!("{id}/gate")) >= 1
                    && !done.load(SeqCst)
                {
                    counted.fetch_add(1, SeqCst);
                }
            })
            .build();
        let fluxo = fluxo_on(&hooked);
        let worker = worker_builder(&fluxo).concurrency(1).spawn();
        let (first_gate, second_gate) = (
            format!("gate-{}", uuid_suffix()),
            format!("gate-{}", uuid_suffix()),
        );
        // The first instance holds the worker's one slot.
        let first = Gated::start(&fluxo, first_gate.clone()).await.unwrap();
        gate_step_started(first.id()).await;
        let second = Gated::start(&fluxo, second_gate.clone()).await.unwrap();
        *second_id.lock().unwrap() = second.id().to_owned();
        let waiting_since = std::time::Instant::now();
        let waiting = tokio::spawn({
            let h = second.clone();
            async move { h.result_timeout(WAIT).await }
        });
        // The caller polls while the second instance waits for the slot.
        tokio::time::sleep(Duration::from_millis(10)).await;
        open_gate(&first_gate);
        gate_step_started(second.id()).await;
        // The caller's polls double, so its next one comes at most as long
        // after the claim as the claim came after it began: the instance
        // runs past it, well short of the 250 ms after which the caller
        // reads an instance running here.
        let claimed_after = waiting_since.elapsed();
        tokio::time::sleep(
            (claimed_after + Duration::from_millis(20)).min(Duration::from_millis(120)),
        )
        .await;
        let_go.store(true, SeqCst);
        open_gate(&second_gate);
        assert_eq!(waiting.await.unwrap().unwrap(), 1);
        assert_eq!(first.result_timeout(WAIT).await.unwrap(), 1);
        worker.shutdown().await;
        if reads_while_running.load(SeqCst) == 0 {
            return;
        }
    }
    panic!("every waiting caller read the store while its instance ran here");
}

pub async fn a_run_whose_end_the_store_missed_runs_again(store: Arc<dyn Store>) {
    // The store is away for every try of the commit that completes the
    // workflow (the engine's own retries of it included), then for the
    // first two tries to give the lease back.
    let tries = FirstTries::default();
    let counted = tries.clone();
    let hooked = Hooked::new(&store)
        .on_commit(move |commit| {
            if counted.among_first(commit, 7, 2) {
                return Err(StoreError::backend(std::io::Error::other("away")));
            }
            Ok(())
        })
        .build();
    let (completes, releases) = (&tries.completes, &tries.releases);
    let (fluxo, w) = setup(&hooked);
    let h = Greet::start(&fluxo, "again".into()).await.unwrap();
    // Without the lease given back, this worker would keep renewing it
    // and the instance would never run again.
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), "hello again");
    assert_eq!(completes.load(SeqCst), 8, "seven failed tries, then one");
    assert!(releases.load(SeqCst) >= 3, "two failed tries, then one");
    assert_eq!(
        count(&format!("{}/greet", h.id())),
        1,
        "the second run replayed the step from the journal"
    );
    assert_journal_dense(&fluxo, h.id()).await;
    w.shutdown().await;
}

pub async fn a_run_that_panics_in_the_store_runs_again_and_frees_its_slot(store: Arc<dyn Store>) {
    // The store panics in the first commit that completes a workflow, and
    // in the first that releases one: a bug in a store, outside any user
    // code the engine catches panics of.
    let tries = FirstTries::default();
    let counted = tries.clone();
    let hooked = Hooked::new(&store)
        .on_commit(move |commit| {
            if counted.among_first(commit, 1, 1) {
                panic!("the store panics");
            }
            Ok(())
        })
        .build();
    let panicked = &tries.completes;
    let fluxo = fluxo_on(&hooked);
    let w = worker_builder(&fluxo).concurrency(1).spawn();
    // On memory the panic ends the run's task, and the lease given back
    // meets the second panic; on the stores that group commits it happens
    // in the group-commit writer.
    let h = Greet::start(&fluxo, "panic".into()).await.unwrap();
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), "hello panic");
    assert_eq!(panicked.load(SeqCst), 2, "one panic, then one commit");
    assert_eq!(count(&format!("{}/greet", h.id())), 1);
    // The worker's one slot is free again.
    let next = Greet::start(&fluxo, "next".into()).await.unwrap();
    assert_eq!(next.result_timeout(WAIT).await.unwrap(), "hello next");
    w.shutdown().await;
}

pub async fn a_store_that_panics_in_a_claim_leaves_the_worker_claiming(store: Arc<dyn Store>) {
    let claims = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&claims);
    let hooked = Hooked::new(&store)
        .on_claim(move |_| {
            if c.fetch_add(1, SeqCst) == 0 {
                panic!("the store panics");
            }
        })
        .build();
    let (fluxo, w) = setup(&hooked);
    // The first claim, with nothing to claim yet, panics.
    let waited = tokio::time::Instant::now();
    while claims.load(SeqCst) == 0 {
        assert!(waited.elapsed() < WAIT, "the worker never claimed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let h = Greet::start(&fluxo, "claimed".into()).await.unwrap();
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), "hello claimed");
    assert!(claims.load(SeqCst) >= 2);
    w.shutdown().await;
}

pub async fn a_claim_whose_answer_is_lost_runs_once_its_lease_runs_out(store: Arc<dyn Store>) {
    // The first claim that leases an instance never reaches the worker, as
    // when the connection drops after the store applied it: the instance
    // is leased to the worker, which does not know. Renewing only what it
    // runs, the worker lets that lease run out, and a claim takes the
    // instance then; renewing every lease it holds, it kept it forever.
    let lost = Arc::new(AtomicU32::new(0));
    let l = Arc::clone(&lost);
    let hooked = Hooked::new(&store)
        .on_claim(move |batch| {
            if !batch.claimed.is_empty() && l.fetch_add(1, SeqCst) == 0 {
                batch.claimed.clear();
            }
        })
        .build();
    let fluxo = fluxo_on(&hooked);
    let lease = Duration::from_secs(1);
    let w = worker_builder(&fluxo).lease(lease).spawn();
    let h = Greet::start(&fluxo, "lost".into()).await.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), "hello lost");
    assert!(lost.load(SeqCst) >= 1, "the first claim's answer was lost");
    assert!(
        started.elapsed() >= lease / 2,
        "ran before the lost lease could have run out"
    );
    assert_eq!(count(&format!("{}/greet", h.id())), 1);
    w.shutdown().await;
}

pub async fn continue_as_new_on_a_store_without_it_fails_typed(store: Arc<dyn Store>) {
    let hooked = Hooked::new(&store).build();
    let (fluxo, w) = setup(&hooked);
    let h = Countdown::start(&fluxo, 1).await.unwrap();
    match h.result_timeout(WAIT).await {
        Err(Error::WorkflowFailed { error, .. }) => {
            assert_eq!(error.kind(), "Unsupported");
            assert!(error.message().contains("continue-as-new"), "{error:?}");
        }
        other => panic!("expected WorkflowFailed, got {other:?}"),
    }
    assert_eq!(count(&format!("{}/tick", h.id())), 1, "run once, not again");
    w.shutdown().await;
}

pub async fn a_worker_whose_handle_is_dropped_keeps_working_at_rest(store: Arc<dyn Store>) {
    let claims = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&claims);
    let wrapped = Hooked::new(&store)
        .on_claim(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
        .build();
    let fluxo = fluxo_on(&wrapped);
    // Dropping the handle does not stop the worker.
    drop(
        fluxo
            .worker()
            .poll_interval(Duration::from_millis(50))
            .spawn(),
    );
    let h = Greet::start(&fluxo, "dropped".into()).await.unwrap();
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), "hello dropped");
    // Idle, it claims about once per poll interval: some ten times in half a
    // second, not in a loop.
    claims.store(0, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let claims = claims.load(std::sync::atomic::Ordering::SeqCst);
    assert!(claims <= 50, "{claims} claims in 500 ms at rest");
}

pub async fn a_store_clock_behind_the_workers_costs_a_few_claims_not_a_loop(store: Arc<dyn Store>) {
    // Every empty claim reports a wake-up a second ago by this process's
    // clock, which the store's own clock has not reached: a server whose
    // clock runs behind the worker's.
    let claims = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&claims);
    let wrapped = Hooked::new(&store)
        .on_claim(move |batch| {
            counted.fetch_add(1, SeqCst);
            if batch.claimed.is_empty() {
                batch.next_wake = Some(fluxo::store::now_millis() - 1000);
            }
        })
        .build();
    let fluxo = fluxo_on(&wrapped);
    let w = fluxo
        .worker()
        .poll_interval(Duration::from_millis(50))
        .spawn();
    let h = Greet::start(&fluxo, "skewed".into()).await.unwrap();
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), "hello skewed");
    // It waits as long as the wake-up has been overdue (1 ms at first), up
    // to its poll interval: some ten claims in half a second, not hundreds.
    claims.store(0, SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = claims.load(SeqCst);
    assert!(n <= 40, "{n} claims in 500 ms");
    // New work is still claimed at once.
    let h = Greet::start(&fluxo, "later".into()).await.unwrap();
    assert_eq!(
        h.result_timeout(Duration::from_secs(5)).await.unwrap(),
        "hello later"
    );
    w.shutdown().await;
}

pub async fn handle_from_another_process(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Approval::start(&fluxo, ()).await.unwrap();
    // A client with no worker and no registrations.
    let client = Fluxo::from_store(Arc::clone(&store));
    let remote = Approval::handle(&client, h.id());
    remote.signal(Approved { by: "x".into() }).await.unwrap();
    remote.signal(Approved { by: "y".into() }).await.unwrap();
    assert_eq!(remote.result_timeout(WAIT).await.unwrap(), "x,y");
    w.shutdown().await;
}

pub async fn long_history(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = ManySteps::start(&fluxo, 300).await.unwrap();
    assert_eq!(
        h.result_timeout(WAIT).await.unwrap(),
        (1..=300).sum::<u32>()
    );
    assert_eq!(fluxo.history(h.id()).await.unwrap().len(), 300);
    assert_journal_dense(&fluxo, h.id()).await;
    w.shutdown().await;
}

fn uuid_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

pub async fn call_time_step_options(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = CallTimeOptions::start(&fluxo, 1).await.unwrap();
    assert_eq!(
        h.result_timeout(WAIT).await.unwrap(),
        "gave up: attempt 1 failed"
    );
    assert_eq!(
        count(&format!("{}/flaky", h.id())),
        1,
        "the call-time policy allowed one attempt"
    );
    w.shutdown().await;
}

pub async fn incompatible_history_format(store: Arc<dyn Store>) {
    // Every instance reads as written by a future journal format, as after
    // a downgrade.
    let wrapped = Hooked::new(&store)
        .on_claim(|batch| {
            for c in &mut batch.claimed {
                c.record.history_format = fluxo::store::HISTORY_FORMAT + 1;
            }
        })
        .build();
    let (fluxo, w) = setup(&wrapped);
    let h = Greet::start(&fluxo, "old".into()).await.unwrap();
    match h.result_timeout(WAIT).await {
        Err(Error::IncompatibleHistory {
            found, supported, ..
        }) => {
            assert_eq!(supported, fluxo::store::HISTORY_FORMAT);
            assert_eq!(found, supported + 1);
        }
        other => panic!("expected IncompatibleHistory, got {other:?}"),
    }
    assert_eq!(
        count(&format!("{}/greet", h.id())),
        0,
        "nothing ran on the foreign history"
    );
    w.shutdown().await;
}

pub async fn observers_see_lifecycle_events(store: Arc<dyn Store>) {
    use fluxo::observe::{BasicMetrics, CompositeObserver, LoggingObserver};
    let fluxo = fluxo_on(&store);
    let metrics = BasicMetrics::new();
    assert!(fluxo.observe(
        CompositeObserver::new()
            .with(metrics.clone())
            .with(LoggingObserver)
    ));
    assert!(!fluxo.observe(LoggingObserver), "one observer per Fluxo");
    let w = worker(&fluxo);
    let ok = Retrying::start(&fluxo, 1).await.unwrap();
    ok.result_timeout(WAIT).await.unwrap();
    let failed = Failing::start(&fluxo, ()).await.unwrap();
    failed.result_timeout(WAIT).await.unwrap_err();
    // The worker reports a finish once it is durable, which a caller polling
    // the store may see first: wait for both reports.
    let mut snap = metrics.snapshot();
    for _ in 0..500 {
        let done = |name: &str| {
            snap.workflows
                .get(name)
                .is_some_and(|w| w.completed + w.failed > 0)
        };
        if done("retrying") && done("failing") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        snap = metrics.snapshot();
    }
    let retrying = &snap.workflows["retrying"];
    assert_eq!((retrying.started, retrying.completed), (1, 1));
    assert_eq!(retrying.latency.count, 1);
    let flaky = &snap.steps[&("retrying".to_owned(), "flaky".to_owned())];
    assert_eq!((flaky.started, flaky.retried, flaky.completed), (2, 1, 1));
    let failing = &snap.workflows["failing"];
    assert_eq!((failing.started, failing.failed), (1, 1));
    let boom = &snap.steps[&("failing".to_owned(), "always_fails".to_owned())];
    assert_eq!((boom.started, boom.retried, boom.failed), (2, 1, 1));
    w.shutdown().await;
}

pub async fn patched_serves_old_and_new_instances(store: Arc<dyn Store>) {
    let v1 = Fluxo::from_store(Arc::clone(&store));
    v1.register(PatchyV1).unwrap();
    let w1 = worker(&v1);
    let old = PatchyV1::start(&v1, ()).await.unwrap();
    for _ in 0..500 {
        if !step_events(&v1, old.id()).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    w1.shutdown().await;

    let v2 = Fluxo::from_store(Arc::clone(&store));
    v2.register(PatchyV1Patched).unwrap();
    let w2 = worker(&v2);
    let new = PatchyV1Patched::start(&v2, ()).await.unwrap();
    let old = PatchyV1Patched::handle(&v2, old.id());
    old.signal(Go).await.unwrap();
    new.signal(Go).await.unwrap();
    assert_eq!(
        old.result_timeout(WAIT).await.unwrap(),
        "old",
        "the old instance replays the old branch"
    );
    assert_eq!(new.result_timeout(WAIT).await.unwrap(), "new");
    let names: Vec<String> = step_events(&v2, new.id())
        .await
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    assert_eq!(names, ["greet_step", "count_step"]);
    w2.shutdown().await;
}

pub async fn published_events(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Publisher::start(&fluxo, ()).await.unwrap();
    assert_eq!(h.wait_event::<u32>("progress", WAIT).await.unwrap(), 1);
    assert_eq!(h.event::<u32>("missing").await.unwrap(), None);
    h.signal(Go).await.unwrap();
    h.result_timeout(WAIT).await.unwrap();
    assert_eq!(h.event::<u32>("progress").await.unwrap(), Some(2));
    assert!(matches!(
        h.event::<String>("progress").await,
        Err(Error::Decode(_))
    ));
    w.shutdown().await;
}

pub async fn saga_compensates_on_failure(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Trip::start(&fluxo, true).await.unwrap();
    match h.result_timeout(WAIT).await {
        Err(Error::WorkflowFailed { error, .. }) => {
            assert_eq!(error.step_error().unwrap().kind(), "Declined")
        }
        other => panic!("expected WorkflowFailed, got {other:?}"),
    }
    assert_eq!(
        crate::common::log_of(h.id()),
        ["undo flight", "undo hotel"],
        "reverse order"
    );
    let names: Vec<String> = step_events(&fluxo, h.id())
        .await
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    assert_eq!(
        names,
        [
            "count_step",
            "count_step",
            "compensate flight",
            "compensate hotel"
        ]
    );
    w.shutdown().await;
}

pub async fn saga_compensates_on_cancel(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Trip::start(&fluxo, false).await.unwrap();
    for _ in 0..500 {
        if step_events(&fluxo, h.id()).await.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.cancel().await.unwrap();
    assert!(matches!(
        h.result_timeout(WAIT).await,
        Err(Error::Cancelled { .. })
    ));
    assert_eq!(crate::common::log_of(h.id()), ["undo flight", "undo hotel"]);
    let history = fluxo.history(h.id()).await.unwrap();
    assert!(history
        .iter()
        .any(|e| matches!(e.event, Event::CancelRequested)));
    w.shutdown().await;
}

/// A step's context kept past the run (in a task the step spawned, say)
/// does not wait on the finished run forever: `cancelled()` resolves and
/// `is_cancelled()` is true once the run is over.
pub async fn a_step_context_kept_past_its_run_sees_it_end(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = KeepsStepContext::start(&fluxo, ()).await.unwrap();
    h.result_timeout(WAIT).await.unwrap();
    let kept = kept_step_contexts()
        .remove(h.id())
        .expect("the step kept its context");
    assert_eq!(kept.workflow_id(), h.id());
    tokio::time::timeout(WAIT, kept.cancelled())
        .await
        .expect("cancelled() resolves once the run is over");
    assert!(kept.is_cancelled(), "the run is over");
    w.shutdown().await;
}

pub async fn a_step_run_on_another_task_knows_its_workflow(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = StepOnAnotherTask::start(&fluxo, ()).await.unwrap();
    let out = h.result_timeout(WAIT).await.unwrap();
    assert_eq!(out, format!("0 {}:1", h.id()));
    w.shutdown().await;
}

pub async fn cancel_reaches_a_running_step(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = LongRunning::start(&fluxo, ()).await.unwrap();
    for _ in 0..500 {
        if count(&format!("{}/long_started", h.id())) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let asked = std::time::Instant::now();
    h.cancel().await.unwrap();
    assert!(matches!(
        h.result_timeout(WAIT).await,
        Err(Error::Cancelled { .. })
    ));
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "well within the grace period"
    );
    assert_eq!(
        count(&format!("{}/saw_cancel", h.id())),
        1,
        "the step saw the request"
    );
    assert_eq!(
        crate::common::log_of(h.id()),
        ["cleanup"],
        "the on_cancel handler ran"
    );
    w.shutdown().await;
}

/// Counts attempts and rewrites the output of `greet_step`.
struct Shout(Arc<std::sync::atomic::AtomicU32>);

impl fluxo::middleware::Middleware for Shout {
    fn handle<'a>(
        &'a self,
        info: &'a fluxo::middleware::StepInfo<'a>,
        next: fluxo::middleware::Next<'a>,
    ) -> fluxo::middleware::BoxFuture<'a, Result<serde_json::Value, StepError>> {
        Box::pin(async move {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let out = next.run(info).await?;
            Ok(match (info.step, out) {
                ("greet_step", serde_json::Value::String(s)) => {
                    serde_json::Value::String(s.to_uppercase())
                }
                (_, other) => other,
            })
        })
    }
}

pub async fn middleware_wraps_steps(store: Arc<dyn Store>) {
    use fluxo::middleware::MiddlewareStack;
    let fluxo = fluxo_on(&store);
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    assert!(fluxo.use_middleware(MiddlewareStack::new().with(Shout(Arc::clone(&attempts)))));
    let w = worker(&fluxo);
    let h = Greet::start(&fluxo, "mid".into()).await.unwrap();
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), "HELLO MID");
    let r = Retrying::start(&fluxo, 1).await.unwrap();
    assert_eq!(r.result_timeout(WAIT).await.unwrap(), 2);
    assert_eq!(
        attempts.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "every attempt is wrapped"
    );
    w.shutdown().await;
}

pub async fn continue_as_new_keeps_the_id_and_empties_the_journal(store: Arc<dyn Store>) {
    let (fluxo, w) = setup(&store);
    let h = Countdown::start(&fluxo, 3).await.unwrap();
    assert_eq!(h.result_timeout(WAIT).await.unwrap(), "liftoff");
    assert_eq!(
        count(&format!("{}/tick", h.id())),
        4,
        "one run per input 3, 2, 1, 0"
    );
    let history = fluxo.history(h.id()).await.unwrap();
    assert_eq!(
        history.len(),
        1,
        "only the last run's journal is kept: {history:#?}"
    );
    let input: u32 = serde_json::from_slice(&fluxo.instance(h.id()).await.unwrap().input).unwrap();
    assert_eq!(input, 0);
    w.shutdown().await;
}
