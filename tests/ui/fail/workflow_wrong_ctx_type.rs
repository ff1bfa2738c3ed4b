use fluxo::WorkflowError;

struct Context;

#[fluxo::workflow]
async fn order_flow(_ctx: Context, order: u64) -> Result<u64, WorkflowError> {
    Ok(order)
}

fn main() {}
