use fluxo::{WorkflowContext, WorkflowError};

#[fluxo::workflow]
async fn timed(_ctx: WorkflowContext) -> Result<u128, WorkflowError> {
    let started = std::time::Instant::now();
    Ok(started.elapsed().as_millis())
}

fn main() {}
