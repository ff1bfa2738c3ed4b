//! Workflow and signal traits (implemented by the macros) and the registry
//! of workflows a [`Fluxo`](crate::Fluxo) instance can run.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;

use crate::context::WorkflowContext;
use crate::error::{Failure, WorkflowError};
use crate::payload::{self, Payload};

/// A workflow type. `#[fluxo::workflow]` implements it for the unit struct
/// it generates (`order_flow` becomes `OrderFlow`).
pub trait Workflow: Send + Sync + 'static {
    /// Input type.
    type Input: Payload;
    /// Output type.
    type Output: Payload;
    /// Registered name.
    const NAME: &'static str;
    /// Version; instances stay on the version they started with.
    const VERSION: u32;
    /// Runs the workflow body.
    fn run(
        ctx: WorkflowContext,
        input: Self::Input,
    ) -> BoxFuture<'static, Result<Self::Output, WorkflowError>>;
}

/// A typed message a workflow can wait for. Implemented by `#[fluxo::signal]`.
pub trait Signal: Payload {
    /// The signal's name in the inbox and the journal.
    const NAME: &'static str;
}

/// Marks that workflow `Self` declared signal `S`, so handles only send
/// signals the workflow can receive.
#[diagnostic::on_unimplemented(
    message = "workflow `{Self}` does not declare the signal `{S}`",
    label = "`{S}` is not in this workflow's signals",
    note = "declare it on the workflow: #[fluxo::workflow(signals({S}))]"
)]
pub trait HasSignal<S: Signal> {}

/// A signal no value can have. Every workflow "declares" it, so that with a
/// single declared signal the compiler still reports an undeclared one as a
/// missing [`HasSignal`] instead of a type mismatch.
#[doc(hidden)]
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Undeclared {}

impl Signal for Undeclared {
    const NAME: &'static str = "";
}

impl<W: Workflow> HasSignal<Undeclared> for W {}

/// What the engine's registry stores per workflow: the run function with
/// input decoding and output encoding done.
pub(crate) type ErasedRun = Arc<
    dyn Fn(WorkflowContext, &[u8]) -> Result<BoxFuture<'static, RunOutcome>, Failure> + Send + Sync,
>;

/// What an erased workflow run ends with.
pub(crate) enum RunOutcome {
    /// Encoded output.
    Output(Vec<u8>),
    /// The workflow returned an error.
    Failed(WorkflowError),
    /// The output could not be encoded.
    Encode(String),
}

/// A registered workflow definition.
#[derive(Clone)]
pub(crate) struct Definition {
    pub name: String,
    pub version: u32,
    pub run: ErasedRun,
}

impl Definition {
    // The failure is built once per run start; its size does not matter.
    #[allow(clippy::result_large_err)]
    pub(crate) fn of<W: Workflow>() -> Self {
        Definition {
            name: W::NAME.to_owned(),
            version: W::VERSION,
            run: Arc::new(|ctx, input| {
                let input: W::Input =
                    payload::decode(input).map_err(|message| Failure::Decode {
                        seq: None,
                        what: "input".into(),
                        type_name: std::any::type_name::<W::Input>().to_owned(),
                        message,
                    })?;
                Ok(W::run(ctx, input)
                    .map(|r| match r {
                        Ok(out) => match payload::encode(&out) {
                            Ok(bytes) => RunOutcome::Output(bytes),
                            Err(e) => RunOutcome::Encode(e.to_string()),
                        },
                        Err(e) => RunOutcome::Failed(e),
                    })
                    .boxed())
            }),
        }
    }
}

impl Definition {
    /// A workflow defined at run time (builder flows, DAGs): JSON in, JSON
    /// out.
    #[allow(clippy::result_large_err)] // once per run start
    pub(crate) fn dynamic<F>(name: String, version: u32, run: F) -> Self
    where
        F: Fn(
                WorkflowContext,
                serde_json::Value,
            ) -> BoxFuture<'static, Result<serde_json::Value, WorkflowError>>
            + Send
            + Sync
            + 'static,
    {
        let run = Arc::new(run);
        Definition {
            name,
            version,
            run: Arc::new(move |ctx, input| {
                let input: serde_json::Value =
                    payload::decode(input).map_err(|message| Failure::Decode {
                        seq: None,
                        what: "input".into(),
                        type_name: "serde_json::Value".into(),
                        message,
                    })?;
                Ok(run(ctx, input)
                    .map(|r| match r {
                        Ok(out) => match payload::encode(&out) {
                            Ok(bytes) => RunOutcome::Output(bytes),
                            Err(e) => RunOutcome::Encode(e.to_string()),
                        },
                        Err(e) => RunOutcome::Failed(e),
                    })
                    .boxed())
            }),
        }
    }
}

/// The workflows one process can run, by name and version.
#[derive(Default, Clone)]
pub(crate) struct Registry {
    by_name: HashMap<String, HashMap<u32, Definition>>,
    /// Bumped by every registration, so a worker rebuilds its list of
    /// [`Registry::keys`] only when it changed.
    generation: u64,
}

impl Registry {
    pub(crate) fn insert(&mut self, def: Definition) {
        self.generation += 1;
        self.by_name
            .entry(def.name.clone())
            .or_default()
            .insert(def.version, def);
    }

    pub(crate) fn get(&self, name: &str, version: u32) -> Option<&Definition> {
        self.by_name.get(name)?.get(&version)
    }

    /// The latest registered version of `name`.
    pub(crate) fn latest(&self, name: &str) -> Option<&Definition> {
        self.by_name.get(name)?.values().max_by_key(|d| d.version)
    }

    /// Changes whenever the registered workflows do.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn keys(&self) -> Vec<(String, u32)> {
        self.by_name
            .values()
            .flat_map(|vs| vs.values().map(|d| (d.name.clone(), d.version)))
            .collect()
    }
}
