//! Small builders the backends' own tests share (the behavioural checks
//! every backend runs live in [`conformance`](super::conformance)).

use std::time::Duration;

use super::{ClaimRequest, ClaimedInstance, Commit, NewInstance, StoredEvent, Transition};

/// A fresh instance of `workflow`, version 1.
pub(crate) fn new_instance(workflow: &str) -> NewInstance {
    NewInstance {
        id: uuid::Uuid::new_v4().to_string(),
        workflow: workflow.to_owned(),
        version: 1,
        input: b"in".to_vec(),
        parent_id: None,
    }
}

/// A claim of up to `limit` instances of `workflow` (version 1) by a fresh
/// owner.
pub(crate) fn claim_request(workflow: &str, limit: usize, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        owner: uuid::Uuid::new_v4().to_string(),
        workflows: vec![(workflow.to_owned(), 1)],
        limit,
        lease,
    }
}

/// Journal entry `event_id`, with bytes that are not valid text.
pub(crate) fn event(event_id: u64) -> StoredEvent {
    StoredEvent {
        event_id,
        seq: event_id,
        kind: "step_completed".into(),
        data: vec![event_id as u8, 0, 255],
    }
}

/// A commit under `c`'s lease.
pub(crate) fn commit(
    c: &ClaimedInstance,
    events: Vec<StoredEvent>,
    transition: Transition,
) -> Commit {
    Commit {
        instance_id: c.record.id.as_str().into(),
        lease_token: c.lease_token,
        events: events.into(),
        transition,
        ..Commit::default()
    }
}
