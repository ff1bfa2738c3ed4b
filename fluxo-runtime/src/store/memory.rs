//! In-memory backend: everything behind one mutex. For tests and for
//! workflows that need no durability across process restarts.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::*;

/// A [`Store`] that keeps everything in process memory.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// By id. Hashed with a fast seeded hasher: every commit looks its
    /// instance up. The id is shared with `order` and `live`.
    instances: HashMap<Arc<str>, Instance, foldhash::fast::RandomState>,
    /// Creation order, for listing newest first.
    order: Vec<Arc<str>>,
    /// The instances not finished, by position in `order`: all a claim or
    /// a lease renewal has to look at, so their cost does not grow with
    /// the number of finished instances kept.
    live: BTreeMap<usize, Arc<str>>,
    next_signal_id: u64,
}

struct Instance {
    /// Position in [`State::order`].
    position: usize,
    record: InstanceRecord,
    history: Vec<StoredEvent>,
    inbox: BTreeMap<u64, (String, Vec<u8>)>,
    ready_at: Option<Millis>,
    lease_owner: Option<String>,
    lease_expires_at: Millis,
    lease_token: u64,
    inbox_seq: u64,
}

impl MemoryStore {
    /// Creates an empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of
        // plain data; the state itself is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Instance {
    fn new(new: NewInstance, position: usize, now: Millis) -> Self {
        Instance {
            position,
            record: InstanceRecord {
                id: new.id,
                workflow: new.workflow,
                version: new.version,
                status: InstanceStatus::Running,
                input: new.input,
                output: None,
                failure: None,
                parent_id: new.parent_id,
                cancel_requested: false,
                history_format: HISTORY_FORMAT,
                created_at: now,
                updated_at: now,
            },
            history: Vec::new(),
            inbox: BTreeMap::new(),
            ready_at: Some(now),
            lease_owner: None,
            lease_expires_at: 0,
            lease_token: 0,
            inbox_seq: 0,
        }
    }

    fn wake(&mut self, now: Millis) {
        self.inbox_seq += 1;
        self.ready_at = Some(now);
        self.record.updated_at = now;
    }

    fn finish(&mut self, status: InstanceStatus, now: Millis) {
        self.record.status = status;
        self.record.updated_at = now;
        self.lease_owner = None;
        self.ready_at = None;
        self.inbox.clear();
    }
}

impl State {
    fn insert(&mut self, new: NewInstance, now: Millis) -> CreateOutcome {
        if let Some(existing) = self.instances.get(new.id.as_str()) {
            return CreateOutcome::Existing(existing.record.clone());
        }
        let position = self.order.len();
        let id: Arc<str> = new.id.as_str().into();
        self.order.push(Arc::clone(&id));
        self.live.insert(position, Arc::clone(&id));
        self.instances.insert(id, Instance::new(new, position, now));
        CreateOutcome::Created
    }

    fn request_cancel(&mut self, id: &str, now: Millis) -> StoreResult<InstanceStatus> {
        let inst = self
            .instances
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        if inst.record.status.is_finished() {
            return Ok(inst.record.status);
        }
        inst.record.cancel_requested = true;
        inst.wake(now);
        Ok(inst.record.status)
    }

