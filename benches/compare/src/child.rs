//! The child process: runs one workload of one engine on one target and
//! prints its result as one `RESULT <json>` line. A recovery "load" child
//! starts its workflows and SIGKILLs itself half-way through their steps,
//! after printing `KILLED <steps run>`.

use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::common::{self, CellResult, Engine, Params, Spec};

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Notes the start of the process (call first thing in `main`).
pub fn mark_process_start() {
    let _ = PROCESS_START.get_or_init(Instant::now);
}

pub fn run_child(spec_json: &str) -> Result<()> {
    let spec: Spec = serde_json::from_str(spec_json)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        match spec.engine {
            Engine::Fluxo => crate::fluxo_engine::run(&spec).await,
            Engine::Durare => crate::durare_engine::run(&spec).await,
            Engine::Duroxide => crate::duroxide_engine::run(&spec).await,
        }
    });
    let result = result.unwrap_or_else(|e| CellResult {
        error: Some(format!("{e:#}")),
        ..Default::default()
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "RESULT {}", serde_json::to_string(&result)?)?;
    out.flush()?;
    drop(out);
    // Engines may keep background tasks that do not end on their own.
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(0);
}

/// In a recovery "load" child, once every workflow has been started (with
/// the step gate closed, so none ran yet): opens the gate, and the step that
/// completes half of all steps SIGKILLs the process.
pub async fn kill_midway(p: &Params) -> ! {
    common::kill_at(p.rec_workflows as u64 * p.rec_steps as u64 / 2);
    common::open_gate();
    let end = common::deadline(p.budget_s);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "STALLED {}", common::steps_run());
    let _ = out.flush();
    drop(out);
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// In a recovery "resume" child: records the time from process start until
/// every workflow finished.
pub fn resume_done(r: &mut CellResult) {
    let start = PROCESS_START.get().copied().unwrap_or_else(Instant::now);
    r.set("resume_s", start.elapsed().as_secs_f64());
    r.set("steps_in_resume", common::steps_run() as f64);
}
