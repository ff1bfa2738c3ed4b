//! The Fluxo runtime: journal-replay engine, workflow context, workers and
//! storage backends. Users depend on the `fluxo` facade crate, which
//! re-exports what is public here together with the macros.

mod abort_on_drop;
mod client;
mod committer;
mod context;
pub mod dag;
pub mod error;
mod finish_watch;
pub mod flow;
pub mod history;
mod instance;
mod live_set;
pub mod middleware;
pub mod middleware_builtin;
pub mod observe;
mod panics;
pub mod payload;
mod retry;
mod runner;
mod shared;
mod step;
pub mod store;
pub mod time;
mod worker;
mod workflow;

pub use client::{Fluxo, HistoryEntry, StartOptions, WorkflowHandle};
pub use context::{
    ChildCall, Saga, SignalWait, SignalWaitTimeout, StepCall, Timeout, WorkflowContext,
};
pub use error::{DecodeError, Error, Failure, NonDeterminismError, StepError, WorkflowError};
pub use retry::{RetryPolicy, StepOptions};
pub use step::{run_step, StepContext};
pub use store::InstanceStatus as WorkflowStatus;
pub use worker::{Worker, WorkerBuilder};
pub use workflow::{HasSignal, Signal, Workflow};

/// Items used by the code the macros generate. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::step::run_step;
    pub use crate::workflow::Undeclared;
    pub use futures::future::BoxFuture;

    use crate::{Error, Fluxo, StartOptions, Workflow, WorkflowHandle};

    /// Compile-time check that a type can cross the journal.
    pub fn assert_payload<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static>() {}

    /// Starts an instance of `W`.
    pub async fn start<W: Workflow>(
        fluxo: &Fluxo,
        input: W::Input,
        options: StartOptions,
    ) -> Result<WorkflowHandle<W>, Error> {
        WorkflowHandle::start(fluxo, input, options).await
    }

    /// A handle to instance `id` of `W`.
    pub fn handle<W: Workflow>(fluxo: &Fluxo, id: String) -> WorkflowHandle<W> {
        WorkflowHandle::new(fluxo, id)
    }
}
