//! Workflows the conformance suite runs on every backend.

use std::time::Duration;

use fluxo::prelude::*;

use crate::common::bump;

fn step_key(name: &str) -> String {
    let s = StepContext::current().expect("inside a step");
    format!("{}/{}", s.workflow_id(), name)
}

// ----- steps -------------------------------------------------------------------

#[fluxo::step]
pub async fn greet_step(name: &str) -> Result<String, StepError> {
    bump(step_key("greet"));
    Ok(format!("hello {name}"))
}

#[fluxo::step(retry(max_attempts = 4, initial = "10ms", backoff = 1.0, jitter = 0.0))]
pub async fn flaky(fail_times: u32) -> Result<u32, StepError> {
    let n = bump(step_key("flaky"));
    if n <= fail_times {
        return Err(StepError::retryable(format!("attempt {n} failed")));
    }
    Ok(StepContext::current().unwrap().attempt())
}

#[fluxo::step(retry(max_attempts = 2, initial = "5ms"))]
pub async fn always_fails() -> Result<u32, StepError> {
    bump(step_key("always_fails"));
    Err(StepError::retryable("boom").with_kind("Boom"))
}

#[fluxo::step(retry(max_attempts = 5, initial = "5ms", non_retryable("Declined")))]
pub async fn declined() -> Result<u32, StepError> {
    bump(step_key("declined"));
    Err(StepError::retryable("card declined").with_kind("Declined"))
}

#[fluxo::step(retry(max_attempts = 2, initial = "1200ms", jitter = 0.0))]
pub async fn fails_once_slowly() -> Result<u32, StepError> {
    let n = bump(step_key("fails_once_slowly"));
    if n == 1 {
        return Err(StepError::retryable("first attempt fails"));
    }
    Ok(n)
}

#[fluxo::step(retry(max_attempts = 2, initial = "5ms"), timeout = "50ms")]
pub async fn too_slow() -> Result<u32, StepError> {
    bump(step_key("too_slow"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    Ok(0)
}

#[fluxo::step(retry(max_attempts = 3, initial = "5ms", backoff = 1.0, jitter = 0.0))]
pub async fn panics_first(times: u32) -> Result<u32, StepError> {
    let n = bump(step_key("panics_first"));
    if n <= times {
        panic!("attempt {n} panics");
    }
    Ok(StepContext::current().unwrap().attempt())
}

/// Its step panics on the first `times` attempts (of three).
#[fluxo::workflow]
pub async fn panicking_step(_ctx: WorkflowContext, times: u32) -> Result<u32, WorkflowError> {
    Ok(panics_first(times).await?)
}

/// Runs a step, then panics in its own body.
#[fluxo::workflow]
pub async fn panicking_body(_ctx: WorkflowContext, name: String) -> Result<u32, WorkflowError> {
    let greeting = greet_step(&name).await?;
    // A lookup that finds nothing, unwrapped.
    let found = greeting.find("not in the greeting");
    Ok(found.map(|i| i as u32).expect("the body panics"))
}

/// Sleeps until a time some 280,000 years away, past the calendars of
/// date libraries, or (`forever`) for `Duration::MAX`.
#[fluxo::workflow]
pub async fn sleeps_past_the_calendar(
    ctx: WorkflowContext,
    forever: bool,
) -> Result<u32, WorkflowError> {
    if forever {
        ctx.sleep(Duration::MAX).await;
    } else {
        let far = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 43);
        ctx.sleep_until(far).await;
    }
    Ok(0)
}

#[fluxo::step]
pub async fn count_step(name: &str) -> Result<String, StepError> {
    bump(step_key(name));
    Ok(name.to_owned())
}

#[fluxo::step]
pub async fn key_step() -> Result<String, StepError> {
    Ok(StepContext::current().unwrap().idempotency_key())
}

// ----- signals -----------------------------------------------------------------

#[fluxo::signal]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Approved {
    pub by: String,
}

#[fluxo::signal]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Go;

// ----- workflows ---------------------------------------------------------------

#[fluxo::workflow]
pub async fn greet(_ctx: WorkflowContext, name: String) -> Result<String, WorkflowError> {
    Ok(greet_step(&name).await?)
}

#[fluxo::workflow]
pub async fn retrying(_ctx: WorkflowContext, fail_times: u32) -> Result<u32, WorkflowError> {
    Ok(flaky(fail_times).await?)
}

