//! The workflow the engine benches time: `n` sequential no-op steps.

use fluxo::prelude::*;

#[fluxo::step]
async fn noop(i: u32) -> Result<u32, StepError> {
    Ok(i)
}

/// `n` sequential no-op steps; returns the last step's output.
#[fluxo::workflow]
pub async fn sequential(_ctx: WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
    let mut last = 0;
    for i in 0..n {
        last = noop(i).await?;
    }
    Ok(last)
}
