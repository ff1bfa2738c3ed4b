//! Workers: claim runnable instances under leases, run them, keep live
//! instances in memory (sticky) and renew their leases.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::abort_on_drop::AbortOnDrop;
use crate::client::Fluxo;
use crate::instance::{Instance, Resume};
use crate::live_set::{LiveEntry, LiveSet};
use crate::panics;
use crate::shared::Shared;
use crate::store::{
    now_millis, ClaimRequest, ClaimedInstance, Commit, CommitOutcome, Millis, StoreError,
    Transition,
};

/// Configures and starts a worker. Get one from [`Fluxo::worker`].
#[derive(Debug, Clone)]
pub struct WorkerBuilder {
    fluxo: Fluxo,
    id: Option<String>,
    concurrency: usize,
    lease: Duration,
    poll_interval: Option<Duration>,
    max_cached: usize,
    shutdown_grace: Duration,
    cancel_grace: Duration,
    renew: bool,
}

impl WorkerBuilder {
    pub(crate) fn new(fluxo: Fluxo) -> Self {
        WorkerBuilder {
            fluxo,
            id: None,
            concurrency: 64,
            lease: Duration::from_secs(30),
            poll_interval: None,
            max_cached: 10_000,
            shutdown_grace: Duration::from_secs(10),
            cancel_grace: Duration::from_secs(10),
            renew: true,
        }
    }

    /// How long a step that is running when its workflow is cancelled may
    /// go on (it sees the request through [`StepContext`](crate::StepContext))
    /// before it is stopped (default 10 s; `Duration::MAX`: never stopped).
    pub fn cancel_grace(mut self, d: Duration) -> Self {
        self.cancel_grace = d;
        self
    }

    /// Turns lease renewal off, so the worker behaves like one that stalls
    /// (tests of lease expiry and fencing use this).
    #[doc(hidden)]
    pub fn renew_leases(mut self, on: bool) -> Self {
        self.renew = on;
        self
    }

    /// Worker identity in leases (default: a random id).
    ///
    /// Give each worker process a stable id that no other live process
    /// uses (a host or pod name, say): a process that starts under the id
    /// of one that died takes over that process's instances at once,
    /// instead of after their leases expire. It ends every lease held under
    /// its id when it starts; the instances are claimed again under new
    /// lease tokens, so anything the old process might still write is
    /// fenced off. Two live processes with one id stay correct (fencing)
    /// but take work from each other on every start.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// How many instances may run at once; parked instances do not count
    /// (default 64; at least 1, at most `Semaphore::MAX_PERMITS` of
    /// Tokio).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.clamp(1, Semaphore::MAX_PERMITS);
        self
    }

    /// Lease length (default 30 s). A crashed worker's instances are taken
    /// over by others after this long; leases are renewed every third of it.
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d.max(Duration::from_millis(100));
        self
    }

    /// How often an idle worker looks for work started by other processes.
    /// Work started through the same [`Fluxo`] is picked up at once, and so
    /// is other processes' work on backends that push notices (Postgres);
    /// there polling is only a fallback. Default: 100 ms, or 1 s on a
    /// backend that pushes. An interval too long to add to the clock
    /// (`Duration::MAX`) looks once a day.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = Some(d.max(Duration::from_millis(1)));
        self
    }

    /// How many parked instances stay in memory, ready to resume without a
    /// replay (default 10 000). Beyond that the longest parked are evicted
    /// and replayed from their journal when they wake.
    pub fn max_cached(mut self, n: usize) -> Self {
        self.max_cached = n;
        self
    }

    /// How long [`Worker::shutdown`] waits for running instances to finish or
    /// park before releasing them to other workers (default 10 s;
    /// `Duration::MAX`: as long as they take).
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.shutdown_grace = d;
        self
    }

    /// Starts the worker on the current Tokio runtime.
    pub fn spawn(self) -> Worker {
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| format!("worker-{}", uuid::Uuid::new_v4().simple()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let rt = Arc::new(WorkerRuntime {
            id: id.clone(),
            shared: Arc::clone(&self.fluxo.shared),
            semaphore: Arc::new(Semaphore::new(self.concurrency)),
            slot_freed: Notify::new(),
            live: Mutex::new(LiveSet::default()),
            stopping: AtomicBool::new(false),
            max_cached: self.max_cached,
            cancel_grace: self.cancel_grace,
            next_run: AtomicU64::new(0),
        });
        self.fluxo
            .shared
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&rt));
        let task = tokio::spawn(Arc::clone(&rt).run(self.clone(), stop_rx));
        Worker {
            id,
            rt,
            stop: stop_tx,
            task,
            grace: self.shutdown_grace,
        }
    }

    /// Runs the worker until the process receives Ctrl-C, then shuts it down
    /// gracefully.
    pub async fn run(self) -> std::io::Result<()> {
        let worker = self.spawn();
        let r = tokio::signal::ctrl_c().await;
        worker.shutdown().await;
        r
    }
}