#[fluxo::workflow]
pub async fn exhausting(_ctx: WorkflowContext) -> Result<String, WorkflowError> {
    let a = match always_fails().await {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("caught {}", e.kind()),
    };
    let b = match declined().await {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("caught {}", e.kind()),
    };
    let c = match too_slow().await {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("caught {}", e.kind()),
    };
    Ok(format!("{a}; {b}; {c}"))
}

#[fluxo::workflow]
pub async fn failing(_ctx: WorkflowContext) -> Result<u32, WorkflowError> {
    always_fails().await?;
    Ok(1)
}

#[fluxo::workflow]
pub async fn durable_retry(_ctx: WorkflowContext) -> Result<u32, WorkflowError> {
    Ok(fails_once_slowly().await?)
}

#[fluxo::workflow]
pub async fn sleeper(ctx: WorkflowContext, ms: u64) -> Result<i64, WorkflowError> {
    let before = ctx.now().await;
    ctx.sleep(Duration::from_millis(ms)).await;
    let after = ctx.now().await;
    Ok((after - before).num_milliseconds())
}

#[fluxo::workflow(signals(Approved))]
pub async fn approval(ctx: WorkflowContext) -> Result<String, WorkflowError> {
    let first = ctx.wait::<Approved>().await;
    let second = ctx.wait::<Approved>().await;
    Ok(format!("{},{}", first.by, second.by))
}

#[fluxo::workflow(signals(Approved))]
pub async fn approval_timeout(ctx: WorkflowContext, ms: u64) -> Result<String, WorkflowError> {
    match ctx
        .wait::<Approved>()
        .timeout(Duration::from_millis(ms))
        .await
    {
        Ok(a) => Ok(format!("approved by {}", a.by)),
        Err(t) => Ok(format!("gave up: {t}")),
    }
}

#[fluxo::workflow]
pub async fn parallel(ctx: WorkflowContext) -> Result<Vec<String>, WorkflowError> {
    let (a, b) = ctx.join(count_step("a"), count_step("b")).await;
    let rest = ctx
        .join_all(["c", "d", "e", "f"].map(count_step))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = vec![a?, b?];
    out.extend(rest);
    Ok(out)
}

#[fluxo::workflow]
pub async fn child_double(_ctx: WorkflowContext, n: u64) -> Result<u64, WorkflowError> {
    if n == 13 {
        return Err(WorkflowError::new("unlucky").with_kind("Unlucky"));
    }
    Ok(n * 2)
}

#[fluxo::workflow]
pub async fn parent(ctx: WorkflowContext, n: u64) -> Result<String, WorkflowError> {
    let doubled = ctx.child(ChildDouble, n).await?;
    let failed = match ctx.child(ChildDouble, 13).await {
        Ok(v) => format!("unexpected {v}"),
        Err(e) => e.kind().to_owned(),
    };
    Ok(format!("{doubled} {failed}"))
}

#[fluxo::workflow(signals(Go))]
pub async fn waits_forever(ctx: WorkflowContext) -> Result<(), WorkflowError> {
    ctx.wait::<Go>().await;
    Ok(())
}

#[fluxo::workflow(signals(Go))]
pub async fn cancel_parent(ctx: WorkflowContext) -> Result<(), WorkflowError> {
    ctx.child(WaitsForever, ())
        .id(format!("{}-child", ctx.id()))
        .await?;
    Ok(())
}

/// Steps, a signal wait and values: replayed after an eviction.
#[fluxo::workflow(signals(Go))]
pub async fn replayed(
    ctx: WorkflowContext,
) -> Result<(String, u64, String, String), WorkflowError> {
    count_step("one").await?;
    let now = ctx.now().await;
    let r = ctx.random().await;
    let u = ctx.uuid().await;
    ctx.wait::<Go>().await;
    count_step("two").await?;
    let k = key_step().await?;
    Ok((now.to_rfc3339(), r, u.to_string(), k))
}

/// Version 1 of a workflow whose code then changes incompatibly.
#[fluxo::workflow(name = "evolving", signals(Go))]
pub async fn evolving_v1(ctx: WorkflowContext) -> Result<String, WorkflowError> {
    count_step("a").await?;
    ctx.wait::<Go>().await;
    Ok("v1".into())
}

/// The incompatible change: another step at seq 0.
#[fluxo::workflow(name = "evolving", signals(Go))]
pub async fn evolving_v1_changed(ctx: WorkflowContext) -> Result<String, WorkflowError> {
    greet_step("x").await?;
    ctx.wait::<Go>().await;
    Ok("changed".into())
}

