//! Step options: retry policy and timeout.

use std::time::Duration;

use crate::error::StepError;

/// How a failed step is retried.
///
/// The delay before attempt `n + 1` is `initial_interval * backoff_coefficient^(n-1)`,
/// capped at `max_interval`, then spread by `± jitter` (a fraction). Delays
/// longer than one second are durable timers: the instance is parked and
/// its worker slot freed.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_interval: Duration,
    backoff_coefficient: f64,
    max_interval: Duration,
    jitter: f64,
    non_retryable: Vec<String>,
}

impl Default for RetryPolicy {
    /// 3 attempts, 1 s initial interval, doubling, at most 60 s, 10 % jitter.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_interval: Duration::from_secs(1),
            backoff_coefficient: 2.0,
            max_interval: Duration::from_secs(60),
            jitter: 0.1,
            non_retryable: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// A policy that runs the step once.
    pub fn none() -> Self {
        RetryPolicy::default().max_attempts(1)
    }

    /// Total attempts, including the first (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Delay before the second attempt.
    pub fn initial_interval(mut self, d: Duration) -> Self {
        self.initial_interval = d;
        self
    }

    /// Growth factor of the delay per attempt (at least 1.0).
    pub fn backoff_coefficient(mut self, c: f64) -> Self {
        self.backoff_coefficient = if c.is_finite() { c.max(1.0) } else { 1.0 };
        self
    }

    /// Upper bound of the delay.
    pub fn max_interval(mut self, d: Duration) -> Self {
        self.max_interval = d;
        self
    }

    /// Random spread of each delay, as a fraction in `0.0..=1.0`.
    pub fn jitter(mut self, j: f64) -> Self {
        self.jitter = if j.is_finite() {
            j.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Error kinds (see [`StepError::kind`]) that are never retried.
    pub fn non_retryable(mut self, kinds: &[&str]) -> Self {
        self.non_retryable = kinds.iter().map(|k| (*k).to_owned()).collect();
        self
    }

    /// The configured number of attempts.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether attempt `attempt` (from 1), which failed with `error`, may be
    /// followed by another.
    pub fn should_retry(&self, attempt: u32, error: &StepError) -> bool {
        attempt < self.max_attempts
            && !error.is_fatal()
            && !self.non_retryable.iter().any(|k| k == error.kind())
    }

    /// The delay after failed attempt `attempt` (from 1), with jitter.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_coefficient
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let base = self.initial_interval.as_secs_f64() * exp;
        let capped = base.min(self.max_interval.as_secs_f64());
        let spread = if self.jitter > 0.0 {
            1.0 + self.jitter * (fastrand::f64() * 2.0 - 1.0)
        } else {
            1.0
        };
        // Past what a `Duration` holds (a `max_interval` near
        // `Duration::MAX`), the longest.
        Duration::try_from_secs_f64((capped * spread).max(0.0)).unwrap_or(Duration::MAX)
    }
}

/// Options of one step: retries and a per-attempt timeout.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOptions {
    pub(crate) retry: RetryPolicy,
    pub(crate) timeout: Option<Duration>,
}

impl StepOptions {
    /// Default options: [`RetryPolicy::default`], no timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets the timeout of each attempt.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The per-attempt timeout.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let p = RetryPolicy::default()
            .initial_interval(Duration::from_millis(100))
            .max_interval(Duration::from_millis(350))
            .jitter(0.0);
        assert_eq!(p.delay_after(1), Duration::from_millis(100));
        assert_eq!(p.delay_after(2), Duration::from_millis(200));
        assert_eq!(p.delay_after(3), Duration::from_millis(350));
        assert_eq!(p.delay_after(40), Duration::from_millis(350));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let p = RetryPolicy::default()
            .initial_interval(Duration::from_secs(1))
            .jitter(0.2);
        for _ in 0..100 {
            let d = p.delay_after(1).as_secs_f64();
            assert!((0.8..=1.2).contains(&d), "{d}");
        }
    }

    #[test]
    fn fatal_and_listed_kinds_are_not_retried() {
        let p = RetryPolicy::default()
            .max_attempts(5)
            .non_retryable(&["Declined"]);
        assert!(p.should_retry(1, &StepError::retryable("x")));
        assert!(!p.should_retry(5, &StepError::retryable("x")));
        assert!(!p.should_retry(1, &StepError::fatal("x")));
        assert!(!p.should_retry(1, &StepError::retryable("x").with_kind("Declined")));
    }
}
