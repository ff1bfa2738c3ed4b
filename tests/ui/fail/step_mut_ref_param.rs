use fluxo::StepError;

#[fluxo::step]
async fn fill(buffer: &mut Vec<u8>) -> Result<(), StepError> {
    buffer.push(1);
    Ok(())
}

fn main() {}
