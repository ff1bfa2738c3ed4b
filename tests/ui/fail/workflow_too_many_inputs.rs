use fluxo::{WorkflowContext, WorkflowError};

#[fluxo::workflow]
async fn order_flow(
    _ctx: WorkflowContext,
    order: u64,
    customer: String,
) -> Result<u64, WorkflowError> {
    let _ = customer;
    Ok(order)
}

fn main() {}
