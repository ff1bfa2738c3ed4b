//! Work notifications: one change stream per store on the instances
//! collection, watching for changes that make an instance runnable.

use std::sync::Arc;
use std::time::Duration;

use ::mongodb::bson::{doc, Document};
use ::mongodb::change_stream::ChangeStream;
use ::mongodb::Collection;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::codec::*;

/// First pause before opening a failed change stream again.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause before opening a failed change stream again.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The change stream task of a store and the counter it bumps. The task
/// stops when this is dropped.
pub(super) struct Notifier {
    sender: Arc<watch::Sender<u64>>,
    receiver: watch::Receiver<u64>,
    task: AbortHandle,
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The changes that may make work runnable: a new instance, every update
/// that moves an inbox (a signal, a cancel request, a parent woken by its
/// child) and every update that sets `ready_at` (those, a release, a park
/// with a timer). Claims, renewals and plain commits change neither.
fn pipeline() -> Vec<Document> {
    let updated = |field: &str| {
        doc! { format!("updateDescription.updatedFields.{field}"): { "$exists": true } }
    };
    vec![
        doc! { "$match": { "$or": [
            { "operationType": "insert" },
            updated(READY_AT),
            updated(INBOX_SEQ),
        ] } },
        // Only the resume token (`_id`) and the kind are needed.
        doc! { "$project": { "operationType": 1 } },
    ]
}

async fn open(
    instances: &Collection<Document>,
) -> Result<ChangeStream<Document>, ::mongodb::error::Error> {
    Ok(instances
        .watch()
        .pipeline(pipeline())
        .await?
        .with_type::<Document>())
}

impl Notifier {
    /// Opens the change stream and starts its task; `None` when the
    /// deployment has no change streams.
    pub(super) async fn start(instances: Collection<Document>) -> Option<Notifier> {
        let stream = match open(&instances).await {
            Ok(stream) => Some(stream),
            Err(e) if is_unsupported(&e) => {
                tracing::info!(error = %e, "no change streams: workers will poll for work");
                return None;
            }
            Err(e) => {
                // Reachable a moment ago: keep trying in the background.
                tracing::warn!(error = %e, "cannot open the change stream yet");
                None
            }
        };
        let (sender, receiver) = watch::channel(0_u64);
        let sender = Arc::new(sender);
        let task = tokio::spawn(watch_loop(instances, Arc::clone(&sender), stream)).abort_handle();
        Some(Notifier {
            sender,
            receiver,
            task,
        })
    }

    /// A receiver whose value changes whenever work may have become
    /// runnable.
    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.receiver.clone()
    }

    /// Announces work made runnable by this process.
    pub(super) fn bump(&self) {
        bump(&self.sender);
    }
}

fn bump(sender: &watch::Sender<u64>) {
    sender.send_modify(|n| *n = n.wrapping_add(1));
}

/// Follows the change stream, opening it again with back-off when it fails.
/// After every reopening the counter is bumped once, since changes may have
/// been missed meanwhile.
async fn watch_loop(
    instances: Collection<Document>,
    sender: Arc<watch::Sender<u64>>,
    mut stream: Option<ChangeStream<Document>>,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        if let Some(mut changes) = stream.take() {
            loop {
                match changes.next().await {
                    Some(Ok(_)) => {
                        backoff = MIN_BACKOFF;
                        bump(&sender);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "change stream failed; reopening it");
                        break;
                    }
                    None => {
                        tracing::debug!("change stream ended; reopening it");
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        match open(&instances).await {
            Ok(changes) => {
                stream = Some(changes);
                bump(&sender);
            }
            Err(e) => tracing::warn!(error = %e, ?backoff, "cannot reopen the change stream"),
        }
    }
}