/// A running worker. Dropping it does not stop it; call
/// [`Worker::shutdown`].
pub struct Worker {
    id: String,
    rt: Arc<WorkerRuntime>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    grace: Duration,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("id", &self.id).finish()
    }
}

impl Worker {
    /// The worker's lease identity.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Number of instances in memory (running and parked).
    pub fn live_instances(&self) -> usize {
        self.rt.live().len()
    }

    /// Stops claiming, waits up to the grace period for running instances to
    /// finish or park, then releases the rest so other workers take them
    /// over at once. Parked instances hold no lease and are simply dropped.
    pub async fn shutdown(self) {
        self.rt.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop.send(true);
        // A grace too long to add to the clock waits as long as it takes.
        let deadline = Instant::now().checked_add(self.grace);
        loop {
            let active = self.rt.live().running();
            if active == 0 || deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let entries = self.rt.live().drain();
        for (id, entry) in entries {
            entry.abort.abort();
            if entry.parked.is_some() {
                continue;
            }
            // Also a run still loading its journal, and one just resumed
            // (its new lease is the entry's before the runner has it).
            let release = release(id.as_str().into(), entry.lease_token);
            if let Err(e) = self.rt.shared.store.commit(release).await {
                tracing::warn!(instance = %id, error = %e, "cannot release instance; its lease will expire");
            }
        }
        let _ = self.task.await;
        tracing::info!(worker = %self.id, "worker stopped");
    }
}

pub(crate) struct WorkerRuntime {
    id: String,
    pub(crate) shared: Arc<Shared>,
    semaphore: Arc<Semaphore>,
    slot_freed: Notify,
    live: Mutex<LiveSet>,
    stopping: AtomicBool,
    max_cached: usize,
    pub(crate) cancel_grace: Duration,
    next_run: AtomicU64,
}

impl WorkerRuntime {
    fn live(&self) -> MutexGuard<'_, LiveSet> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn run(self: Arc<Self>, cfg: WorkerBuilder, mut stop: watch::Receiver<bool>) {
        tracing::info!(worker = %self.id, concurrency = cfg.concurrency, backend = self.shared.store.backend_name(), "worker started");
        let mut tasks = JoinSet::new();
        // Renewal ends with this loop, however it ends: leases renewed for a
        // loop that no longer runs their instances would keep them here.
        let renew =
            tokio::spawn(Arc::clone(&self).renew_leases(cfg.lease, cfg.renew, stop.clone()))
                .abort_handle();
        let _renewal = AbortOnDrop(renew);
        let mut work = self.shared.work.subscribe();
        // Other processes' work, pushed by the store when it can.
        let mut pushed = self.shared.store.work_notifications();
        let poll_interval = cfg.poll_interval.unwrap_or(if pushed.is_some() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(100)
        });
        if cfg.id.is_some() {
            self.take_over_own_leases().await;
        }
        let mut backoff = Duration::from_millis(50);
        // Since when the store has reported a wake-up that is due by this
        // process's clock but not handed it out: its clock is behind ours
        // (Postgres and Redis keep time by the server's). The worker waits
        // as long as that has lasted (at least 1 ms, at most its poll
        // interval) before it claims again, so a skew costs a few claims,
        // not a loop of them, and delays the wake-up by about as much again.
        let mut overdue_since: Option<Instant> = None;
        // Built once; its workflows again only when registrations change.
        let mut req = ClaimRequest {
            owner: self.id.clone(),
            workflows: Vec::new(),
            limit: 0,
            lease: cfg.lease,
        };
        let mut registered = None;
        // One timer for the idle wait, moved only when it must fire
        // earlier or has fired: re-arming it on every pass costs the
        // timer wheel's lock each time.
        let idle = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(idle);
        while !*stop.borrow() {
            self.reap(&mut tasks);
            let free = self.semaphore.available_permits();
            let mut next_wake: Option<Millis> = None;
            let mut full_batch = false;
            let mut claimed_none = false;
            if free > 0 {
                {
                    let registry = self.shared.registry();
                    if registered != Some(registry.generation()) {
                        registered = Some(registry.generation());
                        req.workflows = registry.keys();
                    }
                }
                req.limit = free.min(256);
                if !req.workflows.is_empty() {
                    // A store that panics here is treated as one that failed.
                    match panics::catch_store_call(self.shared.store.claim(&req)).await {
                        Ok(batch) => {
                            backoff = Duration::from_millis(50);
                            full_batch = batch.more || batch.claimed.len() == req.limit;
                            next_wake = batch.next_wake;
                            claimed_none = batch.claimed.is_empty();
                            for c in batch.claimed {
                                self.dispatch(c, &mut tasks);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, ?backoff, "claim failed; backing off");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    }
                }
            }
            if full_batch && self.semaphore.available_permits() > 0 {
                continue;
            }
            // Every slot is taken, and more work may be waiting (none was
            // free to claim with, or the claim filled them all): claim again
            // as soon as one frees.
            let slots_full = free == 0 || full_batch;
            let mut wait = poll_interval;
            if let Some(at) = next_wake {
                let until = at.saturating_sub(now_millis());
                if until <= 0 && claimed_none {
                    let since = *overdue_since.get_or_insert_with(Instant::now);
                    wait = wait.min(since.elapsed().max(Duration::from_millis(1)));
                } else {
                    overdue_since = None;
                    wait = wait.min(Duration::from_millis(until.max(0) as u64));
                }
            } else {
                overdue_since = None;
            }
            // A poll interval too long to add to the clock: a day, then
            // look again.
            let now = tokio::time::Instant::now();
            let deadline = now
                .checked_add(wait)
                .unwrap_or_else(|| now + Duration::from_secs(86_400));
            if idle.is_elapsed() || idle.deadline() > deadline {
                idle.as_mut().reset(deadline);
            }
            let remote = async {
                match pushed.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            // A dropped `Worker` handle leaves the worker running (only
            // `shutdown` stops it): its channel closing is no wake-up, or
            // this loop would spin.
            let stopped = async {
                if stop.changed().await.is_err() {
                    std::future::pending::<()>().await
                }
            };
            tokio::select! {
                _ = work.changed() => {}
                _ = remote => {}
                _ = self.slot_freed.notified(), if slots_full => {}
                _ = &mut idle => {}
                _ = stopped => {}
            }
        }
        // Runner tasks are aborted by `Worker::shutdown`; wait for them here.
        while tasks.join_next().await.is_some() {}
    }

    /// Resumes a cached parked instance, or starts a runner that replays it.
    fn dispatch(self: &Arc<Self>, c: ClaimedInstance, tasks: &mut JoinSet<()>) {
        if self.stopping.load(Ordering::SeqCst) {
            // Claimed as `shutdown` began: it may have released what it
            // found already, so this one goes back at once.
            self.give_back(c.record.id.as_str().into(), c.lease_token);
            return;
        }
        let Ok(permit) = Arc::clone(&self.semaphore).try_acquire_owned() else {
            // Cannot happen: we claim at most the free permits. Leave the
            // claim to expire rather than run over the limit.
            tracing::warn!(instance = %c.record.id, "no free slot for a claimed instance");
            return;
        };
        let mut live = self.live();
        if let Some(entry) = live.remove(&c.record.id) {
            match (&entry.instance, entry.parked) {
                (Some(inst), Some(p)) if p.journal_len == c.next_event_id => {
                    inst.resume(Resume {
                        lease_token: c.lease_token,
                        inbox_seq: c.inbox_seq,
                        cancel_requested: c.record.cancel_requested,
                        permit,
                    });
                    let mut entry = entry;
                    entry.lease_token = c.lease_token;
                    self.runs_now(live, c.record.id, entry);
                    return;
                }
                // Someone else advanced it, or our copy is mid-park: replay.
                _ => entry.abort.abort(),
            }
        }
        let id = c.record.id.clone();
        let lease_token = c.lease_token;
        let run = self.next_run.fetch_add(1, Ordering::Relaxed);
        // Boxed: the runner's future is large, and the task would otherwise
        // copy all of it on every move into place.
        let runner = Box::pin(crate::runner::run(Arc::clone(self), c, run, permit));
        let abort = tasks.spawn(runner);
        let entry = LiveEntry {
            run,
            instance: None,
            abort,
            lease_token,
            parked: None,
        };
        self.runs_now(live, id, entry);
    }

    /// Enters instance `id` as running here and wakes the callers waiting
    /// on its end, which hear of it here from now on (they look at the
    /// live set once woken, so the entry goes in first).
    fn runs_now(&self, mut live: MutexGuard<'_, LiveSet>, id: String, entry: LiveEntry) {
        live.insert_running(id.clone(), entry);
        drop(live);
        self.shared.finished.claimed_here(&id);
    }

    /// Reaps finished runner tasks. A runner that panicked never told the
    /// store how its run ended (user code's panics are caught where it runs,
    /// so this is a bug in engine or store code): its entry goes, which
    /// frees its slot, and its lease is given back so the instance runs
    /// again from its journal.
    fn reap(self: &Arc<Self>, tasks: &mut JoinSet<()>) {
        while let Some(done) = tasks.try_join_next() {
            let Err(e) = done else { continue };
            if !e.is_panic() {
                continue;
            }
            let removed = self.live().remove_task(e.id());
            if let Some((id, entry)) = removed {
                tracing::error!(instance = %id, "the run panicked; giving its lease back so that it runs again");
                let lease_token = entry.lease_token;
                // Its instance held the slot.
                drop(entry);
                self.slot_freed.notify_one();
                self.give_back(id.into(), lease_token);
            }
        }
    }

    /// Gives instance `id`'s lease back, so that a claim (here or in another
    /// process) runs it again from its journal: for a run that ended without
    /// the store learning how (its last commit failed past the retries, or
    /// the run panicked). The instance has left the worker's live set, so
    /// its lease is no longer renewed: this keeps trying in the background
    /// while the store fails with backend errors, until the lease runs out
    /// (a claim then takes the instance as it would after a give-back) or
    /// the worker stops.
    pub(crate) fn give_back(self: &Arc<Self>, id: Arc<str>, lease_token: u64) {
        let worker = Arc::clone(self);
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(50);
            loop {
                // A store that panics here is treated as one that failed.
                let release = release(Arc::clone(&id), lease_token);
                match panics::catch_store_call(worker.shared.store.commit(release)).await {
                    Ok(CommitOutcome::LeaseLost) => return,
                    Ok(_) => {
                        tracing::debug!(instance = %id, "lease given back");
                        worker.shared.notify_work();
                        return;
                    }
                    Err(StoreError::Backend(e)) if !worker.stopping.load(Ordering::SeqCst) => {
                        tracing::warn!(instance = %id, error = %e, ?pause, "cannot give the lease back yet; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => {
                        tracing::warn!(instance = %id, error = %e, "cannot give the lease back");
                        return;
                    }
                }
            }
        });
    }

