//! Lifecycle observers: a hook for every workflow and step event, with a
//! logging observer, in-process metrics ([`BasicMetrics`]), a fan-out
//! ([`CompositeObserver`]) and a no-op. With no observer installed the
//! engine skips building events entirely.
//!
//! A step's completion and a workflow's completion, failure or
//! cancellation are reported once they are durable, by the worker that
//! made them. So a caller waiting on the store (`result()`, say) may see a
//! finish a moment before the observer hears of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What happened. Borrowed strings: an observer copies what it keeps.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum LifecycleEvent<'a> {
    /// An instance was created.
    WorkflowStarted {
        /// Workflow name.
        workflow: &'a str,
        /// Instance id.
        id: &'a str,
    },
    /// An instance completed.
    WorkflowCompleted {
        /// Workflow name.
        workflow: &'a str,
        /// Instance id.
        id: &'a str,
        /// Time from creation to completion.
        duration: Duration,
    },
    /// An instance failed.
    WorkflowFailed {
        /// Workflow name.
        workflow: &'a str,
        /// Instance id.
        id: &'a str,
        /// Why.
        error: &'a str,
        /// Time from creation to failure.
        duration: Duration,
    },
    /// An instance was cancelled.
    WorkflowCancelled {
        /// Workflow name.
        workflow: &'a str,
        /// Instance id.
        id: &'a str,
    },
    /// A step attempt started.
    StepStarted {
        /// Workflow name.
        workflow: &'a str,
        /// Instance id.
        id: &'a str,
        /// Step name.
        step: &'a str,
        /// Attempt, from 1.
        attempt: u32,
    },
    /// A step succeeded.
    StepCompleted {
        /// Workflow name.
        workflow: &'a str,
        /// Instance id.
        id: &'a str,
        /// Step name.
        step: &'a str,
        /// Attempt that succeeded.
        attempt: u32,
        /// Duration of that attempt.
        duration: Duration,
    },
    /// A step attempt failed and will be retried.
    StepRetried {
        /// Workflow name.
        workflow: &'a str,
        /// Instance id.
        id: &'a str,
        /// Step name.
        step: &'a str,
        /// Attempt that failed.
        attempt: u32,
        /// Why.
        error: &'a str,
        /// Delay before the next attempt.
        delay: Duration,
    },
    /// A step failed for good.
    StepFailed {
        /// Workflow name.
        workflow: &'a str,
        /// Instance id.
        id: &'a str,
        /// Step name.
        step: &'a str,
        /// Last attempt.
        attempt: u32,
        /// Why.
        error: &'a str,
    },
    /// A signal was delivered to a waiting workflow.
    SignalReceived {
        /// Workflow name.
        workflow: &'a str,
        /// Instance id.
        id: &'a str,
        /// Signal name.
        signal: &'a str,
    },
    /// A durable timer fired.
    TimerFired {
        /// Workflow name.
        workflow: &'a str,
        /// Instance id.
        id: &'a str,
    },
}

/// Receives lifecycle events. Called inline on the engine's tasks: keep it
/// fast and non-blocking (hand heavy work to a channel).
pub trait Observer: Send + Sync + 'static {
    /// Called for every event.
    fn on_event(&self, event: &LifecycleEvent<'_>);
}

/// Ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl Observer for NoopObserver {
    fn on_event(&self, _event: &LifecycleEvent<'_>) {}
}

/// Logs every event through `tracing` (failures at `WARN`/`ERROR`, the rest
/// at `INFO`).
#[derive(Debug, Default, Clone, Copy)]
pub struct LoggingObserver;

impl Observer for LoggingObserver {
    fn on_event(&self, event: &LifecycleEvent<'_>) {
        match event {
            LifecycleEvent::WorkflowFailed {
                workflow,
                id,
                error,
                ..
            } => {
                tracing::error!(workflow, id, error, "workflow failed")
            }
            LifecycleEvent::StepFailed {
                workflow,
                id,
                step,
                error,
                ..
            } => tracing::error!(workflow, id, step, error, "step failed"),
            LifecycleEvent::StepRetried {
                workflow,
                id,
                step,
                error,
                attempt,
                ..
            } => tracing::warn!(workflow, id, step, attempt, error, "step retried"),
            other => tracing::info!(event = ?other, "fluxo"),
        }
    }
}

