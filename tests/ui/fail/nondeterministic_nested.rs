use fluxo::{StepError, WorkflowContext, WorkflowError};

#[fluxo::workflow]
async fn audit(_ctx: WorkflowContext, ids: Vec<u64>) -> Result<Vec<u64>, WorkflowError> {
    // Every offending call is reported, wherever it hides; steps may use them.
    #[fluxo::step]
    async fn stamp() -> Result<u64, StepError> {
        Ok(std::time::SystemTime::now()
            .elapsed()
            .map(|d| d.as_secs())
            .unwrap_or(0))
    }
    let later = || async { tokio::time::sleep(std::time::Duration::from_millis(1)).await };
    later().await;
    println!("{:?}", std::time::Instant::now());
    let _ = stamp().await?;
    Ok(ids)
}

fn main() {}
