//! Group commit: concurrent instances' commits are queued and written in
//! one store transaction, for backends where that is cheaper per commit
//! ([`Store::prefers_batches`]). While one batch is being written, the next
//! one fills up, so batches grow with load and a lone commit waits for
//! nothing. Each commit is still fenced and atomic on its own, and an
//! instance continues only once its own commit is durable.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{Commit, CommitOutcome, Store, StoreError, StoreResult};

/// The most commits written in one transaction.
const MAX_BATCH: usize = 512;

type Request = (Commit, oneshot::Sender<StoreResult<CommitOutcome>>);

/// Queues commits for a background writer task.
pub(crate) struct Committer {
    tx: mpsc::UnboundedSender<Request>,
}

impl Committer {
    /// Starts the writer task on the current Tokio runtime.
    pub(crate) fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(store, rx));
        Committer { tx }
    }

    /// Commits through the writer task.
    pub(crate) async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        let (done, result) = oneshot::channel();
        if self.tx.send((commit, done)).is_err() {
            return Err(StoreError::Backend(
                "the group-commit writer has stopped".into(),
            ));
        }
        result.await.unwrap_or_else(|_| {
            Err(StoreError::Backend(
                "the group-commit writer has stopped".into(),
            ))
        })
    }
}

async fn write_batches(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (commits, waiters): (Vec<Commit>, Vec<_>) = batch.drain(..).unzip();
        let results = store.commit_batch(commits).await;
        for (waiter, result) in waiters.into_iter().zip(results) {
            // The instance may have been dropped meanwhile; nothing to tell.
            let _ = waiter.send(result);
        }
    }
}
