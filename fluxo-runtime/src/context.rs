//! [`WorkflowContext`]: everything a workflow body may do that touches the
//! outside world, each operation journaled so a replay sees the same thing.

use std::borrow::Cow;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::FutureExt;
use tracing::Instrument;

use crate::error::{Failure, StepError, WorkflowError};
use crate::history::{Entry, Event, Operation, StepCompletedRef};
use crate::instance::{retry_transient, Abort, CommitExtra, Instance, OpGuard};
use crate::middleware::{Next, StepInfo};
use crate::observe::LifecycleEvent;
use crate::panics;
use crate::payload::{self, Payload};
use crate::retry::{RetryPolicy, StepOptions};
use crate::step::StepScope;
use crate::store::{now_millis, InstanceStatus, Millis, NewInstance};
use crate::workflow::{Signal, Workflow};

tokio::task_local! {
    static CURRENT: WorkflowContext;
}

/// Waits shorter than this are slept in memory while holding the lease;
/// longer ones park the instance and free its worker slot.
const PARK_THRESHOLD_MS: Millis = 1_000;

/// The workflow running on this task, if any.
pub(crate) fn current() -> Option<WorkflowContext> {
    CURRENT.try_with(|c| c.clone()).ok()
}

/// `f` on the workflow running on this task, if any, without a copy of it.
pub(crate) fn with_current<R>(f: impl FnOnce(&WorkflowContext) -> R) -> Option<R> {
    CURRENT.try_with(f).ok()
}

/// Runs `fut` with `ctx` as the current workflow (so `#[step]` calls inside
/// it are journaled).
pub(crate) async fn scope<F: Future>(ctx: WorkflowContext, fut: F) -> F::Output {
    CURRENT.scope(ctx, fut).await
}

/// Never resolves: the instance was aborted and its runner drops the
/// workflow future.
async fn halt<T>() -> T {
    std::future::pending().await
}

/// The handle a workflow body uses for durable operations.
///
/// Every operation gets the next sequence number when it is issued and its
/// result is journaled; after a crash the workflow runs again from the start
/// and journaled operations return their recorded result at once.
#[derive(Clone)]
pub struct WorkflowContext {
    inst: Arc<Instance>,
}

impl std::fmt::Debug for WorkflowContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowContext")
            .field("workflow", &self.inst.workflow)
            .field("id", &self.inst.id)
            .finish()
    }
}

/// A signal wait ran past its deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timed out waiting for signal `{signal}`")]
pub struct Timeout {
    /// The signal waited for.
    pub signal: String,
}

impl WorkflowContext {
    pub(crate) fn new(inst: Arc<Instance>) -> Self {
        WorkflowContext { inst }
    }

    /// The instance id.
    pub fn id(&self) -> &str {
        &self.inst.id
    }

    /// The workflow name.
    pub fn workflow(&self) -> &str {
        &self.inst.workflow
    }

    /// Journals one event of operation `seq`; `false` means the instance was
    /// aborted and the caller must halt.
    async fn commit_event(&self, seq: u64, event: impl Entry + Sync) -> bool {
        self.inst
            .commit(seq, std::slice::from_ref(&event), CommitExtra::default())
            .await
            .is_some()
    }

    /// The run of the instance this context belongs to.
    pub(crate) fn instance(&self) -> &Arc<Instance> {
        &self.inst
    }

    /// Whether this is the workflow running on this task.
    fn is_current(&self) -> bool {
        with_current(|c| Arc::ptr_eq(&c.inst, &self.inst)).unwrap_or(false)
    }

    fn fail(&self, failure: Failure) {
        self.inst.abort(Abort::Fail(failure));
    }

