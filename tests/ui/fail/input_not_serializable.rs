use fluxo::{WorkflowContext, WorkflowError};

pub struct Order {
    pub cents: u64,
}

#[fluxo::workflow]
async fn order_flow(_ctx: WorkflowContext, order: Order) -> Result<u64, WorkflowError> {
    Ok(order.cents)
}

fn main() {}
