use fluxo::{WorkflowContext, WorkflowError};

pub struct Receipt {
    pub cents: u64,
}

#[fluxo::workflow]
async fn order_flow(_ctx: WorkflowContext, cents: u64) -> Result<Receipt, WorkflowError> {
    Ok(Receipt { cents })
}

fn main() {}
