//! Error types: what the API returns ([`Error`]), what a step fails with
//! ([`StepError`]), what a workflow fails with ([`WorkflowError`]), and the
//! stored form of an instance's failure ([`Failure`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::store::{InstanceStatus, StoreError};

/// An error returned by the Fluxo API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No workflow with that name (and version) is registered.
    #[error("unknown workflow {name:?}{}: register it with `fluxo.register(..)` first", version.map(|v| format!(" version {v}")).unwrap_or_default())]
    UnknownWorkflow {
        /// Workflow name.
        name: String,
        /// Workflow version, when one was asked for.
        version: Option<u32>,
    },
    /// No instance with that id.
    #[error("no workflow instance with id {id:?}")]
    NotFound {
        /// Instance id.
        id: String,
    },
    /// An instance exists with that id but runs another workflow.
    #[error("instance {id:?} runs workflow {found:?}, not {expected:?}")]
    WorkflowMismatch {
        /// Instance id.
        id: String,
        /// The workflow the caller expected.
        expected: String,
        /// The workflow the instance runs.
        found: String,
    },
    /// The instance has finished and takes no signals.
    #[error("workflow instance {id:?} has already finished ({status}); signal {signal:?} was not delivered")]
    WorkflowFinished {
        /// Instance id.
        id: String,
        /// Its final state.
        status: InstanceStatus,
        /// The signal that was refused.
        signal: String,
    },
    /// A payload could not be decoded into the expected type.
    #[error(transparent)]
    Decode(Box<DecodeError>),
    /// A value could not be encoded.
    #[error("cannot encode `{type_name}`: {message}")]
    Encode {
        /// The Rust type.
        type_name: String,
        /// The encoder's message.
        message: String,
    },
    /// The workflow code issued other operations than its journal holds.
    #[error(transparent)]
    NonDeterminism(Box<NonDeterminismError>),
    /// The instance's journal was written by an incompatible build.
    #[error("instance {id:?} was written with history format {found}; this build reads format {supported}")]
    IncompatibleHistory {
        /// Instance id.
        id: String,
        /// Format found.
        found: u32,
        /// Format this build supports.
        supported: u32,
    },
    /// The workflow returned an error.
    #[error("workflow {workflow:?} instance {id:?} failed: {error}")]
    WorkflowFailed {
        /// Workflow name.
        workflow: String,
        /// Instance id.
        id: String,
        /// The workflow's error.
        error: Box<WorkflowError>,
    },
    /// The workflow was cancelled.
    #[error("workflow {workflow:?} instance {id:?} was cancelled")]
    Cancelled {
        /// Workflow name.
        workflow: String,
        /// Instance id.
        id: String,
    },
    /// Waiting for a result timed out.
    #[error("timed out waiting for workflow instance {id:?}")]
    Timeout {
        /// Instance id.
        id: String,
    },
    /// The storage backend failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A payload that does not decode into the expected type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {what} of workflow {workflow:?} (instance {id:?}{}) as `{type_name}`: {message}", seq.map(|s| format!(", seq {s}")).unwrap_or_default())]
pub struct DecodeError {
    /// Workflow name.
    pub workflow: String,
    /// Instance id.
    pub id: String,
    /// Journal sequence number, when the payload came from the journal.
    pub seq: Option<u64>,
    /// What was decoded: `input`, `output`, `signal `Approved``, ...
    pub what: String,
    /// The Rust type asked for.
    pub type_name: String,
    /// The decoder's message.
    pub message: String,
}

/// Workflow code that issued other operations than its journal holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("non-determinism in workflow {workflow:?} instance {id:?} at seq {seq}: the journal holds {expected} but the code issued {found}")]
pub struct NonDeterminismError {
    /// Workflow name.
    pub workflow: String,
    /// Instance id.
    pub id: String,
    /// Sequence number of the mismatch.
    pub seq: u64,
    /// What the journal holds.
    pub expected: String,
    /// What the code issued.
    pub found: String,
}

/// How a step failure is classified for retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Retryable {
    /// The policy decides (default).
    Yes,
    /// Never retried, whatever the policy says.
    No,
}

/// The error of a step.
///
/// Any `std::error::Error` converts into it with `?` (as a retryable error
/// whose kind is the error's type name). Use [`StepError::fatal`] for errors
/// that must not be retried, or list kinds in the retry policy's
/// `non_retryable`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct StepError {
    kind: String,
    message: String,
    retryable: Retryable,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    details: Option<serde_json::Value>,
}

impl StepError {
    /// A retryable error with a message.
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError {
            kind: "Error".into(),
            message: message.into(),
            retryable: Retryable::Yes,
            details: None,
        }
    }

    /// An error that is never retried.
    pub fn fatal(message: impl Into<String>) -> Self {
        StepError {
            retryable: Retryable::No,
            ..StepError::retryable(message)
        }
    }

    /// Sets the kind, which retry policies match in `non_retryable`.
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = kind.into();
        self
    }

    /// Attaches structured details, kept in the journal.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The error kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Structured details, if any.
    pub fn details(&self) -> Option<&serde_json::Value> {
        self.details.as_ref()
    }

    /// Whether the error itself forbids retrying.
    pub fn is_fatal(&self) -> bool {
        self.retryable == Retryable::No
    }

    pub(crate) fn timed_out(after: std::time::Duration) -> Self {
        StepError::retryable(format!("step timed out after {after:?}")).with_kind("Timeout")
    }
}

