use fluxo::WorkflowContext;

#[fluxo::workflow]
async fn order_flow(_ctx: WorkflowContext, order: u64) -> u64 {
    order
}

fn main() {}
