use fluxo::{WorkflowContext, WorkflowError};

mod uuid {
    pub struct Uuid(pub u128);

    impl Uuid {
        pub fn new_v4() -> Uuid {
            Uuid(4)
        }
    }
}

use uuid::Uuid;

#[fluxo::workflow]
async fn open_account(_ctx: WorkflowContext) -> Result<u128, WorkflowError> {
    let id = Uuid::new_v4();
    Ok(id.0)
}

fn main() {}
