//! Retry policy: exponential backoff with jitter, and when to give up (dead-letter).

use std::time::Duration;

use rand::Rng;

/// How failed publishes are retried. The retry time is stored in the database with the
/// message, so it survives relay restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound for any delay.
    pub max: Duration,
    /// Growth factor per attempt (≥ 1).
    pub multiplier: f64,
    /// Fraction of the delay that is randomised, 0.0 (none) to 1.0 (full jitter). The delay
    /// is drawn uniformly from `[d * (1 - jitter), d]`.
    pub jitter: f64,
    /// Failed attempts after which a message is dead-lettered. A permanent error
    /// dead-letters at once.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: 10,
        }
    }
}

/// What to do with a message whose publish just failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Give up: dead-letter it.
    DeadLetter,
}

impl RetryPolicy {
    /// Check the policy's values.
    pub fn validate(&self) -> crate::Result<()> {
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(crate::Error::config("retry multiplier must be >= 1"));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(crate::Error::config("retry jitter must be within 0..=1"));
        }
        if self.max_attempts == 0 {
            return Err(crate::Error::config("max_attempts must be at least 1"));
        }
        if self.initial > self.max {
            return Err(crate::Error::config(
                "the initial retry delay is above the maximum",
            ));
        }
        Ok(())
    }

    /// The delay before the attempt after `failed_attempts` failures (1 = the first failure),
    /// before jitter.
    pub fn base_delay(&self, failed_attempts: u32) -> Duration {
        let exp = i32::try_from(failed_attempts.saturating_sub(1).min(64)).unwrap_or(64);
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The jittered delay after `failed_attempts` failures.
    pub fn delay<R: Rng + ?Sized>(&self, failed_attempts: u32, rng: &mut R) -> Duration {
        let base = self.base_delay(failed_attempts);
        if self.jitter <= 0.0 {
            return base;
        }
        let low = 1.0 - self.jitter;
        base.mul_f64(rng.random_range(low..=1.0))
    }

    /// Decide after a failure: `failed_attempts` counts this one; `permanent` says the broker
    /// rejected the message for good.
    pub fn decide<R: Rng + ?Sized>(
        &self,
        failed_attempts: u32,
        permanent: bool,
        rng: &mut R,
    ) -> RetryDecision {
        if permanent || failed_attempts >= self.max_attempts {
            RetryDecision::DeadLetter
        } else {
            RetryDecision::RetryAfter(self.delay(failed_attempts, rng))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.0,
            max_attempts: 5,
        }
    }

    #[test]
    fn backoff_doubles_then_caps() {
        let p = policy();
        assert_eq!(p.base_delay(1), Duration::from_millis(100));
        assert_eq!(p.base_delay(2), Duration::from_millis(200));
        assert_eq!(p.base_delay(4), Duration::from_millis(800));
        assert_eq!(p.base_delay(20), Duration::from_secs(10));
        assert_eq!(p.base_delay(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn dead_letters_after_max_attempts_or_permanent_error() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(
            p.decide(4, false, &mut rng),
            RetryDecision::RetryAfter(Duration::from_millis(800))
        );
        assert_eq!(p.decide(5, false, &mut rng), RetryDecision::DeadLetter);
        assert_eq!(p.decide(1, true, &mut rng), RetryDecision::DeadLetter);
    }

    #[test]
    fn invalid_policies_are_refused() {
        let mut p = policy();
        p.jitter = 1.5;
        assert!(p.validate().is_err());
        let mut p = policy();
        p.multiplier = 0.5;
        assert!(p.validate().is_err());
        let mut p = policy();
        p.max_attempts = 0;
        assert!(p.validate().is_err());
        assert!(policy().validate().is_ok());
    }

    proptest! {
        #[test]
        fn jittered_delay_stays_within_bounds(attempt in 1u32..100, jitter in 0.0f64..=1.0, seed: u64) {
            let p = RetryPolicy { jitter, ..policy() };
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let base = p.base_delay(attempt);
            let d = p.delay(attempt, &mut rng);
            prop_assert!(d <= base);
            prop_assert!(d.as_secs_f64() >= base.as_secs_f64() * (1.0 - jitter) - 1e-9);
            prop_assert!(d <= p.max);
        }

        #[test]
        fn base_delay_never_decreases(attempt in 1u32..200) {
            let p = policy();
            prop_assert!(p.base_delay(attempt) <= p.base_delay(attempt + 1));
        }
    }
}
