//! Step middleware: code that wraps every attempt of a step (logging,
//! validation, metrics, in-process retries or time-outs, your own), composed
//! in a stack. Installed on a [`Fluxo`](crate::Fluxo) with
//! [`Fluxo::use_middleware`](crate::Fluxo::use_middleware), it wraps
//! `#[step]` functions and ad-hoc `ctx.step(..)` calls alike; the builder
//! and DAG APIs apply stacks per step too.
//!
//! Middleware sees step outputs as JSON values. With no middleware
//! installed, steps run without any wrapping or conversion.

use std::sync::Arc;

/// The boxed future middleware returns.
pub use futures::future::BoxFuture;

use crate::error::StepError;

/// What a middleware knows about the step attempt it wraps.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo<'a> {
    /// Workflow name.
    pub workflow: &'a str,
    /// Instance id.
    pub id: &'a str,
    /// Step name.
    pub step: &'a str,
    /// Sequence number of the step in the workflow.
    pub seq: u64,
    /// Attempt, from 1.
    pub attempt: u32,
    /// The step's input, for steps that have one as a value (builder and
    /// DAG steps); `None` for `#[step]` functions.
    pub input: Option<&'a serde_json::Value>,
}

/// Wraps step attempts. Call `next.run(info)` to run the rest of the stack
/// and the step (any number of times), or return without calling it.
///
/// ```
/// use fluxo_runtime::middleware::{BoxFuture, Middleware, Next, StepInfo};
/// use fluxo_runtime::StepError;
///
/// struct Timing;
///
/// impl Middleware for Timing {
///     fn handle<'a>(
///         &'a self,
///         info: &'a StepInfo<'a>,
///         next: Next<'a>,
///     ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
///         Box::pin(async move {
///             let started = std::time::Instant::now();
///             let out = next.run(info).await;
///             println!("{} took {:?}", info.step, started.elapsed());
///             out
///         })
///     }
/// }
/// ```
pub trait Middleware: Send + Sync + 'static {
    /// Runs around one step attempt.
    fn handle<'a>(
        &'a self,
        info: &'a StepInfo<'a>,
        next: Next<'a>,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>>;
}

/// The rest of the stack and the step itself. Cheap to copy; may be run
/// several times.
#[derive(Clone, Copy)]
pub struct Next<'a> {
    chain: &'a [Arc<dyn Middleware>],
    body: &'a (dyn Fn() -> BoxFuture<'a, Result<serde_json::Value, StepError>> + Send + Sync + 'a),
}

impl<'a> Next<'a> {
    /// A chain of `middleware` around `body`.
    pub fn new(
        middleware: &'a [Arc<dyn Middleware>],
        body: &'a (dyn Fn() -> BoxFuture<'a, Result<serde_json::Value, StepError>>
                 + Send
                 + Sync
                 + 'a),
    ) -> Self {
        Next {
            chain: middleware,
            body,
        }
    }

    /// Runs the remaining middleware and the step.
    pub fn run(
        self,
        info: &'a StepInfo<'a>,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        match self.chain.split_first() {
            Some((first, rest)) => first.handle(
                info,
                Next {
                    chain: rest,
                    body: self.body,
                },
            ),
            None => (self.body)(),
        }
    }
}

/// An ordered stack of middleware; the first added is the outermost.
#[derive(Clone, Default)]
pub struct MiddlewareStack {
    layers: Vec<Arc<dyn Middleware>>,
}

impl std::fmt::Debug for MiddlewareStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiddlewareStack")
            .field("layers", &self.layers.len())
            .finish()
    }
}

impl MiddlewareStack {
    /// An empty stack.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a layer inside the ones already added.
    pub fn with(mut self, middleware: impl Middleware) -> Self {
        self.layers.push(Arc::new(middleware));
        self
    }

    /// Adds a shared layer.
    pub fn with_shared(mut self, middleware: Arc<dyn Middleware>) -> Self {
        self.layers.push(middleware);
        self
    }

    /// The layers, outermost first.
    pub fn layers(&self) -> &[Arc<dyn Middleware>] {
        &self.layers
    }

    /// Whether the stack has no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}