    /// Ends the leases held under this worker's id, which belong to an
    /// earlier process of the same id (this one holds none yet), so the
    /// claims that follow take those instances at once.
    async fn take_over_own_leases(&self) {
        match self.shared.store.end_leases(&self.id).await {
            Ok(_) => {
                tracing::debug!(worker = %self.id, "ended leases left by an earlier process of this id")
            }
            Err(e) => {
                tracing::warn!(error = %e, worker = %self.id, "cannot end leases left under this id; they expire on their own")
            }
        }
    }

    /// Whether this worker runs instance `id` now: claimed, and not parked.
    pub(crate) fn runs(&self, id: &str) -> bool {
        self.live().get(id).is_some_and(|e| e.parked.is_none())
    }

    /// Passes a cancel request to instance `id` if it runs here.
    pub(crate) fn cancel_live(&self, id: &str) {
        let inst = self.live().get(id).and_then(|e| e.instance.clone());
        if let Some(inst) = inst {
            inst.request_cancel();
        }
    }

    /// Called by a runner once it has rebuilt its instance.
    pub(crate) fn attach(&self, id: &str, run: u64, inst: Arc<Instance>) {
        if let Some(e) = self.live().get_mut(id).filter(|e| e.run == run) {
            e.instance = Some(inst);
        }
    }

