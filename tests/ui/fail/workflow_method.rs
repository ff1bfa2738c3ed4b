use fluxo::{WorkflowContext, WorkflowError};

struct Shop;

impl Shop {
    #[fluxo::workflow]
    async fn order_flow(&self, _ctx: WorkflowContext, order: u64) -> Result<u64, WorkflowError> {
        Ok(order)
    }
}

fn main() {}
