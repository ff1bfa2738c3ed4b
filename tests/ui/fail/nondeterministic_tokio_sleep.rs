use std::time::Duration;

use fluxo::{WorkflowContext, WorkflowError};

#[fluxo::workflow]
async fn reminder(_ctx: WorkflowContext) -> Result<(), WorkflowError> {
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(())
}

fn main() {}
