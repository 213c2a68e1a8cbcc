//! The per-enrollment circuit breaker. After `failure_threshold` consecutive POSTs that found
//! the target unavailable it opens: no POST is made and the worker grants no link credit, so
//! messages wait in the broker (or unsettled in hand) without using up their delivery count.
//! After `open_ms` it turns half-open: one probe POST is let through (the worker grants one
//! credit if nothing is in hand, so a probe can always be made); its success closes the
//! breaker, its failure opens it again. A probe permit that is dropped unused (its task was
//! aborted, the worker is stopping) gives the probe slot back.
//!
//! The probe goes to the POST that has waited longest: waiters take a ticket in arrival order,
//! and a POST that fails its probe and tries again queues behind the others. Without that, the
//! order in which waiting POSTs happen to be polled decides, and inside one task that order is
//! the same every time: one message that keeps failing would take every probe and the messages
//! behind it would never be tried.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::enrollment::policy::BreakerPolicy;
use crate::enrollment::status::BreakerState;

/// What kind of POST a permit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermitKind {
    Normal,
    /// The one probe of a half-open breaker.
    Probe,
}

/// How a POST went, as far as the target's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// 2xx.
    Up,
    /// No answer, or an answer that says the target is unavailable.
    Down,
    /// The target answered deliberately (an error answer, a 4xx): it is alive.
    Answered,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    opened_at: Instant,
    probe_out: bool,
    /// Tickets of the POSTs waiting for an open or half-open breaker; the lowest takes the
    /// probe.
    waiting: BTreeSet<u64>,
    next_ticket: u64,
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

/// Leave to make one POST. Report its result with [`Permit::record`]; a permit dropped
/// unreported gives a probe slot back, so an aborted probe never blocks the breaker.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    kind: PermitKind,
    reported: bool,
}

impl Permit<'_> {
    pub fn kind(&self) -> PermitKind {
        self.kind
    }

    /// Reports the result of the POST made under this permit.
    pub fn record(mut self, health: Health) {
        self.reported = true;
        self.breaker.record(self.kind, health);
    }
}

/// What a waiting POST does after a look at the breaker.
enum Next {
    Take(PermitKind),
    WaitUntilHalfOpen(Duration),
    WaitForChange,
}

