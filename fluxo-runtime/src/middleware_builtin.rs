//! Ready-made step middleware ([`LoggingMiddleware`], [`TimeoutMiddleware`],
//! [`RetryMiddleware`], [`ValidationMiddleware`]) and
//! [`MiddlewareStackExt::apply`], which wraps a builder or DAG step
//! function with a stack.
//!
//! ```
//! use std::time::Duration;
//! use fluxo_runtime::middleware::MiddlewareStack;
//! use fluxo_runtime::middleware_builtin::*;
//!
//! let stack = MiddlewareStack::new()
//!     .with(LoggingMiddleware::new())
//!     .with(ValidationMiddleware::new().input(|v| {
//!         v.get("email").map(|_| ()).ok_or_else(|| "missing email".to_string())
//!     }))
//!     .with(TimeoutMiddleware(Duration::from_secs(5)))
//!     .with(RetryMiddleware { attempts: 3, delay: Duration::from_millis(100) });
//! # let _ = stack;
//! ```
//!
//! All of them run inside one step attempt, so what they do is covered by
//! the step's journal entry: a retry in [`RetryMiddleware`] is invisible to
//! the journal, unlike the step's own (durable) retry policy.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::Value;

use crate::middleware::{Middleware, MiddlewareStack, Next, StepInfo};
use crate::{StepContext, StepError};

tokio::task_local! {
    /// The workflow name of the flow or DAG step running on this task.
    static WORKFLOW: String;
}

/// Runs `fut` (a builder or DAG step attempt) knowing its workflow name, so
/// middleware applied inside it can report it.
pub(crate) async fn in_workflow<F: Future>(workflow: String, fut: F) -> F::Output {
    WORKFLOW.scope(workflow, fut).await
}

/// Runs `body` through `stack`, with `input` as the step input middleware
/// sees. The rest of [`StepInfo`] comes from the running step, if any.
pub(crate) async fn run_stack<F>(
    stack: &MiddlewareStack,
    input: &Value,
    body: F,
) -> Result<Value, StepError>
where
    F: Fn() -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync,
{
    if stack.is_empty() {
        return body().await;
    }
    let workflow = WORKFLOW.try_with(Clone::clone).unwrap_or_default();
    let step = StepContext::current();
    let (id, name, seq, attempt) = match &step {
        Some(s) => (
            s.workflow_id().to_owned(),
            s.name().to_owned(),
            s.seq(),
            s.attempt(),
        ),
        None => (String::new(), String::new(), 0, 1),
    };
    let info = StepInfo {
        workflow: &workflow,
        id: &id,
        step: &name,
        seq,
        attempt,
        input: Some(input),
    };
    let body = || -> BoxFuture<'_, Result<Value, StepError>> { body() };
    Next::new(stack.layers(), &body).run(&info).await
}

/// A value a step function takes that middleware can show as the step's
/// input: the JSON value of a builder step, the [`NodeCtx`](crate::dag::NodeCtx)
/// of a DAG node (its DAG input).
pub trait StepInput: Clone + Send + Sync + 'static {
    /// The input as middleware sees it.
    fn input_value(&self) -> Value;
}

impl StepInput for Value {
    fn input_value(&self) -> Value {
        self.clone()
    }
}

/// Adds [`apply`](MiddlewareStackExt::apply) to [`MiddlewareStack`].
pub trait MiddlewareStackExt {
    /// Wraps a builder step function (`Fn(Value) -> ..`) or DAG node
    /// function (`Fn(NodeCtx) -> ..`) so every call runs through this
    /// stack. Use it to give one step its own middleware:
    /// `flow.step("charge", stack.apply(charge))`.
    fn apply<I, F, Fut>(
        &self,
        f: F,
    ) -> impl Fn(I) -> BoxFuture<'static, Result<Value, StepError>> + Clone + Send + Sync + 'static
    where
        I: StepInput,
        F: Fn(I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, StepError>> + Send + 'static;
}

impl MiddlewareStackExt for MiddlewareStack {
    fn apply<I, F, Fut>(
        &self,
        f: F,
    ) -> impl Fn(I) -> BoxFuture<'static, Result<Value, StepError>> + Clone + Send + Sync + 'static
    where
        I: StepInput,
        F: Fn(I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
    {
        let stack = self.clone();
        let f = Arc::new(f);
        move |input: I| {
            let stack = stack.clone();
            let f = Arc::clone(&f);
            Box::pin(async move {
                let value = input.input_value();
                run_stack(&stack, &value, || {
                    let (f, input) = (Arc::clone(&f), input.clone());
                    Box::pin(async move { f(input).await })
                })
                .await
            })
        }
    }
}

type LogSink = Arc<dyn Fn(&str) + Send + Sync>;

/// Logs every step attempt it wraps (start, outcome, duration) through
/// `tracing` at `INFO` (failures at `WARN`), or to a function of yours.
#[derive(Clone, Default)]
pub struct LoggingMiddleware {
    sink: Option<LogSink>,
}

impl std::fmt::Debug for LoggingMiddleware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggingMiddleware")
            .field("custom_sink", &self.sink.is_some())
            .finish()
    }
}