    fn apply(&mut self, c: Commit, now: Millis) -> StoreResult<CommitOutcome> {
        let inst = self
            .instances
            .get_mut(&*c.instance_id)
            .ok_or_else(|| StoreError::NotFound(c.instance_id.to_string()))?;
        if inst.lease_token != c.lease_token
            || inst.lease_owner.is_none()
            || inst.record.status.is_finished()
        {
            return Ok(CommitOutcome::LeaseLost);
        }
        for (expected, e) in (inst.history.len() as u64..).zip(&c.events) {
            if e.event_id != expected {
                return Err(StoreError::Conflict(format!(
                    "instance {:?}: journal entry {} written where {} was expected",
                    c.instance_id, e.event_id, expected
                )));
            }
        }
        inst.history.extend(c.events);
        if let Some(sid) = c.consume_signal {
            inst.inbox.remove(&sid);
        }
        inst.record.updated_at = now;
        let cancel_requested = inst.record.cancel_requested;
        let mut outcome = CommitOutcome::Applied { cancel_requested };
        let mut finished_parent = None;
        match c.transition {
            Transition::None => {}
            Transition::Park {
                wake_at,
                seen_inbox,
            } => {
                if inst.inbox_seq != seen_inbox {
                    outcome = CommitOutcome::InboxChanged {
                        inbox_seq: inst.inbox_seq,
                        cancel_requested,
                    };
                } else {
                    inst.lease_owner = None;
                    inst.ready_at = wake_at;
                }
            }
            Transition::Release => {
                inst.lease_owner = None;
                inst.ready_at = Some(now);
            }
            Transition::Complete { output } => {
                inst.record.output = Some(output);
                inst.finish(InstanceStatus::Completed, now);
                finished_parent = inst.record.parent_id.clone();
            }
            Transition::Fail { failure } => {
                inst.record.failure = Some(failure);
                inst.finish(InstanceStatus::Failed, now);
                finished_parent = inst.record.parent_id.clone();
            }
            Transition::Cancel { failure } => {
                inst.record.failure = Some(failure);
                inst.finish(InstanceStatus::Cancelled, now);
                finished_parent = inst.record.parent_id.clone();
            }
        }
        if inst.record.status.is_finished() {
            self.live.remove(&inst.position);
        }
        for new in c.new_instances {
            self.insert(new, now);
        }
        for id in c.cancel_instances {
            // A child that does not exist (any more) needs no cancelling.
            let _ = self.request_cancel(&id, now);
        }
        if let Some(parent) = finished_parent {
            if let Some(p) = self.instances.get_mut(parent.as_str()) {
                if !p.record.status.is_finished() {
                    p.wake(now);
                }
            }
        }
        Ok(outcome)
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn backend_name(&self) -> &'static str {
        "memory"
    }

    async fn create_instance(&self, new: NewInstance) -> StoreResult<CreateOutcome> {
        // The clock is read before the lock is taken, here and below: the
        // lock is held as briefly as can be.
        let now = now_millis();
        Ok(self.lock().insert(new, now))
    }

    async fn get_instance(&self, id: &str) -> StoreResult<Option<InstanceRecord>> {
        Ok(self.lock().instances.get(id).map(|i| i.record.clone()))
    }

    async fn get_if_finished(&self, id: &str) -> StoreResult<FinishedLookup> {
        Ok(match self.lock().instances.get(id) {
            None => FinishedLookup::NotFound,
            Some(i) if i.record.status.is_finished() => FinishedLookup::Finished(i.record.clone()),
            Some(_) => FinishedLookup::Unfinished,
        })
    }

