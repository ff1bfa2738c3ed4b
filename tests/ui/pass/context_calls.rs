//! A workflow body that uses the context's journaled equivalents of the clock,
//! randomness, ids, timers, signal waits and concurrency: none of them trips
//! the determinism check, and neither do steps that read the clock.
#![deny(warnings)]

use std::time::{SystemTime, UNIX_EPOCH};

use fluxo::prelude::*;

#[fluxo::signal]
#[derive(Debug, Serialize, Deserialize)]
pub struct Approved {
    pub by: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Summary {
    pub started: String,
    pub roll: u64,
    pub id: String,
    pub approved_by: Option<String>,
    pub stamps: (u64, u64),
}

#[fluxo::step]
async fn stamp(label: &str) -> Result<u64, StepError> {
    let _ = label;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| StepError::fatal(e.to_string()))?;
    Ok(now.as_secs())
}

#[fluxo::workflow(signals(Approved))]
async fn audited(ctx: WorkflowContext) -> Result<Summary, WorkflowError> {
    let started = ctx.now().await.to_rfc3339();
    let roll = ctx.random().await % 6;
    let id = ctx.uuid().await.to_string();
    ctx.sleep(hours(1)).await;
    let approved_by = match ctx.wait::<Approved>().timeout(days(2)).await {
        Ok(approved) => Some(approved.by),
        Err(_) => None,
    };
    let (a, b) = ctx.join(stamp("a"), stamp("b")).await;
    Ok(Summary {
        started,
        roll,
        id,
        approved_by,
        stamps: (a?, b?),
    })
}

fn main() {
    let _ = Audited;
}
