use fluxo::{WorkflowContext, WorkflowError};

#[fluxo::workflow]
async fn fan_out(_ctx: WorkflowContext, n: u64) -> Result<u64, WorkflowError> {
    let task = tokio::spawn(async move { n * 2 });
    task.await.map_err(|e| WorkflowError::new(e.to_string()))
}

fn main() {}