/// Sends every event to several observers in order.
#[derive(Default, Clone)]
pub struct CompositeObserver {
    observers: Vec<Arc<dyn Observer>>,
}

impl CompositeObserver {
    /// An empty fan-out.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an observer.
    pub fn with(mut self, observer: impl Observer) -> Self {
        self.observers.push(Arc::new(observer));
        self
    }

    /// Adds a shared observer (e.g. a [`BasicMetrics`] you keep a handle to).
    pub fn with_shared(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observers.push(observer);
        self
    }
}

impl Observer for CompositeObserver {
    fn on_event(&self, event: &LifecycleEvent<'_>) {
        for o in &self.observers {
            o.on_event(event);
        }
    }
}

/// Counters and latency distributions per workflow and per step, kept in
/// memory. Install it with `Fluxo::observe(metrics.clone())` and read
/// [`BasicMetrics::snapshot`].
#[derive(Debug, Default, Clone)]
pub struct BasicMetrics {
    inner: Arc<Mutex<MetricsState>>,
}

#[derive(Debug, Default)]
struct MetricsState {
    workflows: HashMap<String, Counters>,
    steps: HashMap<(String, String), Counters>,
}

#[derive(Debug, Default, Clone)]
struct Counters {
    started: u64,
    completed: u64,
    failed: u64,
    retried: u64,
    cancelled: u64,
    latency: Histogram,
}

/// Counts and latencies of one workflow or step, as of a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Started (workflows) or attempts started (steps).
    pub started: u64,
    /// Completed.
    pub completed: u64,
    /// Failed for good.
    pub failed: u64,
    /// Attempts retried (steps).
    pub retried: u64,
    /// Cancelled (workflows).
    pub cancelled: u64,
    /// Latency of completions.
    pub latency: LatencySummary,
}

/// A latency distribution summary.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: Duration,
    /// Smallest.
    pub min: Duration,
    /// Largest.
    pub max: Duration,
    /// Median (upper bound of its bucket).
    pub p50: Duration,
    /// 90th percentile (upper bound of its bucket).
    pub p90: Duration,
    /// 99th percentile (upper bound of its bucket).
    pub p99: Duration,
}

/// A point-in-time copy of [`BasicMetrics`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricsSnapshot {
    /// Per workflow name.
    pub workflows: HashMap<String, Stats>,
    /// Per (workflow name, step name).
    pub steps: HashMap<(String, String), Stats>,
}

impl BasicMetrics {
    /// Empty metrics.
    pub fn new() -> Self {
        Self::default()
    }

    /// Copies the current figures.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        MetricsSnapshot {
            workflows: st
                .workflows
                .iter()
                .map(|(k, c)| (k.clone(), c.stats()))
                .collect(),
            steps: st
                .steps
                .iter()
                .map(|(k, c)| (k.clone(), c.stats()))
                .collect(),
        }
    }
}

impl Observer for BasicMetrics {
    fn on_event(&self, event: &LifecycleEvent<'_>) {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match *event {
            LifecycleEvent::WorkflowStarted { workflow, .. } => {
                st.workflows.entry(workflow.to_owned()).or_default().started += 1
            }
            LifecycleEvent::WorkflowCompleted {
                workflow, duration, ..
            } => {
                let c = st.workflows.entry(workflow.to_owned()).or_default();
                c.completed += 1;
                c.latency.record(duration);
            }
            LifecycleEvent::WorkflowFailed { workflow, .. } => {
                st.workflows.entry(workflow.to_owned()).or_default().failed += 1
            }
            LifecycleEvent::WorkflowCancelled { workflow, .. } => {
                st.workflows
                    .entry(workflow.to_owned())
                    .or_default()
                    .cancelled += 1
            }
            LifecycleEvent::StepStarted { workflow, step, .. } => {
                st.step(workflow, step).started += 1
            }
            LifecycleEvent::StepCompleted {
                workflow,
                step,
                duration,
                ..
            } => {
                let c = st.step(workflow, step);
                c.completed += 1;
                c.latency.record(duration);
            }
            LifecycleEvent::StepRetried { workflow, step, .. } => {
                st.step(workflow, step).retried += 1
            }
            LifecycleEvent::StepFailed { workflow, step, .. } => {
                st.step(workflow, step).failed += 1
            }
            LifecycleEvent::SignalReceived { .. } | LifecycleEvent::TimerFired { .. } => {}
        }
    }
}