    fn decode<T: Payload>(
        &self,
        seq: u64,
        what: impl Into<String>,
        value: serde_json::Value,
    ) -> Option<T> {
        match serde_json::from_value(value) {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(Failure::Decode {
                    seq: Some(seq),
                    what: what.into(),
                    type_name: std::any::type_name::<T>().to_owned(),
                    message: e.to_string(),
                });
                None
            }
        }
    }

    // ----- steps -------------------------------------------------------------

    /// Runs an ad-hoc step: `ctx.step("fetch", || async { .. }).retry(p).await`.
    pub fn step<T, F, Fut>(&self, name: impl Into<String>, f: F) -> StepCall<T, F>
    where
        T: Payload,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, StepError>> + Send,
    {
        StepCall {
            ctx: self.clone(),
            name: name.into(),
            options: StepOptions::default(),
            f,
            _t: PhantomData,
        }
    }

    /// Runs a `#[step]` call with options chosen at call time instead of
    /// those in its attribute:
    /// `ctx.with_options(StepOptions::new().retry(p), charge(&order)).await`.
    /// The options apply to the first step `fut` starts.
    pub async fn with_options<F: Future>(&self, options: StepOptions, fut: F) -> F::Output {
        crate::step::with_options(options, fut).await
    }

    /// Runs step `step_name` (borrowed when it is a `#[step]` function's,
    /// so naming it costs nothing per call).
    pub(crate) async fn run_step<T, F, Fut>(
        &self,
        step_name: Cow<'static, str>,
        options: StepOptions,
        mut f: F,
    ) -> Result<T, StepError>
    where
        T: Payload,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, StepError>> + Send,
    {
        // The step's body finds its workflow in the task's scope (see
        // `StepContext::current`): a step run from outside it (a context
        // moved to another task) runs in one of its own.
        if !self.is_current() {
            let scoped = scope(self.clone(), self.run_step(step_name, options, f));
            return Box::pin(scoped).await;
        }
        let name: &str = &step_name;
        let Some((guard, recorded)) = self.inst.begin(|| Operation::Step(name.to_owned())) else {
            return halt().await;
        };
        let seq = guard.seq;
        let mut attempt = 1;
        let mut retry_at = None;
        for event in recorded {
            match event {
                Event::StepCompleted { output, .. } => {
                    return match self.decode(seq, format!("output of step `{name}`"), output) {
                        Some(v) => Ok(v),
                        None => halt().await,
                    };
                }
                Event::StepFailed { error, .. } => return Err(error),
                Event::StepAttemptFailed {
                    attempt: a,
                    retry_at: at,
                    ..
                } => {
                    attempt = a.saturating_add(1);
                    retry_at = Some(at);
                }
                _ => {}
            }
        }
        loop {
            if let Some(at) = retry_at.take() {
                self.wait_until(&guard, at).await;
            }
            // Debug level: a step is the hot path, and a subscriber that
            // wants no debug spans skips this one for a load and a compare
            // (an `info` span per step would cost a service logging at
            // `info` more than the step itself). Not even built when no
            // subscriber takes debug: a disabled span still formats its
            // fields for the `log` crate, which costs more than the check.
            let span = tracing::level_enabled!(tracing::Level::DEBUG)
                .then(|| tracing::debug_span!("step", step = name, seq, attempt))
                .filter(|span| !span.is_disabled());
            let step = StepScope {
                name: step_name.clone(),
                seq,
                attempt,
            };
            let (workflow, id) = (self.inst.workflow.as_str(), &*self.inst.id);
            self.inst.shared.observe(|o| {
                o.on_event(&LifecycleEvent::StepStarted {
                    workflow,
                    id,
                    step: name,
                    attempt,
                })
            });
            // Only an observer reads the duration.
            let attempt_started = self
                .inst
                .shared
                .observer
                .get()
                .map(|_| std::time::Instant::now());
            let info = StepInfo {
                workflow,
                id,
                step: name,
                seq,
                attempt,
                input: None,
            };
            // The step's future is pinned where it is built and never moved
            // again: the wrappers below hold a reference to it. A panic in
            // the attempt (the step's body or a middleware) is the attempt's
            // error, retried as the policy says.
            let result = {
                let run = std::pin::pin!(step.scope(self.attempt(&mut f, &info)));
                let run = panics::CatchStep(run);
                match (options.timeout, &span) {
                    (None, None) => run.await,
                    (None, Some(span)) => run.instrument(span.clone()).await,
                    (Some(limit), span) => {
                        let timed = tokio::time::timeout(limit, run);
                        let result = match span {
                            None => timed.await,
                            Some(span) => timed.instrument(span.clone()).await,
                        };
                        match result {
                            Ok(r) => r,
                            Err(_) => Err(StepError::timed_out(limit)),
                        }
                    }
                }
                // The attempt's future ends here, a timed-out one with it,
                // before its outcome is committed.
            };
            let _enter = span.as_ref().map(|span| span.enter());
            let error = match result.map(|v| serde_json::to_value(&v).map(|o| (v, o))) {
                Ok(Ok((value, output))) => {
                    let entry = StepCompletedRef {
                        name,
                        output: &output,
                    };
                    drop(_enter);
                    // The step ends with its entry written: the same lock
                    // records both.
                    let (entries, extra) = (std::slice::from_ref(&entry), CommitExtra::default());
                    if self
                        .inst
                        .commit_ending(Some(guard), seq, entries, extra)
                        .await
                        .is_none()
                    {
                        return halt().await;
                    }
                    self.inst.shared.observe(|o| {
                        o.on_event(&LifecycleEvent::StepCompleted {
                            workflow,
                            id,
                            step: name,
                            attempt,
                            duration: attempt_started.map(|t| t.elapsed()).unwrap_or_default(),
                        })
                    });
                    return Ok(value);
                }
                Ok(Err(e)) => StepError::fatal(format!(
                    "cannot encode the output as `{}`: {e}",
                    std::any::type_name::<T>()
                ))
                .with_kind("Encode"),
                Err(e) => e,
            };
            let event = if options.retry.should_retry(attempt, &error) {
                let delay = options.retry.delay_after(attempt);
                tracing::warn!(
                    workflow = %self.inst.workflow, id = %self.inst.id, step = name, seq, attempt,
                    %error, ?delay, "step attempt failed; retrying"
                );
                let at = now_millis().saturating_add(crate::store::duration_millis(delay));
                retry_at = Some(at);
                self.inst.shared.observe(|o| {
                    o.on_event(&LifecycleEvent::StepRetried {
                        workflow,
                        id,
                        step: name,
                        attempt,
                        error: &error.to_string(),
                        delay,
                    })
                });
                Event::StepAttemptFailed {
                    name: name.to_owned(),
                    attempt,
                    error: error.clone(),
                    retry_at: at,
                }
            } else {
                tracing::error!(
                    workflow = %self.inst.workflow, id = %self.inst.id, step = name, seq, attempt,
                    %error, "step failed"
                );
                self.inst.shared.observe(|o| {
                    o.on_event(&LifecycleEvent::StepFailed {
                        workflow,
                        id,
                        step: name,
                        attempt,
                        error: &error.to_string(),
                    })
                });
                Event::StepFailed {
                    name: name.to_owned(),
                    error: error.clone(),
                }
            };
            drop(_enter);
            // Boxed: a failed attempt is the rare case, and its commit (an
            // owned `Event` with the error) held inline would widen every
            // step's future, which each step moves: 1,656 bytes, against
            // 1,384 boxed.
            if !Box::pin(self.commit_event(seq, event)).await {
                return halt().await;
            }
            if retry_at.is_none() {
                return Err(error);
            }
            attempt += 1;
        }
    }

    /// One attempt of a step, through the installed middleware if any.
    async fn attempt<T, F, Fut>(&self, f: &mut F, info: &StepInfo<'_>) -> Result<T, StepError>
    where
        T: Payload,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, StepError>> + Send,
    {
        let Some(stack) = self.inst.shared.middleware.get().filter(|s| !s.is_empty()) else {
            return f().await;
        };
        let f = std::sync::Mutex::new(f);
        let body = || {
            let fut = (f.lock().unwrap_or_else(|e| e.into_inner()))();
            async move {
                let value = fut.await?;
                serde_json::to_value(&value).map_err(|e| {
                    StepError::fatal(format!("cannot encode the output: {e}")).with_kind("Encode")
                })
            }
            .boxed()
        };
        let out = Next::new(stack.layers(), &body).run(info).await?;
        serde_json::from_value(out).map_err(|e| {
            StepError::fatal(format!(
                "middleware returned a value that is not a `{}`: {e}",
                std::any::type_name::<T>()
            ))
            .with_kind("Decode")
        })
    }

    /// Waits until `at`: in memory for short waits, parked otherwise.
    async fn wait_until(&self, guard: &OpGuard<'_>, at: Millis) {
        loop {
            let now = now_millis();
            if now >= at {
                return;
            }
            if at - now <= PARK_THRESHOLD_MS {
                tokio::time::sleep(Duration::from_millis((at - now) as u64)).await;
                continue;
            }
            guard.instance().block(guard.seq, Some(at)).await;
        }
    }

    // ----- timers ------------------------------------------------------------

    /// Sleeps durably: the wake-up time is journaled, and a long sleep parks
    /// the instance so it costs no worker slot and survives restarts.
    pub async fn sleep(&self, duration: Duration) {
        let ms = crate::store::duration_millis(duration);
        self.timer(|now| now.saturating_add(ms)).await
    }

    /// Sleeps durably until `deadline` (see [`WorkflowContext::sleep`]).
    pub async fn sleep_until(&self, deadline: impl Into<SystemTime>) {
        // By hand, not through `chrono`, which panics on times past its
        // range: a deadline out of `Millis`'s range saturates.
        let at = match deadline.into().duration_since(SystemTime::UNIX_EPOCH) {
            Ok(after) => crate::store::duration_millis(after),
            Err(before) => crate::store::duration_millis(before.duration()).saturating_neg(),
        };
        self.timer(|_| at).await
    }

    async fn timer(&self, fire_at: impl FnOnce(Millis) -> Millis) {
        let Some((guard, recorded)) = self.inst.begin(|| Operation::Timer) else {
            return halt().await;
        };
        let mut at = None;
        for event in recorded {
            match event {
                Event::TimerFired => return,
                Event::TimerStarted { fire_at } => at = Some(fire_at),
                _ => {}
            }
        }
        let at = match at {
            Some(at) => at,
            None => {
                let at = fire_at(now_millis());
                // Nothing outside sees the timer until the next commit, which
                // carries these events.
                self.inst
                    .record_lazy(guard.seq, Event::TimerStarted { fire_at: at });
                at
            }
        };
        self.wait_until(&guard, at).await;
        self.inst.record_lazy(guard.seq, Event::TimerFired);
        self.inst.shared.observe(|o| {
            o.on_event(&LifecycleEvent::TimerFired {
                workflow: &self.inst.workflow,
                id: &self.inst.id,
            })
        });
    }

    // ----- signals -----------------------------------------------------------

    /// Waits for the next signal of type `S`; signals that arrived earlier
    /// are delivered in arrival order. Add `.timeout(d)` for a deadline.
    pub fn wait<S: Signal>(&self) -> SignalWait<S> {
        SignalWait {
            ctx: self.clone(),
            _s: PhantomData,
        }
    }

    async fn wait_signal<S: Signal>(&self, timeout: Option<Duration>) -> Result<S, Timeout> {
        let (seq, _, value) = self.wait_signals(&[S::NAME], timeout).await?;
        match self.decode(seq, format!("signal `{}`", S::NAME), value) {
            Some(v) => Ok(v),
            None => halt().await,
        }
    }

    /// Waits for the next signal named `name`, as JSON (for workflows
    /// defined at run time; typed workflows use [`WorkflowContext::wait`]).
    pub async fn wait_raw(
        &self,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<serde_json::Value, Timeout> {
        self.wait_signals(&[name], timeout).await.map(|(_, _, v)| v)
    }

    /// Waits for the first signal to arrive among `names` (by arrival order
    /// if several are waiting) and returns its name and JSON payload.
    pub async fn wait_any_raw(
        &self,
        names: &[&str],
        timeout: Option<Duration>,
    ) -> Result<(String, serde_json::Value), Timeout> {
        self.wait_signals(names, timeout)
            .await
            .map(|(_, n, v)| (n, v))
    }

    /// The signal wait operation: journaled under the names waited for; the
    /// received event names the signal that came.
    async fn wait_signals(
        &self,
        names: &[&str],
        timeout: Option<Duration>,
    ) -> Result<(u64, String, serde_json::Value), Timeout> {
        let label = names.join("|");
        let Some((guard, recorded)) = self.inst.begin(|| Operation::Signal(label.clone())) else {
            return halt().await;
        };
        let seq = guard.seq;
        let mut deadline = None;
        for event in recorded {
            match event {
                Event::SignalReceived { name, payload } => return Ok((seq, name, payload)),
                Event::SignalTimedOut { .. } => return Err(Timeout { signal: label }),
                Event::SignalWaitStarted { deadline: d, .. } => deadline = Some(d),
                _ => {}
            }
        }
        if deadline.is_none() {
            if let Some(t) = timeout {
                let d = now_millis().saturating_add(t.as_millis().min(i64::MAX as u128) as Millis);
                let event = Event::SignalWaitStarted {
                    name: label.clone(),
                    deadline: d,
                };
                self.inst.record_lazy(seq, event);
                deadline = Some(d);
            }
        }
        loop {
            let store = &self.inst.shared.store;
            let mut first: Option<(&str, crate::store::InboxSignal)> = None;
            for name in names {
                match retry_transient(|| store.next_signal(&self.inst.id, name)).await {
                    Ok((Some(signal), _)) => {
                        if first
                            .as_ref()
                            .is_none_or(|(_, f)| signal.signal_id < f.signal_id)
                        {
                            first = Some((name, signal));
                        }
                    }
                    Ok((None, _)) => {}
                    Err(e) => {
                        self.inst.abort(Abort::Store(e));
                        return halt().await;
                    }
                }
            }
            if let Some((name, signal)) = first {
                let value: serde_json::Value = match serde_json::from_slice(&signal.payload) {
                    Ok(v) => v,
                    Err(e) => {
                        self.fail(Failure::Decode {
                            seq: Some(seq),
                            what: format!("signal `{name}`"),
                            type_name: "serde_json::Value".into(),
                            message: e.to_string(),
                        });
                        return halt().await;
                    }
                };
                let event = Event::SignalReceived {
                    name: name.to_owned(),
                    payload: value.clone(),
                };
                let extra = CommitExtra {
                    consume_signal: Some(signal.signal_id),
                    ..CommitExtra::default()
                };
                if self
                    .inst
                    .commit(seq, std::slice::from_ref(&event), extra)
                    .await
                    .is_none()
                {
                    return halt().await;
                }
                tracing::debug!(signal = name, seq, "signal received");
                self.inst.shared.observe(|o| {
                    o.on_event(&LifecycleEvent::SignalReceived {
                        workflow: &self.inst.workflow,
                        id: &self.inst.id,
                        signal: name,
                    })
                });
                return Ok((seq, name.to_owned(), value));
            }
            if let Some(d) = deadline {
                if now_millis() >= d {
                    let event = Event::SignalTimedOut {
                        name: label.clone(),
                    };
                    self.inst.record_lazy(seq, event);
                    return Err(Timeout { signal: label });
                }
            }
            guard.instance().block(seq, deadline).await;
        }
    }

    // ----- versioning, published state, cancellation ----------------------

    /// Lets one code version serve instances started before and after a
    /// change: `if ctx.patched("new-fraud-check") { new } else { old }`.
    /// New instances (and instances that reach this point for the first
    /// time) take the new branch and journal a marker; instances whose
    /// journal already went past this point without the marker replay the
    /// old branch. Remove the old branch once no such instance is running.
    pub fn patched(&self, id: &str) -> bool {
        self.inst.patched(id)
    }

    /// Publishes `value` under `key`, readable from outside through
    /// [`WorkflowHandle::event`](crate::WorkflowHandle::event) (progress,
    /// intermediate results), without signals. The last value per key wins.
    pub async fn set_event<T: Payload>(&self, key: &str, value: &T) {
        let Some((guard, recorded)) = self.inst.begin(|| Operation::Publish(key.to_owned())) else {
            return halt().await;
        };
        if !recorded.is_empty() {
            return;
        }
        let value = serde_json::to_value(value).unwrap_or_default();
        let event = Event::EventPublished {
            key: key.to_owned(),
            value,
        };
        if !self.commit_event(guard.seq, event).await {
            halt().await
        }
    }

    /// Registers `handler` to run if the workflow is cancelled: the body
    /// stops at its next operation, then handlers run (last registered
    /// first) with this context, journaled like the body, before the
    /// instance is marked cancelled.
    pub fn on_cancel<F, Fut>(&self, handler: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.inst.on_cancel(Box::new(move || handler().boxed()));
    }

    /// A saga: record a compensation after each step that needs undoing;
    /// [`Saga::compensate`] runs them in reverse on failure, and a
    /// cancellation runs the ones not yet run. Each compensation is a
    /// journaled step with its own retries.
    pub fn saga(&self) -> Saga {
        let saga = Saga {
            ctx: self.clone(),
            pending: Arc::new(std::sync::Mutex::new(Vec::new())),
        };
        let on_cancel = saga.clone();
        self.on_cancel(move || async move { on_cancel.run_compensations().await });
        saga
    }

    /// Restarts this workflow with `input` and an empty journal, keeping its
    /// id, its inbox and any cancel request: for workflows that run forever
    /// (polling loops, subscriptions) so their journal stays short.
    /// `return ctx.continue_as_new(next_input).await;` — it never returns.
    pub async fn continue_as_new<T, I: serde::Serialize>(
        &self,
        input: I,
    ) -> Result<T, WorkflowError> {
        match payload::encode(&input) {
            Ok(bytes) => {
                self.inst.abort(Abort::ContinueAsNew(bytes));
                halt().await
            }
            Err(e) => Err(WorkflowError::new(e.to_string()).with_kind("Encode")),
        }
    }

    // ----- recorded values ---------------------------------------------------

    async fn recorded<T: Payload>(&self, what: &str, make: impl FnOnce() -> T) -> T {
        let Some((guard, recorded)) = self.inst.begin(|| Operation::Value(what.to_owned())) else {
            return halt().await;
        };
        if let Some(Event::ValueRecorded { value, .. }) = recorded.into_iter().next() {
            return match self.decode(guard.seq, format!("ctx.{what}()"), value) {
                Some(v) => v,
                None => halt().await,
            };
        }
        let v = make();
        let event = Event::ValueRecorded {
            what: what.to_owned(),
            value: serde_json::to_value(&v).unwrap_or_default(),
        };
        if !self.commit_event(guard.seq, event).await {
            return halt().await;
        }
        v
    }

    /// The current time, journaled: a replay sees the same instant.
    pub async fn now(&self) -> DateTime<Utc> {
        self.recorded("now", Utc::now).await
    }

    /// A random number, journaled.
    pub async fn random(&self) -> u64 {
        self.recorded("random", || fastrand::u64(..)).await
    }

    /// A random (v4) UUID, journaled.
    pub async fn uuid(&self) -> uuid::Uuid {
        self.recorded("uuid", uuid::Uuid::new_v4).await
    }

    // ----- parallelism -------------------------------------------------------

    /// Runs two operations concurrently and returns both results. Sequence
    /// numbers are assigned in argument order, so replays are stable.
    pub async fn join<A: Future, B: Future>(&self, a: A, b: B) -> (A::Output, B::Output) {
        futures::future::join(a, b).await
    }

    /// Runs three operations concurrently (see [`WorkflowContext::join`]).
    pub async fn join3<A: Future, B: Future, C: Future>(
        &self,
        a: A,
        b: B,
        c: C,
    ) -> (A::Output, B::Output, C::Output) {
        futures::future::join3(a, b, c).await
    }

    /// Runs any number of operations concurrently, results in input order.
    /// Each is first polled in order, so sequence numbers are stable.
    pub async fn join_all<F: Future>(
        &self,
        futures: impl IntoIterator<Item = F>,
    ) -> Vec<F::Output> {
        JoinAll {
            pending: futures.into_iter().map(|f| Some(Box::pin(f))).collect(),
            done: Vec::new(),
        }
        .await
    }

    // ----- child workflows ---------------------------------------------------

    /// Starts child workflow `W` and awaits its result. The child runs like
    /// any instance (on any worker); its id defaults to
    /// `<parent id>/<sequence number>`.
    pub fn child<W: Workflow>(&self, _workflow: W, input: W::Input) -> ChildCall<W> {
        ChildCall {
            ctx: self.clone(),
            input,
            id: None,
        }
    }

    async fn run_child<W: Workflow>(
        &self,
        input: W::Input,
        id: Option<String>,
    ) -> Result<W::Output, WorkflowError> {
        let Some((guard, recorded)) = self.inst.begin(|| Operation::Child(W::NAME.to_owned()))
        else {
            return halt().await;
        };
        let seq = guard.seq;
        let mut child_id = None;
        for event in recorded {
            match event {
                Event::ChildStarted { child_id: c, .. } => child_id = Some(c),
                Event::ChildFinished { outcome, .. } => {
                    return self.child_outcome::<W>(seq, outcome).await
                }
                _ => {}
            }
        }
        let child_id = match child_id {
            Some(c) => c,
            None => {
                let c = id.unwrap_or_else(|| format!("{}/{}", self.inst.id, seq));
                let input = match payload::encode(&input) {
                    Ok(i) => i,
                    Err(e) => return Err(WorkflowError::new(e.to_string()).with_kind("Encode")),
                };
                let extra = CommitExtra {
                    new_instances: vec![NewInstance {
                        id: c.clone(),
                        workflow: W::NAME.to_owned(),
                        version: W::VERSION,
                        input,
                        parent_id: Some(String::from(&*self.inst.id)),
                    }],
                    ..CommitExtra::default()
                };
                let event = Event::ChildStarted {
                    workflow: W::NAME.to_owned(),
                    child_id: c.clone(),
                };
                if self
                    .inst
                    .commit(seq, std::slice::from_ref(&event), extra)
                    .await
                    .is_none()
                {
                    return halt().await;
                }
                self.inst.shared.notify_work();
                self.inst.shared.observe(|o| {
                    o.on_event(&LifecycleEvent::WorkflowStarted {
                        workflow: W::NAME,
                        id: &c,
                    })
                });
                c
            }
        };
        self.inst.add_child(child_id.clone());
        loop {
            let store = &self.inst.shared.store;
            let record = match retry_transient(|| store.get_instance(&child_id)).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.inst
                        .abort(Abort::Store(crate::store::StoreError::NotFound(child_id)));
                    return halt().await;
                }
                Err(e) => {
                    self.inst.abort(Abort::Store(e));
                    return halt().await;
                }
            };
            if record.status.is_finished() {
                let outcome = match record.status {
                    InstanceStatus::Completed => {
                        let bytes = record.output.unwrap_or_default();
                        Ok(serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
                    }
                    _ => Err(record
                        .failure
                        .and_then(|f| serde_json::from_slice::<Failure>(&f).ok())
                        .unwrap_or(Failure::Cancelled)),
                };
                let event = Event::ChildFinished {
                    child_id: child_id.clone(),
                    outcome: outcome.clone(),
                };
                if !self.commit_event(seq, event).await {
                    return halt().await;
                }
                return self.child_outcome::<W>(seq, outcome).await;
            }
            guard.instance().block(seq, None).await;
        }
    }

    async fn child_outcome<W: Workflow>(
        &self,
        seq: u64,
        outcome: Result<serde_json::Value, Failure>,
    ) -> Result<W::Output, WorkflowError> {
        match outcome {
            Ok(v) => match self.decode(seq, format!("output of child `{}`", W::NAME), v) {
                Some(out) => Ok(out),
                None => halt().await,
            },
            Err(Failure::Cancelled) => Err(WorkflowError::new(format!(
                "child workflow `{}` was cancelled",
                W::NAME
            ))
            .with_kind("ChildCancelled")),
            Err(f) => Err(WorkflowError::new(format!(
                "child workflow `{}` failed: {}",
                W::NAME,
                f.describe()
            ))
            .with_kind("ChildFailed")),
        }
    }
}

