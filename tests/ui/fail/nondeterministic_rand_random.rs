use fluxo::{WorkflowContext, WorkflowError};

mod rand {
    pub fn random<T: Default>() -> T {
        T::default()
    }
}

#[fluxo::workflow]
async fn pick(_ctx: WorkflowContext, choices: Vec<String>) -> Result<String, WorkflowError> {
    let index = rand::random::<usize>() % choices.len().max(1);
    Ok(choices.get(index).cloned().unwrap_or_default())
}

fn main() {}