impl MetricsState {
    fn step(&mut self, workflow: &str, step: &str) -> &mut Counters {
        self.steps
            .entry((workflow.to_owned(), step.to_owned()))
            .or_default()
    }
}

impl Counters {
    fn stats(&self) -> Stats {
        Stats {
            started: self.started,
            completed: self.completed,
            failed: self.failed,
            retried: self.retried,
            cancelled: self.cancelled,
            latency: self.latency.summary(),
        }
    }
}

/// Log-scaled buckets from 1 µs to ~1 h, four per power of two.
#[derive(Debug, Clone)]
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum_ns: u128,
    min: Duration,
    max: Duration,
}

const SUB_BUCKETS: f64 = 4.0;
const BUCKETS: usize = 4 * 32;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; BUCKETS],
            count: 0,
            sum_ns: 0,
            min: Duration::MAX,
            max: Duration::ZERO,
        }
    }
}

impl Histogram {
    fn bucket_of(d: Duration) -> usize {
        let us = (d.as_nanos() as f64 / 1_000.0).max(1.0);
        ((us.log2() * SUB_BUCKETS).ceil() as usize).min(BUCKETS - 1)
    }

    fn upper_bound(bucket: usize) -> Duration {
        Duration::from_nanos((2f64.powf(bucket as f64 / SUB_BUCKETS) * 1_000.0) as u64)
    }

    fn record(&mut self, d: Duration) {
        self.buckets[Self::bucket_of(d)] += 1;
        self.count += 1;
        self.sum_ns += d.as_nanos();
        self.min = self.min.min(d);
        self.max = self.max.max(d);
    }

    fn quantile(&self, q: f64) -> Duration {
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::upper_bound(i).min(self.max).max(self.min);
            }
        }
        self.max
    }

    fn summary(&self) -> LatencySummary {
        if self.count == 0 {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.count,
            mean: Duration::from_nanos((self.sum_ns / self.count as u128) as u64),
            min: self.min,
            max: self.max,
            p50: self.quantile(0.5),
            p90: self.quantile(0.9),
            p99: self.quantile(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.max, Duration::from_millis(100));
        let p50 = s.p50.as_secs_f64() * 1000.0;
        assert!((50.0..=60.0).contains(&p50), "p50 {p50}");
        let p99 = s.p99.as_secs_f64() * 1000.0;
        assert!((99.0..=100.0).contains(&p99), "p99 {p99}");
    }

    #[test]
    fn metrics_count_per_workflow_and_step() {
        let m = BasicMetrics::new();
        let o: &dyn Observer = &m;
        o.on_event(&LifecycleEvent::WorkflowStarted {
            workflow: "w",
            id: "1",
        });
        o.on_event(&LifecycleEvent::StepRetried {
            workflow: "w",
            id: "1",
            step: "s",
            attempt: 1,
            error: "x",
            delay: Duration::from_millis(1),
        });
        o.on_event(&LifecycleEvent::StepCompleted {
            workflow: "w",
            id: "1",
            step: "s",
            attempt: 2,
            duration: Duration::from_millis(3),
        });
        let snap = m.snapshot();
        assert_eq!(snap.workflows["w"].started, 1);
        let s = &snap.steps[&("w".to_owned(), "s".to_owned())];
        assert_eq!((s.retried, s.completed, s.latency.count), (1, 1, 1));
    }
}
