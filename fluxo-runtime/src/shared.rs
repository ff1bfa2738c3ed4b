//! State shared by a [`Fluxo`](crate::Fluxo) handle, its workers and its
//! running instances.

use std::sync::{Arc, OnceLock, RwLock};

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::committer::Committer;
use crate::finish_watch::FinishWatches;
use crate::middleware::MiddlewareStack;
use crate::observe::Observer;
use crate::store::{Commit, CommitOutcome, Store, StoreResult};
use crate::workflow::Registry;

pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub registry: RwLock<Registry>,
    /// Bumped when this process creates or wakes work, so local workers
    /// claim at once instead of waiting for their next poll.
    pub work: watch::Sender<u64>,
    /// Callers waiting for an instance to finish in this process.
    pub finished: Arc<FinishWatches>,
    /// Group-commit writer, started on first use for stores that prefer
    /// batches.
    committer: OnceLock<Committer>,
    /// The installed observer; unset costs one atomic load per event site.
    pub observer: OnceLock<Arc<dyn Observer>>,
    /// Middleware around every step attempt.
    pub middleware: OnceLock<MiddlewareStack>,
    /// This process's workers, so a cancel reaches a running instance at once.
    pub workers: std::sync::Mutex<Vec<std::sync::Weak<crate::worker::WorkerRuntime>>>,
}

impl Shared {
    pub(crate) fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Shared {
            store,
            registry: RwLock::new(Registry::default()),
            work: watch::Sender::new(0),
            finished: Arc::default(),
            committer: OnceLock::new(),
            observer: OnceLock::new(),
            middleware: OnceLock::new(),
            workers: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// This client's workers that are still alive.
    fn local_workers(&self) -> Vec<Arc<crate::worker::WorkerRuntime>> {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.retain(|w| w.strong_count() > 0);
        workers
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }

    /// Tells a local worker running instance `id` that a cancel was
    /// requested (other processes learn it from the store).
    pub(crate) fn cancel_local(&self, id: &str) {
        for w in self.local_workers() {
            w.cancel_live(id);
        }
    }

    /// Whether a worker of this client runs instance `id` now (leased and
    /// not parked): its finish will then be told here at once.
    pub(crate) fn runs_here(&self, id: &str) -> bool {
        self.local_workers().iter().any(|w| w.runs(id))
    }

    /// Calls `f` with the observer, if one is installed (so events are only
    /// built when someone listens). An observer that panics is logged; the
    /// workflow it watched goes on.
    #[inline]
    pub(crate) fn observe(&self, f: impl FnOnce(&dyn Observer)) {
        if let Some(o) = self.observer.get() {
            let observed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(o.as_ref())));
            if observed.is_err() {
                tracing::warn!("an observer panicked; the event is dropped");
            }
        }
    }

    /// Commits an instance's change, grouped with other instances' commits
    /// when the store prefers batches. (Not an `async fn`: the store's own
    /// future is returned as it is, not moved into another one.)
    pub(crate) fn commit(&self, commit: Commit) -> BoxFuture<'_, StoreResult<CommitOutcome>> {
        if !self.store.prefers_batches() {
            return self.store.commit(commit);
        }
        let committer = self
            .committer
            .get_or_init(|| Committer::start(Arc::clone(&self.store)));
        Box::pin(committer.commit(commit))
    }

    pub(crate) fn notify_work(&self) {
        self.work.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn registry_mut(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|e| e.into_inner())
    }
}
