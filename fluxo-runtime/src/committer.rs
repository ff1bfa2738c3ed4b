//! Group commit: concurrent instances' commits are queued and written in
//! one store transaction, for backends where that is cheaper per commit
//! ([`Store::prefers_batches`]). While one batch is being written, the next
//! one fills up, so batches grow with load and a lone commit waits for
//! nothing. Each commit is still fenced and atomic on its own, and an
//! instance continues only once its own commit is durable.
//!
//! A lone commit (none queued or being written) of a store that can commit
//! on the caller's thread ([`Store::commits_here`]: SQLite) is made by the
//! instance itself, inside `block_in_place`: no hand-off to the writer task
//! and the store's thread and back, whose thread wake-ups cost more than a
//! SQLite commit without a flush and a good part of one with it. Commits
//! that arrive meanwhile queue for the writer and are grouped. (For a store
//! reached over the network, a lone commit made directly instead of through
//! the writer task measured no faster, and under load it split groups.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::{mpsc, oneshot};

use crate::panics;
use crate::store::{all_failed, Commit, CommitOutcome, Store, StoreError, StoreResult};

/// The most commits written in one transaction.
const MAX_BATCH: usize = 512;

type Request = (Commit, oneshot::Sender<StoreResult<CommitOutcome>>);

/// Queues commits for a background writer task.
pub(crate) struct Committer {
    tx: mpsc::UnboundedSender<Request>,
    store: Arc<dyn Store>,
    /// Commits queued for the writer task, being written by it, or being
    /// made on an instance's thread.
    pending: Arc<AtomicUsize>,
}

impl Committer {
    /// Starts the writer task on the current Tokio runtime.
    pub(crate) fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        tokio::spawn(write_batches(Arc::clone(&store), rx, Arc::clone(&pending)));
        Committer { tx, store, pending }
    }

    /// Commits on this thread if the commit is alone and the store can,
    /// otherwise through the writer task.
    pub(crate) async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        if self.store.commits_here() {
            if let Some(_alone) = Alone::enter(&self.pending) {
                if let Some(done) = self.try_commit_here(&commit) {
                    return done;
                }
            }
        }
        let (done, result) = oneshot::channel();
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.send((commit, done)).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(writer_stopped());
        }
        result.await.unwrap_or_else(|_| Err(writer_stopped()))
    }

    /// The commit made on the calling thread, or `None` when another write
    /// holds the store or this thread may not block (only a multi-threaded
    /// runtime's workers may, through `block_in_place`).
    fn try_commit_here(&self, commit: &Commit) -> Option<StoreResult<CommitOutcome>> {
        let flavor = Handle::try_current().ok()?.runtime_flavor();
        if flavor != RuntimeFlavor::MultiThread {
            return None;
        }
        tokio::task::block_in_place(|| self.store.try_commit_here(commit))
    }
}

/// A commit made on the caller's thread, counted as pending while it runs
/// so that others queue for the writer meanwhile.
struct Alone<'a>(&'a AtomicUsize);

impl<'a> Alone<'a> {
    /// `Some` when nothing else is pending.
    fn enter(pending: &'a AtomicUsize) -> Option<Self> {
        pending
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Alone(pending))
    }
}

impl Drop for Alone<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn writer_stopped() -> StoreError {
    StoreError::Backend("the group-commit writer has stopped".into())
}

async fn write_batches(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    pending: Arc<AtomicUsize>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let n = batch.len();
        let (commits, waiters): (Vec<Commit>, Vec<_>) = batch.drain(..).unzip();
        // Built inside the catch too: a store's call may panic before it
        // returns its future.
        let write = async { store.commit_batch(commits).await };
        let results = panics::catch_store(write, |error| {
            tracing::error!(%error, commits = n, "writing a group of commits");
            all_failed(error, n)
        })
        .await;
        pending.fetch_sub(n, Ordering::SeqCst);
        for (waiter, result) in waiters.into_iter().zip(results) {
            // The instance may have been dropped meanwhile; nothing to tell.
            let _ = waiter.send(result);
        }
    }
}
