use fluxo::{WorkflowContext, WorkflowError};

mod rand {
    pub struct ThreadRng;

    impl ThreadRng {
        pub fn next_u32(&mut self) -> u32 {
            4
        }
    }

    pub fn thread_rng() -> ThreadRng {
        ThreadRng
    }
}

#[fluxo::workflow]
async fn roll(_ctx: WorkflowContext) -> Result<u32, WorkflowError> {
    let mut rng = rand::thread_rng();
    Ok(rng.next_u32() % 6 + 1)
}

fn main() {}
