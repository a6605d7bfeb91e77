//! Reconnection delays: exponential, capped, jittered.

use std::time::Duration;

use rand::Rng;

use crate::config::ReconnectConfig;

/// Delays of `initial`, `2 x initial`, ... up to `max`, each drawn uniformly from the upper half
/// of its step ("equal jitter"): never shorter than half the step, so a dead gateway is not
/// hammered, and spread out, so a fleet of agents does not reconnect in lockstep.
#[derive(Debug)]
pub struct Backoff {
    config: ReconnectConfig,
    attempt: u32,
}

impl Backoff {
    pub fn new(config: ReconnectConfig) -> Self {
        Backoff { config, attempt: 0 }
    }

    /// Takes new bounds (a reload); the attempt count carries on.
    pub fn set_config(&mut self, config: ReconnectConfig) {
        self.config = config;
    }

    /// The upper bound of the next delay, before jitter.
    pub fn step(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        self.config
            .initial
            .saturating_mul(factor)
            .min(self.config.max)
    }

    pub fn next_delay(&mut self) -> Duration {
        let step = self.step();
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Goes straight to the longest delay (a refusal only an operator can lift).
    pub fn exhaust(&mut self) {
        self.attempt = self.attempt.max(20);
    }

    /// After a healthy session, start again from `initial`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::new(ReconnectConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        });
        let mut steps = Vec::new();
        for _ in 0..8 {
            let step = b.step();
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "{d:?} not within {step:?}");
            steps.push(step.as_millis());
        }
        assert_eq!(steps, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(100));
    }
}
