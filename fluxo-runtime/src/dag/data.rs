//! Data a DAG's nodes share: typed keys into [`WorkflowData`], the
//! [`NodeCtx`] a node runs with, and the [`DagOutput`] of a finished DAG.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::middleware_builtin::StepInput;
use crate::StepError;

/// A typed key into [`WorkflowData`]: `const TOTAL: Key<u64> = Key::new("total");`.
pub struct Key<T> {
    name: &'static str,
    _t: PhantomData<fn() -> T>,
}

impl<T> Key<T> {
    /// A key named `name`.
    pub const fn new(name: &'static str) -> Self {
        Key {
            name,
            _t: PhantomData,
        }
    }

    /// The key's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl<T> Clone for Key<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Key<T> {}

impl<T> std::fmt::Debug for Key<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key<{}>({:?})", std::any::type_name::<T>(), self.name)
    }
}

/// Values shared by a DAG's nodes under typed [`Key`]s, stored as JSON.
///
/// A node writes with [`NodeCtx::set`]; its writes are journaled with its
/// output, so the data is rebuilt identically on replay. A node sees the
/// writes of the nodes it (transitively) depends on, applied in dependency
/// order; the [`DagOutput`] holds the writes of every node that completed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkflowData {
    values: BTreeMap<String, Value>,
}

impl WorkflowData {
    /// Empty data.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value under `key`, if present and of type `T`.
    pub fn get<T: DeserializeOwned>(&self, key: &Key<T>) -> Option<T> {
        self.values
            .get(key.name)
            .and_then(|v| T::deserialize(v).ok())
    }

    /// The value under `key`, or `default`.
    pub fn get_or<T: DeserializeOwned>(&self, key: &Key<T>, default: T) -> T {
        self.get(key).unwrap_or(default)
    }

    /// Stores `value` under `key` (a value that cannot be encoded as JSON
    /// is stored as `null`).
    pub fn set<T: Serialize>(&mut self, key: &Key<T>, value: T) {
        let v = serde_json::to_value(&value).unwrap_or(Value::Null);
        self.values.insert(key.name.to_owned(), v);
    }

    /// Whether a value is stored under `key`.
    pub fn contains<T>(&self, key: &Key<T>) -> bool {
        self.values.contains_key(key.name)
    }

    /// The raw JSON value stored under a key name.
    pub fn raw(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    /// Every key name and raw value, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub(crate) fn apply(&mut self, writes: &BTreeMap<String, Value>) {
        for (k, v) in writes {
            self.values.insert(k.clone(), v.clone());
        }
    }
}

/// What a node sees: frozen when it is scheduled.
pub(crate) struct NodeView {
    pub node: String,
    pub input: Value,
    pub outputs: BTreeMap<String, Value>,
    pub data: WorkflowData,
}

/// What a DAG node runs with: the DAG's input, the outputs of the nodes it
/// depends on (directly or not), the shared [`WorkflowData`], and a way to
/// write to it.
#[derive(Clone)]
pub struct NodeCtx {
    view: Arc<NodeView>,
    writes: Arc<Mutex<BTreeMap<String, Value>>>,
}

impl std::fmt::Debug for NodeCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCtx")
            .field("node", &self.view.node)
            .field("input", &self.view.input)
            .finish()
    }
}

impl NodeCtx {
    pub(crate) fn new(view: Arc<NodeView>) -> Self {
        NodeCtx {
            view,
            writes: Arc::default(),
        }
    }

    fn writes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Value>> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn take_writes(&self) -> BTreeMap<String, Value> {
        std::mem::take(&mut *self.writes())
    }

    /// The node's name.
    pub fn node(&self) -> &str {
        &self.view.node
    }

    /// The DAG's input.
    pub fn input(&self) -> &Value {
        &self.view.input
    }

    /// The DAG's input decoded as `T` (a fatal step error if it does not
    /// decode).
    pub fn input_as<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        T::deserialize(&self.view.input).map_err(|e| {
            StepError::fatal(format!(
                "node {}: cannot decode the DAG input as `{}`: {e}",
                self.view.node,
                std::any::type_name::<T>()
            ))
            .with_kind("Decode")
        })
    }

    /// The output of `node`, if this node depends on it (directly or
    /// through others) and it completed.
    pub fn output(&self, node: &str) -> Option<&Value> {
        self.view.outputs.get(node)
    }

    /// The output of `node` decoded as `T`; a fatal step error if it is
    /// missing or does not decode.
    pub fn output_as<T: DeserializeOwned>(&self, node: &str) -> Result<T, StepError> {
        let v = self.output(node).ok_or_else(|| {
            StepError::fatal(format!(
                "node {} has no output of node {node:?} (not an upstream node, bypassed or failed)",
                self.view.node
            ))
            .with_kind("MissingOutput")
        })?;
        T::deserialize(v).map_err(|e| {
            StepError::fatal(format!(
                "node {}: cannot decode the output of {node:?} as `{}`: {e}",
                self.view.node,
                std::any::type_name::<T>()
            ))
            .with_kind("Decode")
        })
    }

    /// The shared data as this node sees it (without its own writes).
    pub fn data(&self) -> &WorkflowData {
        &self.view.data
    }

    /// The value under `key`: this node's own write if any, else the shared
    /// data's.
    pub fn get<T: DeserializeOwned>(&self, key: &Key<T>) -> Option<T> {
        if let Some(v) = self.writes().get(key.name) {
            return T::deserialize(v).ok();
        }
        self.view.data.get(key)
    }

    /// The value under `key`, or `default`.
    pub fn get_or<T: DeserializeOwned>(&self, key: &Key<T>, default: T) -> T {
        self.get(key).unwrap_or(default)
    }

    /// Writes `value` under `key`. The write is journaled with the node's
    /// output and seen by the nodes downstream of this one.
    pub fn set<T: Serialize>(&self, key: &Key<T>, value: T) {
        let v = serde_json::to_value(&value).unwrap_or(Value::Null);
        self.writes().insert(key.name.to_owned(), v);
    }
}

impl StepInput for NodeCtx {
    fn input_value(&self) -> Value {
        self.view.input.clone()
    }
}

/// What a compensation runs with: the node it undoes and that node's
/// output.
#[derive(Debug, Clone)]
pub struct Compensation {
    pub(crate) node: String,
    pub(crate) input: Value,
    pub(crate) output: Value,
}

impl Compensation {
    /// The node being compensated.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The DAG's input.
    pub fn input(&self) -> &Value {
        &self.input
    }

    /// The output the node produced.
    pub fn output(&self) -> &Value {
        &self.output
    }
}

/// The output of a DAG run (decode it with
/// [`FlowHandle::result`](crate::flow::FlowHandle::result)).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DagOutput {
    /// Output of every node that completed, by name (a choice node's
    /// output is the name of the branch it took, or `null`).
    pub outputs: BTreeMap<String, Value>,
    /// The shared data after every completed node's writes.
    pub data: WorkflowData,
    /// Nodes that did not run because a choice did not take them (or all
    /// their dependencies were bypassed), in declaration order.
    pub bypassed: Vec<String>,
    /// Nodes that failed but were allowed to (`continue_on_error`), with
    /// their error.
    pub failed: BTreeMap<String, String>,
}

impl DagOutput {
    /// The output of `node`, if it completed.
    pub fn output(&self, node: &str) -> Option<&Value> {
        self.outputs.get(node)
    }

    /// The value under `key` in the final data.
    pub fn get<T: DeserializeOwned>(&self, key: &Key<T>) -> Option<T> {
        self.data.get(key)
    }
}
