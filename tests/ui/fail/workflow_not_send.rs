use std::rc::Rc;

use fluxo::{StepError, WorkflowContext, WorkflowError};

#[fluxo::step]
async fn charge(cents: u64) -> Result<u64, StepError> {
    Ok(cents)
}

#[fluxo::workflow]
async fn order_flow(_ctx: WorkflowContext, cents: u64) -> Result<u64, WorkflowError> {
    let shared = Rc::new(cents);
    let charged = charge(*shared).await?;
    Ok(charged + *shared)
}

fn main() {}
