//! # Fluxo: durable, typed workflows inside your own service
//!
//! Annotate async functions with [`#[fluxo::workflow]`](macro@workflow) and
//! [`#[fluxo::step]`](macro@step); Fluxo journals every step, survives
//! crashes by replaying the journal, and schedules work over the database
//! you already have (in-memory and SQLite here; more backends behind
//! features).
//!
//! ```no_run
//! use fluxo::prelude::*;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Order { id: String, cents: u64 }
//!
//! #[fluxo::signal]
//! #[derive(Serialize, Deserialize)]
//! struct Approved { by: String }
//!
//! #[fluxo::step(retry(max_attempts = 5, initial = "200ms", max = "30s"), timeout = "10s")]
//! async fn charge(order: &Order) -> Result<String, StepError> {
//!     Ok(format!("pay-{}", order.id))
//! }
//!
//! #[fluxo::workflow(version = 1, signals(Approved))]
//! async fn order_flow(ctx: WorkflowContext, order: Order) -> Result<String, WorkflowError> {
//!     let payment = charge(&order).await?;
//!     let ok = ctx.wait::<Approved>().timeout(days(2)).await?;
//!     ctx.sleep(hours(1)).await;
//!     Ok(format!("{payment} approved by {}", ok.by))
//! }
//!
//! # async fn run() -> Result<(), fluxo::Error> {
//! let fluxo = Fluxo::sqlite("fluxo.db").await?;
//! fluxo.register(OrderFlow)?;
//! let worker = fluxo.worker().concurrency(32).spawn();
//! let h = OrderFlow::start(&fluxo, Order { id: "o-1".into(), cents: 4200 }).await?;
//! h.signal(Approved { by: "ana".into() }).await?;
//! let receipt: String = h.result().await?;
//! worker.shutdown().await;
//! # Ok(()) }
//! ```

pub use fluxo_macros::{signal, step, workflow};
pub use fluxo_runtime::payload::Payload;
pub use fluxo_runtime::{
    dag, error, flow, history, middleware, middleware_builtin, observe, store, time, ChildCall,
    DecodeError, Error, Failure, Fluxo, HasSignal, HistoryEntry, NonDeterminismError, RetryPolicy,
    Saga, Signal, SignalWait, SignalWaitTimeout, StartOptions, StepCall, StepContext, StepError,
    StepOptions, Timeout, Worker, WorkerBuilder, Workflow, WorkflowContext, WorkflowError,
    WorkflowHandle, WorkflowStatus,
};

/// serde, re-exported for the derives in the prelude.
pub use serde;

/// Helpers for tests: a Fluxo on the in-memory backend with a worker.
#[cfg(feature = "memory")]
pub mod testing;

/// The common imports: `use fluxo::prelude::*;`.
pub mod prelude {
    pub use crate::time::{days, hours, millis, minutes, secs};
    pub use crate::{
        Fluxo, RetryPolicy, StartOptions, StepContext, StepError, StepOptions, WorkflowContext,
        WorkflowError, WorkflowHandle, WorkflowStatus,
    };
    pub use serde::{Deserialize, Serialize};
}

#[doc(hidden)]
pub use fluxo_runtime::__private;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// The flows guide's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/flows.md")]
pub struct FlowsGuideDoctests;
