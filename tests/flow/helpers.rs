//! Helpers shared by the builder and DAG suites.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fluxo::history::Event;
use fluxo::prelude::*;
use fluxo::store::Store;
use fluxo::Worker;

use crate::common;

/// How long a test waits for a result before failing.
pub const WAIT: Duration = Duration::from_secs(30);

/// A Fluxo on `store`.
pub fn fluxo_on(store: &Arc<dyn Store>) -> Fluxo {
    Fluxo::from_store(Arc::clone(store))
}

/// A worker suited to tests.
pub fn worker(fluxo: &Fluxo) -> Worker {
    fluxo
        .worker()
        .lease(Duration::from_secs(5))
        .poll_interval(Duration::from_millis(20))
        .spawn()
}

/// A worker that keeps no parked instance in memory: every wake-up replays
/// the instance from its journal.
pub fn evicting_worker(fluxo: &Fluxo) -> Worker {
    fluxo
        .worker()
        .max_cached(0)
        .lease(Duration::from_secs(5))
        .poll_interval(Duration::from_millis(20))
        .spawn()
}

/// A worker whose shutdown releases running instances after 100 ms.
pub fn stoppable_worker(fluxo: &Fluxo) -> Worker {
    fluxo
        .worker()
        .lease(Duration::from_secs(5))
        .poll_interval(Duration::from_millis(20))
        .shutdown_grace(Duration::from_millis(100))
        .spawn()
}

/// `<instance id>/<step name>` of the running step.
pub fn step_key() -> String {
    let s = StepContext::current().expect("called inside a step");
    format!("{}/{}", s.workflow_id(), s.name())
}

/// Counts an execution of the running step; returns the new count.
pub fn ran() -> u32 {
    common::bump(step_key())
}

/// Counts a completion of the running step.
pub fn completed() -> u32 {
    common::bump(format!("{}#completed", step_key()))
}

/// How often step `name` of instance `id` started.
pub fn runs(id: &str, name: &str) -> u32 {
    common::count(&format!("{id}/{name}"))
}

/// How often step `name` of instance `id` completed.
pub fn completions(id: &str, name: &str) -> u32 {
    common::count(&format!("{id}/{name}#completed"))
}

/// Waits until `cond` holds (at most 10 s).
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Waits until the async `cond` holds (at most 10 s).
pub async fn until_async<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    for _ in 0..1000 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// The names of the completed steps in the journal, in journal order.
pub async fn step_names(fluxo: &Fluxo, id: &str) -> Vec<String> {
    fluxo
        .history(id)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|h| match h.event {
            Event::StepCompleted { name, .. } => Some(name),
            _ => None,
        })
        .collect()
}

/// Every journaled event of a kind, in journal order.
pub async fn count_events(fluxo: &Fluxo, id: &str, pred: impl Fn(&Event) -> bool) -> usize {
    fluxo
        .history(id)
        .await
        .unwrap()
        .iter()
        .filter(|h| pred(&h.event))
        .count()
}

/// Asserts that no step completed twice in the journal and that positions
/// are dense.
pub async fn assert_journal_sound(fluxo: &Fluxo, id: &str) {
    let h = fluxo.history(id).await.unwrap();
    for (i, e) in h.iter().enumerate() {
        assert_eq!(e.event_id, i as u64, "journal of {id} has a gap: {h:#?}");
    }
    let mut seqs = std::collections::HashSet::new();
    for e in &h {
        if let Event::StepCompleted { .. } = e.event {
            assert!(seqs.insert(e.seq), "seq {} completed twice: {h:#?}", e.seq);
        }
    }
}

/// Tracks how many calls are in flight at once, per key.
#[derive(Default)]
pub struct InFlight {
    now: HashMap<String, usize>,
    max: HashMap<String, usize>,
}

fn in_flight() -> std::sync::MutexGuard<'static, InFlight> {
    static F: OnceLock<Mutex<InFlight>> = OnceLock::new();
    F.get_or_init(Default::default).lock().unwrap()
}

/// Marks the start of a call under `key`.
pub fn enter(key: &str) {
    let mut f = in_flight();
    let n = {
        let n = f.now.entry(key.to_owned()).or_default();
        *n += 1;
        *n
    };
    let m = f.max.entry(key.to_owned()).or_default();
    *m = (*m).max(n);
}

/// Marks the end of a call under `key`.
pub fn leave(key: &str) {
    let mut f = in_flight();
    if let Some(n) = f.now.get_mut(key) {
        *n = n.saturating_sub(1);
    }
}

/// The most calls in flight at once under `key`.
pub fn max_in_flight(key: &str) -> usize {
    in_flight().max.get(key).copied().unwrap_or(0)
}
