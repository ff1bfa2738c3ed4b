//! The builder API: workflows assembled at run time from steps and control
//! structures over JSON values, with the same durability as
//! `#[fluxo::workflow]` functions.
//!
//! ```no_run
//! use fluxo_runtime::flow::Flow;
//! use fluxo_runtime::Fluxo;
//! use serde_json::{json, Value};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let fluxo = Fluxo::in_memory();
//! let onboarding = Flow::new("OnboardUser")
//!     .step("create_account", |user: Value| async move {
//!         Ok(json!({ "user": user, "account": 42 }))
//!     })
//!     .step("send_welcome", |v: Value| async move { Ok(v) });
//! onboarding.register(&fluxo)?;
//! let worker = fluxo.worker().spawn();
//! let handle = onboarding.start(&fluxo, json!({ "email": "ana@example.com" })).await?;
//! let out: Value = handle.result().await?;
//! worker.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Every step is a journaled step named after its position in the flow
//! (`create_account`, `vip/then/send_gift`, `poll[3]/check`, `fan[1]/ship`);
//! every branch choice and loop iteration is journaled as well
//! (`vip#choice`, `poll[3]#cond`, `retry_loop[2]#iter`), so a replay after a
//! crash takes the same branches and resumes at the iteration it stopped
//! in. Concurrent branches (`parallel`, `parallel_map`) take turns through
//! journaled scheduling decisions (`fan#next[k]`), so the order in which
//! they issue durable operations is replayed exactly.

// `StepError` is the error every step body returns; how large it is
// depends on `serde_json`'s features (e.g. `preserve_order`), not on us.
#![allow(clippy::result_large_err)]

mod exec;
mod handle;
pub(crate) mod sched;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::middleware::MiddlewareStack;
use crate::{Error, Fluxo, RetryPolicy, StartOptions, StepError, StepOptions};

pub use handle::FlowHandle;

/// A step body: the step's input value in, its output value out.
pub type StepFn = Arc<dyn Fn(Value) -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync>;

/// A condition over a value, evaluated once and journaled.
pub(crate) type CondFn = Arc<dyn Fn(&Value) -> Result<bool, StepError> + Send + Sync>;

/// A key function of a `switch`, evaluated once and journaled.
pub(crate) type KeyFn = Arc<dyn Fn(&Value) -> Result<String, StepError> + Send + Sync>;

/// The default bound on the iterations of [`Flow::while_`].
pub const DEFAULT_MAX_ITERATIONS: u32 = 10_000;

/// A flow that is not valid, or could not be registered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// A flow or node name is empty or uses a reserved character.
    #[error("invalid name {name:?} in flow {flow:?}: {reason}")]
    InvalidName {
        /// The flow.
        flow: String,
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two nodes of the same (sub-)flow have the same name, so their
    /// journal entries could not be told apart.
    #[error("flow {flow:?} has two nodes named {name:?} at {scope}; names must be unique among siblings")]
    DuplicateName {
        /// The flow.
        flow: String,
        /// The repeated name.
        name: String,
        /// Where, as a journal path (`<top>` for the top level).
        scope: String,
    },
    /// A node is configured in a way that cannot run.
    #[error("node {node:?} of flow {flow:?}: {reason}")]
    InvalidNode {
        /// The flow.
        flow: String,
        /// The node's journal path.
        node: String,
        /// What is wrong.
        reason: String,
    },
    /// The engine refused the registration.
    #[error(transparent)]
    Engine(#[from] Error),
}

/// One node of a flow.
#[derive(Clone)]
pub(crate) enum Node {
    Step {
        name: String,
        f: StepFn,
        options: StepOptions,
    },
    If {
        name: String,
        cond: CondFn,
        then: Flow,
        otherwise: Flow,
    },
    Switch {
        name: String,
        key: KeyFn,
        cases: Vec<(String, Flow)>,
        default: Flow,
    },
    Parallel {
        name: String,
        branches: Vec<Flow>,
    },
    ParallelMap {
        name: String,
        width: usize,
        body: Flow,
    },
    Loop {
        name: String,
        times: u32,
        body: Flow,
    },
    While {
        name: String,
        cond: CondFn,
        max: u32,
        body: Flow,
    },
    WaitSignal {
        name: String,
        signal: String,
        timeout: Option<Duration>,
    },
    WaitAny {
        name: String,
        signals: Vec<String>,
        timeout: Option<Duration>,
    },
    Sleep {
        name: String,
        duration: Duration,
    },
    SleepUntil {
        name: String,
        at: SystemTime,
    },
}

impl Node {
    pub(crate) fn name(&self) -> &str {
        match self {
            Node::Step { name, .. }
            | Node::If { name, .. }
            | Node::Switch { name, .. }
            | Node::Parallel { name, .. }
            | Node::ParallelMap { name, .. }
            | Node::Loop { name, .. }
            | Node::While { name, .. }
            | Node::WaitSignal { name, .. }
            | Node::WaitAny { name, .. }
            | Node::Sleep { name, .. }
            | Node::SleepUntil { name, .. } => name,
        }
    }
}

/// A workflow (or a branch of one) built from steps and control
/// structures. Each node's output is the next node's input; the flow's
/// input feeds the first node and the last node's output is the flow's.
///
/// Build a top-level flow with [`Flow::new`], register it with
/// [`Flow::register`] and start it with [`Flow::start`]. Branches (the
/// arms of `if_`, `switch`, `parallel`, loop bodies) are flows too, usually
/// built with [`Flow::empty`] or the [`step`] shorthand.
#[derive(Clone)]
pub struct Flow {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) nodes: Vec<Node>,
    pub(crate) middleware: Option<MiddlewareStack>,
}