/// Blocks in its first step until told to go on (for the zombie test).
#[fluxo::workflow]
pub async fn gated(_ctx: WorkflowContext, gate: String) -> Result<u32, WorkflowError> {
    let n = gate_step(&gate).await?;
    count_step("after").await?;
    Ok(n)
}

#[fluxo::step(retry(max_attempts = 1))]
pub async fn gate_step(gate: &str) -> Result<u32, StepError> {
    let n = bump(step_key("gate"));
    if n == 1 {
        crate::common::wait_gate(gate).await;
    }
    Ok(n)
}

/// Many steps, for the long-history test.
#[fluxo::workflow]
pub async fn many_steps(_ctx: WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
    let mut total = 0;
    for i in 0..n {
        total += add_one(i).await?;
    }
    Ok(total)
}

#[fluxo::step]
pub async fn add_one(i: u32) -> Result<u32, StepError> {
    Ok(i + 1)
}

/// Registers every workflow of the suite.
pub fn register_all(fluxo: &Fluxo) {
    fluxo.register(Greet).unwrap();
    fluxo.register(Retrying).unwrap();
    fluxo.register(Exhausting).unwrap();
    fluxo.register(Failing).unwrap();
    fluxo.register(DurableRetry).unwrap();
    fluxo.register(Sleeper).unwrap();
    fluxo.register(Approval).unwrap();
    fluxo.register(ApprovalTimeout).unwrap();
    fluxo.register(Parallel).unwrap();
    fluxo.register(ChildDouble).unwrap();
    fluxo.register(Parent).unwrap();
    fluxo.register(WaitsForever).unwrap();
    fluxo.register(CancelParent).unwrap();
    fluxo.register(Replayed).unwrap();
    fluxo.register(Gated).unwrap();
    fluxo.register(ManySteps).unwrap();
    fluxo.register(CallTimeOptions).unwrap();
    fluxo.register(Publisher).unwrap();
    fluxo.register(Trip).unwrap();
    fluxo.register(LongRunning).unwrap();
    fluxo.register(Countdown).unwrap();
    fluxo.register(KeepsStepContext).unwrap();
    fluxo.register(StepOnAnotherTask).unwrap();
    fluxo.register(PanickingStep).unwrap();
    fluxo.register(PanickingBody).unwrap();
    fluxo.register(SleepsPastTheCalendar).unwrap();
    fluxo.register(PanickingHandler).unwrap();
}

/// Step contexts kept past their step, by workflow id.
pub fn kept_step_contexts(
) -> std::sync::MutexGuard<'static, std::collections::HashMap<String, StepContext>> {
    static KEPT: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, StepContext>>,
    > = std::sync::OnceLock::new();
    KEPT.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

#[fluxo::step]
pub async fn keep_context() -> Result<(), StepError> {
    let s = StepContext::current().expect("inside a step");
    kept_step_contexts().insert(s.workflow_id().to_owned(), s);
    Ok(())
}

/// A step that keeps a copy of its context, as a task it spawned would.
#[fluxo::workflow]
pub async fn keeps_step_context(_ctx: WorkflowContext) -> Result<(), WorkflowError> {
    Ok(keep_context().await?)
}

/// Runs an ad-hoc step through the workflow's context on a task of its
/// own, which has no workflow in scope; the step reports the id and the
/// sequence number its context gives it.
#[fluxo::workflow]
pub async fn step_on_another_task(ctx: WorkflowContext) -> Result<String, WorkflowError> {
    let first = ctx
        .step("here", || async {
            Ok(StepContext::current().unwrap().seq())
        })
        .await?;
    let there = on_a_task_of_its_own(ctx.clone())
        .await
        .expect("step task")?;
    Ok(format!("{first} {there}"))
}

/// Spawned outside the workflow body, where spawning is refused.
fn on_a_task_of_its_own(
    ctx: WorkflowContext,
) -> tokio::task::JoinHandle<Result<String, StepError>> {
    tokio::spawn(async move {
        ctx.step("there", || async {
            let s = StepContext::current().expect("a step context on any task");
            Ok(format!("{}:{}", s.workflow_id(), s.seq()))
        })
        .await
    })
}

/// Overrides the step's attribute options at call time.
#[fluxo::workflow]
pub async fn call_time_options(
    ctx: WorkflowContext,
    fail_times: u32,
) -> Result<String, WorkflowError> {
    let once = StepOptions::new().retry(RetryPolicy::none());
    match ctx.with_options(once, flaky(fail_times)).await {
        Ok(attempt) => Ok(format!("succeeded on attempt {attempt}")),
        Err(e) => Ok(format!("gave up: {}", e.message())),
    }
}

