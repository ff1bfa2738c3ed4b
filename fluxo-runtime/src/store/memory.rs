//! In-memory backend: everything behind one mutex. For tests and for
//! workflows that need no durability across process restarts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::*;

/// A [`Store`] that keeps everything in process memory.
///
/// An instance's `updated_at` after a step is read from the kernel's coarse
/// clock (its last timer tick, a few milliseconds back; it never moves
/// backwards); creation, due and finish times from the precise one.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// By id. Hashed with a fast seeded hasher: every commit looks its
    /// instance up. The id is shared with `order`.
    instances: HashMap<Arc<str>, Instance, foldhash::fast::RandomState>,
    /// Creation order, for listing newest first.
    order: Vec<Arc<str>>,
    /// When each unfinished instance can next be claimed: all a claim or
    /// the end of an owner's leases looks at, so their cost grows with the
    /// instances due (a claim) or leased (`end_leases`), not with those
    /// parked until a signal or finished. (Instances due of workflows no
    /// claim names are passed over by each claim.)
    due: DueIndex,
    next_signal_id: u64,
    /// The newest instance's creation time. Clocks are read before the lock
    /// is taken, so a create that takes it second may have read the clock
    /// first; its instance is stamped no earlier than this, so creation
    /// times agree with `order` (listing is newest first).
    last_created_at: Millis,
}

/// When an instance can be claimed next: the key it has in [`DueIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// Finished, or parked until a signal wakes it.
    Never,
    /// Not leased, runnable from then on.
    Ready(Millis),
    /// Leased until then.
    LeaseEnds(Millis),
}

/// Instances by due time, then position in [`State::order`].
type DueSet = BTreeSet<(Millis, usize)>;

/// The unfinished instances by [`Due`] time, then position in
/// [`State::order`] (creation order among instances due at once).
#[derive(Default)]
struct DueIndex {
    /// [`Due::Ready`] instances.
    ready: DueSet,
    /// [`Due::LeaseEnds`] instances.
    leases: DueSet,
}

impl DueIndex {
    /// Files `inst` under what its state says now, if that changed.
    fn update(&mut self, inst: &mut Instance) {
        let due = inst.due();
        if due == inst.indexed {
            return;
        }
        if let Some((set, t)) = self.set_of(inst.indexed) {
            set.remove(&(t, inst.position));
        }
        if let Some((set, t)) = self.set_of(due) {
            set.insert((t, inst.position));
        }
        inst.indexed = due;
    }

    /// The set an instance due at `due` is filed in, and its time there.
    fn set_of(&mut self, due: Due) -> Option<(&mut BTreeSet<(Millis, usize)>, Millis)> {
        match due {
            Due::Never => None,
            Due::Ready(t) => Some((&mut self.ready, t)),
            Due::LeaseEnds(t) => Some((&mut self.leases, t)),
        }
    }
}

/// Room a journal starts with, in bytes and in entries: a short
/// workflow's entries in one allocation each, instead of one per doubling.
const JOURNAL_BYTES: usize = 1024;
const JOURNAL_ENTRIES: usize = 16;

/// An instance's journal: its entries' bytes end to end in one buffer, and
/// where each entry ends. Appending copies an entry's bytes in, so the
/// commit's own copy is freed at once and reused by the next (a step costs
/// no allocation that lives on), and an entry takes 40 bytes besides its
/// own instead of a separately allocated 64.
#[derive(Default)]
struct Journal {
    bytes: Vec<u8>,
    /// Entry `i` (event id `i`): its operation, kind and the end of its
    /// bytes in `bytes` (which start where entry `i - 1`'s end).
    index: Vec<(u64, Cow<'static, str>, usize)>,
}

impl Journal {
    /// Entries stored: the next event id.
    fn len(&self) -> usize {
        self.index.len()
    }

    fn push(&mut self, e: &StoredEvent) {
        if self.index.capacity() == 0 {
            self.bytes.reserve(JOURNAL_BYTES.max(e.data.len()));
            self.index.reserve(JOURNAL_ENTRIES);
        }
        self.bytes.extend_from_slice(&e.data);
        self.index.push((e.seq, e.kind.clone(), self.bytes.len()));
    }

    /// Gives back the room no entry will take: a finished instance's
    /// journal never grows again.
    fn shrink(&mut self) {
        self.bytes.shrink_to_fit();
        self.index.shrink_to_fit();
    }

