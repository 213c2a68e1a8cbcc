//! Capped exponential backoff with jitter, shared by reconnects and worker restarts.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Bounds of a backoff sequence.
#[derive(Debug, Clone, Copy)]
pub struct BackoffSettings {
    pub min: Duration,
    pub max: Duration,
}

/// An endless sequence of delays doubling from `min` to `max`, each with random jitter so a
/// fleet of workers that lost the broker together does not reconnect in lockstep.
pub struct Backoff {
    settings: BackoffSettings,
    delays: ExponentialBackoff,
}

impl Backoff {
    pub fn new(settings: BackoffSettings) -> Self {
        Self {
            settings,
            delays: Self::build(settings),
        }
    }

    fn build(settings: BackoffSettings) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(settings.min)
            .with_max_delay(settings.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The next delay, never above `max`.
    pub fn next_delay(&mut self) -> Duration {
        self.delays
            .next()
            .unwrap_or(self.settings.max)
            .min(self.settings.max)
    }

    /// Starts over from `min`, after a period of health.
    pub fn reset(&mut self) {
        self.delays = Self::build(self.settings);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_reset() {
        let settings = BackoffSettings {
            min: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut b = Backoff::new(settings);
        let first = b.next_delay();
        assert!(
            first >= settings.min && first <= settings.min * 2,
            "{first:?}"
        );
        let later: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= settings.max));
        assert!(later.iter().any(|d| *d >= Duration::from_secs(1)));
        b.reset();
        assert!(b.next_delay() <= settings.min * 2);
    }
}
