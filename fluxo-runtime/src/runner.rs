//! Runs one claimed instance: rebuilds it from its journal, drives the
//! workflow future, parks it when every operation waits, and commits how it
//! ended.

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::context::{self, WorkflowContext};
use crate::error::{Failure, WorkflowError};
use crate::finish_watch::Ended;
use crate::history::{Event, Replay};
use crate::instance::{Abort, Instance, InstanceInit};
use crate::observe::LifecycleEvent;
use crate::panics;
use crate::payload;
use crate::store::{
    now_millis, ClaimedInstance, CommitOutcome, InstanceStatus, Millis, StoreError, Transition,
    HISTORY_FORMAT,
};
use crate::worker::WorkerRuntime;
use crate::workflow::RunOutcome;
use std::time::Duration;

/// Runs `claimed` on this worker until it finishes, is aborted or evicted.
pub(crate) async fn run(
    worker: Arc<WorkerRuntime>,
    claimed: ClaimedInstance,
    run: u64,
    permit: OwnedSemaphorePermit,
) {
    let rec = &claimed.record;
    let span = tracing::info_span!("workflow", workflow = %rec.workflow, id = %rec.id, version = rec.version);
    run_inner(worker, claimed, run, permit)
        .instrument(span)
        .await
}

async fn run_inner(
    worker: Arc<WorkerRuntime>,
    claimed: ClaimedInstance,
    run: u64,
    permit: OwnedSemaphorePermit,
) {
    let shared = Arc::clone(&worker.shared);
    let rec = claimed.record;

    // Rebuild the journal; a problem with it fails the instance below.
    let mut problem = None;
    let mut events = Vec::new();
    if rec.history_format != HISTORY_FORMAT {
        problem = Some(Failure::IncompatibleHistory {
            found: rec.history_format,
            supported: HISTORY_FORMAT,
        });
    } else if claimed.next_event_id > 0 {
        match shared.store.load_history(&rec.id).await {
            Ok(stored) => {
                for s in &stored {
                    match Event::from_stored(s) {
                        Ok(e) => events.push((s.seq, e)),
                        Err(message) => {
                            problem = Some(Failure::Decode {
                                seq: Some(s.seq),
                                what: format!("journal entry {} ({})", s.event_id, s.kind),
                                type_name: "fluxo::history::Event".into(),
                                message,
                            });
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot load history; releasing the instance");
                worker.detach(&rec.id, run);
                worker.give_back(rec.id.as_str().into(), claimed.lease_token);
                return;
            }
        }
        if problem.is_some() {
            events.clear();
        }
    }
    let children = events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ChildStarted { child_id, .. } => Some(child_id.clone()),
            _ => None,
        })
        .collect();
    let replaying = !events.is_empty();
    let inst = Instance::new(
        Arc::clone(&shared),
        InstanceInit {
            id: rec.id,
            workflow: rec.workflow,
            lease_token: claimed.lease_token,
            next_event_id: claimed.next_event_id,
            inbox_seq: claimed.inbox_seq,
            cancel_requested: rec.cancel_requested,
            replay: Replay::new(events),
            children,
            permit,
        },
    );
    let id = &*inst.id;
    worker.attach(id, run, Arc::clone(&inst));
    // However this run ends (even aborted by an eviction), drop what could
    // keep the instance alive through a reference cycle.
    let _handlers = ClearHandlersOnDrop(Arc::clone(&inst));
    if replaying {
        tracing::debug!(events = claimed.next_event_id, "replaying from the journal");
    }

    let outcome = match problem {
        Some(f) => Err(Abort::Fail(f)),
        None => drive(&worker, run, &inst, &inst.workflow, rec.version, &rec.input).await,
    };
    let end = finish(&inst, outcome, rec.created_at).await;
    inst.release_permit();
    worker.detach(id, run);
    if let RunEnd::Recorded(ended) = end {
        shared.finished.finished(id, ended);
    } else {
        // Detached, its lease is no longer renewed; given back, a claim
        // takes the instance at once instead of when the lease runs out.
        worker.give_back(Arc::clone(&inst.id), inst.lease_token());
    }
}

/// Runs the workflow body; if a cancel request stops it, runs its
/// cancellation handlers (saga compensations) and reports the cancellation.
async fn drive(
    worker: &Arc<WorkerRuntime>,
    run: u64,
    inst: &Arc<Instance>,
    workflow: &str,
    version: u32,
    input: &[u8],
) -> Result<RunOutcome, Abort> {
    let build = registered_run(inst, workflow, version)?;
    let ctx = WorkflowContext::new(Arc::clone(inst));
    // Building the body runs user code too (a hand-written `run`, a
    // dynamic workflow's closure, the input's decoding).
    // The lint looks at the closure, which returns what `build` always did.
    #[allow(clippy::result_large_err)]
    let body = match panics::catch_call(|| build(ctx.clone(), input)) {
        Ok(body) => body.map_err(Abort::Fail)?,
        Err(error) => return Ok(RunOutcome::Failed(*error)),
    };
    let body = panics::catch_workflow(body, RunOutcome::Failed);
    match drive_future(worker, run, inst, context::scope(ctx.clone(), body)).await {
        Err(Abort::Cancelled) => {}
        // A body that gives up with an error after a cancel request (e.g. a
        // step that stopped because of it) counts as cancelled.
        Ok(RunOutcome::Failed(_)) if inst.cancel_pending() => {}
        other => return other,
    }
    let (handlers, seq, marked) = inst.start_cancelling();
    if !handlers.is_empty() {
        tracing::info!(
            handlers = handlers.len(),
            "cancelled; running cancellation handlers"
        );
        if !marked
            && inst
                .commit(seq, &[Event::CancelRequested], Default::default())
                .await
                .is_none()
        {
            return Err(inst.take_abort().unwrap_or(Abort::LeaseLost));
        }
        for handler in handlers {
            // A handler that panics is over; the next one still runs.
            let handler = panics::catch_workflow(async move { handler().await }, |error| {
                tracing::warn!(%error, "a cancellation handler panicked");
            });
            drive_future(worker, run, inst, context::scope(ctx.clone(), handler)).await?;
        }
    }
    Err(Abort::Cancelled)
}

/// Polls `fut` until it returns or the instance is aborted, parking the
/// instance whenever every operation waits. A cancel request stops the body
/// when it is idle, or after the grace period given to running steps.
async fn drive_future<T>(
    worker: &Arc<WorkerRuntime>,
    run: u64,
    inst: &Arc<Instance>,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Abort> {
    let mut fut = std::pin::pin!(fut);
    let mut grace_ends: Option<tokio::time::Instant> = None;
    loop {
        let grace = async {
            match grace_ends {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = inst.wake_runner.notified() => {
                if let Some(abort) = inst.take_abort() {
                    return Err(abort);
                }
                let idle = inst.idle_until();
                if inst.cancel_pending() {
                    if idle.is_some() {
                        return Err(Abort::Cancelled);
                    }
                    // A grace too long to add to the clock never ends.
                    if grace_ends.is_none() {
                        grace_ends = tokio::time::Instant::now().checked_add(worker.cancel_grace);
                    }
                    continue;
                }
                let Some(wake_at) = idle else { continue };
                match inst.park(wake_at).await {
                    Some(true) => {
                        tracing::debug!(?wake_at, "parked");
                        worker.parked(&inst.id, run, inst.next_event_id(), wake_at);
                        if !inst.wait_resume().await {
                            return Err(Abort::LeaseLost);
                        }
                        tracing::debug!("resumed");
                    }
                    Some(false) => {}
                    None => {
                        if let Some(abort) = inst.take_abort() {
                            return Err(abort);
                        }
                    }
                }
            }
            _ = grace => {
                tracing::info!("cancel grace period over; stopping the running step");
                return Err(Abort::Cancelled);
            }
            out = &mut fut => {
                // An abort set while the future completed still wins.
                if let Some(abort) = inst.take_abort() {
                    return Err(abort);
                }
                return Ok(out);
            }
        }
    }
}

/// The run function registered for `workflow` at `version`.
#[allow(clippy::result_large_err)] // once per run start
fn registered_run(
    inst: &Instance,
    workflow: &str,
    version: u32,
) -> Result<crate::workflow::ErasedRun, Abort> {
    inst.shared
        .registry()
        .get(workflow, version)
        .map(|def| Arc::clone(&def.run))
        .ok_or_else(|| {
            Abort::Fail(Failure::Workflow {
                error: WorkflowError::new(format!(
                    "workflow {workflow:?} version {version} is not registered on this worker"
                ))
                .with_kind("UnknownWorkflow"),
            })
        })
}

/// What became of a run's end.
enum RunEnd {
    /// The store has it, or the instance is another worker's now. With how
    /// the instance ended, when this run recorded that and a caller in this
    /// process waits for it.
    Recorded(Option<Ended>),
    /// The store missed it: the lease goes back.
    Missed,
}

/// How the instance ends with `transition`, for the callers waiting on it
/// here (none: `None`, and nothing is copied); `None` too for a transition
/// that does not end it.
fn ended(inst: &Instance, transition: &Transition) -> Option<Ended> {
    let (status, output, failure) = match transition {
        Transition::Complete { output } => (InstanceStatus::Completed, Some(output), None),
        Transition::Fail { failure } => (InstanceStatus::Failed, None, Some(failure)),
        Transition::Cancel { failure } => (InstanceStatus::Cancelled, None, Some(failure)),
        _ => return None,
    };
    inst.shared.finished.is_watched(&inst.id).then(|| Ended {
        id: inst.id.to_string(),
        workflow: inst.workflow.clone(),
        status,
        output: output.cloned(),
        failure: failure.cloned(),
    })
}

/// Commits how the run ended: [`RunEnd::Missed`] when the store did not
/// learn of it (the commit failed past its retries) and the instance still
/// holds this run's lease.
async fn finish(inst: &Instance, outcome: Result<RunOutcome, Abort>, created_at: Millis) -> RunEnd {
    let failure = |f: Failure| Transition::Fail {
        failure: payload::encode(&f).unwrap_or_default(),
    };
    let diverged = || {
        inst.unreplayed().map(|(seq, op)| Failure::NonDeterminism {
            seq,
            expected: op.to_string(),
            found: "the workflow returning".into(),
        })
    };
    let (transition, cancel_children) = match outcome {
        Ok(RunOutcome::Output(output)) => match diverged() {
            Some(f) => (failure(f), Vec::new()),
            None => (Transition::Complete { output }, Vec::new()),
        },
        // A panic mid-replay stopped the body before it reached the rest of
        // its journal: the panic is what happened, not a divergence.
        Ok(RunOutcome::Failed(error)) if error.kind() == panics::PANIC_KIND => {
            (failure(Failure::Workflow { error }), Vec::new())
        }
        Ok(RunOutcome::Failed(error)) => match diverged() {
            Some(f) => (failure(f), Vec::new()),
            None => (failure(Failure::Workflow { error }), Vec::new()),
        },
        Ok(RunOutcome::Encode(message)) => (
            failure(Failure::Workflow {
                error: WorkflowError::new(message).with_kind("Encode"),
            }),
            Vec::new(),
        ),
        Err(Abort::Fail(f)) => (failure(f), Vec::new()),
        Err(Abort::Cancelled) => (
            Transition::Cancel {
                failure: payload::encode(&Failure::Cancelled).unwrap_or_default(),
            },
            inst.children(),
        ),
        Err(Abort::LeaseLost) => {
            tracing::warn!("lease lost to another worker; stopped running here");
            return RunEnd::Recorded(None);
        }
        Err(Abort::ContinueAsNew(input)) => match inst.continue_as_new(input).await {
            Ok(CommitOutcome::LeaseLost) => {
                tracing::warn!("lease lost before continuing as new");
                return RunEnd::Recorded(None);
            }
            Ok(_) => {
                tracing::info!("workflow continued as new");
                inst.shared.notify_work();
                return RunEnd::Recorded(None);
            }
            // Every run would end the same way: the workflow fails.
            Err(StoreError::Unsupported(message)) => (
                failure(Failure::Workflow {
                    error: WorkflowError::new(message).with_kind("Unsupported"),
                }),
                Vec::new(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot continue as new; the run will be retried");
                return RunEnd::Missed;
            }
        },
        Err(Abort::Store(e)) => {
            tracing::warn!(error = %e, "storage error; releasing the instance to be retried");
            (Transition::Release, Vec::new())
        }
    };
    let what = match &transition {
        Transition::Complete { .. } => "completed",
        Transition::Fail { .. } => "failed",
        Transition::Cancel { .. } => "cancelled",
        _ => "released",
    };
    let error = match &transition {
        Transition::Fail { failure } => {
            let f: Option<Failure> = payload::decode(failure).ok();
            let error = f.map(|f| f.describe()).unwrap_or_default();
            tracing::error!(workflow = %inst.workflow, id = %inst.id, failure = %error, "workflow failed");
            Some(error)
        }
        _ => None,
    };
    let ended = ended(inst, &transition);
    match inst.commit_final(transition, cancel_children).await {
        Ok(CommitOutcome::LeaseLost) => {
            tracing::warn!("lease lost before the final commit");
            RunEnd::Recorded(None)
        }
        Ok(_) => {
            tracing::info!("workflow {what}");
            let (workflow, id) = (inst.workflow.as_str(), &*inst.id);
            let duration =
                Duration::from_millis(now_millis().saturating_sub(created_at).max(0) as u64);
            inst.shared.observe(|o| match (what, &error) {
                ("completed", _) => o.on_event(&LifecycleEvent::WorkflowCompleted {
                    workflow,
                    id,
                    duration,
                }),
                ("failed", Some(error)) => o.on_event(&LifecycleEvent::WorkflowFailed {
                    workflow,
                    id,
                    error,
                    duration,
                }),
                ("cancelled", _) => o.on_event(&LifecycleEvent::WorkflowCancelled { workflow, id }),
                _ => {}
            });
            RunEnd::Recorded(ended)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot record that the workflow {what}; it will run again");
            RunEnd::Missed
        }
    }
}

/// Clears an instance's cancellation handlers when dropped.
struct ClearHandlersOnDrop(Arc<Instance>);

impl Drop for ClearHandlersOnDrop {
    fn drop(&mut self) {
        self.0.clear_cancel_handlers();
    }
}
