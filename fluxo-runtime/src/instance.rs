//! The in-memory side of one live workflow instance: its lease, its replay
//! buffer, the commit path to the store, and the bookkeeping that lets the
//! runner park it when every operation in flight is waiting.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit};

use crate::error::Failure;
use crate::history::{to_stored, Entry, Event, Operation, Replay};
use crate::shared::Shared;
use crate::store::{
    Commit, CommitNow, CommitOutcome, Millis, NewInstance, SmallVec, StoreError, Transition,
};

/// Why an instance stopped running on this worker before its function
/// returned.
#[derive(Debug)]
pub(crate) enum Abort {
    /// Another worker holds the lease now; nothing more may be written.
    LeaseLost,
    /// The instance must be failed with this failure.
    Fail(Failure),
    /// A cancel was requested.
    Cancelled,
    /// The store failed; the instance is released and retried later.
    Store(StoreError),
    /// The workflow continues as new with this encoded input.
    ContinueAsNew(Vec<u8>),
}

/// Sent by the worker to a parked instance it claimed again.
pub(crate) struct Resume {
    pub lease_token: u64,
    pub inbox_seq: u64,
    pub cancel_requested: bool,
    pub permit: OwnedSemaphorePermit,
}

/// A parked or active instance as the worker sees it.
pub(crate) struct Instance {
    pub id: Arc<str>,
    pub workflow: String,
    pub shared: Arc<Shared>,
    state: Mutex<State>,
    /// Wakes commits waiting for their turn ([`State::committing`]).
    commit_done: Notify,
    /// Wakes the runner: an abort was set, or the instance may be idle.
    pub wake_runner: Notify,
    /// Bumped on every resume; blocked operations then check again. Made
    /// by the first operation that blocks: most runs have none.
    epoch: OnceLock<watch::Sender<u64>>,
    /// New leases for a parked instance, made on first use: most runs
    /// never park.
    resumes: OnceLock<Resumes>,
    /// `true` once a cancel was requested; running steps can watch it.
    /// Made on first use: most runs are neither cancelled nor watched.
    cancel_token: OnceLock<watch::Sender<bool>>,
}

/// The channel that hands new leases to a parked instance's runner.
struct Resumes {
    tx: mpsc::UnboundedSender<Resume>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Resume>>,
}

impl Resumes {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Resumes {
            tx,
            rx: tokio::sync::Mutex::new(rx),
        }
    }
}

struct State {
    lease_token: u64,
    next_event_id: u64,
    inbox_seq: u64,
    cancel_requested: bool,
    next_seq: u64,
    replay: Replay,
    /// Events recorded but not yet written; they ride along the next commit.
    lazy: Vec<(u64, Event)>,
    /// A commit is on its way to the store. Commits take turns, so event
    /// ids stay consecutive; the turn is a flag under this lock, not a lock
    /// of its own, so taking it costs nothing beyond building the commit.
    committing: bool,
    /// A commit waits for the turn: passing it on must wake
    /// [`Instance::commit_done`].
    commit_waited: bool,
    /// Operations started and not finished.
    in_flight: usize,
    /// Operations waiting on a timer, signal or child: seq -> (wake time, epoch).
    blocked: BTreeMap<u64, (Option<Millis>, u64)>,
    children: Vec<String>,
    abort: Option<Abort>,
    permit: Option<OwnedSemaphorePermit>,
    /// Running cancellation handlers: cancel requests no longer stop
    /// operations.
    cancelling: bool,
    /// Run, last registered first, when a cancel request stops the body.
    cancel_handlers: Vec<CancelHandler>,
    /// Patch markers recorded by this run, so a repeated `patched` call at
    /// the same point does not record twice.
    patches: Vec<(u64, String)>,
}

/// Work to do when a cancel request stops the workflow body (e.g. saga
/// compensations). Runs with the workflow's context, journaled.
pub(crate) type CancelHandler =
    Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send + 'static>;

/// Settings for a fresh instance.
pub(crate) struct InstanceInit {
    pub id: String,
    pub workflow: String,
    pub lease_token: u64,
    pub next_event_id: u64,
    pub inbox_seq: u64,
    pub cancel_requested: bool,
    pub replay: Replay,
    pub children: Vec<String>,
    pub permit: OwnedSemaphorePermit,
}

