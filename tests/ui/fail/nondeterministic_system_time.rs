use std::time::{SystemTime, UNIX_EPOCH};

use fluxo::{WorkflowContext, WorkflowError};

#[fluxo::workflow]
async fn stamp(_ctx: WorkflowContext) -> Result<u64, WorkflowError> {
    let now = SystemTime::now();
    Ok(now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0))
}

fn main() {}
