use fluxo::StepError;

#[fluxo::step]
async fn add((a, b): (u32, u32)) -> Result<u32, StepError> {
    Ok(a + b)
}

fn main() {}
