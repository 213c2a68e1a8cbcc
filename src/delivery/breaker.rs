//! The per-enrollment circuit breaker. After `failure_threshold` consecutive failed POSTs it
//! opens: no POST is made and the worker grants no link credit, so messages wait in the
//! broker (or unsettled in hand) without using up their delivery count. After `open_ms` one
//! probe POST is let through (half-open); its success closes the breaker, its failure opens
//! it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::enrollment::policy::BreakerPolicy;
use crate::enrollment::status::BreakerState;

/// What a caller may do: an ordinary POST, or the one probe of a half-open breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Normal,
    Probe,
}

/// How a POST went, as far as the target's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// 2xx.
    Up,
    /// Network error, timeout, or a retry-class status.
    Down,
    /// The target answered deliberately (a 4xx outside the retry class): it is alive.
    Answered,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    opened_at: Instant,
    probe_out: bool,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    open_for: Duration,
    inner: Mutex<Inner>,
    /// Broadcasts every state change: to waiting POSTs and to the worker, which stops and
    /// restarts link credit.
    changes: watch::Sender<BreakerState>,
}

impl CircuitBreaker {
    pub fn new(policy: BreakerPolicy) -> Self {
        Self {
            threshold: policy.failure_threshold,
            open_for: Duration::from_millis(policy.open_ms),
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                opened_at: Instant::now(),
                probe_out: false,
            }),
            changes: watch::channel(BreakerState::Closed).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update is a few field writes; a panic cannot leave the state half-changed.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.changes.subscribe()
    }

    fn set(&self, inner: &mut Inner, state: BreakerState) {
        if inner.state != state {
            inner.state = state;
            self.changes.send_replace(state);
            tracing::info!(breaker = ?state, "circuit breaker changed state");
        }
    }

    /// Waits until a POST may be made. Cancel-safe: a caller dropped while waiting holds
    /// nothing; one that got a probe must report it with [`record`](Self::record) or
    /// [`abandon`](Self::abandon).
    pub async fn acquire(&self) -> Permit {
        // The common case, a closed breaker, costs one uncontended lock.
        if self.lock().state == BreakerState::Closed {
            return Permit::Normal;
        }
        loop {
            // Subscribe before looking, so a change between the look and the wait wakes us.
            let mut changes = self.changes.subscribe();
            changes.borrow_and_update();
            let wait = {
                let mut inner = self.lock();
                match inner.state {
                    BreakerState::Closed => return Permit::Normal,
                    BreakerState::Open => {
                        let elapsed = inner.opened_at.elapsed();
                        if elapsed >= self.open_for && !inner.probe_out {
                            inner.probe_out = true;
                            self.set(&mut inner, BreakerState::HalfOpen);
                            return Permit::Probe;
                        }
                        Some(self.open_for.saturating_sub(elapsed))
                    }
                    BreakerState::HalfOpen if !inner.probe_out => {
                        inner.probe_out = true;
                        return Permit::Probe;
                    }
                    BreakerState::HalfOpen => None,
                }
            };
            match wait {
                Some(d) if !d.is_zero() => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = changes.changed() => {}
                    }
                }
                _ => {
                    let _ = changes.changed().await;
                }
            }
        }
    }

    /// Reports the result of a POST made under `permit`.
    pub fn record(&self, permit: Permit, health: Health) {
        let mut inner = self.lock();
        match (permit, health) {
            (_, Health::Up | Health::Answered) => {
                inner.consecutive_failures = 0;
                if permit == Permit::Probe || inner.state == BreakerState::HalfOpen {
                    inner.probe_out = false;
                    self.set(&mut inner, BreakerState::Closed);
                }
            }
            (Permit::Probe, Health::Down) => {
                inner.probe_out = false;
                inner.opened_at = Instant::now();
                self.set(&mut inner, BreakerState::Open);
            }
            (Permit::Normal, Health::Down) => {
                inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                if self.threshold > 0
                    && inner.consecutive_failures >= self.threshold
                    && inner.state == BreakerState::Closed
                {
                    inner.opened_at = Instant::now();
                    self.set(&mut inner, BreakerState::Open);
                }
            }
        }
    }

    /// Gives back a probe that was never made (the worker is stopping).
    pub fn abandon(&self, permit: Permit) {
        if permit == Permit::Probe {
            let mut inner = self.lock();
            inner.probe_out = false;
            // Wake another waiter so it can take the probe.
            self.changes.send_replace(inner.state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, open_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(BreakerPolicy {
            failure_threshold: threshold,
            open_ms,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_probes_and_closes() {
        let b = breaker(3, 1000);
        for _ in 0..2 {
            assert_eq!(b.acquire().await, Permit::Normal);
            b.record(Permit::Normal, Health::Down);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(Permit::Normal, Health::Down);
        assert_eq!(b.state(), BreakerState::Open);

        let started = tokio::time::Instant::now();
        assert_eq!(b.acquire().await, Permit::Probe);
        assert!(started.elapsed() >= Duration::from_millis(1000));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.record(Permit::Probe, Health::Down);
        assert_eq!(b.state(), BreakerState::Open);

        assert_eq!(b.acquire().await, Permit::Probe);
        b.record(Permit::Probe, Health::Up);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.acquire().await, Permit::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_or_a_deliberate_answer_resets_the_count() {
        let b = breaker(2, 1000);
        b.record(Permit::Normal, Health::Down);
        b.record(Permit::Normal, Health::Answered);
        b.record(Permit::Normal, Health::Down);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(Permit::Normal, Health::Up);
        b.record(Permit::Normal, Health::Down);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn threshold_zero_never_opens() {
        let b = breaker(0, 1000);
        for _ in 0..100 {
            b.record(Permit::Normal, Health::Down);
        }
        assert_eq!(b.acquire().await, Permit::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn only_one_probe_at_a_time_and_an_abandoned_probe_passes_on() {
        let b = std::sync::Arc::new(breaker(1, 100));
        b.record(Permit::Normal, Health::Down);
        assert_eq!(b.acquire().await, Permit::Probe);
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire().await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "a second probe must wait");
        b.abandon(Permit::Probe);
        assert_eq!(waiter.await.expect("join"), Permit::Probe);
    }
}
