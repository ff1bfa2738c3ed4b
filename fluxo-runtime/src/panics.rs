//! Panics in user code (a step's body, a middleware's, a workflow's, a
//! cancellation handler's), caught where that code runs and turned into the
//! errors a failure of it would give, so that a panic in user code does not
//! take the worker's run of the instance down with it; and a store's panic
//! in a call of the engine's own tasks (a group commit, a lease given back),
//! which would otherwise end them.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt;

use crate::error::{StepError, WorkflowError};
use crate::store::{StoreError, StoreResult};

/// The kind a caught panic's error carries: match it in a retry policy's
/// `non_retryable` to stop retrying steps that panic.
pub(crate) const PANIC_KIND: &str = "Panic";

/// The message a panic was raised with.
fn message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "a panic without a message"
    }
}

/// A step attempt's future, pinned where it was built: a panic in one of
/// its polls is a retryable step error of kind [`PANIC_KIND`]. It holds the
/// future by reference, so wrapping it moves nothing.
pub(crate) struct CatchStep<'a, F>(pub(crate) Pin<&'a mut F>);

impl<T, F> Future for CatchStep<'_, F>
where
    F: Future<Output = Result<T, StepError>>,
{
    type Output = Result<T, StepError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(poll) => poll,
            Err(payload) => Poll::Ready(Err(StepError::retryable(format!(
                "the step panicked: {}",
                message(&*payload)
            ))
            .with_kind(PANIC_KIND))),
        }
    }
}

/// Calls `f`, user code that builds a workflow's body: a panic in it is a
/// [`WorkflowError`] of kind [`PANIC_KIND`].
pub(crate) fn catch_call<T>(f: impl FnOnce() -> T) -> Result<T, Box<WorkflowError>> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .map_err(|payload| Box::new(workflow_panicked(&*payload)))
}

fn workflow_panicked(payload: &(dyn Any + Send)) -> WorkflowError {
    WorkflowError::new(format!("the workflow panicked: {}", message(payload))).with_kind(PANIC_KIND)
}

/// Runs a workflow's body: a panic in it fails the workflow with an error of
/// kind [`PANIC_KIND`] (`on_panic` builds the body's outcome from it).
pub(crate) async fn catch_workflow<T, F>(fut: F, on_panic: impl FnOnce(WorkflowError) -> T) -> T
where
    F: Future<Output = T>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(out) => out,
        Err(payload) => on_panic(workflow_panicked(&*payload)),
    }
}

/// Runs a store call made by a task of the engine's own (the group-commit
/// writer's write of a group, a claim, a lease given back): a panic in it
/// (a bug in the store) is answered by `on_panic`, given the error it
/// stands for, so that the task goes on.
pub(crate) async fn catch_store<T, F>(fut: F, on_panic: impl FnOnce(StoreError) -> T) -> T
where
    F: Future<Output = T>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(out) => out,
        Err(payload) => on_panic(StoreError::Backend(
            format!("the store panicked: {}", message(&*payload)).into(),
        )),
    }
}

/// [`catch_store`] for a call that answers one result: a panic is that
/// call's backend error.
pub(crate) async fn catch_store_call<T>(
    fut: impl Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    catch_store(fut, Err).await
}
