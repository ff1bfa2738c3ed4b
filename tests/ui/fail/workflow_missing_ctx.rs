use fluxo::WorkflowError;

#[fluxo::workflow]
async fn order_flow(order: u64) -> Result<u64, WorkflowError> {
    Ok(order)
}

fn main() {}