impl fmt::Debug for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if self.is_fatal() {
            f.write_str(" (not retryable)")?;
        }
        Ok(())
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for StepError {
    fn from(e: E) -> Self {
        let kind = short_type_name(std::any::type_name::<E>());
        StepError::retryable(e.to_string()).with_kind(kind)
    }
}

/// The error a workflow fails with.
///
/// Step errors, signal time-outs and any `std::error::Error` convert into it
/// with `?`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowError {
    kind: String,
    message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    step: Option<StepError>,
}

impl WorkflowError {
    /// A workflow error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        WorkflowError {
            kind: "Error".into(),
            message: message.into(),
            step: None,
        }
    }

    /// Sets the kind.
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = kind.into();
        self
    }

    /// The kind: `StepFailed`, `Timeout`, `ChildFailed`, or a user kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The step error this came from, if any.
    pub fn step_error(&self) -> Option<&StepError> {
        self.step.as_ref()
    }
}

impl fmt::Debug for WorkflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl From<StepError> for WorkflowError {
    fn from(e: StepError) -> Self {
        WorkflowError {
            kind: "StepFailed".into(),
            message: e.to_string(),
            step: Some(e),
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for WorkflowError {
    fn from(e: E) -> Self {
        WorkflowError::new(e.to_string()).with_kind(short_type_name(std::any::type_name::<E>()))
    }
}

impl From<WorkflowError> for Box<dyn std::error::Error + Send + Sync> {
    fn from(e: WorkflowError) -> Self {
        e.to_string().into()
    }
}

impl From<StepError> for Box<dyn std::error::Error + Send + Sync> {
    fn from(e: StepError) -> Self {
        e.to_string().into()
    }
}

/// Why an instance did not complete, as stored with the instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "failure", rename_all = "snake_case")]
pub enum Failure {
    /// The workflow function returned an error.
    Workflow {
        /// The error.
        error: WorkflowError,
    },
    /// The code diverged from the journal.
    NonDeterminism {
        /// Sequence number.
        seq: u64,
        /// What the journal holds.
        expected: String,
        /// What the code issued.
        found: String,
    },
    /// A payload did not decode.
    Decode {
        /// Sequence number, when from the journal.
        seq: Option<u64>,
        /// What was decoded.
        what: String,
        /// Expected type.
        type_name: String,
        /// Decoder message.
        message: String,
    },
    /// The history was written by an incompatible build.
    IncompatibleHistory {
        /// Format found.
        found: u32,
        /// Format supported.
        supported: u32,
    },
    /// The instance was cancelled.
    Cancelled,
}

impl Failure {
    /// Turns a stored failure into the API error for instance `id`.
    pub fn into_error(self, workflow: &str, id: &str) -> Error {
        let (workflow, id) = (workflow.to_owned(), id.to_owned());
        match self {
            Failure::Workflow { error } => Error::WorkflowFailed {
                workflow,
                id,
                error: Box::new(error),
            },
            Failure::NonDeterminism {
                seq,
                expected,
                found,
            } => Error::NonDeterminism(Box::new(NonDeterminismError {
                workflow,
                id,
                seq,
                expected,
                found,
            })),
            Failure::Decode {
                seq,
                what,
                type_name,
                message,
            } => Error::Decode(Box::new(DecodeError {
                workflow,
                id,
                seq,
                what,
                type_name,
                message,
            })),
            Failure::IncompatibleHistory { found, supported } => Error::IncompatibleHistory {
                id,
                found,
                supported,
            },
            Failure::Cancelled => Error::Cancelled { workflow, id },
        }
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match self {
            Failure::Workflow { error } => error.to_string(),
            Failure::NonDeterminism {
                seq,
                expected,
                found,
            } => format!(
                "non-determinism at seq {seq}: journal holds {expected}, code issued {found}"
            ),
            Failure::Decode {
                what,
                type_name,
                message,
                ..
            } => format!("cannot decode {what} as `{type_name}`: {message}"),
            Failure::IncompatibleHistory { found, supported } => {
                format!("history format {found} is not supported (this build reads {supported})")
            }
            Failure::Cancelled => "cancelled".into(),
        }
    }
}

/// `my_crate::module::MyError<T>` -> `MyError`.
fn short_type_name(full: &str) -> String {
    let base = full.split('<').next().unwrap_or(full);
    base.rsplit("::").next().unwrap_or(base).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_convert_with_their_type_as_kind() {
        let e: StepError = std::io::Error::other("disk").into();
        assert_eq!(e.kind(), "Error");
        assert_eq!(e.message(), "disk");
        assert!(!e.is_fatal());
        let e: StepError = "x".parse::<u32>().unwrap_err().into();
        assert_eq!(e.kind(), "ParseIntError");
    }

    #[test]
    fn step_errors_become_workflow_errors_with_the_cause() {
        let w: WorkflowError = StepError::fatal("declined").with_kind("Declined").into();
        assert_eq!(w.kind(), "StepFailed");
        assert_eq!(w.step_error().map(|s| s.kind()), Some("Declined"));
    }
}
