//! The DAG API: workflows whose nodes run as soon as the nodes they depend
//! on have completed, with choice nodes, per-node retries, time-outs and
//! compensations, and typed data shared between nodes.
//!
//! ```no_run
//! use fluxo_runtime::dag::{Dag, Key, NodeCtx};
//! use fluxo_runtime::Fluxo;
//! use serde_json::json;
//!
//! const TOTAL: Key<u64> = Key::new("total");
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let order = Dag::builder("order")
//!     .node("validate", |n: NodeCtx| async move {
//!         n.set(&TOTAL, 4200);
//!         Ok(json!("ok"))
//!     })
//!     .node("pay", |n: NodeCtx| async move {
//!         Ok(json!({ "charged": n.get(&TOTAL) }))
//!     })
//!     .depends_on(["validate"])
//!     .compensate(|c| async move { println!("refund {}", c.output()); Ok(()) })
//!     .build()?;
//! let fluxo = Fluxo::in_memory();
//! order.register(&fluxo)?;
//! let worker = fluxo.worker().spawn();
//! let out: fluxo_runtime::dag::DagOutput = order.start(&fluxo, json!({})).await?.result().await?;
//! worker.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Every node is a journaled step named after the node; a choice is
//! journaled as the branch it took; which ready nodes start next is a
//! journaled scheduling decision (`<dag>#next[k]`), so a replay starts the
//! same nodes in the same order whatever the timing was.

// `StepError` is the error every step body returns; how large it is
// depends on `serde_json`'s features (e.g. `preserve_order`), not on us.
#![allow(clippy::result_large_err)]

mod data;
mod exec;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;

use crate::flow::{check_name, FlowHandle};
use crate::middleware::MiddlewareStack;
use crate::{Error, Fluxo, RetryPolicy, StartOptions, StepError, StepOptions};

pub use data::{Compensation, DagOutput, Key, NodeCtx, WorkflowData};

/// A node body.
pub type NodeFn =
    Arc<dyn Fn(NodeCtx) -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync>;

/// A compensation body.
pub type CompensateFn =
    Arc<dyn Fn(Compensation) -> BoxFuture<'static, Result<(), StepError>> + Send + Sync>;

/// A choice branch predicate.
pub(crate) type Predicate = Arc<dyn Fn(&NodeCtx) -> bool + Send + Sync>;

/// The default number of nodes that may run at once.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Why a DAG could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DagError {
    /// A DAG or node name is empty or uses a reserved character.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two nodes have the same name.
    #[error("duplicate node {name:?}: node names must be unique")]
    DuplicateNode {
        /// The repeated name.
        name: String,
    },
    /// A node depends on a node that does not exist.
    #[error("node {node:?} depends on unknown node {dependency:?}")]
    UnknownDependency {
        /// The node.
        node: String,
        /// The missing dependency.
        dependency: String,
    },
    /// A choice branch leads to a node that does not exist.
    #[error("choice {choice:?} has a branch to unknown node {target:?}")]
    UnknownBranchTarget {
        /// The choice node.
        choice: String,
        /// The missing target.
        target: String,
    },
    /// The dependencies form a cycle; `path` starts and ends with the same
    /// node, each running before the next.
    #[error("dependency cycle: {}", path.join(" -> "))]
    Cycle {
        /// The nodes on the cycle.
        path: Vec<String>,
    },
    /// A builder method that configures "the last node" was called before
    /// any node, or on a node it does not apply to.
    #[error("`{method}` {reason}")]
    Misuse {
        /// The method.
        method: &'static str,
        /// What was wrong.
        reason: String,
    },
}

pub(crate) enum Kind {
    Task(NodeFn),
    Choice {
        branches: Vec<(String, Predicate)>,
        otherwise: Option<String>,
    },
}

pub(crate) struct NodeSpec {
    pub name: String,
    pub deps: Vec<String>,
    pub kind: Kind,
    pub options: StepOptions,
    pub continue_on_error: bool,
    pub compensate: Option<CompensateFn>,
}

/// A built node, with its relations resolved to indexes.
pub(crate) struct NodeDef {
    pub spec: NodeSpec,
    pub deps: Vec<usize>,
    /// Every node this one depends on, directly or not, in `topo` order.
    pub ancestors: Vec<usize>,
    /// Choice nodes that list this node as a branch.
    pub choice_parents: Vec<usize>,
}