impl LoggingMiddleware {
    /// Logs through `tracing`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends each log line to `sink` instead (e.g. `|l| println!("{l}")`).
    pub fn with_sink(sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        LoggingMiddleware {
            sink: Some(Arc::new(sink)),
        }
    }

    fn log(&self, failed: bool, line: String) {
        match &self.sink {
            Some(sink) => sink(&line),
            None if failed => tracing::warn!("{line}"),
            None => tracing::info!("{line}"),
        }
    }
}

impl Middleware for LoggingMiddleware {
    fn handle<'a>(
        &'a self,
        info: &'a StepInfo<'a>,
        next: Next<'a>,
    ) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let input = info.input.map(|v| v.to_string()).unwrap_or_default();
            self.log(
                false,
                format!(
                    "step {} (attempt {}) started; input {input}",
                    info.step, info.attempt
                ),
            );
            let started = Instant::now();
            let out = next.run(info).await;
            let took = started.elapsed();
            match &out {
                Ok(v) => self.log(
                    false,
                    format!("step {} succeeded in {took:?}; output {v}", info.step),
                ),
                Err(e) => self.log(true, format!("step {} failed in {took:?}: {e}", info.step)),
            }
            out
        })
    }
}

/// Fails an attempt that takes longer than the duration with a retryable
/// error of kind `Timeout` (the step's retry policy decides what follows).
#[derive(Debug, Clone, Copy)]
pub struct TimeoutMiddleware(pub Duration);

impl Middleware for TimeoutMiddleware {
    fn handle<'a>(
        &'a self,
        info: &'a StepInfo<'a>,
        next: Next<'a>,
    ) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            match tokio::time::timeout(self.0, next.run(info)).await {
                Ok(out) => out,
                Err(_) => Err(StepError::retryable(format!(
                    "step {} timed out after {:?}",
                    info.step, self.0
                ))
                .with_kind("Timeout")),
            }
        })
    }
}

/// Retries a failed attempt in process, up to `attempts` runs in all with
/// `delay` between them, before the step's own (journaled) retry policy
/// sees the failure. Fatal errors are not retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryMiddleware {
    /// Runs in all, including the first (at least 1).
    pub attempts: u32,
    /// Pause between runs.
    pub delay: Duration,
}

impl Middleware for RetryMiddleware {
    fn handle<'a>(
        &'a self,
        info: &'a StepInfo<'a>,
        next: Next<'a>,
    ) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            let mut run = 1;
            loop {
                match next.run(info).await {
                    Err(e) if !e.is_fatal() && run < self.attempts.max(1) => {
                        tracing::debug!(step = info.step, run, error = %e, "retrying in process");
                        run += 1;
                        tokio::time::sleep(self.delay).await;
                    }
                    out => return out,
                }
            }
        })
    }
}

type Validator = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

/// Validates a step's input before it runs and/or its output after, with
/// your functions; a rejected value fails the step with a fatal error of
/// kind `Validation` (never retried).
#[derive(Clone, Default)]
pub struct ValidationMiddleware {
    input: Option<Validator>,
    output: Option<Validator>,
}

impl std::fmt::Debug for ValidationMiddleware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValidationMiddleware")
            .field("input", &self.input.is_some())
            .field("output", &self.output.is_some())
            .finish()
    }
}

impl ValidationMiddleware {
    /// Validates nothing until told what.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the step input (steps without an input value are not
    /// checked); `Err(reason)` rejects it.
    pub fn input(
        mut self,
        check: impl Fn(&Value) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.input = Some(Arc::new(check));
        self
    }

    /// Checks the step output; `Err(reason)` rejects it.
    pub fn output(
        mut self,
        check: impl Fn(&Value) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.output = Some(Arc::new(check));
        self
    }
}

impl Middleware for ValidationMiddleware {
    fn handle<'a>(
        &'a self,
        info: &'a StepInfo<'a>,
        next: Next<'a>,
    ) -> BoxFuture<'a, Result<Value, StepError>> {
        Box::pin(async move {
            if let (Some(check), Some(input)) = (&self.input, info.input) {
                if let Err(reason) = check(input) {
                    return Err(StepError::fatal(format!(
                        "invalid input of step {}: {reason}",
                        info.step
                    ))
                    .with_kind("Validation"));
                }
            }
            let out = next.run(info).await?;
            if let Some(check) = &self.output {
                if let Err(reason) = check(&out) {
                    return Err(StepError::fatal(format!(
                        "invalid output of step {}: {reason}",
                        info.step
                    ))
                    .with_kind("Validation"));
                }
            }
            Ok(out)
        })
    }
}
