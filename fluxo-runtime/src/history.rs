//! Journal events: what the engine appends to an instance's history, and
//! how they are encoded for the store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Failure, StepError};
use crate::store::{Millis, StoredEvent};

/// One journal event. Every event belongs to the workflow operation with
/// sequence number `seq` (see [`StoredEvent`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A step succeeded.
    StepCompleted {
        /// Step name.
        name: String,
        /// Its output.
        output: serde_json::Value,
    },
    /// One attempt of a step failed and another will follow at `retry_at`.
    StepAttemptFailed {
        /// Step name.
        name: String,
        /// The attempt that failed, from 1.
        attempt: u32,
        /// Why.
        error: StepError,
        /// When the next attempt may start.
        retry_at: Millis,
    },
    /// A step failed for good (retries exhausted or a fatal error).
    StepFailed {
        /// Step name.
        name: String,
        /// The last error.
        error: StepError,
    },
    /// A durable timer was started.
    TimerStarted {
        /// When it fires.
        fire_at: Millis,
    },
    /// A durable timer fired.
    TimerFired,
    /// A signal wait with a deadline started.
    SignalWaitStarted {
        /// Signal name.
        name: String,
        /// When the wait times out.
        deadline: Millis,
    },
    /// A signal was taken from the inbox.
    SignalReceived {
        /// Signal name.
        name: String,
        /// Its payload.
        payload: serde_json::Value,
    },
    /// A signal wait timed out.
    SignalTimedOut {
        /// Signal name.
        name: String,
    },
    /// A value produced by the context (`now`, `random`, `uuid`).
    ValueRecorded {
        /// Which value.
        what: String,
        /// The value.
        value: serde_json::Value,
    },
    /// A child workflow was started.
    ChildStarted {
        /// Child workflow name.
        workflow: String,
        /// Child instance id.
        child_id: String,
    },
    /// A child workflow finished.
    ChildFinished {
        /// Child instance id.
        child_id: String,
        /// Its output, or why it did not complete.
        outcome: Result<serde_json::Value, Failure>,
    },
    /// The workflow published a value under a key (`ctx.set_event`).
    EventPublished {
        /// The key.
        key: String,
        /// The value.
        value: serde_json::Value,
    },
    /// Marker: the code took the new branch of `ctx.patched(id)` here. Does
    /// not take a sequence number of its own.
    Patched {
        /// The patch id.
        id: String,
    },
    /// Marker: a cancel request stopped the workflow body here and its
    /// cancellation handlers (saga compensations) started. Does not take a
    /// sequence number of its own.
    CancelRequested,
}

impl Event {
    /// The short kind stored beside the encoded event.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::StepCompleted { .. } => "step_completed",
            Event::StepAttemptFailed { .. } => "step_attempt_failed",
            Event::StepFailed { .. } => "step_failed",
            Event::TimerStarted { .. } => "timer_started",
            Event::TimerFired => "timer_fired",
            Event::SignalWaitStarted { .. } => "signal_wait_started",
            Event::SignalReceived { .. } => "signal_received",
            Event::SignalTimedOut { .. } => "signal_timed_out",
            Event::ValueRecorded { .. } => "value_recorded",
            Event::ChildStarted { .. } => "child_started",
            Event::ChildFinished { .. } => "child_finished",
            Event::EventPublished { .. } => "event_published",
            Event::Patched { .. } => "patched",
            Event::CancelRequested => "cancel_requested",
        }
    }

    /// The operation this event belongs to, as compared on replay.
    pub fn operation(&self) -> Operation {
        match self {
            Event::StepCompleted { name, .. }
            | Event::StepAttemptFailed { name, .. }
            | Event::StepFailed { name, .. } => Operation::Step(name.clone()),
            Event::TimerStarted { .. } | Event::TimerFired => Operation::Timer,
            Event::SignalWaitStarted { name, .. }
            | Event::SignalReceived { name, .. }
            | Event::SignalTimedOut { name } => Operation::Signal(name.clone()),
            Event::ValueRecorded { what, .. } => Operation::Value(what.clone()),
            Event::ChildStarted { workflow, .. } => Operation::Child(workflow.clone()),
            Event::ChildFinished { .. } => Operation::Child(String::new()),
            Event::EventPublished { key, .. } => Operation::Publish(key.clone()),
            Event::Patched { id } => Operation::Patch(id.clone()),
            Event::CancelRequested => Operation::Cancel,
        }
    }

    /// Encodes the event for the store.
    pub fn to_stored(&self, event_id: u64, seq: u64) -> StoredEvent {
        to_stored(self, event_id, seq)
    }

    /// Decodes a stored event.
    pub fn from_stored(stored: &StoredEvent) -> Result<Event, String> {
        serde_json::from_slice(&stored.data).map_err(|e| e.to_string())
    }
}

