use fluxo::StepError;

#[fluxo::step(timeout = "10 parsecs")]
async fn charge(cents: u64) -> Result<u64, StepError> {
    Ok(cents)
}

fn main() {}
