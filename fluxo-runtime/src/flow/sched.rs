//! Deterministic scheduling of concurrent branches ("lanes") on top of the
//! journal.
//!
//! The engine gives every durable operation the next sequence number when
//! it is first polled, and a replay must issue the same operations in the
//! same order. Branches that run several operations one after the other
//! would issue them in an order that depends on timing (which branch's
//! previous operation finished first), and a replay, where every journaled
//! operation finishes at once, would not reproduce it.
//!
//! So branches never issue an operation on their own. A branch that wants
//! to ask for its next operation waits for a turn; a single driver decides
//! which waiting branches go next and journals that decision as a small
//! step (`<region>#next[k]`) before the chosen branches issue their
//! operations, one at a time, in the decided order. On replay the driver
//! reads its decisions back from the journal and grants the same branches
//! in the same order, so the journal is reproduced entry by entry.
//!
//! Failures are decided the same way: a branch that fails waits until a
//! decision acknowledges it, so the point where a block stops (and what the
//! workflow does next) is journaled too.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use serde::{Deserialize, Serialize};

use crate::{RetryPolicy, WorkflowContext, WorkflowError};

/// A lane's position: the indexes of the branches leading to it.
pub(crate) type LaneId = Vec<u32>;

/// What a block does when one of its lanes fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailMode {
    /// Stop at once: the other lanes are dropped (builder `parallel`).
    Cancel,
    /// Start nothing new, let running operations finish, then stop (DAG:
    /// what finished can be compensated).
    Drain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Running code between operations (or waiting for something that is
    /// not an operation, e.g. a DAG node's dependencies).
    Running,
    /// Asking for a turn to issue its next operation.
    Waiting,
    /// Given a turn; issues its operation on its next poll.
    Granted,
    /// Its operation was issued and has not finished.
    InFlight,
    /// Running a nested block of lanes.
    Suspended,
    /// Failed; waits for a decision to acknowledge it.
    Failed,
}

struct Lane {
    region: u64,
    label: String,
    state: State,
    started: bool,
    error: Option<WorkflowError>,
}

struct Region {
    width: Option<usize>,
    owner: Option<LaneId>,
    failed: Option<WorkflowError>,
}

#[derive(Default)]
struct St {
    lanes: BTreeMap<LaneId, Lane>,
    /// Live lanes by label.
    labels: HashMap<String, LaneId>,
    regions: HashMap<u64, Region>,
    next_region: u64,
    /// Bumped on every change, so a block can tell when polling its lanes
    /// and driver again may make progress.
    version: u64,
    wakers: Vec<Waker>,
}

/// A journaled scheduling decision.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Decision {
    /// These lanes (by label) issue their next operation, in this order.
    Run(Vec<String>),
    /// This lane's failure stops its block.
    Fail(String),
}

/// The scheduler of one outermost concurrent block and every block nested
/// in it.
pub(crate) struct Sched {
    ctx: WorkflowContext,
    mode: FailMode,
    st: Mutex<St>,
}