pub(crate) struct DagDef {
    pub name: String,
    pub version: u32,
    pub concurrency: usize,
    pub middleware: Option<MiddlewareStack>,
    pub nodes: Vec<NodeDef>,
    /// A topological order (ties broken by declaration order).
    pub topo: Vec<usize>,
}

/// Builds a [`Dag`]: add nodes with [`node`](DagBuilder::node) or
/// [`choice`](DagBuilder::choice); the methods after them
/// (`depends_on`, `retry`, `timeout`, `continue_on_error`, `compensate`,
/// `branch`, `otherwise`) configure the node added last.
pub struct DagBuilder {
    name: String,
    version: u32,
    concurrency: usize,
    middleware: Option<MiddlewareStack>,
    nodes: Vec<NodeSpec>,
    errors: Vec<DagError>,
}

impl std::fmt::Debug for DagBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DagBuilder")
            .field("name", &self.name)
            .field(
                "nodes",
                &self.nodes.iter().map(|n| &n.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl DagBuilder {
    fn last(&mut self, method: &'static str) -> Option<&mut NodeSpec> {
        if self.nodes.is_empty() {
            self.errors.push(DagError::Misuse {
                method,
                reason: "was called before any node was added".into(),
            });
        }
        self.nodes.last_mut()
    }

    fn add(mut self, name: String, kind: Kind) -> Self {
        self.nodes.push(NodeSpec {
            name,
            deps: Vec::new(),
            kind,
            options: StepOptions::default(),
            continue_on_error: false,
            compensate: None,
        });
        self
    }

    /// Adds a node running `f` (a journaled step named after the node, with
    /// the default retry policy unless [`retry`](DagBuilder::retry) says
    /// otherwise).
    pub fn node<F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(NodeCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
    {
        let f: NodeFn = Arc::new(move |c| Box::pin(f(c)));
        self.add(name.into(), Kind::Task(f))
    }

    /// Adds a choice node: its first [`branch`](DagBuilder::branch) whose
    /// predicate holds runs (or its [`otherwise`](DagBuilder::otherwise)
    /// node); the other branch nodes are bypassed, and so are nodes that
    /// depend only on bypassed nodes. Branch nodes depend on the choice
    /// automatically. The choice taken is journaled.
    pub fn choice(self, name: impl Into<String>) -> Self {
        self.add(
            name.into(),
            Kind::Choice {
                branches: Vec::new(),
                otherwise: None,
            },
        )
    }

    /// Adds a branch to the last (choice) node: `target` runs if `pred` is
    /// the first predicate to hold.
    pub fn branch(
        mut self,
        target: impl Into<String>,
        pred: impl Fn(&NodeCtx) -> bool + Send + Sync + 'static,
    ) -> Self {
        let target = target.into();
        let mut misuse = None;
        if let Some(node) = self.last("branch") {
            match &mut node.kind {
                Kind::Choice { branches, .. } => branches.push((target, Arc::new(pred))),
                Kind::Task(_) => misuse = Some(node.name.clone()),
            }
        }
        if let Some(name) = misuse {
            self.errors.push(DagError::Misuse {
                method: "branch",
                reason: format!("applies to choice nodes; {name:?} is not one"),
            });
        }
        self
    }

    /// Sets the node the last (choice) node runs when no branch predicate
    /// holds.
    pub fn otherwise(mut self, target: impl Into<String>) -> Self {
        let target = target.into();
        let mut misuse = None;
        if let Some(node) = self.last("otherwise") {
            match &mut node.kind {
                Kind::Choice { otherwise, .. } => *otherwise = Some(target),
                Kind::Task(_) => misuse = Some(node.name.clone()),
            }
        }
        if let Some(name) = misuse {
            self.errors.push(DagError::Misuse {
                method: "otherwise",
                reason: format!("applies to choice nodes; {name:?} is not one"),
            });
        }
        self
    }

    /// The last node runs after these nodes complete (or are bypassed, or
    /// failed with [`continue_on_error`](DagBuilder::continue_on_error)).
    pub fn depends_on<S: Into<String>>(mut self, deps: impl IntoIterator<Item = S>) -> Self {
        if let Some(node) = self.last("depends_on") {
            for d in deps {
                let d = d.into();
                if !node.deps.contains(&d) {
                    node.deps.push(d);
                }
            }
        }
        self
    }

    /// The last node's retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        if let Some(node) = self.last("retry") {
            node.options = node.options.clone().retry(policy);
        }
        self
    }

    /// The last node's per-attempt timeout (a timed-out attempt is a
    /// retryable error of kind `Timeout`).
    pub fn timeout(mut self, d: Duration) -> Self {
        if let Some(node) = self.last("timeout") {
            node.options = node.options.clone().timeout(d);
        }
        self
    }

    /// If the last node fails (after its retries), the DAG goes on: the
    /// failure is listed in [`DagOutput::failed`] and the nodes depending on
    /// it run without its output.
    pub fn continue_on_error(mut self) -> Self {
        if let Some(node) = self.last("continue_on_error") {
            node.continue_on_error = true;
        }
        self
    }

    /// Undoes the last node if the DAG fails after it completed (or is
    /// cancelled): compensations run as journaled steps
    /// (`compensate <node>`), in reverse dependency order.
    pub fn compensate<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Compensation) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        if let Some(node) = self.last("compensate") {
            node.compensate = Some(Arc::new(move |c| Box::pin(f(c))));
        }
        self
    }

    /// How many nodes may run at once (default [`DEFAULT_CONCURRENCY`]).
    pub fn concurrency(mut self, n: usize) -> Self {
        if n == 0 {
            self.errors.push(DagError::Misuse {
                method: "concurrency",
                reason: "must be at least 1".into(),
            });
        }
        self.concurrency = n.max(1);
        self
    }

    /// The version the DAG is registered with (default 1).
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Applies `stack` around every attempt of every node (middleware sees
    /// the DAG input as the step input).
    pub fn middleware(mut self, stack: MiddlewareStack) -> Self {
        self.middleware = Some(stack);
        self
    }

    /// Checks the graph: names, dependencies, branch targets and cycles.
    pub fn build(mut self) -> Result<Dag, DagError> {
        if let Some(e) = self.errors.drain(..).next() {
            return Err(e);
        }
        let name_error = |e: crate::flow::FlowError| match e {
            crate::flow::FlowError::InvalidName { name, reason, .. } => {
                DagError::InvalidName { name, reason }
            }
            other => DagError::InvalidName {
                name: String::new(),
                reason: other.to_string(),
            },
        };
        check_name(&self.name, &self.name, "the DAG name").map_err(name_error)?;
        let mut index = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            check_name(&self.name, &n.name, "a node name").map_err(name_error)?;
            if index.insert(n.name.clone(), i).is_some() {
                return Err(DagError::DuplicateNode {
                    name: n.name.clone(),
                });
            }
        }
        // Branch targets depend on their choice.
        let mut extra: Vec<(usize, String)> = Vec::new();
        for n in &self.nodes {
            if let Kind::Choice {
                branches,
                otherwise,
            } = &n.kind
            {
                for target in branches.iter().map(|(t, _)| t).chain(otherwise.iter()) {
                    match index.get(target) {
                        Some(&t) => extra.push((t, n.name.clone())),
                        None => {
                            return Err(DagError::UnknownBranchTarget {
                                choice: n.name.clone(),
                                target: target.clone(),
                            })
                        }
                    }
                }
            }
        }
        for (t, choice) in extra {
            if !self.nodes[t].deps.contains(&choice) {
                self.nodes[t].deps.push(choice);
            }
        }
        let mut deps = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let mut ds = Vec::new();
            for d in &n.deps {
                match index.get(d) {
                    Some(&j) => ds.push(j),
                    None => {
                        return Err(DagError::UnknownDependency {
                            node: n.name.clone(),
                            dependency: d.clone(),
                        })
                    }
                }
            }
            deps.push(ds);
        }
        if let Some(cycle) = find_cycle(&deps) {
            return Err(DagError::Cycle {
                path: cycle
                    .into_iter()
                    .map(|i| self.nodes[i].name.clone())
                    .collect(),
            });
        }
        let topo = topo_order(&deps);
        let mut position = vec![0; topo.len()];
        for (p, &i) in topo.iter().enumerate() {
            position[i] = p;
        }
        let mut choice_parents = vec![Vec::new(); self.nodes.len()];
        for (c, n) in self.nodes.iter().enumerate() {
            if let Kind::Choice {
                branches,
                otherwise,
            } = &n.kind
            {
                for target in branches.iter().map(|(t, _)| t).chain(otherwise.iter()) {
                    let t = index[target];
                    if !choice_parents[t].contains(&c) {
                        choice_parents[t].push(c);
                    }
                }
            }
        }
        let nodes = self
            .nodes
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let mut seen = BTreeSet::new();
                let mut stack = deps[i].clone();
                while let Some(j) = stack.pop() {
                    if seen.insert((position[j], j)) {
                        stack.extend(deps[j].iter().copied());
                    }
                }
                NodeDef {
                    spec,
                    deps: deps[i].clone(),
                    ancestors: seen.into_iter().map(|(_, j)| j).collect(),
                    choice_parents: std::mem::take(&mut choice_parents[i]),
                }
            })
            .collect();
        Ok(Dag {
            def: Arc::new(DagDef {
                name: self.name,
                version: self.version,
                concurrency: self.concurrency,
                middleware: self.middleware,
                nodes,
                topo,
            }),
        })
    }
}

