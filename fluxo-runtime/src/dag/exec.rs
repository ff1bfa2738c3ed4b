//! The DAG runner.
//!
//! Each node is a lane of one concurrent block: it waits (in memory) for
//! its dependencies, then asks for a turn; the block's driver journals which
//! waiting nodes start next (`<dag>#next[k]`, at most `concurrency` running)
//! and the node runs as a journaled step. Everything a node sees (outputs,
//! shared data, whether it is bypassed) is derived from journaled results,
//! so a replay rebuilds it identically.

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::data::NodeView;
use super::{Compensation, DagDef, DagOutput, Kind, NodeCtx, NodeFn, WorkflowData};
use crate::flow::sched::{FailMode, LaneId, Sched};
use crate::middleware::MiddlewareStack;
use crate::middleware_builtin::{in_workflow, run_stack};
use crate::{RetryPolicy, StepError, StepOptions, WorkflowContext, WorkflowError};

/// What a node's step journals: its output and its data writes.
#[derive(Serialize, Deserialize)]
struct NodeRecord {
    output: Value,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    data: BTreeMap<String, Value>,
}

#[derive(Debug, Clone)]
enum NodeState {
    Pending,
    Done {
        output: Value,
        writes: BTreeMap<String, Value>,
    },
    Bypassed,
    /// Failed with `continue_on_error`.
    Failed(StepError),
    /// Failed: the DAG fails.
    Aborted,
}

struct DagRun {
    def: Arc<DagDef>,
    input: Value,
    states: Mutex<Vec<NodeState>>,
    compensated: Mutex<Vec<bool>>,
}

impl DagRun {
    fn states(&self) -> MutexGuard<'_, Vec<NodeState>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, i: usize, s: NodeState) {
        self.states()[i] = s;
    }

    fn deps_finished(&self, i: usize) -> bool {
        let st = self.states();
        self.def.nodes[i].deps.iter().all(|&d| {
            matches!(
                st[d],
                NodeState::Done { .. } | NodeState::Bypassed | NodeState::Failed(_)
            )
        })
    }

    fn bypassed(&self, i: usize) -> bool {
        let st = self.states();
        let node = &self.def.nodes[i];
        let not_chosen = node.choice_parents.iter().any(|&c| match &st[c] {
            NodeState::Done { output, .. } => output.as_str() != Some(node.spec.name.as_str()),
            _ => true,
        });
        let all_deps_bypassed = !node.deps.is_empty()
            && node
                .deps
                .iter()
                .all(|&d| matches!(st[d], NodeState::Bypassed));
        not_chosen || all_deps_bypassed
    }

    fn view(&self, i: usize) -> NodeView {
        let st = self.states();
        let mut outputs = BTreeMap::new();
        let mut data = WorkflowData::new();
        for &a in &self.def.nodes[i].ancestors {
            if let NodeState::Done { output, writes } = &st[a] {
                outputs.insert(self.def.nodes[a].spec.name.clone(), output.clone());
                data.apply(writes);
            }
        }
        NodeView {
            node: self.def.nodes[i].spec.name.clone(),
            input: self.input.clone(),
            outputs,
            data,
        }
    }

    fn output(&self) -> DagOutput {
        let st = self.states();
        let mut out = DagOutput::default();
        for &i in &self.def.topo {
            if let NodeState::Done { output, writes } = &st[i] {
                out.outputs
                    .insert(self.def.nodes[i].spec.name.clone(), output.clone());
                out.data.apply(writes);
            }
        }
        for (i, s) in st.iter().enumerate() {
            let name = &self.def.nodes[i].spec.name;
            match s {
                NodeState::Bypassed => out.bypassed.push(name.clone()),
                NodeState::Failed(e) => {
                    out.failed.insert(name.clone(), e.to_string());
                }
                _ => {}
            }
        }
        out
    }

    /// Completed nodes with a compensation not run yet, in reverse
    /// dependency order.
    fn to_compensate(&self) -> Vec<String> {
        let st = self.states();
        let done = self.compensated.lock().unwrap_or_else(|e| e.into_inner());
        self.def
            .topo
            .iter()
            .rev()
            .filter(|&&i| {
                matches!(st[i], NodeState::Done { .. })
                    && self.def.nodes[i].spec.compensate.is_some()
                    && !done[i]
            })
            .map(|&i| self.def.nodes[i].spec.name.clone())
            .collect()
    }

    /// Runs the compensations of `nodes`, in that order, each as the
    /// journaled step `compensate <node>`. Failures are logged; the others
    /// still run.
    async fn compensate(&self, ctx: &WorkflowContext, nodes: Vec<String>) {
        for name in nodes {
            let Some(i) = self.def.nodes.iter().position(|n| n.spec.name == name) else {
                continue;
            };
            let Some(f) = self.def.nodes[i].spec.compensate.clone() else {
                continue;
            };
            let output = match &self.states()[i] {
                NodeState::Done { output, .. } => output.clone(),
                _ => Value::Null,
            };
            let c = Compensation {
                node: name.clone(),
                input: self.input.clone(),
                output,
            };
            let result = ctx
                .step(format!("compensate {name}"), move || f(c.clone()))
                .await;
            match result {
                Ok(()) => {
                    self.compensated.lock().unwrap_or_else(|e| e.into_inner())[i] = true;
                }
                Err(e) => tracing::error!(
                    workflow = %self.def.name, node = %name, error = %e,
                    "compensation failed"
                ),
            }
        }
    }
}