    async fn list_instances(&self, filter: ListFilter) -> StoreResult<Vec<InstanceRecord>> {
        let state = self.lock();
        let limit = filter.limit.unwrap_or(100);
        Ok(state
            .order
            .iter()
            .rev()
            .filter_map(|id| state.instances.get(id))
            .map(|i| &i.record)
            .filter(|r| filter.workflow.as_deref().is_none_or(|w| r.workflow == w))
            .filter(|r| filter.status.is_none_or(|s| r.status == s))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn load_history(&self, id: &str) -> StoreResult<Vec<StoredEvent>> {
        let state = self.lock();
        let inst = state
            .instances
            .get(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        Ok(inst.history.clone())
    }

    async fn claim(&self, req: &ClaimRequest) -> StoreResult<ClaimBatch> {
        let now = now_millis();
        let mut state = self.lock();
        let State {
            instances, live, ..
        } = &mut *state;
        let mut batch = ClaimBatch::default();
        for id in live.values() {
            let Some(inst) = instances.get_mut(id) else {
                continue;
            };
            // `live` holds no finished instance.
            if !req
                .workflows
                .iter()
                .any(|(w, v)| *w == inst.record.workflow && *v == inst.record.version)
            {
                continue;
            }
            let runnable = match &inst.lease_owner {
                Some(_) => inst.lease_expires_at <= now,
                None => match inst.ready_at {
                    Some(t) if t <= now => true,
                    Some(t) => {
                        batch.next_wake = Some(batch.next_wake.map_or(t, |w: Millis| w.min(t)));
                        false
                    }
                    None => false,
                },
            };
            if !runnable || batch.claimed.len() >= req.limit {
                continue;
            }
            inst.lease_token += 1;
            inst.lease_owner = Some(req.owner.clone());
            inst.lease_expires_at = now + req.lease.as_millis() as Millis;
            batch.claimed.push(ClaimedInstance {
                record: inst.record.clone(),
                lease_token: inst.lease_token,
                next_event_id: inst.history.len() as u64,
                inbox_seq: inst.inbox_seq,
            });
        }
        Ok(batch)
    }

    async fn renew_leases(&self, owner: &str, lease: Duration) -> StoreResult<Vec<String>> {
        let now = now_millis();
        let mut state = self.lock();
        let State {
            instances, live, ..
        } = &mut *state;
        let mut cancelled = Vec::new();
        for id in live.values() {
            let Some(inst) = instances.get_mut(id) else {
                continue;
            };
            if inst.lease_owner.as_deref() == Some(owner) {
                inst.lease_expires_at = now + lease.as_millis() as Millis;
                if inst.record.cancel_requested {
                    cancelled.push(inst.record.id.clone());
                }
            }
        }
        Ok(cancelled)
    }

    async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        self.lock().apply(commit, now_millis())
    }

    fn commit_now(&self, commit: Commit) -> CommitNow {
        CommitNow::Done(self.lock().apply(commit, now_millis()))
    }

    async fn send_signal(&self, id: &str, name: &str, payload: Vec<u8>) -> StoreResult<u64> {
        let now = now_millis();
        let mut state = self.lock();
        state.next_signal_id += 1;
        let sid = state.next_signal_id;
        let inst = state
            .instances
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        if inst.record.status.is_finished() {
            return Err(StoreError::Finished {
                id: id.to_owned(),
                status: inst.record.status,
            });
        }
        inst.inbox.insert(sid, (name.to_owned(), payload));
        inst.wake(now);
        Ok(sid)
    }

    async fn next_signal(&self, id: &str, name: &str) -> StoreResult<(Option<InboxSignal>, u64)> {
        let state = self.lock();
        let inst = state
            .instances
            .get(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let found = inst
            .inbox
            .iter()
            .find(|(_, (n, _))| n == name)
            .map(|(sid, (_, p))| InboxSignal {
                signal_id: *sid,
                payload: p.clone(),
            });
        Ok((found, inst.inbox_seq))
    }

    async fn request_cancel(&self, id: &str) -> StoreResult<InstanceStatus> {
        let now = now_millis();
        self.lock().request_cancel(id, now)
    }

    async fn continue_as_new(
        &self,
        id: &str,
        lease_token: u64,
        input: Vec<u8>,
    ) -> StoreResult<CommitOutcome> {
        let now = now_millis();
        let mut state = self.lock();
        let inst = state
            .instances
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        if inst.lease_token != lease_token
            || inst.lease_owner.is_none()
            || inst.record.status.is_finished()
        {
            return Ok(CommitOutcome::LeaseLost);
        }
        inst.history.clear();
        inst.record.input = input;
        inst.record.updated_at = now;
        inst.lease_owner = None;
        inst.ready_at = Some(now);
        Ok(CommitOutcome::Applied {
            cancel_requested: inst.record.cancel_requested,
        })
    }
}