    /// Called by a runner when it ends; a newer runner of the same instance
    /// keeps its entry.
    pub(crate) fn detach(&self, id: &str, run: u64) {
        let mut live = self.live();
        if live.get(id).is_some_and(|e| e.run == run) {
            live.remove(id);
        }
        drop(live);
        self.slot_freed.notify_one();
    }

    /// Records that run `run` of an instance parked with `next_event_id`
    /// journal entries, and evicts the longest-parked ones beyond the cache
    /// size. A newer run of the instance (claimed here once the park was
    /// written) keeps its entry as it is.
    pub(crate) fn parked(&self, id: &str, run: u64, next_event_id: u64, wake_at: Option<Millis>) {
        let mut live = self.live();
        if live.get(id).is_some_and(|e| e.run == run) {
            live.mark_parked(id, next_event_id);
        }
        while live.parked() > self.max_cached {
            match live.pop_longest_parked() {
                Some((_, evicted)) => evicted.abort.abort(),
                None => break,
            }
        }
        drop(live);
        self.slot_freed.notify_one();
        if wake_at.is_some() {
            // Let the claim loop learn the new wake-up time.
            self.shared.notify_work();
        }
    }

    async fn renew_leases(
        self: Arc<Self>,
        lease: Duration,
        enabled: bool,
        stop: watch::Receiver<bool>,
    ) {
        if !enabled {
            return;
        }
        let every = lease / 3;
        loop {
            tokio::time::sleep(every).await;
            if *stop.borrow() || self.stopping.load(Ordering::SeqCst) {
                return;
            }
            // Only the instances this worker runs: a lease it holds
            // without knowing (a claim whose answer was lost) runs out.
            let running = self.live().running_ids();
            if running.is_empty() {
                continue;
            }
            match self
                .shared
                .store
                .renew_leases(&self.id, &running, lease)
                .await
            {
                Ok(cancelled) => {
                    for id in cancelled {
                        self.cancel_live(&id);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
        }
    }
}

/// The commit that ends lease `lease_token` of instance `id` and leaves the
/// instance runnable at once.
fn release(id: Arc<str>, lease_token: u64) -> Commit {
    Commit {
        instance_id: id,
        lease_token,
        transition: Transition::Release,
        ..Commit::default()
    }
}