/// Runs a registered DAG.
pub(crate) async fn run(
    ctx: WorkflowContext,
    def: Arc<DagDef>,
    input: Value,
) -> Result<Value, WorkflowError> {
    let n = def.nodes.len();
    let run = Arc::new(DagRun {
        def: Arc::clone(&def),
        input,
        states: Mutex::new(vec![NodeState::Pending; n]),
        compensated: Mutex::new(vec![false; n]),
    });
    if def.nodes.iter().any(|n| n.spec.compensate.is_some()) {
        let (run, ctx2) = (Arc::clone(&run), ctx.clone());
        ctx.on_cancel(move || async move {
            // Which nodes completed before the cancel is journaled, so a
            // replay of the handlers compensates the same ones.
            let r = Arc::clone(&run);
            let nodes = ctx2
                .step(format!("{}#cancelled", run.def.name), move || {
                    let nodes = r.to_compensate();
                    async move { Ok(nodes) }
                })
                .retry(RetryPolicy::none())
                .await
                .unwrap_or_default();
            run.compensate(&ctx2, nodes).await;
        });
    }
    // Maps with string keys and JSON values always encode.
    let encode = |out: DagOutput| serde_json::to_value(out).unwrap_or(Value::Null);
    if n == 0 {
        return Ok(encode(run.output()));
    }
    let sched = Sched::new(ctx.clone(), FailMode::Drain);
    let labels = def.nodes.iter().map(|n| n.spec.name.clone()).collect();
    let (block, ids) = sched.open_region(None, labels, Some(def.concurrency));
    let lanes: Vec<_> = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let (sched, run, ctx) = (&sched, &run, &ctx);
            async move {
                let body = node_lane(ctx, sched, &id, run, i);
                sched.lane(id.clone(), body).await
            }
        })
        .collect();
    match sched.run_region(block, lanes, Some(def.name.clone())).await {
        Ok(_) => Ok(encode(run.output())),
        Err(e) => {
            let nodes = run.to_compensate();
            run.compensate(&ctx, nodes).await;
            Err(e)
        }
    }
}

async fn node_lane(
    ctx: &WorkflowContext,
    sched: &Arc<Sched>,
    id: &LaneId,
    run: &DagRun,
    i: usize,
) -> Result<(), WorkflowError> {
    let node = &run.def.nodes[i];
    let name = node.spec.name.clone();
    sched.wait_external(|| run.deps_finished(i)).await;
    if run.bypassed(i) {
        run.set(i, NodeState::Bypassed);
        sched.notify();
        return Ok(());
    }
    let view = Arc::new(run.view(i));
    match &node.spec.kind {
        Kind::Task(f) => {
            let call = task_call(
                ctx,
                name.clone(),
                Arc::clone(f),
                node.spec.options.clone(),
                view,
                run.def.middleware.clone(),
            );
            match sched.op(id, call).await {
                Ok(rec) => run.set(
                    i,
                    NodeState::Done {
                        output: rec.output,
                        writes: rec.data,
                    },
                ),
                Err(e) if node.spec.continue_on_error => {
                    tracing::warn!(workflow = %run.def.name, node = %name, error = %e, "node failed; continuing");
                    run.set(i, NodeState::Failed(e));
                }
                Err(e) => {
                    run.set(i, NodeState::Aborted);
                    sched.notify();
                    return Err(WorkflowError::new(format!("node `{name}` failed: {e}"))
                        .with_kind("NodeFailed"));
                }
            }
        }
        Kind::Choice {
            branches,
            otherwise,
        } => {
            let branches = branches.clone();
            let otherwise = otherwise.clone();
            let call = ctx
                .step(name, move || {
                    let c = NodeCtx::new(Arc::clone(&view));
                    let chosen = branches
                        .iter()
                        .find(|(_, pred)| pred(&c))
                        .map(|(t, _)| t.clone())
                        .or_else(|| otherwise.clone());
                    async move { Ok(chosen) }
                })
                .retry(RetryPolicy::none());
            let chosen: Option<String> = sched.op(id, call.into_future()).await?;
            run.set(
                i,
                NodeState::Done {
                    output: chosen.map(Value::String).unwrap_or(Value::Null),
                    writes: BTreeMap::new(),
                },
            );
        }
    }
    sched.notify();
    Ok(())
}

fn task_call(
    ctx: &WorkflowContext,
    name: String,
    f: NodeFn,
    options: StepOptions,
    view: Arc<NodeView>,
    mw: Option<MiddlewareStack>,
) -> impl Future<Output = Result<NodeRecord, StepError>> + Send + 'static {
    let workflow = ctx.workflow().to_owned();
    ctx.step(name, move || {
        let (f, mw, view, workflow) = (
            Arc::clone(&f),
            mw.clone(),
            Arc::clone(&view),
            workflow.clone(),
        );
        in_workflow(workflow, async move {
            let node = NodeCtx::new(view);
            let output = match mw {
                Some(stack) if !stack.is_empty() => {
                    let input = node.input().clone();
                    run_stack(&stack, &input, || {
                        // A run repeated by middleware starts with no writes.
                        node.take_writes();
                        f(node.clone())
                    })
                    .await?
                }
                _ => f(node.clone()).await?,
            };
            Ok(NodeRecord {
                output,
                data: node.take_writes(),
            })
        })
    })
    .options(options)
    .into_future()
}
