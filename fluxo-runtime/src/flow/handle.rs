//! [`FlowHandle`]: a handle to an instance of a builder flow or a DAG.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::DecodeError;
use crate::{Error, Fluxo, HistoryEntry, StartOptions, WorkflowStatus};

/// A handle to one instance of a flow or DAG (JSON in, JSON out), with
/// typed helpers.
#[derive(Debug, Clone)]
pub struct FlowHandle {
    fluxo: Fluxo,
    workflow: String,
    id: String,
}

impl FlowHandle {
    /// Starts an instance of the registered flow or DAG `workflow`.
    pub async fn start(
        fluxo: &Fluxo,
        workflow: &str,
        input: impl Serialize,
        options: StartOptions,
    ) -> Result<FlowHandle, Error> {
        let input = serde_json::to_value(&input).map_err(|e| Error::Encode {
            type_name: std::any::type_name_of_val(&input).to_owned(),
            message: e.to_string(),
        })?;
        let id = fluxo.start_by_name(workflow, input, options).await?;
        Ok(FlowHandle {
            fluxo: fluxo.clone(),
            workflow: workflow.to_owned(),
            id,
        })
    }

    /// A handle to an existing instance of `workflow` (e.g. from another
    /// process).
    pub fn new(fluxo: &Fluxo, workflow: impl Into<String>, id: impl Into<String>) -> Self {
        FlowHandle {
            fluxo: fluxo.clone(),
            workflow: workflow.into(),
            id: id.into(),
        }
    }

    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The flow's (workflow) name.
    pub fn workflow(&self) -> &str {
        &self.workflow
    }

    /// Waits for the instance to finish and returns its output as JSON.
    pub async fn result_value(&self) -> Result<Value, Error> {
        self.fluxo.result_value(&self.id).await
    }

    /// Waits for the instance to finish and decodes its output as `T`.
    pub async fn result<T: DeserializeOwned>(&self) -> Result<T, Error> {
        let value = self.result_value().await?;
        serde_json::from_value(value).map_err(|e| {
            Error::Decode(Box::new(DecodeError {
                workflow: self.workflow.clone(),
                id: self.id.clone(),
                seq: None,
                what: "output".into(),
                type_name: std::any::type_name::<T>().to_owned(),
                message: e.to_string(),
            }))
        })
    }

    /// Like [`FlowHandle::result`], giving up after `timeout`.
    pub async fn result_timeout<T: DeserializeOwned>(&self, timeout: Duration) -> Result<T, Error> {
        match tokio::time::timeout(timeout, self.result()).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                id: self.id.clone(),
            }),
        }
    }

    /// Sends the signal `name` with a JSON payload; durable once this
    /// returns, even if the flow is not waiting for it yet.
    pub async fn signal(&self, name: &str, payload: impl Serialize) -> Result<(), Error> {
        let payload = serde_json::to_value(&payload).map_err(|e| Error::Encode {
            type_name: std::any::type_name_of_val(&payload).to_owned(),
            message: e.to_string(),
        })?;
        self.fluxo.signal_by_name(&self.id, name, payload).await
    }

    /// The instance's current state.
    pub async fn status(&self) -> Result<WorkflowStatus, Error> {
        Ok(self.fluxo.instance(&self.id).await?.status)
    }

    /// Requests cancellation (see [`Fluxo::cancel`]).
    pub async fn cancel(&self) -> Result<(), Error> {
        self.fluxo.cancel(&self.id).await
    }

    /// The instance's journal, decoded.
    pub async fn history(&self) -> Result<Vec<HistoryEntry>, Error> {
        self.fluxo.history(&self.id).await
    }
}
