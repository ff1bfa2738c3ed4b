use fluxo::{WorkflowContext, WorkflowError, WorkflowHandle};
use serde::{Deserialize, Serialize};

#[fluxo::signal]
#[derive(Serialize, Deserialize)]
pub struct Approved {
    pub by: String,
}

#[fluxo::signal]
#[derive(Serialize, Deserialize)]
pub struct Cancelled;

#[fluxo::signal]
#[derive(Serialize, Deserialize)]
pub struct Rejected {
    pub reason: String,
}

#[fluxo::workflow(signals(Approved, Cancelled))]
async fn order_flow(_ctx: WorkflowContext, cents: u64) -> Result<u64, WorkflowError> {
    Ok(cents)
}

async fn reject(handle: &WorkflowHandle<OrderFlow>) -> Result<(), fluxo::Error> {
    handle.signal(Approved { by: "ana".into() }).await?;
    handle
        .signal(Rejected {
            reason: "out of stock".into(),
        })
        .await?;
    Ok(())
}

fn main() {
    let _ = reject;
}
