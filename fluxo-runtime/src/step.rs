//! Steps: journaled units of work with retries and a timeout.

use std::borrow::Cow;
use std::future::Future;
use std::sync::{Arc, Weak};

use crate::context::{self, WorkflowContext};
use crate::error::StepError;
use crate::instance::Instance;
use crate::payload::Payload;
use crate::retry::StepOptions;

tokio::task_local! {
    static STEP: StepScope;
    static OVERRIDE: std::cell::Cell<Option<StepOptions>>;
}

/// Runs `fut` so that the first step it starts uses `options` instead of
/// the ones in its `#[step]` attribute. See
/// [`WorkflowContext::with_options`](crate::WorkflowContext::with_options).
pub(crate) async fn with_options<F: Future>(options: StepOptions, fut: F) -> F::Output {
    OVERRIDE
        .scope(std::cell::Cell::new(Some(options)), fut)
        .await
}

/// Takes the call-time options set around this step, if any.
fn take_override() -> Option<StepOptions> {
    OVERRIDE.try_with(|o| o.take()).ok().flatten()
}

/// What a running step knows about itself. Read it with
/// [`StepContext::current`] from inside a step body.
#[derive(Clone)]
pub struct StepContext {
    pub(crate) workflow_id: Arc<str>,
    /// The run of the instance: its cancel flag, read when asked. Weak, so
    /// a copy kept past the run (in a spawned task, say) neither keeps the
    /// run alive nor waits on it forever.
    pub(crate) instance: Weak<Instance>,
    pub(crate) name: Cow<'static, str>,
    pub(crate) seq: u64,
    pub(crate) attempt: u32,
}

impl std::fmt::Debug for StepContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepContext")
            .field("workflow_id", &self.workflow_id())
            .field("name", &self.name)
            .field("seq", &self.seq)
            .field("attempt", &self.attempt)
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

/// The step running on this task: what is its own. Its workflow is the one
/// in the task's scope ([`context::with_current`]), which
/// [`WorkflowContext::run_step`] makes sure of, so entering a step copies
/// no handle to it.
pub(crate) struct StepScope {
    pub name: Cow<'static, str>,
    pub seq: u64,
    pub attempt: u32,
}

impl StepScope {
    /// Runs `fut` as this step's body.
    pub(crate) async fn scope<F: Future>(self, fut: F) -> F::Output {
        STEP.scope(self, fut).await
    }
}

impl StepContext {
    /// The context of the step running on this task, if any: inside a step's
    /// body, polled by the task that started the step (a step future moved
    /// to another task after it started does not see it there).
    pub fn current() -> Option<StepContext> {
        let (name, seq, attempt) = STEP.try_with(|s| (s.name.clone(), s.seq, s.attempt)).ok()?;
        context::with_current(|ctx| StepContext {
            workflow_id: Arc::clone(&ctx.instance().id),
            instance: Arc::downgrade(ctx.instance()),
            name,
            seq,
            attempt,
        })
    }

    /// A key that is the same for every attempt and every replay of this step
    /// and different for every other step: use it to de-duplicate external
    /// effects (payment idempotency keys, message ids, ...).
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.workflow_id, self.seq)
    }

    /// The attempt number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The id of the workflow instance running the step.
    pub fn workflow_id(&self) -> &str {
        &self.workflow_id
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The step's sequence number in the workflow.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether the workflow was asked to cancel (or the run that started
    /// the step is over). A step that sees it may stop early; otherwise it
    /// is stopped after the worker's cancel grace period.
    pub fn is_cancelled(&self) -> bool {
        self.instance
            .upgrade()
            .is_none_or(|inst| inst.cancel_seen())
    }

    /// Resolves when the workflow is asked to cancel (or the run that
    /// started the step is over): `select!` on it in a long step to stop
    /// cleanly.
    pub async fn cancelled(&self) {
        let Some(inst) = self.instance.upgrade() else {
            return;
        };
        let mut rx = inst.cancel_watch();
        drop(inst);
        // The sender lives as long as the run; if it is gone, so is the
        // workflow here.
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// Runs a step: journaled when called from a workflow, a plain call
/// otherwise (and inside another step). Used by `#[fluxo::step]`.
pub async fn run_step<T, F, Fut>(
    name: &'static str,
    options: StepOptions,
    f: F,
) -> Result<T, StepError>
where
    T: Payload,
    F: FnMut() -> Fut + Send,
    Fut: Future<Output = Result<T, StepError>> + Send,
{
    match current_workflow() {
        Some(ctx) => {
            let options = take_override().unwrap_or(options);
            ctx.run_step(Cow::Borrowed(name), options, f).await
        }
        None => {
            let mut f = f;
            f().await
        }
    }
}

/// The workflow whose body is running on this task, unless a step is.
fn current_workflow() -> Option<WorkflowContext> {
    if STEP.try_with(|_| ()).is_ok() {
        return None;
    }
    context::current()
}