/// Compensations recorded by a workflow; see [`WorkflowContext::saga`].
#[derive(Clone)]
pub struct Saga {
    ctx: WorkflowContext,
    pending: Arc<std::sync::Mutex<Vec<Compensation>>>,
}

struct Compensation {
    name: String,
    options: StepOptions,
    run: Box<dyn FnMut() -> BoxFuture<'static, Result<(), StepError>> + Send>,
}

impl std::fmt::Debug for Saga {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saga")
            .field("pending", &self.pending().len())
            .finish()
    }
}

impl Saga {
    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<Compensation>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a compensation, run as the step `compensate <name>` with the
    /// default retry policy if the saga is compensated.
    pub fn add<F, Fut>(&self, name: impl Into<String>, f: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        self.add_with(name, StepOptions::default(), f)
    }

    /// Records a compensation with its own step options.
    pub fn add_with<F, Fut>(&self, name: impl Into<String>, options: StepOptions, mut f: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        self.pending().push(Compensation {
            name: name.into(),
            options,
            run: Box::new(move || f().boxed()),
        });
    }

    /// Runs every recorded compensation, newest first, each as a journaled
    /// step. A compensation that fails after its retries does not stop the
    /// others; the errors are returned.
    pub async fn compensate(&self) -> Result<(), Vec<StepError>> {
        let errors = self.run_compensations_collect().await;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    async fn run_compensations(&self) {
        for e in self.run_compensations_collect().await {
            tracing::error!(error = %e, "compensation failed");
        }
    }

    async fn run_compensations_collect(&self) -> Vec<StepError> {
        let mut errors = Vec::new();
        loop {
            let next = self.pending().pop();
            let Some(mut c) = next else { break };
            let name = format!("compensate {}", c.name);
            if let Err(e) = self
                .ctx
                .run_step(name.into(), c.options.clone(), &mut c.run)
                .await
            {
                errors.push(e);
            }
        }
        errors
    }
}

/// An ad-hoc step built by [`WorkflowContext::step`]; await it to run.
pub struct StepCall<T, F> {
    ctx: WorkflowContext,
    name: String,
    options: StepOptions,
    f: F,
    _t: PhantomData<fn() -> T>,
}

impl<T, F> StepCall<T, F> {
    /// Sets the retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.options = self.options.retry(policy);
        self
    }