// ----- versioning, published state, sagas, cancellation -------------------------

/// Before a change.
#[fluxo::workflow(name = "patchy", signals(Go))]
pub async fn patchy_v1(ctx: WorkflowContext) -> Result<String, WorkflowError> {
    count_step("a").await?;
    ctx.wait::<Go>().await;
    Ok("old".into())
}

/// After a change guarded by `ctx.patched`: one code version for both.
#[fluxo::workflow(name = "patchy", signals(Go))]
pub async fn patchy_v1_patched(ctx: WorkflowContext) -> Result<String, WorkflowError> {
    let new = ctx.patched("greet-first");
    if new {
        greet_step("patched").await?;
    }
    count_step("a").await?;
    ctx.wait::<Go>().await;
    Ok(if new { "new" } else { "old" }.into())
}

#[fluxo::workflow(signals(Go))]
pub async fn publisher(ctx: WorkflowContext) -> Result<u32, WorkflowError> {
    ctx.set_event("progress", &1u32).await;
    ctx.wait::<Go>().await;
    ctx.set_event("progress", &2u32).await;
    Ok(2)
}

fn record_compensation(id: &str, what: &str) {
    crate::common::bump(format!("{id}/{what}"));
    crate::common::push_log(id, what);
}

#[fluxo::step(retry(max_attempts = 1))]
pub async fn pay(fail: bool) -> Result<u32, StepError> {
    if fail {
        return Err(StepError::fatal("card declined").with_kind("Declined"));
    }
    Ok(1)
}

#[fluxo::workflow(signals(Go))]
pub async fn trip(ctx: WorkflowContext, fail_payment: bool) -> Result<String, WorkflowError> {
    let saga = ctx.saga();
    let id = ctx.id().to_owned();
    count_step("hotel").await?;
    let i = id.clone();
    saga.add("hotel", move || {
        let i = i.clone();
        async move {
            record_compensation(&i, "undo hotel");
            Ok(())
        }
    });
    count_step("flight").await?;
    let i = id.clone();
    saga.add("flight", move || {
        let i = i.clone();
        async move {
            record_compensation(&i, "undo flight");
            Ok(())
        }
    });
    if let Err(e) = pay(fail_payment).await {
        saga.compensate()
            .await
            .map_err(|_| WorkflowError::new("compensation failed"))?;
        return Err(e.into());
    }
    // Wait for a go-ahead; a cancel here compensates too.
    ctx.wait::<Go>().await;
    Ok("booked".into())
}

#[fluxo::step(retry(max_attempts = 1))]
pub async fn long_step() -> Result<u32, StepError> {
    let step = StepContext::current().unwrap();
    crate::common::bump(format!("{}/long_started", step.workflow_id()));
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(60)) => Ok(1),
        _ = step.cancelled() => {
            crate::common::bump(format!("{}/saw_cancel", step.workflow_id()));
            Err(StepError::fatal("stopped: the workflow was cancelled"))
        }
    }
}

#[fluxo::workflow]
pub async fn long_running(ctx: WorkflowContext) -> Result<u32, WorkflowError> {
    let id = ctx.id().to_owned();
    ctx.on_cancel(move || async move { record_compensation(&id, "cleanup") });
    Ok(long_step().await?)
}

/// Sleeps with two cancellation handlers: the one that runs first panics
/// while it is being built, the other records "cleanup".
#[fluxo::workflow]
pub async fn panicking_handler(ctx: WorkflowContext) -> Result<u32, WorkflowError> {
    let id = ctx.id().to_owned();
    ctx.on_cancel(move || async move { record_compensation(&id, "cleanup") });
    let id = ctx.id().to_owned();
    ctx.on_cancel(move || {
        if !id.is_empty() {
            panic!("the handler panics");
        }
        async {}
    });
    ctx.sleep(Duration::from_secs(3600)).await;
    Ok(0)
}

/// Restarts itself with a smaller counter until it reaches zero.
#[fluxo::workflow]
pub async fn countdown(ctx: WorkflowContext, n: u32) -> Result<String, WorkflowError> {
    count_step("tick").await?;
    if n > 0 {
        return ctx.continue_as_new(n - 1).await;
    }
    Ok("liftoff".into())
}
