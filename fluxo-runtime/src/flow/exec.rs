//! The flow interpreter: runs a [`Flow`]'s nodes on a workflow context.
//!
//! Everything that decides what happens next is journaled before it takes
//! effect: steps are journaled steps, branch choices, loop iterations and
//! while-conditions are journaled as small steps, and concurrent branches
//! take turns through journaled scheduling decisions (see `sched`). A
//! replay therefore issues the same operations, with the same names, in the
//! same order.

use std::future::{Future, IntoFuture};
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;

use super::sched::{FailMode, LaneId, Sched};
use super::{join_path, Flow, Node, StepFn};
use crate::middleware::MiddlewareStack;
use crate::middleware_builtin::{in_workflow, run_stack};
use crate::payload::Payload;
use crate::{RetryPolicy, StepError, StepOptions, WorkflowContext, WorkflowError};

/// Runs a registered flow.
pub(crate) async fn run(
    ctx: WorkflowContext,
    flow: &Flow,
    input: Value,
) -> Result<Value, WorkflowError> {
    exec_nodes(
        &ctx,
        &Lane::Root,
        &flow.nodes,
        "",
        flow.middleware.as_ref(),
        input,
    )
    .await
}

/// Where code runs: the workflow body itself, or a lane of a concurrent
/// block (whose operations take journaled turns).
#[derive(Clone)]
pub(crate) enum Lane {
    Root,
    In(Arc<Sched>, LaneId),
}

impl Lane {
    /// Issues one durable operation from this lane.
    pub(crate) async fn op<F: Future>(&self, fut: F) -> F::Output {
        match self {
            Lane::Root => fut.await,
            Lane::In(sched, id) => sched.op(id, fut).await,
        }
    }
}

/// Journals a decision computed by `f` as the step `name` (computed once;
/// a replay reads it back).
pub(crate) async fn record<T, F>(
    ctx: &WorkflowContext,
    lane: &Lane,
    name: String,
    f: F,
) -> Result<T, WorkflowError>
where
    T: Payload,
    F: Fn() -> Result<T, StepError> + Send + Sync + 'static,
{
    let call = ctx
        .step(name, move || {
            let r = f();
            async move { r }
        })
        .retry(RetryPolicy::none());
    Ok(lane.op(call.into_future()).await?)
}

/// A journaled step running `f` on `input` through the middleware `mw`.
pub(crate) fn step_call(
    ctx: &WorkflowContext,
    name: String,
    f: StepFn,
    options: StepOptions,
    mw: Option<MiddlewareStack>,
    input: Value,
) -> impl Future<Output = Result<Value, StepError>> + Send + 'static {
    let workflow = ctx.workflow().to_owned();
    ctx.step(name, move || {
        let (f, mw, input, workflow) =
            (Arc::clone(&f), mw.clone(), input.clone(), workflow.clone());
        in_workflow(workflow, async move {
            match mw {
                Some(stack) if !stack.is_empty() => {
                    run_stack(&stack, &input, || f(input.clone())).await
                }
                _ => f(input).await,
            }
        })
    })
    .options(options)
    .into_future()
}

fn exec_nodes<'a>(
    ctx: &'a WorkflowContext,
    lane: &'a Lane,
    nodes: &'a [Node],
    prefix: &'a str,
    mw: Option<&'a MiddlewareStack>,
    input: Value,
) -> BoxFuture<'a, Result<Value, WorkflowError>> {
    Box::pin(async move {
        let mut v = input;
        for node in nodes {
            v = exec_node(ctx, lane, node, prefix, mw, v).await?;
        }
        Ok(v)
    })
}