/// A cycle in the graph whose edges go from a node to the nodes that depend
/// on it, as node indexes with the first repeated at the end.
fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    let n = deps.len();
    let mut dependents = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(i);
        }
    }
    // 0: unvisited, 1: on the current path, 2: done.
    let mut color = vec![0u8; n];
    for start in 0..n {
        if color[start] != 0 {
            continue;
        }
        let mut path = vec![start];
        let mut next = vec![0usize];
        color[start] = 1;
        while let Some(&node) = path.last() {
            let k = next.last_mut().expect("same length as path");
            if let Some(&m) = dependents[node].get(*k) {
                *k += 1;
                match color[m] {
                    0 => {
                        color[m] = 1;
                        path.push(m);
                        next.push(0);
                    }
                    1 => {
                        let from = path.iter().position(|&p| p == m).unwrap_or(0);
                        let mut cycle = path[from..].to_vec();
                        cycle.push(m);
                        return Some(cycle);
                    }
                    _ => {}
                }
            } else {
                color[node] = 2;
                path.pop();
                next.pop();
            }
        }
    }
    None
}

/// Kahn's algorithm, ready nodes taken in declaration order.
fn topo_order(deps: &[Vec<usize>]) -> Vec<usize> {
    let n = deps.len();
    let mut missing: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut dependents = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| missing[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &j in &dependents[i] {
            missing[j] -= 1;
            if missing[j] == 0 {
                ready.insert(j);
            }
        }
    }
    order
}