/// What the engine writes to the journal: an [`Event`], or a borrowed form
/// of one that encodes to the same bytes.
pub(crate) trait Entry {
    /// The short kind stored next to the encoding.
    fn kind(&self) -> &'static str;
    /// Appends the JSON encoding to `out`.
    fn encode(&self, out: &mut Vec<u8>);
}

impl Entry for Event {
    fn kind(&self) -> &'static str {
        Event::kind(self)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Event::StepCompleted { name, output } => StepCompletedRef { name, output }.encode(out),
            // Serializing this enum of owned, string-keyed data into memory
            // cannot fail.
            _ => {
                let _ = serde_json::to_writer(out, self);
            }
        }
    }
}

/// [`Event::StepCompleted`] borrowed from the step that just ran: the entry
/// of almost every step, written without building the event.
pub(crate) struct StepCompletedRef<'a> {
    pub name: &'a str,
    pub output: &'a serde_json::Value,
}

impl Entry for StepCompletedRef<'_> {
    fn kind(&self) -> &'static str {
        "step_completed"
    }

    /// The same bytes as the derived encoding of the event (a test holds
    /// them equal), written directly instead of through a map serializer
    /// for the tag and field names.
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"type":"step_completed","name":"#);
        write_json_str(out, self.name);
        out.extend_from_slice(br#","output":"#);
        // JSON values encode into memory without failing.
        let _ = serde_json::to_writer(&mut *out, self.output);
        out.push(b'}');
    }
}

/// Appends `s` as a JSON string, as `serde_json` writes it: copied as it
/// is when nothing in it needs escaping (a step's name, almost always).
fn write_json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Strings encode into memory without failing.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// `entry` encoded for the store as journal entry `event_id` of operation
/// `seq`.
pub(crate) fn to_stored(entry: &(impl Entry + ?Sized), event_id: u64, seq: u64) -> StoredEvent {
    thread_local! {
        /// Encoding buffer, kept between calls: an entry is encoded without
        /// growing a fresh buffer step by step, then copied out at its
        /// exact size.
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let data = BUFFER.with_borrow_mut(|buffer| {
        buffer.clear();
        entry.encode(buffer);
        let data = buffer.to_vec();
        // Not kept large after an outsized entry.
        buffer.shrink_to(1024);
        data
    });
    StoredEvent {
        event_id,
        seq,
        kind: std::borrow::Cow::Borrowed(entry.kind()),
        data,
    }
}

/// A workflow operation, as identified for determinism checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// A step with its name.
    Step(String),
    /// A durable timer.
    Timer,
    /// A signal wait for the named signal.
    Signal(String),
    /// A recorded value (`now`, `random`, `uuid`).
    Value(String),
    /// A child workflow of the named workflow.
    Child(String),
    /// `ctx.set_event` with the key.
    Publish(String),
    /// A `ctx.patched` marker.
    Patch(String),
    /// The cancellation marker.
    Cancel,
}

impl Operation {
    /// Whether a journaled operation matches the one the code issued.
    pub(crate) fn matches(&self, issued: &Operation) -> bool {
        match (self, issued) {
            // A `ChildFinished` alone does not name the workflow.
            (Operation::Child(a), Operation::Child(b)) => a.is_empty() || a == b,
            // A wait for any of `a|b|c` records the name that came.
            (Operation::Signal(got), Operation::Signal(waited)) => {
                got == waited || waited.split('|').any(|n| n == got)
            }
            (a, b) => a == b,
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Operation::Step(n) => write!(f, "step `{n}`"),
            Operation::Timer => f.write_str("a timer"),
            Operation::Signal(n) => write!(f, "a wait for signal `{n}`"),
            Operation::Value(w) => write!(f, "ctx.{w}()"),
            Operation::Child(w) => write!(f, "child workflow `{w}`"),
            Operation::Publish(k) => write!(f, "ctx.set_event(\"{k}\")"),
            Operation::Patch(id) => write!(f, "patch marker `{id}`"),
            Operation::Cancel => f.write_str("the cancellation marker"),
        }
    }
}