impl std::fmt::Debug for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flow")
            .field("name", &self.name)
            .field("version", &self.version)
            .field(
                "nodes",
                &self.nodes.iter().map(Node::name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A one-step flow: `parallel("fan", [step("a", f), step("b", g)])`.
pub fn step<F, Fut>(name: impl Into<String>, f: F) -> Flow
where
    F: Fn(Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
{
    Flow::empty().step(name, f)
}

/// Wraps a closure as a [`StepFn`].
pub(crate) fn step_fn<F, Fut>(f: F) -> StepFn
where
    F: Fn(Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
{
    Arc::new(move |v| Box::pin(f(v)))
}

fn decode<T: DeserializeOwned>(what: &str, v: &Value) -> Result<T, StepError> {
    T::deserialize(v).map_err(|e| {
        StepError::fatal(format!(
            "cannot decode the {what} as `{}`: {e}",
            std::any::type_name::<T>()
        ))
        .with_kind("Decode")
    })
}

fn encode<T: Serialize>(what: &str, v: &T) -> Result<Value, StepError> {
    serde_json::to_value(v).map_err(|e| {
        StepError::fatal(format!(
            "cannot encode the {what} of type `{}`: {e}",
            std::any::type_name::<T>()
        ))
        .with_kind("Encode")
    })
}

fn typed_fn<I, O, F, Fut>(f: F) -> StepFn
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, StepError>> + Send + 'static,
{
    let f = Arc::new(f);
    Arc::new(move |v: Value| {
        let f = Arc::clone(&f);
        Box::pin(async move {
            let input: I = decode("step input", &v)?;
            let out = f(input).await?;
            encode("step output", &out)
        })
    })
}

impl Flow {
    /// A top-level flow named `name` (its registered workflow name),
    /// version 1.
    pub fn new(name: impl Into<String>) -> Self {
        Flow {
            name: name.into(),
            version: 1,
            nodes: Vec::new(),
            middleware: None,
        }
    }

    /// An unnamed flow, for branches and loop bodies. With no nodes it
    /// passes its input through.
    pub fn empty() -> Self {
        Flow::new("")
    }

    /// The flow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The flow's version.
    pub fn version_number(&self) -> u32 {
        self.version
    }

    /// Sets the version it is registered with (default 1). Instances stay
    /// on the version they started with.
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Applies `stack` around every attempt of this flow's steps (and those
    /// of its branches that set none of their own). Middleware sees the
    /// step's input as [`StepInfo::input`](crate::middleware::StepInfo).
    pub fn middleware(mut self, stack: MiddlewareStack) -> Self {
        self.middleware = Some(stack);
        self
    }

    fn push(mut self, node: Node) -> Self {
        self.nodes.push(node);
        self
    }

    /// A step with the default retry policy (3 attempts, 1 s, doubling).
    pub fn step<F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
    {
        self.step_with_options(name, StepOptions::default(), f)
    }

    /// A step with its own retry policy.
    pub fn step_with_retry<F, Fut>(self, name: impl Into<String>, policy: RetryPolicy, f: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
    {
        self.step_with_options(name, StepOptions::new().retry(policy), f)
    }

    /// A step with its own options (retry policy, per-attempt timeout).
    pub fn step_with_options<F, Fut>(
        self,
        name: impl Into<String>,
        options: StepOptions,
        f: F,
    ) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
    {
        self.push(Node::Step {
            name: name.into(),
            f: step_fn(f),
            options,
        })
    }

    /// A step whose body is a [`StepFn`] (e.g. one wrapped with
    /// [`MiddlewareStackExt::apply`](crate::middleware_builtin::MiddlewareStackExt::apply)).
    pub fn step_fn(self, name: impl Into<String>, options: StepOptions, f: StepFn) -> Self {
        self.push(Node::Step {
            name: name.into(),
            f,
            options,
        })
    }

    /// A step over typed values: the input is decoded as `I` and the output
    /// encoded from `O` (a value that does not decode fails the step, not
    /// retried).
    pub fn typed_step<I, O, F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        self.step_fn(name, StepOptions::default(), typed_fn(f))
    }

    /// Runs `then` if `cond` holds for the current value, else `otherwise`.
    /// The choice is journaled (`<name>#choice`), so a replay takes the
    /// same branch; branch steps are named `<name>/then/..` and
    /// `<name>/else/..`.
    pub fn if_<C>(self, name: impl Into<String>, cond: C, then: Flow, otherwise: Flow) -> Self
    where
        C: Fn(&Value) -> bool + Send + Sync + 'static,
    {
        self.push(Node::If {
            name: name.into(),
            cond: Arc::new(move |v| Ok(cond(v))),
            then,
            otherwise,
        })
    }

    /// Runs the flow of the case whose key equals `key(value)`, or
    /// `default`. The key is journaled (`<name>#choice`); case steps are
    /// named `<name>/<key>/..` (`<name>/default/..`).
    pub fn switch<K, S>(
        self,
        name: impl Into<String>,
        key: K,
        cases: impl IntoIterator<Item = (S, Flow)>,
        default: Flow,
    ) -> Self
    where
        K: Fn(&Value) -> String + Send + Sync + 'static,
        S: Into<String>,
    {
        self.push(Node::Switch {
            name: name.into(),
            key: Arc::new(move |v| Ok(key(v))),
            cases: cases.into_iter().map(|(k, f)| (k.into(), f)).collect(),
            default,
        })
    }

    /// Runs every branch concurrently on the current value; the output is
    /// the JSON array of their outputs, in branch order. The first branch
    /// to fail stops the others and fails the flow. Branch steps are named
    /// `<name>[i]/..`.
    pub fn parallel(
        self,
        name: impl Into<String>,
        branches: impl IntoIterator<Item = Flow>,
    ) -> Self {
        self.push(Node::Parallel {
            name: name.into(),
            branches: branches.into_iter().collect(),
        })
    }

    /// Runs `body` for every element of the current value (a JSON array),
    /// at most `width` elements at a time; the output is the array of the
    /// results, in input order. Steps are named `<name>[i]/..`.
    pub fn parallel_map(self, name: impl Into<String>, width: usize, body: Flow) -> Self {
        self.push(Node::ParallelMap {
            name: name.into(),
            width,
            body,
        })
    }

    /// Runs `body` `times` times, each iteration on the previous one's
    /// output. Each iteration is journaled (`<name>[i]#iter`) and its steps
    /// are named `<name>[i]/..`.
    pub fn loop_(self, name: impl Into<String>, times: u32, body: Flow) -> Self {
        self.push(Node::Loop {
            name: name.into(),
            times,
            body,
        })
    }

    /// Runs `body` while `cond` holds for the current value, at most
    /// [`DEFAULT_MAX_ITERATIONS`] times (then the flow fails with kind
    /// `MaxIterations`). Each check is journaled (`<name>[i]#cond`).
    pub fn while_<C>(self, name: impl Into<String>, cond: C, body: Flow) -> Self
    where
        C: Fn(&Value) -> bool + Send + Sync + 'static,
    {
        self.while_max(name, DEFAULT_MAX_ITERATIONS, cond, body)
    }

    /// Like [`Flow::while_`] with an explicit bound on the iterations.
    pub fn while_max<C>(self, name: impl Into<String>, max: u32, cond: C, body: Flow) -> Self
    where
        C: Fn(&Value) -> bool + Send + Sync + 'static,
    {
        self.push(Node::While {
            name: name.into(),
            cond: Arc::new(move |v| Ok(cond(v))),
            max,
            body,
        })
    }

    /// A loop over a typed state: `body` maps the state `S` to the next one,
    /// `times` times; each iteration is the journaled step `<name>[i]/body`.
    pub fn typed_loop<S, F, Fut>(self, name: impl Into<String>, times: u32, body: F) -> Self
    where
        S: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(S) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, StepError>> + Send + 'static,
    {
        let body = Flow::empty().step_fn("body", StepOptions::default(), typed_fn(body));
        self.loop_(name, times, body)
    }

    /// A while loop over a typed state: runs `body` (the journaled step
    /// `<name>[i]/body`) while `cond` holds, at most
    /// [`DEFAULT_MAX_ITERATIONS`] times.
    pub fn typed_while<S, C, F, Fut>(self, name: impl Into<String>, cond: C, body: F) -> Self
    where
        S: Serialize + DeserializeOwned + Send + 'static,
        C: Fn(&S) -> bool + Send + Sync + 'static,
        F: Fn(S) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, StepError>> + Send + 'static,
    {
        let body_flow = Flow::empty().step_fn("body", StepOptions::default(), typed_fn(body));
        self.push(Node::While {
            name: name.into(),
            cond: Arc::new(move |v| Ok(cond(&decode::<S>("loop state", v)?))),
            max: DEFAULT_MAX_ITERATIONS,
            body: body_flow,
        })
    }

    /// Waits durably for the next signal named `signal` (sent with
    /// [`FlowHandle::signal`] or [`Fluxo::signal_by_name`]); its payload
    /// becomes the current value.
    pub fn wait_for_signal(self, name: impl Into<String>, signal: impl Into<String>) -> Self {
        self.push(Node::WaitSignal {
            name: name.into(),
            signal: signal.into(),
            timeout: None,
        })
    }

    /// Like [`Flow::wait_for_signal`], failing the flow with kind `Timeout`
    /// if no signal arrives within `timeout` (the deadline is journaled).
    pub fn wait_for_signal_timeout(
        self,
        name: impl Into<String>,
        signal: impl Into<String>,
        timeout: Duration,
    ) -> Self {
        self.push(Node::WaitSignal {
            name: name.into(),
            signal: signal.into(),
            timeout: Some(timeout),
        })
    }

    /// Waits for the first of several signals (in arrival order); the
    /// current value becomes `{"signal": <name>, "payload": <payload>}`.
    pub fn wait_for_any<S: Into<String>>(
        self,
        name: impl Into<String>,
        signals: impl IntoIterator<Item = S>,
    ) -> Self {
        self.push(Node::WaitAny {
            name: name.into(),
            signals: signals.into_iter().map(Into::into).collect(),
            timeout: None,
        })
    }

    /// Like [`Flow::wait_for_any`] with a deadline (kind `Timeout`).
    pub fn wait_for_any_timeout<S: Into<String>>(
        self,
        name: impl Into<String>,
        signals: impl IntoIterator<Item = S>,
        timeout: Duration,
    ) -> Self {
        self.push(Node::WaitAny {
            name: name.into(),
            signals: signals.into_iter().map(Into::into).collect(),
            timeout: Some(timeout),
        })
    }

    /// Sleeps durably (a journaled timer; long sleeps park the instance).
    /// The value passes through.
    pub fn sleep(self, name: impl Into<String>, duration: Duration) -> Self {
        self.push(Node::Sleep {
            name: name.into(),
            duration,
        })
    }

    /// Sleeps durably until `at`. The value passes through.
    pub fn sleep_until(self, name: impl Into<String>, at: impl Into<SystemTime>) -> Self {
        self.push(Node::SleepUntil {
            name: name.into(),
            at: at.into(),
        })
    }

    /// Checks names and node settings (done by [`Flow::register`] too).
    pub fn validate(&self) -> Result<(), FlowError> {
        check_name(&self.name, &self.name, "the flow name")?;
        validate_nodes(&self.name, &self.nodes, "")
    }

    /// Registers the flow on `fluxo` under its name and version, so workers
    /// of that `Fluxo` run it.
    pub fn register(&self, fluxo: &Fluxo) -> Result<(), FlowError> {
        self.validate()?;
        let flow = Arc::new(self.clone());
        fluxo.register_dynamic(self.name.clone(), self.version, move |ctx, input| {
            let flow = Arc::clone(&flow);
            Box::pin(async move { exec::run(ctx, &flow, input).await })
        })?;
        Ok(())
    }

    /// Starts an instance with a new id (see [`StartOptions::new`]; the flow must be registered on
    /// `fluxo` or on a worker sharing its store).
    pub async fn start(&self, fluxo: &Fluxo, input: impl Serialize) -> Result<FlowHandle, Error> {
        self.start_with(fluxo, input, StartOptions::new()).await
    }

    /// Starts an instance with options (e.g. a chosen id).
    pub async fn start_with(
        &self,
        fluxo: &Fluxo,
        input: impl Serialize,
        options: StartOptions,
    ) -> Result<FlowHandle, Error> {
        FlowHandle::start(fluxo, &self.name, input, options).await
    }
}

/// Characters that structure journal names and so cannot appear in node
/// names.
const RESERVED: &[char] = &['/', '#', '[', ']', '|'];

pub(crate) fn check_name(flow: &str, name: &str, what: &str) -> Result<(), FlowError> {
    let reason = if name.is_empty() {
        Some(format!("{what} is empty"))
    } else {
        name.chars()
            .find(|c| RESERVED.contains(c))
            .map(|c| format!("{what} contains {c:?}, which journal paths reserve"))
    };
    match reason {
        Some(reason) => Err(FlowError::InvalidName {
            flow: flow.to_owned(),
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

pub(crate) fn join_path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}/{name}")
    }
}

fn validate_nodes(flow: &str, nodes: &[Node], prefix: &str) -> Result<(), FlowError> {
    let mut seen = std::collections::HashSet::new();
    for node in nodes {
        let name = node.name();
        check_name(flow, name, "a node name")?;
        if !seen.insert(name) {
            return Err(FlowError::DuplicateName {
                flow: flow.to_owned(),
                name: name.to_owned(),
                scope: if prefix.is_empty() {
                    "<top>".to_owned()
                } else {
                    prefix.to_owned()
                },
            });
        }
        let path = join_path(prefix, name);
        let invalid = |reason: &str| FlowError::InvalidNode {
            flow: flow.to_owned(),
            node: path.clone(),
            reason: reason.to_owned(),
        };
        match node {
            Node::If {
                then, otherwise, ..
            } => {
                validate_nodes(flow, &then.nodes, &format!("{path}/then"))?;
                validate_nodes(flow, &otherwise.nodes, &format!("{path}/else"))?;
            }
            Node::Switch { cases, default, .. } => {
                let mut keys = std::collections::HashSet::new();
                for (key, case) in cases {
                    if key.is_empty() || key.contains(RESERVED) || key == "default" {
                        return Err(invalid(&format!(
                            "case key {key:?} must be non-empty, not `default`, without / # [ ] |"
                        )));
                    }
                    if !keys.insert(key) {
                        return Err(invalid(&format!("case key {key:?} appears twice")));
                    }
                    validate_nodes(flow, &case.nodes, &format!("{path}/{key}"))?;
                }
                validate_nodes(flow, &default.nodes, &format!("{path}/default"))?;
            }
            Node::Parallel { branches, .. } => {
                for (i, b) in branches.iter().enumerate() {
                    validate_nodes(flow, &b.nodes, &format!("{path}[{i}]"))?;
                }
            }
            Node::ParallelMap { width, body, .. } => {
                if *width == 0 {
                    return Err(invalid("parallel_map width must be at least 1"));
                }
                validate_nodes(flow, &body.nodes, &format!("{path}[i]"))?;
            }
            Node::Loop { body, .. } => validate_nodes(flow, &body.nodes, &format!("{path}[i]"))?,
            Node::While { body, max, .. } => {
                if *max == 0 {
                    return Err(invalid("the iteration bound must be at least 1"));
                }
                validate_nodes(flow, &body.nodes, &format!("{path}[i]"))?;
            }
            Node::WaitSignal { signal, .. } => {
                if signal.is_empty() || signal.contains('|') {
                    return Err(invalid("a signal name must be non-empty, without `|`"));
                }
            }
            Node::WaitAny { signals, .. } => {
                if signals.is_empty() {
                    return Err(invalid("wait_for_any needs at least one signal"));
                }
                if signals.iter().any(|s| s.is_empty() || s.contains('|')) {
                    return Err(invalid("a signal name must be non-empty, without `|`"));
                }
            }
            Node::Step { .. } | Node::Sleep { .. } | Node::SleepUntil { .. } => {}
        }
    }
    Ok(())
}