    /// Gives back the room a parked instance is not likely to need: what
    /// the first reservation left over (or an emptied journal kept). Room
    /// from doubling is kept, so a long journal that parks often is not
    /// copied at each park.
    fn shrink_spare(&mut self) {
        if self.bytes.capacity() > 2 * self.bytes.len() {
            self.bytes.shrink_to_fit();
        }
        if self.index.capacity() > 2 * self.index.len() {
            self.index.shrink_to_fit();
        }
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.index.clear();
    }

    /// The entries, as the store hands them out.
    fn entries(&self) -> impl Iterator<Item = StoredEvent> + '_ {
        let starts = std::iter::once(0).chain(self.index.iter().map(|&(_, _, end)| end));
        self.index
            .iter()
            .zip(starts)
            .zip(0..)
            .map(|(((seq, kind, end), start), event_id)| StoredEvent {
                event_id,
                seq: *seq,
                kind: kind.clone(),
                data: self.bytes[start..*end].to_vec(),
            })
    }
}

struct Instance {
    /// Position in [`State::order`].
    position: usize,
    record: InstanceRecord,
    history: Journal,
    inbox: BTreeMap<u64, (String, Vec<u8>)>,
    ready_at: Option<Millis>,
    lease_owner: Option<Arc<str>>,
    lease_expires_at: Millis,
    lease_token: u64,
    inbox_seq: u64,
    /// Where [`State::due`] files it.
    indexed: Due,
}

impl MemoryStore {
    /// Creates an empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `commit`, stamped with its time (read before the lock).
    fn apply(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        let now = commit_time(&commit);
        self.lock().apply(commit, now)
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
            history: Journal::default(),
            inbox: BTreeMap::new(),
            ready_at: Some(now),
            lease_owner: None,
            lease_expires_at: 0,
            lease_token: 0,
            inbox_seq: 0,
            indexed: Due::Never,
        }
    }

    /// When it can be claimed next, from its state.
    fn due(&self) -> Due {
        if self.record.status.is_finished() {
            Due::Never
        } else if self.lease_owner.is_some() {
            Due::LeaseEnds(self.lease_expires_at)
        } else {
            self.ready_at.map_or(Due::Never, Due::Ready)
        }
    }

    /// Stamps a change at `now`, never moving `updated_at` backwards (a
    /// step's stamp comes from the coarse clock).
    fn touch(&mut self, now: Millis) {
        self.record.updated_at = self.record.updated_at.max(now);
    }

    fn wake(&mut self, now: Millis) {
        self.inbox_seq += 1;
        self.ready_at = Some(now);
        self.touch(now);
    }

    fn finish(&mut self, status: InstanceStatus, now: Millis) {
        self.record.status = status;
        self.touch(now);
        self.lease_owner = None;
        self.ready_at = None;
        self.inbox.clear();
        self.history.shrink();
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
        let mut inst = Instance::new(new, position, now);
        // Only the creation time: the instance is due from `now` on.
        inst.record.created_at = now.max(self.last_created_at);
        inst.record.updated_at = inst.record.created_at;
        self.last_created_at = inst.record.created_at;
        self.due.update(&mut inst);
        self.instances.insert(id, inst);
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
        self.due.update(inst);
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
        let next_event_id = inst.history.len() as u64;
        if c.events
            .iter()
            .zip(next_event_id..)
            .any(|(e, expected)| e.event_id != expected)
        {
            return Err(journal_conflict(&c, next_event_id));
        }
        for e in &c.events {
            inst.history.push(e);
        }
        if let Some(sid) = c.consume_signal {
            inst.inbox.remove(&sid);
        }
        inst.touch(now);
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
                    inst.history.shrink_spare();
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
        self.due.update(inst);
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
                    self.due.update(p);
                }
            }
        }
        Ok(outcome)
    }
}

/// The time commit `c` is stamped with. A commit of journal entries alone
/// (a step's) only moves `updated_at`, which the kernel's coarse clock
/// stamps well enough (its last tick, a few ms back) for a tenth of the
/// precise clock's cost, itself a tenth of such a commit. Anything else
/// sets due, finish or creation times: those read the precise clock.
fn commit_time(c: &Commit) -> Millis {
    let entries_only = matches!(c.transition, Transition::None)
        && c.new_instances.is_empty()
        && c.cancel_instances.is_empty();
    if entries_only {
        coarse_now_millis()
    } else {
        now_millis()
    }
}

