//! A workflow that takes only the context, with a custom name and version,
//! and an error type that converts into `WorkflowError`.
#![deny(warnings)]

use fluxo::{StepError, WorkflowContext};

#[fluxo::step]
async fn purge() -> Result<u32, StepError> {
    Ok(7)
}

/// Removes expired sessions every night.
#[fluxo::workflow(name = "maintenance.nightly_cleanup", version = 3)]
async fn nightly_cleanup(_ctx: WorkflowContext) -> Result<u32, StepError> {
    let removed = purge().await?;
    Ok(removed)
}

#[fluxo::workflow]
pub(crate) async fn ping(_ctx: fluxo::WorkflowContext) -> Result<(), fluxo::WorkflowError> {
    Ok(())
}

async fn start_both(fluxo: &fluxo::Fluxo) -> Result<(), fluxo::Error> {
    NightlyCleanup::start(fluxo, ()).await?;
    Ping::start(fluxo, ()).await?;
    Ok(())
}

fn assert_workflow<W: fluxo::Workflow<Input = (), Output = u32>>(_: W) {}

fn main() {
    assert_workflow(NightlyCleanup);
    assert_eq!(
        <NightlyCleanup as fluxo::Workflow>::NAME,
        "maintenance.nightly_cleanup"
    );
    assert_eq!(<NightlyCleanup as fluxo::Workflow>::VERSION, 3);
    assert_eq!(<Ping as fluxo::Workflow>::NAME, "ping");
    let _ = start_both;
}