/// A waiting POST's place in line, given up when it is dropped (the POST got its permit, or its
/// caller stopped waiting).
struct Ticket<'a> {
    breaker: &'a CircuitBreaker,
    number: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut inner = self.breaker.lock();
        let was_first = inner.waiting.first() == Some(&self.number);
        inner.waiting.remove(&self.number);
        // The next in line may be waiting for a free probe that this one held back.
        if was_first && inner.state == BreakerState::HalfOpen && !inner.probe_out {
            self.breaker.changes.send_replace(inner.state);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported && self.kind == PermitKind::Probe {
            self.breaker.give_back_probe();
        }
    }
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
                waiting: BTreeSet::new(),
                next_ticket: 0,
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

    fn permit(&self, kind: PermitKind) -> Permit<'_> {
        Permit {
            breaker: self,
            kind,
            reported: false,
        }
    }

    /// When an open breaker turns half-open; `None` unless it is open.
    pub fn half_opens_at(&self) -> Option<Instant> {
        let inner = self.lock();
        (inner.state == BreakerState::Open).then(|| inner.opened_at + self.open_for)
    }

    /// Turns an open breaker half-open once `open_ms` has passed, without waiting for a POST
    /// to ask: the worker calls it on a timer, so a probe can be made even with nothing in hand.
    pub fn half_open_if_due(&self) {
        let mut inner = self.lock();
        if inner.state == BreakerState::Open && inner.opened_at.elapsed() >= self.open_for {
            self.set(&mut inner, BreakerState::HalfOpen);
        }
    }

    /// Waits until a POST may be made; the probe of a half-open breaker goes to the POST that
    /// has waited longest. Cancel-safe: a caller dropped while waiting holds nothing.
    pub async fn acquire(&self) -> Permit<'_> {
        // The common case, a closed breaker, costs one uncontended lock.
        if self.lock().state == BreakerState::Closed {
            return self.permit(PermitKind::Normal);
        }
        let mut ticket: Option<Ticket<'_>> = None;
        loop {
            // Subscribe before looking, so a change between the look and the wait wakes us.
            let mut changes = self.changes.subscribe();
            changes.borrow_and_update();
            let next = {
                let mut inner = self.lock();
                if inner.state == BreakerState::Open && inner.opened_at.elapsed() >= self.open_for {
                    self.set(&mut inner, BreakerState::HalfOpen);
                }
                let number = match &ticket {
                    Some(ticket) => ticket.number,
                    None => {
                        let number = inner.next_ticket;
                        inner.next_ticket = number.wrapping_add(1);
                        inner.waiting.insert(number);
                        ticket = Some(Ticket {
                            breaker: self,
                            number,
                        });
                        number
                    }
                };
                let first_in_line = inner.waiting.first() == Some(&number);
                match inner.state {
                    BreakerState::Closed => Next::Take(PermitKind::Normal),
                    BreakerState::HalfOpen if !inner.probe_out && first_in_line => {
                        inner.probe_out = true;
                        Next::Take(PermitKind::Probe)
                    }
                    BreakerState::HalfOpen => Next::WaitForChange,
                    BreakerState::Open => Next::WaitUntilHalfOpen(
                        (inner.opened_at + self.open_for).saturating_duration_since(Instant::now()),
                    ),
                }
            };
            match next {
                Next::Take(kind) => {
                    // The ticket is given up here, after the lock above was released.
                    drop(ticket);
                    return self.permit(kind);
                }
                Next::WaitUntilHalfOpen(d) if d.is_zero() => {}
                Next::WaitUntilHalfOpen(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = changes.changed() => {}
                    }
                }
                Next::WaitForChange => {
                    let _ = changes.changed().await;
                }
            }
        }
    }

    fn record(&self, kind: PermitKind, health: Health) {
        let mut inner = self.lock();
        match (kind, health) {
            (_, Health::Up | Health::Answered) => {
                inner.consecutive_failures = 0;
                if kind == PermitKind::Probe {
                    inner.probe_out = false;
                }
                if kind == PermitKind::Probe || inner.state == BreakerState::HalfOpen {
                    self.set(&mut inner, BreakerState::Closed);
                }
            }
            (PermitKind::Probe, Health::Down) => {
                inner.probe_out = false;
                inner.opened_at = Instant::now();
                self.set(&mut inner, BreakerState::Open);
            }
            (PermitKind::Normal, Health::Down) => {
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

    /// A probe permit was dropped unused: the slot is free again.
    fn give_back_probe(&self) {
        let mut inner = self.lock();
        inner.probe_out = false;
        // Wake another waiter so it can take the probe.
        self.changes.send_replace(inner.state);
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
            let p = b.acquire().await;
            assert_eq!(p.kind(), PermitKind::Normal);
            p.record(Health::Down);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.acquire().await.record(Health::Down);
        assert_eq!(b.state(), BreakerState::Open);

        let started = Instant::now();
        let probe = b.acquire().await;
        assert_eq!(probe.kind(), PermitKind::Probe);
        assert!(started.elapsed() >= Duration::from_millis(1000));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probe.record(Health::Down);
        assert_eq!(b.state(), BreakerState::Open);

        let probe = b.acquire().await;
        assert_eq!(probe.kind(), PermitKind::Probe);
        probe.record(Health::Up);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.acquire().await.kind(), PermitKind::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_or_a_deliberate_answer_resets_the_count() {
        let b = breaker(2, 1000);
        b.acquire().await.record(Health::Down);
        b.acquire().await.record(Health::Answered);
        b.acquire().await.record(Health::Down);
        assert_eq!(b.state(), BreakerState::Closed);
        b.acquire().await.record(Health::Up);
        b.acquire().await.record(Health::Down);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn threshold_zero_never_opens() {
        let b = breaker(0, 1000);
        for _ in 0..100 {
            b.acquire().await.record(Health::Down);
        }
        assert_eq!(b.acquire().await.kind(), PermitKind::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn only_one_probe_at_a_time_and_a_dropped_probe_passes_on() {
        let b = std::sync::Arc::new(breaker(1, 100));
        b.acquire().await.record(Health::Down);
        let probe = b.acquire().await;
        assert_eq!(probe.kind(), PermitKind::Probe);
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire().await.kind() })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "a second probe must wait");
        // An aborted probe task drops its permit without reporting.
        drop(probe);
        assert_eq!(waiter.await.expect("join"), PermitKind::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_turns_half_open_on_time_without_a_waiter() {
        let b = breaker(1, 1000);
        b.acquire().await.record(Health::Down);
        let due = b.half_opens_at().expect("open");
        b.half_open_if_due();
        assert_eq!(b.state(), BreakerState::Open, "not yet");
        tokio::time::sleep_until(due).await;
        b.half_open_if_due();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.half_opens_at(), None);
        assert_eq!(b.acquire().await.kind(), PermitKind::Probe);
    }

    /// One task polls every waiting POST (as the receive loop does): a message that fails
    /// every probe must not take every probe while the others wait.
    #[tokio::test(start_paused = true)]
    async fn the_probe_goes_to_the_longest_waiter_not_the_one_polled_first() {
        use futures_util::StreamExt;
        use futures_util::stream::FuturesUnordered;
        use std::cell::RefCell;

        let b = breaker(1, 100);
        b.acquire().await.record(Health::Down);
        let probes = RefCell::new(Vec::new());
        let started = Instant::now();
        let post = |name: &'static str, healthy: bool| {
            let (b, probes) = (&b, &probes);
            async move {
                // A bounded number of tries: the one that always fails gives up in the end.
                for _ in 0..20 {
                    let permit = b.acquire().await;
                    if permit.kind() == PermitKind::Probe {
                        probes.borrow_mut().push(name);
                    }
                    if healthy {
                        permit.record(Health::Up);
                        return (name, started.elapsed());
                    }
                    permit.record(Health::Down);
                }
                (name, started.elapsed())
            }
        };
        let mut posts = FuturesUnordered::new();
        posts.push(post("bad", false));
        posts.push(post("first-good", true));
        posts.push(post("second-good", true));
        let mut finished = Vec::new();
        while let Some((name, after)) = posts.next().await {
            finished.push((name, after));
        }
        drop(posts);
        let probes = probes.into_inner();
        assert_eq!(
            probes.get(..2),
            Some(&["bad", "first-good"][..]),
            "the probe goes in order of waiting: {probes:?}"
        );
        for good in ["first-good", "second-good"] {
            let after = finished
                .iter()
                .find(|(name, _)| *name == good)
                .map(|(_, after)| *after);
            assert!(
                after.is_some_and(|after| after < Duration::from_millis(500)),
                "{good} waited behind the failing message: {finished:?}"
            );
        }
    }
}
