//! Wake-ups for callers waiting on one instance to finish in this process.
//!
//! Each waited-on instance has its own [`Notify`], so a finish wakes only
//! the callers waiting for that instance (who then read its record), not
//! every waiter of the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// The instances callers are waiting on, each with the [`Notify`] its
/// finish fires. Entries live as long as a [`FinishWatch`] holds them.
#[derive(Default)]
pub(crate) struct FinishWatches {
    by_id: Mutex<Map>,
}

/// Watched ids, hashed with a fast seeded hasher (every finish looks one
/// up); each key is shared with the watches that hold it.
type Map = HashMap<Arc<str>, Arc<Notify>, foldhash::fast::RandomState>;

impl FinishWatches {
    fn map(&self) -> MutexGuard<'_, Map> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts watching instance `id`.
    pub(crate) fn watch(self: &Arc<Self>, id: &str) -> FinishWatch {
        let mut map = self.map();
        let (id, notify) = match map.get_key_value(id) {
            Some((id, notify)) => (Arc::clone(id), Arc::clone(notify)),
            None => {
                let id: Arc<str> = id.into();
                let notify = Arc::new(Notify::new());
                map.insert(Arc::clone(&id), Arc::clone(&notify));
                (id, notify)
            }
        };
        drop(map);
        FinishWatch {
            watches: Arc::clone(self),
            id,
            notify,
        }
    }

    /// Instance `id` finished here: wakes its watchers, if any.
    pub(crate) fn finished(&self, id: &str) {
        let notify = self.map().get(id).cloned();
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }
}

/// A caller's interest in one instance's finish; dropping it ends it.
pub(crate) struct FinishWatch {
    watches: Arc<FinishWatches>,
    id: Arc<str>,
    notify: Arc<Notify>,
}

impl FinishWatch {
    /// The notification fired when the instance finishes here. Enable it
    /// (or poll it) before reading the instance's status, so a finish in
    /// between is not missed.
    pub(crate) fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for FinishWatch {
    fn drop(&mut self) {
        let mut map = self.watches.map();
        // The map's reference and ours: nobody else watches this instance.
        if Arc::strong_count(&self.notify) == 2 {
            map.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_finish_wakes_only_its_own_watchers() {
        let watches = Arc::new(FinishWatches::default());
        let a1 = watches.watch("a");
        let a2 = watches.watch("a");
        let b = watches.watch("b");
        let (fa1, fa2, fb) = (
            a1.notify().notified(),
            a2.notify().notified(),
            b.notify().notified(),
        );
        tokio::pin!(fa1, fa2, fb);
        fa1.as_mut().enable();
        fa2.as_mut().enable();
        fb.as_mut().enable();
        watches.finished("a");
        tokio::time::timeout(Duration::from_secs(1), fa1)
            .await
            .expect("first watcher of a");
        tokio::time::timeout(Duration::from_secs(1), fa2)
            .await
            .expect("second watcher of a");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), fb)
                .await
                .is_err(),
            "b did not finish"
        );
    }

    #[test]
    fn entries_go_with_their_last_watcher() {
        let watches = Arc::new(FinishWatches::default());
        let first = watches.watch("a");
        let second = watches.watch("a");
        drop(first);
        assert_eq!(watches.map().len(), 1, "still watched");
        drop(second);
        assert!(watches.map().is_empty());
        // A finish nobody waits for is a lookup and nothing else.
        watches.finished("a");
        assert!(watches.map().is_empty());
    }
}