/// [`now_millis`] as of the kernel's last timer tick.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn coarse_now_millis() -> Millis {
    use rustix::time::{clock_gettime, ClockId};
    let t = clock_gettime(ClockId::RealtimeCoarse);
    t.tv_sec as Millis * 1000 + t.tv_nsec as Millis / 1_000_000
}

/// [`now_millis`]: this system has no coarse clock to read instead.
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn coarse_now_millis() -> Millis {
    now_millis()
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
        Ok(inst.history.entries().collect())
    }

    async fn claim(&self, req: &ClaimRequest) -> StoreResult<ClaimBatch> {
        let now = now_millis();
        let mut state = self.lock();
        let State {
            instances,
            order,
            due,
            ..
        } = &mut *state;
        let wanted = |position: usize| {
            instances.get(&order[position]).is_some_and(|inst| {
                req.workflows
                    .iter()
                    .any(|(w, v)| *w == inst.record.workflow && *v == inst.record.version)
            })
        };
        // Runnable now: those whose lease ran out first (their worker is
        // gone; a backlog of ready ones must not keep them waiting), then
        // the ready ones, each in due order, as the SQL stores take them.
        let up_to_now = ..=(now, usize::MAX);
        let claimable: Vec<usize> = due
            .leases
            .range(up_to_now)
            .chain(due.ready.range(up_to_now))
            .map(|&(_, position)| position)
            .filter(|&position| wanted(position))
            .take(req.limit)
            .collect();
        let next_wake = due
            .ready
            .range((now + 1, 0)..)
            .find(|&&(_, position)| wanted(position))
            .map(|&(t, _)| t);
        let mut batch = ClaimBatch {
            next_wake,
            ..ClaimBatch::default()
        };
        // One copy of the owner's name for the whole batch.
        let owner: Arc<str> = req.owner.as_str().into();
        for position in claimable {
            let Some(inst) = instances.get_mut(&order[position]) else {
                continue;
            };
            inst.lease_token += 1;
            inst.lease_owner = Some(Arc::clone(&owner));
            inst.lease_expires_at = now.saturating_add(duration_millis(req.lease));
            due.update(inst);
            batch.claimed.push(ClaimedInstance {
                record: inst.record.clone(),
                lease_token: inst.lease_token,
                next_event_id: inst.history.len() as u64,
                inbox_seq: inst.inbox_seq,
            });
        }
        Ok(batch)
    }

    async fn renew_leases(
        &self,
        owner: &str,
        ids: &[String],
        lease: Duration,
    ) -> StoreResult<Vec<String>> {
        let expires = now_millis().saturating_add(duration_millis(lease));
        let mut state = self.lock();
        let State { instances, due, .. } = &mut *state;
        let mut cancelled = Vec::new();
        for id in ids {
            let Some(inst) = instances.get_mut(id.as_str()) else {
                continue;
            };
            if inst.lease_owner.as_deref() == Some(owner) {
                inst.lease_expires_at = expires;
                due.update(inst);
                if inst.record.cancel_requested {
                    cancelled.push(inst.record.id.clone());
                }
            }
        }
        cancelled.sort();
        cancelled.dedup();
        Ok(cancelled)
    }

    async fn end_leases(&self, owner: &str) -> StoreResult<()> {
        let now = now_millis();
        let mut state = self.lock();
        let State {
            instances,
            order,
            due,
            ..
        } = &mut *state;
        let leased: Vec<usize> = due.leases.iter().map(|&(_, position)| position).collect();
        for position in leased {
            let Some(inst) = instances.get_mut(&order[position]) else {
                continue;
            };
            if inst.lease_owner.as_deref() == Some(owner) {
                inst.lease_expires_at = now;
                due.update(inst);
            }
        }
        Ok(())
    }

    async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        self.apply(commit)
    }

    fn commit_now(&self, commit: Commit) -> CommitNow {
        CommitNow::Done(self.apply(commit))
    }

    async fn send_signal(&self, id: &str, name: &str, payload: Vec<u8>) -> StoreResult<u64> {
        let now = now_millis();
        let mut state = self.lock();
        state.next_signal_id += 1;
        let sid = state.next_signal_id;
        let State { instances, due, .. } = &mut *state;
        let inst = instances
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
        due.update(inst);
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
        let State { instances, due, .. } = &mut *state;
        let inst = instances
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
        due.update(inst);
        Ok(CommitOutcome::Applied {
            cancel_requested: inst.record.cancel_requested,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use futures::executor::block_on;
    use proptest::prelude::*;

    use super::*;
    use crate::store::test_fixtures::{commit, event};

    const HOUR: Duration = Duration::from_secs(3_600);

    /// The `(workflow, version)` pairs an instance is created with.
    const KINDS: [(&str, u32); 3] = [("a", 1), ("b", 1), ("a", 2)];

    /// The pairs a claim may name.
    fn claim_kinds(pick: usize) -> Vec<(String, u32)> {
        let kinds: &[(&str, u32)] = match pick % 4 {
            0 => &[("a", 1)],
            1 => &[("b", 1)],
            2 => &[("a", 1), ("b", 1)],
            _ => &[("a", 2), ("b", 1)],
        };
        kinds.iter().map(|(w, v)| ((*w).to_owned(), *v)).collect()
    }

    /// An operation on the store, its targets picked by index among the
    /// instances created (or claimed) so far.
    #[derive(Debug, Clone)]
    enum Op {
        Create {
            kind: usize,
        },
        Claim {
            kinds: usize,
            limit: usize,
            expired: bool,
        },
        Park {
            claim: usize,
            wake: Option<bool>,
        },
        Release {
            claim: usize,
            now: bool,
        },
        Finish {
            claim: usize,
            failed: bool,
        },
        StartChild {
            claim: usize,
            kind: usize,
        },
        CancelOther {
            claim: usize,
            instance: usize,
        },
        ContinueAsNew {
            claim: usize,
        },
        Signal {
            instance: usize,
        },
        Cancel {
            instance: usize,
        },
        Renew {
            claim: usize,
            to_zero: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..3usize).prop_map(|kind| Op::Create { kind }),
            3 => (0..4usize, 1..6usize, any::<bool>())
                .prop_map(|(kinds, limit, expired)| Op::Claim { kinds, limit, expired }),
            2 => (any::<usize>(), proptest::option::of(any::<bool>()))
                .prop_map(|(claim, wake)| Op::Park { claim, wake }),
            1 => (any::<usize>(), any::<bool>()).prop_map(|(claim, now)| Op::Release { claim, now }),
            1 => (any::<usize>(), any::<bool>())
                .prop_map(|(claim, failed)| Op::Finish { claim, failed }),
            1 => (any::<usize>(), 0..3usize).prop_map(|(claim, kind)| Op::StartChild { claim, kind }),
            1 => (any::<usize>(), any::<usize>())
                .prop_map(|(claim, instance)| Op::CancelOther { claim, instance }),
            1 => any::<usize>().prop_map(|claim| Op::ContinueAsNew { claim }),
            1 => any::<usize>().prop_map(|instance| Op::Signal { instance }),
            1 => any::<usize>().prop_map(|instance| Op::Cancel { instance }),
            1 => (any::<usize>(), any::<bool>())
                .prop_map(|(claim, to_zero)| Op::Renew { claim, to_zero }),
        ]
    }

    fn new_instance(kind: usize, n: usize, parent_id: Option<String>) -> NewInstance {
        let (workflow, version) = KINDS[kind];
        NewInstance {
            id: format!("inst-{n}"),
            workflow: workflow.to_owned(),
            version,
            input: vec![],
            parent_id,
        }
    }

    /// The index as rebuilt from every instance's state: its ready and its
    /// lease sets.
    fn rebuilt(state: &State) -> (DueSet, DueSet) {
        let mut index = DueIndex::default();
        for inst in state.instances.values() {
            if let Some((set, t)) = index.set_of(inst.due()) {
                set.insert((t, inst.position));
            }
        }
        (index.ready, index.leases)
    }

    /// What a walk over every instance finds a claim may hand out: those
    /// whose lease ran out, those ready, and the next wake-up.
    struct Walk {
        expired: Vec<String>,
        ready: Vec<String>,
        next_wake: Option<Millis>,
    }

    fn walk(state: &State, req: &ClaimRequest, now: Millis) -> Walk {
        let mut found = Walk {
            expired: Vec::new(),
            ready: Vec::new(),
            next_wake: None,
        };
        for inst in state.instances.values() {
            let wanted = req
                .workflows
                .iter()
                .any(|(w, v)| *w == inst.record.workflow && *v == inst.record.version);
            if !wanted || inst.record.status.is_finished() {
                continue;
            }
            let id = inst.record.id.clone();
            match (&inst.lease_owner, inst.ready_at) {
                (Some(_), _) if inst.lease_expires_at <= now => found.expired.push(id),
                (Some(_), _) => {}
                (None, Some(t)) if t <= now => found.ready.push(id),
                (None, Some(t)) => {
                    found.next_wake = Some(found.next_wake.map_or(t, |w| w.min(t)));
                }
                (None, None) => {}
            }
        }
        found
    }

    proptest! {
        /// After any sequence of operations, the due index is what the
        /// instances' states say, and claims hand out what a walk over
        /// every instance allows: expired leases first, then ready ones,
        /// with the same next wake-up.
        #[test]
        fn claims_match_a_walk_over_every_instance(ops in proptest::collection::vec(op(), 1..80)) {
            let store = MemoryStore::new();
            let mut ids: Vec<String> = Vec::new();
            let mut claims: Vec<ClaimedInstance> = Vec::new();
            let mut owners: HashMap<String, String> = HashMap::new();
            let pick = |claims: &[ClaimedInstance], i: usize| claims.get(i % claims.len().max(1)).cloned();
            for op in ops {
                match op {
                    Op::Create { kind } => {
                        let new = new_instance(kind, ids.len(), None);
                        ids.push(new.id.clone());
                        block_on(store.create_instance(new)).unwrap();
                    }
                    Op::Claim { kinds, limit, expired } => {
                        let req = ClaimRequest {
                            owner: format!("owner-{}", claims.len()),
                            workflows: claim_kinds(kinds),
                            limit,
                            lease: if expired { Duration::ZERO } else { HOUR },
                        };
                        // Every time in play is the past or an hour ahead,
                        // so the clock moving on changes nothing here.
                        let found = walk(&store.lock(), &req, now_millis());
                        let batch = block_on(store.claim(&req)).unwrap();
                        let due = found.expired.len() + found.ready.len();
                        prop_assert_eq!(batch.claimed.len(), due.min(limit));
                        let taken_expired = batch
                            .claimed
                            .iter()
                            .filter(|c| found.expired.contains(&c.record.id))
                            .count();
                        prop_assert_eq!(taken_expired, found.expired.len().min(limit));
                        for c in &batch.claimed {
                            prop_assert!(
                                found.expired.contains(&c.record.id) || found.ready.contains(&c.record.id)
                            );
                            owners.insert(c.record.id.clone(), req.owner.clone());
                        }
                        prop_assert_eq!(batch.next_wake, found.next_wake);
                        claims.extend(batch.claimed);
                    }
                    Op::Park { claim, wake } => if let Some(c) = pick(&claims, claim) {
                        let wake_at = wake.map(|later| {
                            if later { now_millis() + HOUR.as_millis() as Millis } else { 0 }
                        });
                        let park = Transition::Park { wake_at, seen_inbox: c.inbox_seq };
                        let _ = block_on(store.commit(commit(&c, vec![], park)));
                    },
                    Op::Release { claim, now } => if let Some(c) = pick(&claims, claim) {
                        let release = commit(&c, vec![], Transition::Release);
                        let _ = if now {
                            match store.commit_now(release) {
                                CommitNow::Done(r) => r,
                                CommitNow::Later(_) => unreachable!("the memory store commits at once"),
                            }
                        } else {
                            block_on(store.commit(release))
                        };
                    },
                    Op::Finish { claim, failed } => if let Some(c) = pick(&claims, claim) {
                        let end = if failed {
                            Transition::Fail { failure: vec![] }
                        } else {
                            Transition::Complete { output: vec![] }
                        };
                        let _ = block_on(store.commit(commit(&c, vec![], end)));
                    },
                    Op::StartChild { claim, kind } => if let Some(c) = pick(&claims, claim) {
                        let child = new_instance(kind, ids.len(), Some(c.record.id.clone()));
                        ids.push(child.id.clone());
                        let mut start = commit(&c, vec![], Transition::None);
                        start.new_instances = vec![child];
                        let _ = block_on(store.commit(start));
                    },
                    Op::CancelOther { claim, instance } => if let Some(c) = pick(&claims, claim) {
                        let mut cancel = commit(&c, vec![], Transition::None);
                        cancel.cancel_instances = vec![ids[instance % ids.len()].clone()];
                        let _ = block_on(store.commit(cancel));
                    },
                    Op::ContinueAsNew { claim } => if let Some(c) = pick(&claims, claim) {
                        let _ = block_on(store.continue_as_new(&c.record.id, c.lease_token, vec![]));
                    },
                    Op::Signal { instance } if !ids.is_empty() => {
                        let _ = block_on(store.send_signal(&ids[instance % ids.len()], "s", vec![]));
                    }
                    Op::Cancel { instance } if !ids.is_empty() => {
                        let _ = block_on(store.request_cancel(&ids[instance % ids.len()]));
                    }
                    Op::Renew { claim, to_zero } => if let Some(c) = pick(&claims, claim) {
                        if let Some(owner) = owners.get(&c.record.id) {
                            if to_zero {
                                block_on(store.end_leases(owner)).unwrap();
                            } else {
                                let ids = [c.record.id.clone()];
                                block_on(store.renew_leases(owner, &ids, HOUR)).unwrap();
                            }
                        }
                    },
                    _ => {}
                }
                let state = store.lock();
                let (ready, leases) = rebuilt(&state);
                prop_assert_eq!(&state.due.ready, &ready);
                prop_assert_eq!(&state.due.leases, &leases);
            }
        }
    }

    /// A step's commit stamps `updated_at` from the coarse clock: close to
    /// the precise one, and never before the stamp the instance had.
    #[test]
    fn a_step_commit_stamps_close_to_now_and_never_backwards() {
        let skew = (now_millis() - coarse_now_millis()).abs();
        assert!(skew < 1_000, "the coarse clock is {skew} ms off");

        let store = MemoryStore::new();
        let new = new_instance(0, 0, None);
        let id = new.id.clone();
        block_on(store.create_instance(new)).unwrap();
        let req = ClaimRequest {
            owner: "here".to_owned(),
            workflows: claim_kinds(0),
            limit: 1,
            lease: HOUR,
        };
        let c = block_on(store.claim(&req)).unwrap().claimed.remove(0);
        let record = |store: &MemoryStore| block_on(store.get_instance(&id)).unwrap().unwrap();
        let step = |event_id| commit(&c, vec![event(event_id)], Transition::None);

        block_on(store.commit(step(0))).unwrap();
        let r = record(&store);
        assert!(r.updated_at >= r.created_at);
        assert!((now_millis() - r.updated_at).abs() < 1_000);

        let ahead = now_millis() + HOUR.as_millis() as Millis;
        store
            .lock()
            .instances
            .get_mut(id.as_str())
            .unwrap()
            .record
            .updated_at = ahead;
        block_on(store.commit(step(1))).unwrap();
        assert_eq!(record(&store).updated_at, ahead, "stamped backwards");
    }

    /// A create after a later one in the clock's eyes (the clock stepped
    /// back) is stamped no earlier than it, so listing order and creation
    /// times agree, and is still claimable at once.
    #[test]
    fn a_create_after_the_clock_stepped_back_keeps_order_and_is_due_now() {
        let store = MemoryStore::new();
        let first = new_instance(0, 0, None);
        block_on(store.create_instance(first)).unwrap();
        let ahead = now_millis() + HOUR.as_millis() as Millis;
        store.lock().last_created_at = ahead;

        let second = new_instance(0, 1, None);
        let id = second.id.clone();
        block_on(store.create_instance(second)).unwrap();
        let listed = block_on(store.list_instances(ListFilter::default())).unwrap();
        assert_eq!(listed[0].id, id, "newest first");
        assert_eq!(listed[0].created_at, ahead);
        assert!(listed[0].updated_at >= listed[0].created_at);

        let req = ClaimRequest {
            owner: "here".to_owned(),
            workflows: claim_kinds(0),
            limit: 10,
            lease: HOUR,
        };
        let claimed = block_on(store.claim(&req)).unwrap().claimed;
        assert!(
            claimed.iter().any(|c| c.record.id == id),
            "due now, not at the stamp"
        );
    }
}