/// Result of a commit that did not abort.
pub(crate) enum Committed {
    Applied,
    InboxChanged,
}

/// Extra parts of a commit besides events.
#[derive(Default, Clone)]
pub(crate) struct CommitExtra {
    pub consume_signal: Option<u64>,
    pub new_instances: Vec<NewInstance>,
    pub cancel_instances: Vec<String>,
    pub transition: Transition,
}

impl CommitExtra {
    /// Nothing but events: the default.
    fn is_plain(&self) -> bool {
        self.consume_signal.is_none()
            && self.new_instances.is_empty()
            && self.cancel_instances.is_empty()
            && matches!(self.transition, Transition::None)
    }
}

impl Instance {
    pub(crate) fn new(shared: Arc<Shared>, init: InstanceInit) -> Arc<Self> {
        Arc::new(Instance {
            id: init.id.into(),
            workflow: init.workflow,
            shared,
            state: Mutex::new(State {
                lease_token: init.lease_token,
                next_event_id: init.next_event_id,
                inbox_seq: init.inbox_seq,
                cancel_requested: init.cancel_requested,
                next_seq: 0,
                replay: init.replay,
                lazy: Vec::new(),
                committing: false,
                commit_waited: false,
                in_flight: 0,
                blocked: BTreeMap::new(),
                children: init.children,
                abort: None,
                permit: Some(init.permit),
                cancelling: false,
                cancel_handlers: Vec::new(),
                patches: Vec::new(),
            }),
            cancel_token: OnceLock::new(),
            commit_done: Notify::new(),
            wake_runner: Notify::new(),
            epoch: OnceLock::new(),
            resumes: OnceLock::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ----- aborting -------------------------------------------------------

    /// Stops the instance; the runner drops the workflow future. The first
    /// reason wins.
    pub(crate) fn abort(&self, reason: Abort) {
        let mut st = self.state();
        if st.abort.is_none() {
            st.abort = Some(reason);
        }
        drop(st);
        self.wake_runner.notify_one();
    }

    pub(crate) fn take_abort(&self) -> Option<Abort> {
        self.state().abort.take()
    }

    /// Called by the worker when the store reports a cancel request.
    /// The workflow body stops at its next operation (or at once if every
    /// operation waits); running steps see it through their context and
    /// get a grace period to finish.
    pub(crate) fn request_cancel(&self) {
        let newly = !std::mem::replace(&mut self.state().cancel_requested, true);
        if newly {
            self.cancel_token().send_replace(true);
            self.wake_runner.notify_one();
        }
    }

    /// A cancel was requested and the body has not been stopped yet.
    pub(crate) fn cancel_pending(&self) -> bool {
        let st = self.state();
        st.cancel_requested && !st.cancelling
    }

    /// A receiver that turns `true` when a cancel is requested.
    pub(crate) fn cancel_watch(&self) -> watch::Receiver<bool> {
        self.cancel_token().subscribe()
    }

    /// Whether a cancel was requested, as running steps see it.
    pub(crate) fn cancel_seen(&self) -> bool {
        match self.cancel_token.get() {
            Some(token) => *token.borrow(),
            None => self.state().cancel_requested,
        }
    }

    /// The cancel flag's channel, made on first use from the flag it
    /// mirrors (the two turn `true` together, in `request_cancel`).
    fn cancel_token(&self) -> &watch::Sender<bool> {
        self.cancel_token
            .get_or_init(|| watch::Sender::new(self.state().cancel_requested))
    }

    /// Drops the cancellation handlers. They may hold the instance's own
    /// context (a saga does), so the runner drops them when it ends to break
    /// that cycle.
    pub(crate) fn clear_cancel_handlers(&self) {
        let handlers = std::mem::take(&mut self.state().cancel_handlers);
        drop(handlers);
    }

    /// Registers work to run if a cancel request stops the body.
    pub(crate) fn on_cancel(&self, handler: CancelHandler) {
        self.state().cancel_handlers.push(handler);
    }

    /// Takes the cancellation handlers (last registered first) and switches
    /// to cancelling mode. Returns the sequence number the handlers start at
    /// and whether the journal already marks it (a replay).
    pub(crate) fn start_cancelling(&self) -> (Vec<CancelHandler>, u64, bool) {
        let mut st = self.state();
        st.cancelling = true;
        st.abort = None;
        let mut handlers = std::mem::take(&mut st.cancel_handlers);
        handlers.reverse();
        let seq = st.next_seq;
        let marked = st.replay.cancel_at() == Some(seq);
        (handlers, seq, marked)
    }

    /// `ctx.patched(id)`: whether this point of the code runs the new
    /// branch. New runs record a marker; replays of runs that had the marker
    /// take the new branch, replays of older runs the old one.
    pub(crate) fn patched(&self, id: &str) -> bool {
        let mut st = self.state();
        let seq = st.next_seq;
        if st.replay.has_patch(seq, id) || st.patches.iter().any(|(s, p)| *s == seq && p == id) {
            return true;
        }
        if st.replay.has_from(seq) {
            return false;
        }
        st.patches.push((seq, id.to_owned()));
        st.lazy.push((seq, Event::Patched { id: id.to_owned() }));
        true
    }

    // ----- operations -----------------------------------------------------

    /// Starts an operation: assigns its sequence number and returns what the
    /// journal recorded for it. `op` names the operation; it is only called
    /// when there is a journaled one to check it against (on replay). `None`
    /// means the instance was aborted (non-determinism or a cancel request)
    /// and the caller must halt.
    pub(crate) fn begin(
        &self,
        op: impl FnOnce() -> Operation,
    ) -> Option<(OpGuard<'_>, Vec<Event>)> {
        let mut st = self.state();
        if st.abort.is_some() {
            return None;
        }
        let seq = st.next_seq;
        // A cancel stops the body where the journal says it did, or at the
        // live edge; while replaying older operations it does not.
        let stop_here =
            st.replay.cancel_at() == Some(seq) || (st.cancel_requested && !st.replay.has_from(seq));
        if stop_here && !st.cancelling {
            drop(st);
            self.abort(Abort::Cancelled);
            return None;
        }
        st.next_seq += 1;
        let recorded = st.replay.take(seq);
        if let Some(first) = recorded.first() {
            let journaled = first.operation();
            let op = op();
            if !journaled.matches(&op) {
                drop(st);
                self.abort(Abort::Fail(Failure::NonDeterminism {
                    seq,
                    expected: journaled.to_string(),
                    found: op.to_string(),
                }));
                return None;
            }
        }
        st.in_flight += 1;
        Some((OpGuard { inst: self, seq }, recorded))
    }

    /// The first journaled operation the code has not issued, if any.
    pub(crate) fn unreplayed(&self) -> Option<(u64, Operation)> {
        self.state().replay.first_pending()
    }

    pub(crate) fn lease_token(&self) -> u64 {
        self.state().lease_token
    }

    pub(crate) fn children(&self) -> Vec<String> {
        self.state().children.clone()
    }

    pub(crate) fn add_child(&self, id: String) {
        let mut st = self.state();
        if !st.children.contains(&id) {
            st.children.push(id);
        }
    }

    /// Records an event that needs no write of its own: it is written with
    /// the next commit, before anything the workflow does afterwards becomes
    /// durable.
    pub(crate) fn record_lazy(&self, seq: u64, event: Event) {
        self.state().lazy.push((seq, event));
    }

    // ----- committing -----------------------------------------------------

    /// Writes `events` (after any lazily recorded ones) under the lease. On a
    /// lost lease or a store error the instance is aborted and `None` is
    /// returned.
    pub(crate) async fn commit<E: Entry + Sync>(
        &self,
        seq: u64,
        events: &[E],
        extra: CommitExtra,
    ) -> Option<Committed> {
        self.commit_ending(None, seq, events, extra).await
    }

    /// [`Instance::commit`], which also ends operation `ending` once it is
    /// written (its journal entry is its last), under the same lock as the
    /// bookkeeping of the write. Aborted, the operation ends after the
    /// abort is set.
    pub(crate) async fn commit_ending<E: Entry + Sync>(
        &self,
        ending: Option<OpGuard<'_>>,
        seq: u64,
        events: &[E],
        extra: CommitExtra,
    ) -> Option<Committed> {
        // A step's commit carries nothing extra: no copy of it to make.
        let plain = extra.is_plain();
        let fresh_extra = || {
            if plain {
                CommitExtra::default()
            } else {
                extra.clone()
            }
        };
        // The lazy events recorded by now ride along (ones recorded while
        // this commit is on its way wait for the next). The turn is taken
        // under the lock that builds the commit: the common case, no other
        // commit on its way, costs no lock of its own. Its guard outlives
        // the lock, so if building panics the turn is passed on after the
        // lock is let go.
        let turn;
        let (not_done, lazy) = loop {
            {
                let mut st = self.state();
                if st.abort.is_some() {
                    return None;
                }
                if take_turn(&mut st) {
                    turn = CommitTurn(self);
                    let lazy = st.lazy.len();
                    let commit = self.build_commit(&st, lazy, seq, events, fresh_extra());
                    // A store that applies a commit at once (in memory)
                    // does so under the lock that built it, and the
                    // bookkeeping goes on under the same lock: one lock a
                    // commit instead of two.
                    match self.shared.store.commit_now(commit) {
                        CommitNow::Done(done) if !is_backend_error(&done) => {
                            let written = lazy + events.len();
                            return self.settle(done, st, turn, lazy, written, ending);
                        }
                        not_done => {
                            drop(st);
                            break (not_done, lazy);
                        }
                    }
                }
            }
            self.turn_passed().await;
        };
        let again = || self.build_commit(&self.state(), lazy, seq, events, fresh_extra());
        let outcome = self.write_through(not_done, again).await;
        self.settle(
            outcome,
            self.state(),
            turn,
            lazy,
            lazy + events.len(),
            ending,
        )
    }

    /// Records the outcome of a commit of the first `lazy` lazily recorded
    /// events and others, `written` entries in all, under the instance's
    /// lock `st`, passes the turn on, and ends operation `ending`. A lost
    /// lease or a store error aborts the instance and returns `None`; a
    /// cancel request the store reported is passed on to the instance.
    fn settle(
        &self,
        outcome: Result<CommitOutcome, StoreError>,
        st: MutexGuard<'_, State>,
        turn: CommitTurn<'_>,
        lazy: usize,
        written: usize,
        mut ending: Option<OpGuard<'_>>,
    ) -> Option<Committed> {
        // A local, so that on a panic the lock is let go before `turn` and
        // `ending` (parameters, dropped after the body's locals) take it
        // again to pass the turn on and end the operation.
        let mut st = st;
        let result = match outcome {
            Ok(CommitOutcome::Applied { cancel_requested }) => {
                Ok((Committed::Applied, cancel_requested))
            }
            Ok(CommitOutcome::InboxChanged {
                inbox_seq,
                cancel_requested,
            }) => {
                st.inbox_seq = inbox_seq;
                Ok((Committed::InboxChanged, cancel_requested))
            }
            Ok(CommitOutcome::LeaseLost) => Err(Abort::LeaseLost),
            Err(e) => Err(Abort::Store(e)),
        };
        let mut wake_runner = false;
        let result = match result {
            Ok(result) => {
                st.next_event_id += written as u64;
                if lazy > 0 {
                    st.lazy.drain(..lazy);
                }
                if let Some(op) = ending.take() {
                    wake_runner = op.end(&mut st);
                }
                Some(result)
            }
            Err(reason) => {
                // Set under the lock that passes the turn on: a commit
                // waiting for it sees the abort and writes nothing.
                st.abort.get_or_insert(reason);
                wake_runner = true;
                None
            }
        };
        let wake_committers = turn.pass(&mut st);
        drop(st);
        if wake_committers {
            self.commit_done.notify_waiters();
        }
        if wake_runner {
            self.wake_runner.notify_one();
        }
        // An aborted operation ends now, after the abort is set, as when
        // the runner drops the halted operation: the runner never sees the
        // instance idle without it.
        drop(ending);
        let (committed, cancel_requested) = result?;
        if cancel_requested {
            self.request_cancel();
        }
        Some(committed)
    }

    /// The final commit of a run: `transition` finishes or releases the
    /// instance. Errors are returned instead of aborting.
    pub(crate) async fn commit_final(
        &self,
        transition: Transition,
        cancel_instances: Vec<String>,
    ) -> Result<CommitOutcome, StoreError> {
        let _turn = self.commit_turn().await;
        let extra = CommitExtra {
            cancel_instances,
            transition,
            ..CommitExtra::default()
        };
        let lazy;
        let first = {
            let st = self.state();
            lazy = st.lazy.len();
            self.build_commit::<Event>(&st, lazy, 0, &[], extra.clone())
        };
        let again = || self.build_commit::<Event>(&self.state(), lazy, 0, &[], extra.clone());
        match self.shared.store.commit_now(first) {
            CommitNow::Done(done) if !is_backend_error(&done) => done,
            not_done => self.write_through(not_done, again).await,
        }
    }

    /// Writes what [`Store::commit_now`](crate::store::Store::commit_now)
    /// did not: the commit it handed back, or after its backend error the
    /// commit `again` builds afresh (that error counting as the first try),
    /// through [`Shared::commit`], retrying backend errors.
    async fn write_through(
        &self,
        not_done: CommitNow,
        again: impl Fn() -> Commit,
    ) -> Result<CommitOutcome, StoreError> {
        let (mut first, tried) = match not_done {
            CommitNow::Later(commit) => (Some(commit), None),
            CommitNow::Done(outcome) => (None, Some(outcome)),
        };
        retry_transient_after(tried, || {
            self.shared.commit(first.take().unwrap_or_else(&again))
        })
        .await
    }

    /// Takes this instance's turn to commit, waiting for its other commit
    /// on its way, if any.
    async fn commit_turn(&self) -> CommitTurn<'_> {
        while !take_turn(&mut self.state()) {
            self.turn_passed().await;
        }
        CommitTurn(self)
    }

    /// Waits until the commit on its way passes the turn on (at once if
    /// it has by now).
    async fn turn_passed(&self) {
        let passed = self.commit_done.notified();
        {
            let mut st = self.state();
            if !st.committing {
                return;
            }
            st.commit_waited = true;
        }
        passed.await;
    }

    /// The commit of the first `lazy` lazily recorded events, then `events`
    /// (of operation `seq`), and `extra`, from the instance's state `st`.
    /// Built afresh for every attempt, so the store can take it whole.
    fn build_commit<E: Entry>(
        &self,
        st: &State,
        lazy: usize,
        seq: u64,
        events: &[E],
        extra: CommitExtra,
    ) -> Commit {
        let mut stored = SmallVec::with_capacity(lazy + events.len());
        let mut event_id = st.next_event_id;
        for (s, e) in &st.lazy[..lazy] {
            stored.push(to_stored(e, event_id, *s));
            event_id += 1;
        }
        for e in events {
            stored.push(to_stored(e, event_id, seq));
            event_id += 1;
        }
        Commit {
            instance_id: Arc::clone(&self.id),
            lease_token: st.lease_token,
            events: stored,
            consume_signal: extra.consume_signal,
            new_instances: extra.new_instances,
            cancel_instances: extra.cancel_instances,
            transition: extra.transition,
        }
    }

    /// Restarts the instance with `input` and an empty journal.
    pub(crate) async fn continue_as_new(
        &self,
        input: Vec<u8>,
    ) -> Result<CommitOutcome, StoreError> {
        let _turn = self.commit_turn().await;
        let token = self.state().lease_token;
        let store = &self.shared.store;
        retry_transient(|| store.continue_as_new(&self.id, token, input.clone())).await
    }

    // ----- waiting and parking ---------------------------------------------

    /// Blocks operation `seq` until the next resume (or inbox change). The
    /// runner parks the instance once every operation in flight is blocked.
    pub(crate) async fn block(&self, seq: u64, wake_at: Option<Millis>) {
        let mut epoch = self.epoch.get_or_init(|| watch::Sender::new(0)).subscribe();
        let current = *epoch.borrow_and_update();
        self.state().blocked.insert(seq, (wake_at, current));
        self.wake_runner.notify_one();
        // The sender lives as long as `self`, so this only ends on a new epoch.
        let _ = epoch.changed().await;
        self.state().blocked.remove(&seq);
    }

    /// If every operation in flight is blocked since the current epoch, the
    /// time the instance must wake up at (`Some(None)`: only when woken).
    pub(crate) fn idle_until(&self) -> Option<Option<Millis>> {
        let st = self.state();
        // No channel yet: nothing ever blocked, nor was bumped.
        let epoch = self.epoch.get().map_or(0, |e| *e.borrow());
        if st.in_flight == 0
            || st.blocked.len() != st.in_flight
            || st.blocked.values().any(|(_, e)| *e != epoch)
            || st.abort.is_some()
        {
            return None;
        }
        Some(st.blocked.values().filter_map(|(w, _)| *w).min())
    }

    /// Commits a park. `Some(true)`: parked (lease released; wait for
    /// [`Instance::wait_resume`]); `Some(false)`: the inbox moved, blocked
    /// operations were told to check again; `None`: aborted.
    pub(crate) async fn park(&self, wake_at: Option<Millis>) -> Option<bool> {
        let seen_inbox = self.state().inbox_seq;
        let extra = CommitExtra {
            transition: Transition::Park {
                wake_at,
                seen_inbox,
            },
            ..CommitExtra::default()
        };
        match self.commit::<Event>(0, &[], extra).await? {
            Committed::Applied => {
                let permit = self.state().permit.take();
                drop(permit);
                Some(true)
            }
            Committed::InboxChanged => {
                self.next_epoch();
                Some(false)
            }
        }
    }

    /// The next event id (journal length) as this instance knows it.
    pub(crate) fn next_event_id(&self) -> u64 {
        self.state().next_event_id
    }

    /// Hands a new lease to a parked instance.
    pub(crate) fn resume(&self, resume: Resume) {
        // A closed channel means the runner is gone; the worker notices.
        let _ = self.resumes.get_or_init(Resumes::new).tx.send(resume);
    }

    /// Waits for [`Instance::resume`]; then blocked operations check again.
    pub(crate) async fn wait_resume(&self) -> bool {
        let resumes = self.resumes.get_or_init(Resumes::new);
        let Some(r) = resumes.rx.lock().await.recv().await else {
            return false;
        };
        {
            let mut st = self.state();
            st.lease_token = r.lease_token;
            st.inbox_seq = r.inbox_seq;
            st.permit = Some(r.permit);
        }
        if r.cancel_requested {
            self.request_cancel();
        }
        self.next_epoch();
        true
    }

    /// Tells blocked operations to check again (none can block before the
    /// channel exists).
    fn next_epoch(&self) {
        if let Some(epoch) = self.epoch.get() {
            epoch.send_modify(|e| *e += 1);
        }
    }

    /// Gives the worker slot back (when the runner ends).
    pub(crate) fn release_permit(&self) {
        let permit = self.state().permit.take();
        drop(permit);
    }
}

/// Marks an operation in flight; dropping it (completion or cancellation of
/// the operation's future) ends it. It borrows the instance from the
/// operation's context, which outlives it.
pub(crate) struct OpGuard<'a> {
    inst: &'a Instance,
    /// The operation's sequence number.
    pub seq: u64,
}

impl<'a> OpGuard<'a> {
    pub(crate) fn instance(&self) -> &'a Instance {
        self.inst
    }