/// The decoded journal of an instance being replayed, grouped by operation.
/// Markers (patches, cancellation) are kept apart: they do not take
/// sequence numbers.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    by_seq: BTreeMap<u64, Vec<Event>>,
    patches: BTreeMap<u64, Vec<String>>,
    cancel_at: Option<u64>,
}

impl Replay {
    /// Groups decoded events by sequence number.
    pub(crate) fn new(events: Vec<(u64, Event)>) -> Self {
        let mut replay = Replay::default();
        for (seq, e) in events {
            match e {
                Event::Patched { id } => replay.patches.entry(seq).or_default().push(id),
                Event::CancelRequested => replay.cancel_at = Some(seq),
                e => replay.by_seq.entry(seq).or_default().push(e),
            }
        }
        replay
    }

    /// Takes the recorded events of operation `seq`.
    pub(crate) fn take(&mut self, seq: u64) -> Vec<Event> {
        self.by_seq.remove(&seq).unwrap_or_default()
    }

    /// Whether patch `id` was marked before operation `seq`.
    pub(crate) fn has_patch(&self, seq: u64, id: &str) -> bool {
        self.patches
            .get(&seq)
            .is_some_and(|ids| ids.iter().any(|p| p == id))
    }

    /// Whether the journal holds operations at or after `seq` (the code is
    /// still replaying, not at the live edge).
    pub(crate) fn has_from(&self, seq: u64) -> bool {
        self.by_seq.range(seq..).next().is_some()
    }

    /// Where a cancel request stopped the workflow body, if it did.
    pub(crate) fn cancel_at(&self) -> Option<u64> {
        self.cancel_at
    }

    /// The smallest sequence number still not replayed.
    pub(crate) fn first_pending(&self) -> Option<(u64, Operation)> {
        self.by_seq
            .first_key_value()
            .and_then(|(s, es)| es.first().map(|e| (*s, e.operation())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_completed_is_encoded_as_derived() {
        let names = [
            "charge",
            "",
            "quo\"te",
            "back\\slash",
            "ctl\u{1}\n\t",
            "ünï😀",
            "del\u{7f}",
            "unit\u{1f}sep",
            "a b",
        ];
        let outputs = [
            serde_json::json!(null),
            serde_json::json!(7),
            serde_json::json!(-1.5e300),
            serde_json::json!("a \"string\"\n"),
            serde_json::json!([1, "two", {"three": [3.0]}]),
            serde_json::json!({"id": 7, "nested": {"b": true, "a": [null]}, "é": "😀"}),
        ];
        for name in names {
            for output in &outputs {
                let e = Event::StepCompleted {
                    name: name.to_owned(),
                    output: output.clone(),
                };
                let mut fast = Vec::new();
                Entry::encode(&e, &mut fast);
                let mut borrowed = Vec::new();
                StepCompletedRef { name, output }.encode(&mut borrowed);
                assert_eq!(fast, borrowed);
                let derived = serde_json::to_vec(&e).unwrap();
                assert_eq!(
                    String::from_utf8(fast).unwrap(),
                    String::from_utf8(derived).unwrap()
                );
                assert_eq!(Event::from_stored(&e.to_stored(0, 0)).unwrap(), e);
            }
        }
    }

    #[test]
    fn events_round_trip_through_the_store_encoding() {
        let e = Event::StepCompleted {
            name: "charge".into(),
            output: serde_json::json!({"id": 7}),
        };
        let stored = e.to_stored(3, 2);
        assert_eq!(stored.kind, "step_completed");
        assert_eq!((stored.event_id, stored.seq), (3, 2));
        assert_eq!(Event::from_stored(&stored).unwrap(), e);
    }

    #[test]
    fn child_finished_matches_any_child_operation() {
        let op = Event::ChildFinished {
            child_id: "c".into(),
            outcome: Ok(serde_json::Value::Null),
        }
        .operation();
        assert!(op.matches(&Operation::Child("x".into())));
        assert!(!op.matches(&Operation::Timer));
    }
}