    /// Sets the per-attempt timeout.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.options = self.options.timeout(d);
        self
    }

    /// Sets all options at once.
    pub fn options(mut self, options: StepOptions) -> Self {
        self.options = options;
        self
    }
}

impl<T, F, Fut> IntoFuture for StepCall<T, F>
where
    T: Payload,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, StepError>> + Send,
{
    type Output = Result<T, StepError>;
    type IntoFuture = BoxFuture<'static, Result<T, StepError>>;

    fn into_future(self) -> Self::IntoFuture {
        async move {
            self.ctx
                .run_step(self.name.into(), self.options, self.f)
                .await
        }
        .boxed()
    }
}

/// A signal wait built by [`WorkflowContext::wait`]; await it for the signal.
#[must_use = "a signal wait does nothing unless awaited"]
pub struct SignalWait<S> {
    ctx: WorkflowContext,
    _s: PhantomData<fn() -> S>,
}

impl<S: Signal> SignalWait<S> {
    /// Gives up after `d`, returning [`Timeout`]. The deadline is journaled.
    pub fn timeout(self, d: Duration) -> SignalWaitTimeout<S> {
        SignalWaitTimeout {
            ctx: self.ctx,
            timeout: d,
            _s: PhantomData,
        }
    }
}

impl<S: Signal> IntoFuture for SignalWait<S> {
    type Output = S;
    type IntoFuture = BoxFuture<'static, S>;