/// A validated DAG, ready to register and start. Cheap to clone.
#[derive(Clone)]
pub struct Dag {
    def: Arc<DagDef>,
}

impl std::fmt::Debug for Dag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dag")
            .field("name", &self.def.name)
            .field("version", &self.def.version)
            .field("nodes", &self.node_names())
            .finish()
    }
}

impl Dag {
    /// Starts building a DAG registered as `name`.
    pub fn builder(name: impl Into<String>) -> DagBuilder {
        DagBuilder {
            name: name.into(),
            version: 1,
            concurrency: DEFAULT_CONCURRENCY,
            middleware: None,
            nodes: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// The DAG's (workflow) name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// The node names, in declaration order.
    pub fn node_names(&self) -> Vec<&str> {
        self.def
            .nodes
            .iter()
            .map(|n| n.spec.name.as_str())
            .collect()
    }

    /// The node names in a topological order (every node after the nodes
    /// it depends on; ties in declaration order).
    pub fn topological_order(&self) -> Vec<&str> {
        self.def
            .topo
            .iter()
            .map(|&i| self.def.nodes[i].spec.name.as_str())
            .collect()
    }

    /// The direct dependencies of `node` (including the choice it is a
    /// branch of), if it exists.
    pub fn dependencies(&self, node: &str) -> Option<Vec<&str>> {
        let n = self.def.nodes.iter().find(|n| n.spec.name == node)?;
        Some(
            n.deps
                .iter()
                .map(|&d| self.def.nodes[d].spec.name.as_str())
                .collect(),
        )
    }

    /// Registers the DAG on `fluxo` under its name and version.
    pub fn register(&self, fluxo: &Fluxo) -> Result<(), Error> {
        let def = Arc::clone(&self.def);
        fluxo.register_dynamic(
            self.def.name.clone(),
            self.def.version,
            move |ctx, input| {
                let def = Arc::clone(&def);
                Box::pin(async move { exec::run(ctx, def, input).await })
            },
        )?;
        Ok(())
    }

    /// Starts an instance with a new id (see [`StartOptions::new`]); decode its output as
    /// [`DagOutput`].
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
        FlowHandle::start(fluxo, &self.def.name, input, options).await
    }
}
