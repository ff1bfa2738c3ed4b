use fluxo::{StepError, WorkflowContext, WorkflowError};

#[fluxo::step(retries = 3)]
async fn charge(cents: u64) -> Result<u64, StepError> {
    Ok(cents)
}

#[fluxo::step(retry(attempts = 3))]
async fn refund(cents: u64) -> Result<u64, StepError> {
    Ok(cents)
}

#[fluxo::workflow(verison = 2)]
async fn order_flow(_ctx: WorkflowContext, cents: u64) -> Result<u64, WorkflowError> {
    Ok(charge(cents).await? + refund(cents).await?)
}

#[fluxo::signal(version = 1)]
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Approved;

fn main() {}
