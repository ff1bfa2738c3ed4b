//! [`LocalRunner`](crate::testing::LocalRunner) wires the engine, an in-memory store and a worker in one call.

use std::time::Duration;

use crate::{Error, Fluxo, Worker, Workflow};

/// A Fluxo on the in-memory backend with a running worker, for tests.
///
/// ```
/// # use fluxo::prelude::*;
/// # #[fluxo::workflow]
/// # async fn hello(_ctx: WorkflowContext, name: String) -> Result<String, WorkflowError> {
/// #     Ok(format!("hello {name}"))
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), fluxo::Error> {
/// let runner = fluxo::testing::LocalRunner::new().register(Hello)?.start();
/// let h = Hello::start(runner.fluxo(), "ana".to_string()).await?;
/// assert_eq!(h.result().await?, "hello ana");
/// runner.shutdown().await;
/// # Ok(()) }
/// ```
pub struct LocalRunner {
    fluxo: Fluxo,
    worker: Option<Worker>,
}

impl Default for LocalRunner {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalRunner {
    /// A runner on a fresh in-memory store.
    pub fn new() -> Self {
        LocalRunner {
            fluxo: Fluxo::in_memory(),
            worker: None,
        }
    }

    /// A runner on an existing Fluxo (any backend).
    pub fn on(fluxo: Fluxo) -> Self {
        LocalRunner {
            fluxo,
            worker: None,
        }
    }

    /// Registers a workflow.
    pub fn register<W: Workflow>(self, workflow: W) -> Result<Self, Error> {
        self.fluxo.register(workflow)?;
        Ok(self)
    }

    /// Starts the worker (short lease and poll interval, suited to tests).
    pub fn start(mut self) -> Self {
        self.worker = Some(
            self.fluxo
                .worker()
                .lease(Duration::from_secs(5))
                .poll_interval(Duration::from_millis(10))
                .spawn(),
        );
        self
    }

    /// The Fluxo handle.
    pub fn fluxo(&self) -> &Fluxo {
        &self.fluxo
    }

    /// Stops the worker.
    pub async fn shutdown(mut self) {
        if let Some(w) = self.worker.take() {
            w.shutdown().await;
        }
    }
}
