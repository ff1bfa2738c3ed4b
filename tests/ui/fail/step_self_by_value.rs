use fluxo::StepError;

#[derive(Clone)]
pub struct Mailer {
    pub from: String,
}

impl Mailer {
    #[fluxo::step]
    pub async fn send(self, to: String) -> Result<usize, StepError> {
        Ok(self.from.len() + to.len())
    }
}

fn main() {}
