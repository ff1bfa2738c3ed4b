use fluxo::{WorkflowContext, WorkflowError};

mod chrono {
    pub struct Utc;

    impl Utc {
        pub fn now() -> u64 {
            0
        }
    }
}

#[fluxo::workflow]
async fn stamp(_ctx: WorkflowContext) -> Result<u64, WorkflowError> {
    Ok(chrono::Utc::now())
}

fn main() {}
