//! A fault-tolerance circuit breaker (CLOSED / OPEN / HALF_OPEN) around
//! catalog and storage calls.
//!
//! It is not the degradation level (ADR 0005): the breaker stops K2 from
//! hammering a catalog or object store that is failing, and its state is one
//! of the signals the level is computed from.
//!
//! - CLOSED: calls go through; `failure_threshold` failures in a row open it.
//! - OPEN: calls fail at once with [`BreakerOpen`] for `open_ms`.
//! - HALF_OPEN: one trial call goes through; success closes the breaker,
//!   failure opens it again.
//!
//! Hand-written rather than taken from a crate: the state must be readable
//! at any time without a call (the supervisor samples it every tick), it
//! feeds K2's metrics, and its time is injectable so tests do not sleep; the
//! whole machine is the small `Inner` below.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `[breaker]`: when the breaker opens and how long it stays open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Failed calls in a row that open the breaker.
    pub failure_threshold: u32,
    /// How long an open breaker refuses calls before letting a trial through.
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_ms: 5_000,
        }
    }
}

impl BreakerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.failure_threshold == 0 {
            return Err("breaker.failure_threshold must be at least 1".into());
        }
        if self.open_ms == 0 {
            return Err("breaker.open_ms must be at least 1".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// The more severe of two states (open > half open > closed).
    pub fn max_by_severity(self, other: BreakerState) -> BreakerState {
        if other.as_f64() > self.as_f64() {
            other
        } else {
            self
        }
    }

    /// As a degradation signal and metric: 0 closed, 1 half open, 2 open.
    pub fn as_f64(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the {name} circuit breaker is open after {failures} failures in a row; next trial in {retry_in_ms} ms"
)]
pub struct BreakerOpen {
    pub name: &'static str,
    pub failures: u32,
    pub retry_in_ms: u64,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    failures: u32,
    opened_at: Option<Instant>,
    trial_in_flight: bool,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    name: &'static str,
    failure_threshold: u32,
    open_for: Duration,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    pub fn new(name: &'static str, config: &BreakerConfig) -> Self {
        Self {
            name,
            failure_threshold: config.failure_threshold,
            open_for: Duration::from_millis(config.open_ms),
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                opened_at: None,
                trial_in_flight: false,
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn state(&self) -> BreakerState {
        self.inner.lock().expect("breaker lock").state
    }

    /// Whether a call at `now` would be refused without a try: open, and
    /// the open period not over. An open breaker turns half open only when a
    /// call asks, so callers that wait for it must not wait for the state.
    pub fn refuses_calls(&self, now: Instant) -> bool {
        let inner = self.inner.lock().expect("breaker lock");
        inner.state == BreakerState::Open
            && inner
                .opened_at
                .is_some_and(|opened| now.saturating_duration_since(opened) < self.open_for)
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.inner.lock().expect("breaker lock").failures
    }

    /// Asks to make a call at `now`.
    pub fn acquire(&self, now: Instant) -> Result<(), BreakerOpen> {
        let mut inner = self.inner.lock().expect("breaker lock");
        match inner.state {
            BreakerState::Closed => Ok(()),
            BreakerState::Open => {
                let opened = inner.opened_at.expect("an open breaker knows when it opened");
                let elapsed = now.saturating_duration_since(opened);
                if elapsed < self.open_for {
                    return Err(self.refusal(&inner, self.open_for - elapsed));
                }
                inner.state = BreakerState::HalfOpen;
                inner.trial_in_flight = true;
                self.publish(BreakerState::HalfOpen);
                Ok(())
            }
            BreakerState::HalfOpen if inner.trial_in_flight => Err(self.refusal(&inner, Duration::ZERO)),
            BreakerState::HalfOpen => {
                inner.trial_in_flight = true;
                Ok(())
            }
        }
    }

    fn refusal(&self, inner: &Inner, retry_in: Duration) -> BreakerOpen {
        BreakerOpen {
            name: self.name,
            failures: inner.failures,
            retry_in_ms: retry_in.as_millis() as u64,
        }
    }

    /// Reports how an acquired call ended.
    pub fn record(&self, ok: bool, now: Instant) {
        let mut inner = self.inner.lock().expect("breaker lock");
        inner.trial_in_flight = false;
        if ok {
            inner.failures = 0;
            if inner.state != BreakerState::Closed {
                inner.state = BreakerState::Closed;
                inner.opened_at = None;
                tracing::info!(breaker = self.name, "circuit breaker closed");
                self.publish(BreakerState::Closed);
            }
            return;
        }
        inner.failures = inner.failures.saturating_add(1);
        let opens = match inner.state {
            BreakerState::Closed => inner.failures >= self.failure_threshold,
            BreakerState::HalfOpen => true,
            BreakerState::Open => false,
        };
        if opens {
            inner.state = BreakerState::Open;
            inner.opened_at = Some(now);
            tracing::warn!(
                breaker = self.name,
                failures = inner.failures,
                open_for = ?self.open_for,
                "circuit breaker opened"
            );
            self.publish(BreakerState::Open);
        }
    }

    fn publish(&self, state: BreakerState) {
        metrics::gauge!(crate::metrics::CIRCUIT_BREAKER_STATE, "breaker" => self.name).set(state.as_f64());
    }

    /// Runs `call` through the breaker.
    pub async fn call<T, E, F>(&self, call: F) -> Result<T, BreakerError<E>>
    where
        F: std::future::Future<Output = Result<T, E>>,
    {
        self.acquire(Instant::now()).map_err(BreakerError::Open)?;
        let result = call.await;
        self.record(result.is_ok(), Instant::now());
        result.map_err(BreakerError::Failed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BreakerError<E> {
    #[error(transparent)]
    Open(BreakerOpen),
    #[error(transparent)]
    Failed(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(
            "catalog",
            &BreakerConfig {
                failure_threshold: 3,
                open_ms: 1_000,
            },
        )
    }

    #[test]
    fn opens_after_the_threshold_and_refuses_until_the_trial() {
        let b = breaker();
        let t0 = Instant::now();
        for _ in 0..2 {
            b.acquire(t0).unwrap();
            b.record(false, t0);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.acquire(t0).unwrap();
        b.record(false, t0);
        assert_eq!(b.state(), BreakerState::Open);
        let refused = b.acquire(t0 + Duration::from_millis(400)).unwrap_err();
        assert_eq!(refused.retry_in_ms, 600);
        assert_eq!(refused.failures, 3);
        // The trial: one call, others refused while it runs.
        b.acquire(t0 + Duration::from_millis(1_000)).unwrap();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.acquire(t0 + Duration::from_millis(1_001)).is_err());
        b.record(true, t0 + Duration::from_millis(1_002));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.failures(), 0);
    }

    #[test]
    fn a_failed_trial_opens_again() {
        let b = breaker();
        let t0 = Instant::now();
        for _ in 0..3 {
            b.acquire(t0).unwrap();
            b.record(false, t0);
        }
        let t1 = t0 + Duration::from_millis(1_000);
        b.acquire(t1).unwrap();
        b.record(false, t1);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.acquire(t1 + Duration::from_millis(999)).is_err());
        assert!(b.acquire(t1 + Duration::from_millis(1_000)).is_ok());
    }

    #[test]
    fn an_open_breaker_stops_refusing_when_its_open_period_is_over_even_if_nobody_asked() {
        let b = breaker();
        let t0 = Instant::now();
        assert!(!b.refuses_calls(t0));
        for _ in 0..3 {
            b.acquire(t0).unwrap();
            b.record(false, t0);
        }
        assert!(b.refuses_calls(t0 + Duration::from_millis(999)));
        // Still recorded as open (no call asked), but a call would be tried.
        assert!(!b.refuses_calls(t0 + Duration::from_millis(1_000)));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = breaker();
        let t0 = Instant::now();
        for ok in [false, false, true, false, false] {
            b.acquire(t0).unwrap();
            b.record(ok, t0);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