impl Sched {
    pub(crate) fn new(ctx: WorkflowContext, mode: FailMode) -> Arc<Self> {
        Arc::new(Sched {
            ctx,
            mode,
            st: Mutex::new(St::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(st: &mut St) {
        st.version += 1;
        for w in st.wakers.drain(..) {
            w.wake();
        }
    }

    /// Wakes everything waiting on this scheduler (after a change of state
    /// kept outside it, e.g. a DAG node finishing).
    pub(crate) fn notify(&self) {
        Self::wake(&mut self.lock());
    }

    /// Resolves once `cond` holds; re-checked after every change.
    fn wait_state<'a>(
        &'a self,
        mut cond: impl FnMut(&St) -> bool + Send + 'a,
    ) -> impl Future<Output = ()> + Send + 'a {
        std::future::poll_fn(move |cx| {
            let mut st = self.lock();
            if cond(&st) {
                return Poll::Ready(());
            }
            if !st.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                st.wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }

    /// Resolves once `cond` (over state kept outside the scheduler) holds;
    /// re-checked after every [`Sched::notify`] and every change here.
    pub(crate) fn wait_external<'a>(
        &'a self,
        mut cond: impl FnMut() -> bool + Send + 'a,
    ) -> impl Future<Output = ()> + Send + 'a {
        self.wait_state(move |_| cond())
    }

    fn set_state(&self, id: &LaneId, state: State) {
        let mut st = self.lock();
        if let Some(l) = st.lanes.get_mut(id) {
            l.state = state;
        }
        Self::wake(&mut st);
    }

    /// Opens a block of lanes run by `owner` (`None`: the workflow body
    /// itself). Each lane gets a label (unique among live lanes) used in the
    /// journaled decisions. Returns the block id and the lane ids.
    pub(crate) fn open_region(
        &self,
        owner: Option<&LaneId>,
        labels: Vec<String>,
        width: Option<usize>,
    ) -> (u64, Vec<LaneId>) {
        let mut st = self.lock();
        let region = st.next_region;
        st.next_region += 1;
        st.regions.insert(
            region,
            Region {
                width,
                owner: owner.cloned(),
                failed: None,
            },
        );
        if let Some(owner) = owner {
            if let Some(l) = st.lanes.get_mut(owner) {
                l.state = State::Suspended;
            }
        }
        let mut ids = Vec::with_capacity(labels.len());
        for (i, label) in labels.into_iter().enumerate() {
            let mut id = owner.cloned().unwrap_or_default();
            id.push(i as u32);
            st.labels.insert(label.clone(), id.clone());
            st.lanes.insert(
                id.clone(),
                Lane {
                    region,
                    label,
                    state: State::Running,
                    started: false,
                    error: None,
                },
            );
            ids.push(id);
        }
        Self::wake(&mut st);
        (region, ids)
    }

    /// Closes a block once its future is done: its lanes are gone and its
    /// owner runs again.
    pub(crate) fn close_region(&self, region: u64) {
        let mut st = self.lock();
        let St { lanes, labels, .. } = &mut *st;
        lanes.retain(|_, l| {
            if l.region == region {
                labels.remove(&l.label);
            }
            l.region != region
        });
        if let Some(r) = st.regions.remove(&region) {
            if let Some(owner) = r.owner {
                if let Some(l) = st.lanes.get_mut(&owner) {
                    l.state = State::Running;
                }
            }
        }
        Self::wake(&mut st);
    }

    /// Runs `fut`, one durable operation (or none: then the turn only
    /// orders what the lane does next), when the lane is given its turn.
    pub(crate) async fn op<F: Future>(&self, id: &LaneId, fut: F) -> F::Output {
        self.set_state(id, State::Waiting);
        self.wait_state(|st| st.lanes.get(id).is_some_and(|l| l.state == State::Granted))
            .await;
        let mut fut = std::pin::pin!(fut);
        // The first poll issues the operation (takes its sequence number).
        let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
        self.set_state(id, State::InFlight);
        let out = match first {
            Poll::Ready(v) => v,
            Poll::Pending => fut.await,
        };
        self.set_state(id, State::Running);
        out
    }

    /// Runs one lane's body: on success the lane is gone; on failure it
    /// waits, failed, until a decision stops its block (which drops it).
    pub(crate) async fn lane<T>(
        &self,
        id: LaneId,
        body: impl Future<Output = Result<T, WorkflowError>>,
    ) -> T {
        let guard = LaneGuard {
            sched: self,
            id: id.clone(),
        };
        match body.await {
            Ok(v) => {
                drop(guard);
                v
            }
            Err(e) => {
                {
                    let mut st = self.lock();
                    if let Some(l) = st.lanes.get_mut(&id) {
                        l.state = State::Failed;
                        l.error = Some(e);
                    }
                    Self::wake(&mut st);
                }
                std::future::pending().await
            }
        }
    }

    /// Resolves with the failure that stopped block `region`.
    pub(crate) async fn region_failure(&self, region: u64) -> WorkflowError {
        let mut out = None;
        self.wait_state(
            |st| match st.regions.get(&region).and_then(|r| r.failed.clone()) {
                Some(e) => {
                    out = Some(e);
                    true
                }
                None => false,
            },
        )
        .await;
        out.unwrap_or_else(|| WorkflowError::new("concurrent block stopped"))
    }

    /// Lanes of unstopped blocks whose failure was not acknowledged yet.
    fn first_failed(st: &St) -> Option<&Lane> {
        st.lanes.values().find(|l| {
            l.state == State::Failed
                && st
                    .regions
                    .get(&l.region)
                    .is_some_and(|r| r.failed.is_none())
        })
    }

    /// The waiting lanes that may go now, in lane order; lanes that have not
    /// started yet only while their block is under its width.
    fn grantable(st: &St) -> Vec<String> {
        let mut active: HashMap<u64, usize> = HashMap::new();
        for l in st.lanes.values() {
            if l.started && l.state != State::Failed {
                *active.entry(l.region).or_default() += 1;
            }
        }
        let mut out = Vec::new();
        for l in st.lanes.values() {
            if l.state != State::Waiting {
                continue;
            }
            let Some(region) = st.regions.get(&l.region) else {
                continue;
            };
            if region.failed.is_some() {
                continue;
            }
            if !l.started {
                let n = active.entry(l.region).or_default();
                if region.width.is_some_and(|w| *n >= w) {
                    continue;
                }
                *n += 1;
            }
            out.push(l.label.clone());
        }
        out
    }

    fn any_in(st: &St, states: &[State]) -> bool {
        st.lanes.values().any(|l| states.contains(&l.state))
    }

    /// Whether the driver should take its next decision now.
    fn decision_due(&self, st: &St) -> bool {
        if Self::any_in(st, &[State::Granted]) {
            return false;
        }
        if Self::first_failed(st).is_some() {
            return self.mode == FailMode::Cancel || !Self::any_in(st, &[State::InFlight]);
        }
        !Self::grantable(st).is_empty()
    }

    /// The decision, taken when its step runs for the first time.
    fn decide(&self) -> Decision {
        let st = self.lock();
        if let Some(l) = Self::first_failed(&st) {
            if self.mode == FailMode::Cancel || !Self::any_in(&st, &[State::InFlight]) {
                return Decision::Fail(l.label.clone());
            }
            // Drain first: start nothing new meanwhile.
            return Decision::Run(Vec::new());
        }
        Decision::Run(Self::grantable(&st))
    }

    fn find(st: &St, label: &str) -> Option<LaneId> {
        st.labels.get(label).cloned()
    }

    /// Takes the journaled decisions of this block (`<name>#next[k]`) and
    /// hands out turns accordingly. Never returns while it can go on; an
    /// error is a decision step that failed (only middleware can make it).
    pub(crate) async fn drive(self: Arc<Self>, name: String) -> WorkflowError {
        let mut k: u64 = 0;
        loop {
            self.wait_state(|st| self.decision_due(st)).await;
            let me = Arc::clone(&self);
            let decision = self
                .ctx
                .step(format!("{name}#next[{k}]"), move || {
                    let me = Arc::clone(&me);
                    async move { Ok(me.decide()) }
                })
                .retry(RetryPolicy::none())
                .await;
            k += 1;
            let decision = match decision {
                Ok(d) => d,
                Err(e) => return e.into(),
            };
            match decision {
                Decision::Fail(label) => {
                    // On replay, wait until the lane has failed again.
                    self.wait_state(|st| {
                        Self::find(st, &label)
                            .and_then(|id| st.lanes.get(&id))
                            .is_none_or(|l| l.state == State::Failed)
                    })
                    .await;
                    let mut st = self.lock();
                    let failed = Self::find(&st, &label)
                        .and_then(|id| st.lanes.get(&id))
                        .map(|l| (l.region, l.error.clone()));
                    if let Some((region, error)) = failed {
                        if let Some(r) = st.regions.get_mut(&region) {
                            r.failed = Some(
                                error.unwrap_or_else(|| WorkflowError::new("a branch failed")),
                            );
                        }
                    }
                    Self::wake(&mut st);
                }
                Decision::Run(labels) => {
                    for label in labels {
                        // Grant one lane at a time, so the order in which
                        // they issue their operations is the decided one.
                        self.wait_state(|st| {
                            Self::find(st, &label)
                                .and_then(|id| st.lanes.get(&id))
                                .is_none_or(|l| l.state == State::Waiting)
                        })
                        .await;
                        let id = {
                            let mut st = self.lock();
                            let id = Self::find(&st, &label);
                            if let Some(l) = id.as_ref().and_then(|id| st.lanes.get_mut(id)) {
                                l.state = State::Granted;
                                l.started = true;
                            }
                            Self::wake(&mut st);
                            id
                        };
                        let Some(id) = id else { continue };
                        self.wait_state(|st| {
                            st.lanes.get(&id).is_none_or(|l| l.state != State::Granted)
                        })
                        .await;
                    }
                }
            }
        }
    }

    /// Runs a block's lanes until they all finish (their outputs in lane
    /// order) or a journaled decision stops the block with a failure.
    /// `driver`: the decision step prefix, for the outermost block only.
    pub(crate) async fn run_region<T, L>(
        self: &Arc<Self>,
        region: u64,
        lanes: Vec<L>,
        driver: Option<String>,
    ) -> Result<Vec<T>, WorkflowError>
    where
        L: Future<Output = T>,
    {
        let all = self.ctx.join_all(lanes);
        let failure = self.region_failure(region);
        let drive = async {
            match driver {
                Some(name) => Arc::clone(self).drive(name).await,
                None => std::future::pending().await,
            }
        };
        let mut all = std::pin::pin!(all);
        let mut failure = std::pin::pin!(failure);
        let mut drive = std::pin::pin!(drive);
        // The runner parks the instance when, after a poll, every operation
        // in flight waits. So within one poll, go around until nothing
        // changes: a turn handed out is taken (its operation issued) before
        // the poll ends. Nested blocks are polled through their owner lanes.
        let out = std::future::poll_fn(|cx| loop {
            let before = self.lock().version;
            if let Poll::Ready(outs) = all.as_mut().poll(cx) {
                return Poll::Ready(Ok(outs));
            }
            if let Poll::Ready(e) = failure.as_mut().poll(cx) {
                return Poll::Ready(Err(e));
            }
            if let Poll::Ready(e) = drive.as_mut().poll(cx) {
                return Poll::Ready(Err(e));
            }
            if self.lock().version == before {
                return Poll::Pending;
            }
        })
        .await;
        self.close_region(region);
        out
    }
}

/// Removes a lane from the scheduler when its future ends or is dropped.
struct LaneGuard<'a> {
    sched: &'a Sched,
    id: LaneId,
}

impl Drop for LaneGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.sched.lock();
        if let Some(l) = st.lanes.remove(&self.id) {
            if st.labels.get(&l.label) == Some(&self.id) {
                st.labels.remove(&l.label);
            }
        }
        Sched::wake(&mut st);
    }
}