    fn into_future(self) -> Self::IntoFuture {
        async move {
            match self.ctx.wait_signal::<S>(None).await {
                Ok(s) => s,
                // Without a deadline the wait cannot time out.
                Err(_) => halt().await,
            }
        }
        .boxed()
    }
}

/// A signal wait with a deadline; resolves to `Err(Timeout)` when it passes.
#[must_use = "a signal wait does nothing unless awaited"]
pub struct SignalWaitTimeout<S> {
    ctx: WorkflowContext,
    timeout: Duration,
    _s: PhantomData<fn() -> S>,
}

impl<S: Signal> IntoFuture for SignalWaitTimeout<S> {
    type Output = Result<S, Timeout>;
    type IntoFuture = BoxFuture<'static, Result<S, Timeout>>;

    fn into_future(self) -> Self::IntoFuture {
        async move { self.ctx.wait_signal::<S>(Some(self.timeout)).await }.boxed()
    }
}

/// A child workflow call built by [`WorkflowContext::child`].
#[must_use = "a child workflow does nothing unless awaited"]
pub struct ChildCall<W: Workflow> {
    ctx: WorkflowContext,
    input: W::Input,
    id: Option<String>,
}

impl<W: Workflow> ChildCall<W> {
    /// Uses `id` as the child's instance id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
}

impl<W: Workflow> IntoFuture for ChildCall<W> {
    type Output = Result<W::Output, WorkflowError>;
    type IntoFuture = BoxFuture<'static, Result<W::Output, WorkflowError>>;

    fn into_future(self) -> Self::IntoFuture {
        async move { self.ctx.run_child::<W>(self.input, self.id).await }.boxed()
    }
}

/// Polls every pending future in order on each wake-up.
struct JoinAll<F: Future> {
    pending: Vec<Option<Pin<Box<F>>>>,
    done: Vec<Option<F::Output>>,
}

impl<F: Future> Future for JoinAll<F> {
    type Output = Vec<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.done.len() != this.pending.len() {
            this.done = (0..this.pending.len()).map(|_| None).collect();
        }
        let mut all_done = true;
        for (slot, out) in this.pending.iter_mut().zip(this.done.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            Poll::Ready(this.done.iter_mut().filter_map(Option::take).collect())
        } else {
            Poll::Pending
        }
    }
}

// The futures are boxed and outputs are never pinned, so moving is fine.
impl<F: Future> Unpin for JoinAll<F> {}
