//! Procedural macros for Fluxo: `#[workflow]`, `#[step]` and `#[signal]`.
//!
//! Use them through the `fluxo` crate (`#[fluxo::workflow]`, ...); the code
//! they generate refers to `::fluxo` only.

mod attrs;
mod determinism;
mod payload;
mod sig;
mod signal;
mod step;
mod workflow;

use proc_macro::TokenStream;

/// Turns an `async fn` into a durable, versioned workflow type.
///
/// The function must take the workflow context first, then at most one input,
/// and return `Result<T, E>` where `E: Into<WorkflowError>`:
///
/// ```ignore
/// use fluxo::prelude::*;
///
/// #[fluxo::workflow(version = 1, signals(Approved))]
/// async fn order_flow(ctx: WorkflowContext, order: Order) -> Result<Receipt, WorkflowError> {
///     let payment = charge(&order).await?;
///     let ok = ctx.wait::<Approved>().await?;
///     Ok(Receipt { payment, by: ok.by })
/// }
///
/// // The function stays as written; next to it a type named after it in
/// // UpperCamelCase implements `fluxo::Workflow`:
/// fluxo.register(OrderFlow)?;
/// let handle = OrderFlow::start(&fluxo, order).await?;
/// handle.signal(Approved { by: "ana".into() }).await?;
/// let receipt: Receipt = handle.result().await?;
/// ```
///
/// The generated type has the visibility of the function and offers
/// `start(&fluxo, input)`, `start_with(&fluxo, input, options)` and
/// `handle(&fluxo, id)`. A workflow without input takes only the context;
/// its input type is `()`.
///
/// # Arguments
///
/// All optional:
///
/// - `name = "orders"`: the name stored in the journal; defaults to the
///   function's name. Renaming the function keeps running instances working
///   only if the name stays the same.
/// - `version = 2`: the workflow's version, 1 by default. Raise it when a
///   change would make old histories replay differently.
/// - `signals(Approved, Rejected)`: the signal types (see [`macro@signal`])
///   this workflow accepts. Sending any other type to its handle does not
///   compile.
///
/// # Compile-time checks
///
/// The input, the output and every signal must be
/// `Serialize + DeserializeOwned + Send + 'static`; a violation is reported
/// at the type. The body is replayed after a crash, so it must be
/// deterministic: calls such as `SystemTime::now()`, `Instant::now()`,
/// `rand::random()`, `Uuid::new_v4()`, `tokio::spawn(..)`,
/// `tokio::time::sleep(..)` or `std::thread::sleep(..)` are compile errors
/// that name the journaled replacement (`ctx.now()`, `ctx.random()`,
/// `ctx.uuid()`, `ctx.join(..)`, `ctx.sleep(..)`), or go in a
/// [`macro@step`].
#[proc_macro_attribute]
pub fn workflow(args: TokenStream, item: TokenStream) -> TokenStream {
    workflow::expand(args.into(), item.into()).into()
}

/// Makes an `async fn` a journaled unit of work with a retry and timeout
/// policy.
///
/// Called inside a workflow, a step runs (and is retried) until it succeeds
/// or gives up, and its result is recorded: when the workflow is replayed the
/// recorded result is returned without running the step again. Called outside
/// a workflow it is a plain async fn, so it can be unit tested directly.
///
/// ```ignore
/// use fluxo::prelude::*;
///
/// #[fluxo::step(
///     retry(max_attempts = 5, initial = "200ms", max = "30s", backoff = 2.0,
///           jitter = 0.1, non_retryable("Declined")),
///     timeout = "10s",
/// )]
/// async fn charge(order: &Order) -> Result<PaymentId, StepError> {
///     let id = payments::charge(order.cents).await?;
///     Ok(PaymentId(id))
/// }
///
/// struct Mailer { /* ... */ }
///
/// impl Mailer {
///     #[fluxo::step(name = "send_receipt")]
///     async fn send(&self, to: String) -> Result<(), StepError> {
///         self.client.send(&to).await?;
///         Ok(())
///     }
/// }
/// ```
///
/// The function must return `Result<T, StepError>`, where `T` is
/// serializable. Because a step may run several times, each attempt gets its
/// own copy of the arguments: parameters must be plain names of shared
/// references (`&T`, `&self`) or `Clone` values; `self` by value and `&mut`
/// parameters are compile errors.
///
/// # Arguments
///
/// All optional:
///
/// - `name = "charge_card"`: the name recorded in the journal; defaults to
///   the function's name.
/// - `retry(...)`: the retry policy, any of `max_attempts = 5` (counting the
///   first attempt), `initial = "200ms"` and `max = "30s"` (the first and the
///   largest interval between attempts), `backoff = 2.0` (the factor between
///   two intervals), `jitter = 0.1` (the random fraction added to an
///   interval) and `non_retryable("Declined", ...)` (the `StepError` kinds
///   that fail the step at once). Unset fields keep the policy's defaults.
/// - `timeout = "10s"`: the time limit of one attempt.
///
/// Durations are written like `"250ms"`, `"30s"`, `"5m"`, `"1h 30m"` or
/// `"2days"`, and checked at compile time.
#[proc_macro_attribute]
pub fn step(args: TokenStream, item: TokenStream) -> TokenStream {
    step::expand(args.into(), item.into()).into()
}

/// Makes a struct or enum a signal: a typed message a workflow can wait for.
///
/// ```ignore
/// use fluxo::prelude::*;
///
/// #[fluxo::signal]
/// #[derive(Serialize, Deserialize)]
/// struct Approved {
///     by: String,
/// }
///
/// #[fluxo::signal(name = "order.rejected")]
/// #[derive(Serialize, Deserialize)]
/// enum Rejected {
///     OutOfStock,
///     Fraud { reason: String },
/// }
///
/// // A workflow declares the signals it accepts ...
/// #[fluxo::workflow(signals(Approved, Rejected))]
/// async fn order_flow(ctx: WorkflowContext, order: Order) -> Result<(), WorkflowError> {
///     let approval = ctx.wait::<Approved>().await?;
///     // ...
/// #   Ok(())
/// }
///
/// // ... and only those can be sent to it.
/// handle.signal(Approved { by: "ana".into() }).await?;
/// ```
///
/// The type must be `Serialize + DeserializeOwned + Send + 'static` and
/// cannot be generic. Its signal name, stored with each delivered signal,
/// defaults to the type's name; set `name = "..."` to keep it stable across
/// renames.
#[proc_macro_attribute]
pub fn signal(args: TokenStream, item: TokenStream) -> TokenStream {
    signal::expand(args.into(), item.into()).into()
}