fn sub<'a>(flow: &'a Flow, mw: Option<&'a MiddlewareStack>) -> Option<&'a MiddlewareStack> {
    flow.middleware.as_ref().or(mw)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

async fn exec_node(
    ctx: &WorkflowContext,
    lane: &Lane,
    node: &Node,
    prefix: &str,
    mw: Option<&MiddlewareStack>,
    v: Value,
) -> Result<Value, WorkflowError> {
    let path = join_path(prefix, node.name());
    match node {
        Node::Step { f, options, .. } => {
            let call = step_call(ctx, path, Arc::clone(f), options.clone(), mw.cloned(), v);
            Ok(lane.op(call).await?)
        }
        Node::If {
            cond,
            then,
            otherwise,
            ..
        } => {
            let (cond, input) = (Arc::clone(cond), v.clone());
            let choice = record(ctx, lane, format!("{path}#choice"), move || cond(&input)).await?;
            let (branch, arm) = if choice {
                (then, "then")
            } else {
                (otherwise, "else")
            };
            let prefix = format!("{path}/{arm}");
            exec_nodes(ctx, lane, &branch.nodes, &prefix, sub(branch, mw), v).await
        }
        Node::Switch {
            key,
            cases,
            default,
            ..
        } => {
            let (key, input) = (Arc::clone(key), v.clone());
            let chosen: String =
                record(ctx, lane, format!("{path}#choice"), move || key(&input)).await?;
            let (arm, branch) = match cases.iter().find(|(k, _)| *k == chosen) {
                Some((k, flow)) => (k.as_str(), flow),
                None => ("default", default),
            };
            let prefix = format!("{path}/{arm}");
            exec_nodes(ctx, lane, &branch.nodes, &prefix, sub(branch, mw), v).await
        }
        Node::Parallel { branches, .. } => {
            let items = branches
                .iter()
                .enumerate()
                .map(|(i, b)| (b, v.clone(), format!("{path}[{i}]")))
                .collect();
            let outs = region(ctx, lane, &path, None, items, mw).await?;
            Ok(Value::Array(outs))
        }
        Node::ParallelMap { width, body, .. } => {
            let items = match v {
                Value::Array(items) => items,
                other => {
                    return Err(WorkflowError::new(format!(
                        "parallel_map `{path}` needs a JSON array as its input, got {}",
                        json_kind(&other)
                    ))
                    .with_kind("NotAnArray"))
                }
            };
            let items = items
                .into_iter()
                .enumerate()
                .map(|(i, item)| (body, item, format!("{path}[{i}]")))
                .collect();
            let outs = region(ctx, lane, &path, Some(*width), items, mw).await?;
            Ok(Value::Array(outs))
        }
        Node::Loop { times, body, .. } => {
            let mut v = v;
            for i in 0..*times {
                let prefix = format!("{path}[{i}]");
                record(ctx, lane, format!("{prefix}#iter"), move || Ok(i)).await?;
                v = exec_nodes(ctx, lane, &body.nodes, &prefix, sub(body, mw), v).await?;
            }
            Ok(v)
        }
        Node::While {
            cond, max, body, ..
        } => {
            let mut v = v;
            let mut i: u32 = 0;
            loop {
                let prefix = format!("{path}[{i}]");
                let (cond, input) = (Arc::clone(cond), v.clone());
                let go = record(ctx, lane, format!("{prefix}#cond"), move || cond(&input)).await?;
                if !go {
                    return Ok(v);
                }
                if i >= *max {
                    return Err(WorkflowError::new(format!(
                        "while loop `{path}` still running after {max} iterations"
                    ))
                    .with_kind("MaxIterations"));
                }
                v = exec_nodes(ctx, lane, &body.nodes, &prefix, sub(body, mw), v).await?;
                i += 1;
            }
        }
        Node::WaitSignal {
            signal, timeout, ..
        } => Ok(lane.op(ctx.wait_raw(signal, *timeout)).await?),
        Node::WaitAny {
            signals, timeout, ..
        } => {
            let names: Vec<&str> = signals.iter().map(String::as_str).collect();
            let (signal, payload) = lane.op(ctx.wait_any_raw(&names, *timeout)).await?;
            Ok(serde_json::json!({ "signal": signal, "payload": payload }))
        }
        Node::Sleep { duration, .. } => {
            lane.op(ctx.sleep(*duration)).await;
            Ok(v)
        }
        Node::SleepUntil { at, .. } => {
            lane.op(ctx.sleep_until(*at)).await;
            Ok(v)
        }
    }
}

/// Runs `items` (a flow, its input, its journal prefix) as a concurrent
/// block; outputs in item order.
async fn region(
    ctx: &WorkflowContext,
    lane: &Lane,
    path: &str,
    width: Option<usize>,
    items: Vec<(&Flow, Value, String)>,
    mw: Option<&MiddlewareStack>,
) -> Result<Vec<Value>, WorkflowError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let (sched, owner, driver) = match lane {
        Lane::Root => (
            Sched::new(ctx.clone(), FailMode::Cancel),
            None,
            Some(path.to_owned()),
        ),
        Lane::In(sched, id) => {
            // Opening a nested block takes a turn of its own: it counts as
            // the lane's start (for widths) and is ordered like operations.
            sched.op(id, async {}).await;
            (Arc::clone(sched), Some(id.clone()), None)
        }
    };
    let labels = items.iter().map(|(_, _, p)| p.clone()).collect();
    let (block, ids) = sched.open_region(owner.as_ref(), labels, width);
    let lanes: Vec<_> = items
        .into_iter()
        .zip(ids)
        .map(|((flow, input, prefix), id)| {
            let sched = Arc::clone(&sched);
            let lane = Lane::In(Arc::clone(&sched), id.clone());
            async move {
                let body = exec_nodes(ctx, &lane, &flow.nodes, &prefix, sub(flow, mw), input);
                sched.lane(id, body).await
            }
        })
        .collect();
    sched.run_region(block, lanes, driver).await
}