    /// Ends the operation under the lock `st` the caller holds. `true`:
    /// other operations wait, so the runner must be woken (once the lock
    /// is let go) to see whether the instance is idle.
    fn end(self, st: &mut State) -> bool {
        let seq = self.seq;
        std::mem::forget(self);
        end_operation(st, seq)
    }
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        let others_wait = end_operation(&mut self.inst.state(), self.seq);
        if others_wait {
            self.inst.wake_runner.notify_one();
        }
    }
}

/// Takes operation `seq` out of those in flight; see [`OpGuard::end`].
fn end_operation(st: &mut State, seq: u64) -> bool {
    st.in_flight = st.in_flight.saturating_sub(1);
    st.blocked.remove(&seq);
    // Only operations still waiting can make the instance idle now.
    !st.blocked.is_empty()
}

/// Takes the turn to commit ([`State::committing`]) unless another commit
/// has it.
fn take_turn(st: &mut State) -> bool {
    !std::mem::replace(&mut st.committing, true)
}

/// An instance's turn to commit, held while its commit is on its way.
/// Dropped (a commit dropped half-way, or a commit that needs no lock
/// after its write), it passes the turn on itself.
struct CommitTurn<'a>(&'a Instance);

impl CommitTurn<'_> {
    /// Passes the turn on under the lock `st` the caller holds. `true`: a
    /// commit waits, so [`Instance::commit_done`] must be notified once
    /// the lock is let go.
    fn pass(self, st: &mut State) -> bool {
        std::mem::forget(self);
        pass_turn(st)
    }
}

