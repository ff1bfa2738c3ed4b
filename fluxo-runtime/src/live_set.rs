//! The instances a worker keeps in memory, and the parked ones among them in
//! the order they parked, so that evicting the longest-parked costs the same
//! however many are cached.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::task::AbortHandle;

use crate::instance::Instance;

/// One instance in memory.
pub(crate) struct LiveEntry {
    /// Identifies the runner task (an instance may be replaced by a new run).
    pub(crate) run: u64,
    /// Set once the runner has rebuilt the instance.
    pub(crate) instance: Option<Arc<Instance>>,
    pub(crate) abort: AbortHandle,
    /// The lease its current run holds (a resumed instance holds a new one).
    pub(crate) lease_token: u64,
    /// Set while parked; `None` while running.
    pub(crate) parked: Option<Parked>,
}

/// How an instance parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parked {
    /// Its place in the eviction order (smaller: parked longer ago).
    order: u64,
    /// Its journal length when it parked.
    pub(crate) journal_len: u64,
}

/// The instances in memory by id.
#[derive(Default)]
pub(crate) struct LiveSet {
    /// Hashed with a fast seeded hasher: every claim, attach and detach
    /// looks an id up.
    entries: HashMap<String, LiveEntry, foldhash::fast::RandomState>,
    /// Parked instances, longest parked first.
    parked: BTreeMap<u64, String>,
    next_order: u64,
}

impl LiveSet {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Instances in memory that are not parked.
    pub(crate) fn running(&self) -> usize {
        self.entries.len() - self.parked.len()
    }

    pub(crate) fn parked(&self) -> usize {
        self.parked.len()
    }

    /// The ids of the instances that are not parked: those whose leases
    /// the worker holds.
    pub(crate) fn running_ids(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, e)| e.parked.is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub(crate) fn get(&self, id: &str) -> Option<&LiveEntry> {
        self.entries.get(id)
    }

    pub(crate) fn get_mut(&mut self, id: &str) -> Option<&mut LiveEntry> {
        self.entries.get_mut(id)
    }

    /// Adds a running instance (replacing an entry of the same id).
    pub(crate) fn insert_running(&mut self, id: String, mut entry: LiveEntry) {
        entry.parked = None;
        self.remove(&id);
        self.entries.insert(id, entry);
    }

    pub(crate) fn remove(&mut self, id: &str) -> Option<LiveEntry> {
        let entry = self.entries.remove(id)?;
        if let Some(p) = entry.parked {
            self.parked.remove(&p.order);
        }
        Some(entry)
    }

    /// Marks instance `id` parked with `journal_len` entries, as the most
    /// recently parked.
    pub(crate) fn mark_parked(&mut self, id: &str, journal_len: u64) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        if let Some(p) = entry.parked.take() {
            self.parked.remove(&p.order);
        }
        let order = self.next_order;
        self.next_order += 1;
        entry.parked = Some(Parked { order, journal_len });
        self.parked.insert(order, id.to_owned());
    }

    /// Removes the entry whose runner is task `task`, if one is.
    pub(crate) fn remove_task(&mut self, task: tokio::task::Id) -> Option<(String, LiveEntry)> {
        let id = self
            .entries
            .iter()
            .find(|(_, e)| e.abort.id() == task)
            .map(|(id, _)| id.clone())?;
        let entry = self.remove(&id)?;
        Some((id, entry))
    }

    /// Removes the instance parked longest ago.
    pub(crate) fn pop_longest_parked(&mut self) -> Option<(String, LiveEntry)> {
        let (_, id) = self.parked.pop_first()?;
        let entry = self.entries.remove(&id)?;
        Some((id, entry))
    }

    /// Removes every entry.
    pub(crate) fn drain(&mut self) -> Vec<(String, LiveEntry)> {
        self.parked.clear();
        self.entries.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> LiveEntry {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let abort = rt.block_on(async { tokio::spawn(async {}).abort_handle() });
        LiveEntry {
            run: 0,
            instance: None,
            abort,
            lease_token: 0,
            parked: None,
        }
    }

    #[test]
    fn evicts_in_park_order_and_forgets_removed_and_resumed_entries() {
        let mut live = LiveSet::default();
        for id in ["a", "b", "c", "d"] {
            live.insert_running(id.into(), entry());
        }
        live.mark_parked("b", 1);
        live.mark_parked("a", 2);
        live.mark_parked("c", 3);
        live.mark_parked("b", 4); // parked again: now the most recent
        assert_eq!((live.len(), live.parked(), live.running()), (4, 3, 1));

        // Resumed: running again, out of the eviction order.
        let a = live.remove("a").expect("a");
        assert_eq!(a.parked.map(|p| p.journal_len), Some(2));
        live.insert_running("a".into(), a);
        assert_eq!((live.parked(), live.running()), (2, 2));
        let mut running = live.running_ids();
        running.sort();
        assert_eq!(running, ["a", "d"], "the parked ones hold no lease");

        let (id, e) = live.pop_longest_parked().expect("c");
        assert_eq!(
            (id.as_str(), e.parked.map(|p| p.journal_len)),
            ("c", Some(3))
        );
        let (id, _) = live.pop_longest_parked().expect("b");
        assert_eq!(id, "b");
        assert!(live.pop_longest_parked().is_none());
        assert_eq!(live.len(), 2);
        assert_eq!(live.drain().len(), 2);
        assert_eq!((live.len(), live.parked()), (0, 0));
    }

    #[test]
    fn finds_an_entry_by_its_runner_task() {
        let mut live = LiveSet::default();
        live.insert_running("a".into(), entry());
        let b = entry();
        let task = b.abort.id();
        live.insert_running("b".into(), b);
        live.mark_parked("b", 1);
        let (id, _) = live.remove_task(task).expect("b");
        assert_eq!(id, "b");
        assert_eq!((live.len(), live.parked()), (1, 0));
        assert!(live.remove_task(task).is_none());
    }
}
