//! Wake-ups for callers waiting on one instance to finish in this process.
//!
//! Each waited-on instance has its own [`Notify`], so a finish wakes only
//! the callers waiting for that instance, not every waiter of the process.
//! A claim by a worker of this process wakes them too: while the instance
//! runs here its end is heard of here, and they do not poll the store.
//! A finish recorded by a worker of this process also leaves how the
//! instance ended with its watchers, so they need not read it back from the
//! store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::Notify;

use crate::store::{InstanceRecord, InstanceStatus};

/// How an instance ended: what a caller of `result()` needs of its record.
#[derive(Debug, Clone)]
pub(crate) struct Ended {
    pub(crate) id: String,
    pub(crate) workflow: String,
    pub(crate) status: InstanceStatus,
    pub(crate) output: Option<Vec<u8>>,
    pub(crate) failure: Option<Vec<u8>>,
}

impl From<InstanceRecord> for Ended {
    fn from(rec: InstanceRecord) -> Self {
        Ended {
            id: rec.id,
            workflow: rec.workflow,
            status: rec.status,
            output: rec.output,
            failure: rec.failure,
        }
    }
}

/// The instances callers are waiting on, each with the [`Notify`] its
/// claim or finish here fires. Entries live as long as a [`FinishWatch`]
/// holds them.
#[derive(Default)]
pub(crate) struct FinishWatches {
    by_id: Mutex<Map>,
}

/// Watched ids, hashed with a fast seeded hasher (every finish looks one
/// up); each key is shared with the watches that hold it.
type Map = HashMap<Arc<str>, Arc<Watched>, foldhash::fast::RandomState>;

/// One watched instance.
#[derive(Default)]
struct Watched {
    notify: Notify,
    /// Set by a finish recorded here, before its watchers are woken.
    ended: OnceLock<Arc<Ended>>,
}

impl FinishWatches {
    fn map(&self) -> MutexGuard<'_, Map> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts watching instance `id`.
    pub(crate) fn watch(self: &Arc<Self>, id: &str) -> FinishWatch {
        let mut map = self.map();
        let (id, watched) = match map.get_key_value(id) {
            Some((id, watched)) => (Arc::clone(id), Arc::clone(watched)),
            None => {
                let id: Arc<str> = id.into();
                let watched = Arc::new(Watched::default());
                map.insert(Arc::clone(&id), Arc::clone(&watched));
                (id, watched)
            }
        };
        drop(map);
        FinishWatch {
            watches: Arc::clone(self),
            id,
            watched,
        }
    }

    /// Whether a caller waits on instance `id`: only then is how it ended
    /// worth keeping for [`FinishWatches::finished`].
    pub(crate) fn is_watched(&self, id: &str) -> bool {
        self.map().contains_key(id)
    }

    /// A worker of this process claimed instance `id` (or resumed it from
    /// its cache): wakes its watchers, if any, which need not read the
    /// store while it runs here (its end wakes them again).
    pub(crate) fn claimed_here(&self, id: &str) {
        if let Some(watched) = self.map().get(id) {
            watched.notify.notify_waiters();
        }
    }

    /// A run of instance `id` ended here: wakes its watchers, if any, and
    /// leaves them `ended` when the run recorded the instance's end (a run
    /// that lost its lease, or continued as new, ended without it).
    pub(crate) fn finished(&self, id: &str, ended: Option<Ended>) {
        // Under the map's lock: a copy of the entry held outside it would
        // keep a watch that ends meanwhile from removing it (see `Drop`).
        let map = self.map();
        if let Some(watched) = map.get(id) {
            if let Some(ended) = ended {
                let _ = watched.ended.set(Arc::new(ended));
            }
            watched.notify.notify_waiters();
        }
    }
}

/// A caller's interest in one instance's finish; dropping it ends it.
pub(crate) struct FinishWatch {
    watches: Arc<FinishWatches>,
    id: Arc<str>,
    watched: Arc<Watched>,
}

impl FinishWatch {
    /// The notification fired when a worker here claims the instance and
    /// when a run of it ends here. Enable it (or poll it) before reading
    /// [`FinishWatch::ended`] or the instance's status, so an end in
    /// between is not missed.
    pub(crate) fn notify(&self) -> &Notify {
        &self.watched.notify
    }

    /// How the instance ended, if a worker of this process recorded it
    /// while this watch (or another on the same instance) was held.
    pub(crate) fn ended(&self) -> Option<Arc<Ended>> {
        self.watched.ended.get().cloned()
    }
}

impl Drop for FinishWatch {
    fn drop(&mut self) {
        let mut map = self.watches.map();
        // The map's reference and ours: nobody else watches this instance.
        if Arc::strong_count(&self.watched) == 2 {
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
        watches.finished("a", None);
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

    #[tokio::test]
    async fn a_claim_here_wakes_its_watchers_and_leaves_no_end() {
        let watches = Arc::new(FinishWatches::default());
        let (a, b) = (watches.watch("a"), watches.watch("b"));
        let (fa, fb) = (a.notify().notified(), b.notify().notified());
        tokio::pin!(fa, fb);
        fa.as_mut().enable();
        fb.as_mut().enable();
        watches.claimed_here("a");
        tokio::time::timeout(Duration::from_secs(1), fa)
            .await
            .expect("the watcher of a");
        assert!(a.ended().is_none(), "a claim is not an end");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), fb)
                .await
                .is_err(),
            "b was not claimed"
        );
        // A claim nobody waits for is a lookup and nothing else.
        watches.claimed_here("c");
        assert!(!watches.is_watched("c"));
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
        watches.finished("a", Some(ended("a")));
        assert!(watches.map().is_empty());
    }

    fn ended(id: &str) -> Ended {
        Ended {
            id: id.into(),
            workflow: "wf".into(),
            status: InstanceStatus::Completed,
            output: Some(b"out".to_vec()),
            failure: None,
        }
    }

    #[test]
    fn a_recorded_end_stays_with_the_watchers_of_its_instance() {
        let watches = Arc::new(FinishWatches::default());
        let a = watches.watch("a");
        let b = watches.watch("b");
        assert!(watches.is_watched("a") && !watches.is_watched("c"));
        // A run that ended without recording the end (its lease lost).
        watches.finished("a", None);
        assert!(a.ended().is_none());
        watches.finished("a", Some(ended("a")));
        assert_eq!(
            a.ended().expect("ended").output.as_deref(),
            Some(&b"out"[..])
        );
        // A caller that starts watching while another still does sees it.
        let late = watches.watch("a");
        assert!(late.ended().is_some());
        assert!(b.ended().is_none());
        drop((a, late));
        // Once nobody watched it, a new watch starts afresh.
        assert!(watches.watch("a").ended().is_none());
    }
}
