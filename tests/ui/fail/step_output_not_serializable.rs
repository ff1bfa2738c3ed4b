use fluxo::StepError;

pub struct Connection;

#[fluxo::step]
async fn connect() -> Result<Connection, StepError> {
    Ok(Connection)
}

fn main() {}
