use std::thread;
use std::time::Duration;

use fluxo::{WorkflowContext, WorkflowError};

#[fluxo::workflow]
async fn reminder(_ctx: WorkflowContext) -> Result<(), WorkflowError> {
    thread::sleep(Duration::from_secs(1));
    std::thread::sleep(Duration::from_secs(1));
    Ok(())
}

fn main() {}
