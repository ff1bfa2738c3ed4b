use fluxo::{WorkflowContext, WorkflowError};

#[fluxo::workflow]
async fn order_flow(_ctx: &WorkflowContext, order: u64) -> Result<u64, WorkflowError> {
    Ok(order)
}

fn main() {}