impl Drop for CommitTurn<'_> {
    fn drop(&mut self) {
        let waited = pass_turn(&mut self.0.state());
        if waited {
            self.0.commit_done.notify_waiters();
        }
    }
}

/// Frees the turn to commit; see [`CommitTurn::pass`].
fn pass_turn(st: &mut State) -> bool {
    st.committing = false;
    std::mem::take(&mut st.commit_waited)
}

/// Whether `result` is a backend error (connection lost, server
/// restarting), which [`retry_transient`] retries.
fn is_backend_error<T>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::Backend(_)))
}

/// How often a storage call that failed with a backend error (connection
/// lost, server restarting) is retried before the instance is released.
const TRANSIENT_RETRIES: u32 = 6;

/// Runs `call`, retrying backend errors with a growing pause (about 3 s in
/// all). Retrying a commit is safe: if the first try was applied after all,
/// the retry is refused by the fence (`Conflict`), and the instance is
/// replayed from a journal that holds the entry.
pub(crate) async fn retry_transient<T, F, Fut>(call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    retry_transient_after(None, call).await
}

/// [`retry_transient`] whose first try, if `tried` is set, was made already
/// (without `call`) and ended as `tried`: the same tries and pauses in all.
async fn retry_transient_after<T, F, Fut>(
    mut tried: Option<Result<T, StoreError>>,
    mut call: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut pause = std::time::Duration::from_millis(50);
    let mut tries = 0;
    loop {
        let outcome = match tried.take() {
            Some(outcome) => outcome,
            None => call().await,
        };
        match outcome {
            Err(StoreError::Backend(e)) if tries < TRANSIENT_RETRIES => {
                tries += 1;
                tracing::warn!(error = %e, ?pause, "storage call failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use crate::store::memory::MemoryStore;
    use crate::store::{ClaimRequest, Store};

    /// Instance `id` of a fresh workflow on `store`, claimed, as a runner
    /// holds it.
    async fn claimed(store: &Arc<dyn Store>, id: &str) -> Arc<Instance> {
        let new = NewInstance {
            id: id.to_owned(),
            workflow: "w".to_owned(),
            version: 1,
            input: Vec::new(),
            parent_id: None,
        };
        store.create_instance(new).await.expect("create");
        let req = ClaimRequest {
            owner: "here".to_owned(),
            workflows: vec![("w".to_owned(), 1)],
            limit: 1,
            lease: Duration::from_secs(30),
        };
        let batch = store.claim(&req).await.expect("claim");
        let c = batch.claimed.into_iter().next().expect("claimed");
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        Instance::new(
            Shared::new(Arc::clone(store)),
            InstanceInit {
                id: c.record.id,
                workflow: c.record.workflow,
                lease_token: c.lease_token,
                next_event_id: c.next_event_id,
                inbox_seq: c.inbox_seq,
                cancel_requested: false,
                replay: Replay::new(Vec::new()),
                children: Vec::new(),
                permit: slots.try_acquire_owned().expect("permit"),
            },
        )
    }

    /// Journal `(event id, operation)` pairs of instance `id`.
    async fn journal(store: &Arc<dyn Store>, id: &str) -> Vec<(u64, u64)> {
        let history = store.load_history(id).await.expect("history");
        history.iter().map(|e| (e.event_id, e.seq)).collect()
    }

    /// Commits wait while another holds the turn, go on when that one is
    /// dropped half-way (its future cancelled), and write densely; the
    /// turn is free again after them.
    #[tokio::test]
    async fn commits_take_turns() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let inst = claimed(&store, "turns").await;
        let held = inst.commit_turn().await;
        let commits: Vec<_> = (0..3)
            .map(|seq| {
                let inst = Arc::clone(&inst);
                tokio::spawn(async move {
                    let events = [Event::TimerFired];
                    inst.commit(seq, &events, CommitExtra::default())
                        .await
                        .is_some()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            journal(&store, "turns").await.is_empty(),
            "written out of turn"
        );

        drop(held);
        for commit in commits {
            let done = tokio::time::timeout(Duration::from_secs(5), commit);
            let committed = done.await.expect("the turn was not passed on");
            assert!(committed.expect("commit task"), "commit aborted");
        }
        let mut written = journal(&store, "turns").await;
        let ids: Vec<u64> = written.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [0, 1, 2]);
        written.sort_by_key(|(_, seq)| *seq);
        assert_eq!(
            written.iter().map(|(_, seq)| *seq).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(inst.next_event_id(), 3);

        let after = tokio::time::timeout(
            Duration::from_secs(5),
            inst.commit(3, &[Event::TimerFired], CommitExtra::default()),
        );
        assert!(after.await.expect("turn left taken").is_some());
        assert_eq!(journal(&store, "turns").await.len(), 4);
    }

    /// The cancel flag reads the same before and after its channel is made:
    /// a request made before anyone watched is seen by later watchers, and
    /// one made after is seen by earlier ones.
    #[tokio::test]
    async fn a_cancel_is_seen_whenever_its_watcher_came() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let inst = claimed(&store, "cancel-first").await;
        assert!(!inst.cancel_seen());
        inst.request_cancel();
        assert!(inst.cancel_seen());
        assert!(*inst.cancel_watch().borrow());

        let inst = claimed(&store, "watch-first").await;
        let mut watch = inst.cancel_watch();
        assert!(!*watch.borrow());
        inst.request_cancel();
        let seen = tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|c| *c));
        assert!(seen
            .await
            .expect("the request never reached the watcher")
            .is_ok());
        assert!(inst.cancel_seen());
    }

    /// A step's commit that ends its operation takes it out of those in
    /// flight, written or aborted.
    #[tokio::test]
    async fn a_written_commit_ends_its_operation() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let inst = claimed(&store, "ends").await;
        let (op, _) = inst.begin(|| Operation::Timer).expect("begin");
        assert_eq!(inst.state().in_flight, 1);
        let events = [Event::TimerFired];
        let committed = inst.commit_ending(Some(op), 0, &events, CommitExtra::default());
        assert!(committed.await.is_some());
        assert_eq!(inst.state().in_flight, 0);

        let (op, _) = inst.begin(|| Operation::Timer).expect("begin");
        inst.state().lease_token += 1; // as if another worker took it over
        let committed = inst.commit_ending(Some(op), 1, &events, CommitExtra::default());
        assert!(committed.await.is_none(), "written under a stale lease");
        assert!(matches!(inst.take_abort(), Some(Abort::LeaseLost)));
        assert_eq!(
            inst.state().in_flight,
            0,
            "the aborted operation's guard is gone"
        );
    }

    fn backend() -> StoreError {
        StoreError::Backend("connection reset".into())
    }

    /// A first try made elsewhere counts: as many tries in all as
    /// `retry_transient` makes, then its error.
    #[tokio::test(start_paused = true)]
    async fn a_try_made_already_counts_as_the_first() {
        let calls = AtomicU32::new(0);
        let failing = || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(backend()) }
        };
        let out = retry_transient_after(Some(Err(backend())), failing).await;
        assert!(matches!(out, Err(StoreError::Backend(_))));
        assert_eq!(calls.load(Ordering::SeqCst), TRANSIENT_RETRIES);

        calls.store(0, Ordering::SeqCst);
        let out = retry_transient(failing).await;
        assert!(matches!(out, Err(StoreError::Backend(_))));
        assert_eq!(calls.load(Ordering::SeqCst), TRANSIENT_RETRIES + 1);
    }

    /// After a backend error from the first try, the next try runs (after a
    /// pause) and its success is the answer; a final answer from the first
    /// try is returned without a call.
    #[tokio::test(start_paused = true)]
    async fn a_failed_first_try_is_retried_and_a_final_one_is_not() {
        let calls = AtomicU32::new(0);
        let succeeding = || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<u32, StoreError>(7) }
        };
        let started = tokio::time::Instant::now();
        let out = retry_transient_after(Some(Err(backend())), succeeding).await;
        assert_eq!(out.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));

        let out = retry_transient_after(Some(Ok(3)), succeeding).await;
        assert_eq!(out.unwrap(), 3);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no call after a final answer"
        );
    }
}
