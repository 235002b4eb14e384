//! Retrying failed network requests with exponential backoff.
//!
//! Owns the retry schedule ([`RetryPolicy`]) and the loop that applies it. It
//! decides nothing about *which* failures are worth another try: callers pass
//! that judgement in (see `RegistryError::is_retryable`). It must not sleep
//! for a failure that is not retryable, and must not hide a retry: every one is
//! logged and counted.

use std::collections::hash_map::RandomState;
use std::fmt::Display;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// How often and how patiently a failed request is tried again.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Total number of tries, the first included (0 counts as 1). Default 5.
    pub attempts: u32,
    /// Pause before the first retry; it doubles for every further retry.
    /// Default 100 ms.
    pub base_delay: Duration,
    /// Upper bound for any pause. Default 2 s.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn none() -> Self {
        RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The pause before retry number `retry` (1 = the first retry), without
    /// jitter: `base_delay * 2^(retry-1)`, at most `max_delay`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.base_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay)
    }

    /// The pause actually taken before retry number `retry`: the
    /// [`backoff`](Self::backoff) less a random 0–20 %, so that clients that
    /// failed together do not retry in lockstep. Never more than `max_delay`.
    pub fn delay(&self, retry: u32) -> Duration {
        let full = self.backoff(retry);
        let jitter_range = full / 5;
        if jitter_range.is_zero() {
            return full;
        }
        let nanos = jitter_range.as_nanos().min(u64::MAX as u128) as u64;
        full - Duration::from_nanos(random_u64() % (nanos + 1))
    }

    fn total_attempts(&self) -> u32 {
        self.attempts.max(1)
    }
}

/// A random number good enough for jitter (not for anything secret).
fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Runs `op` until it succeeds, fails with an error `retryable` rejects, or
/// the policy's attempts are used up; returns the last result. `op` gets the
/// attempt number (1-based). Each retry is logged with `what` and the cause
/// and counted in `retries`.
pub(crate) fn run<T, E: Display>(
    policy: &RetryPolicy,
    what: &dyn Display,
    retries: &crate::transport::Counter,
    retryable: impl Fn(&E) -> bool,
    mut op: impl FnMut(u32) -> Result<T, E>,
) -> Result<T, E> {
    let attempts = policy.total_attempts();
    let mut attempt = 1;
    loop {
        match op(attempt) {
            Ok(v) => return Ok(v),
            Err(e) if attempt < attempts && retryable(&e) => {
                let pause = policy.delay(attempt);
                tracing::warn!(
                    target: "lazypull::backend",
                    "{what}: attempt {attempt} of {attempts} failed, retrying in {pause:?}: {e}"
                );
                retries.add(1);
                std::thread::sleep(pause);
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::default();
        let schedule: Vec<_> = (1..=8).map(|r| p.backoff(r)).collect();
        assert_eq!(
            schedule,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(2000),
                ms(2000),
                ms(2000)
            ]
        );
        // Huge retry numbers saturate instead of overflowing.
        assert_eq!(p.backoff(u32::MAX), ms(2000));
        assert_eq!(p.backoff(0), ms(100));
    }

    #[test]
    fn jitter_stays_within_a_fifth_below_the_backoff() {
        let p = RetryPolicy::default();
        let mut seen = std::collections::HashSet::new();
        for retry in 1..=6 {
            let full = p.backoff(retry);
            for _ in 0..50 {
                let d = p.delay(retry);
                assert!(d <= full && d >= full - full / 5, "{d:?} vs {full:?}");
                assert!(d <= p.max_delay);
                seen.insert(d);
            }
        }
        // Jitter really varies the pauses.
        assert!(seen.len() > 20, "only {} distinct delays", seen.len());
    }

    fn quick(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        }
    }

    #[test]
    fn retries_retryable_errors_until_success() {
        let retries = crate::transport::Counter::detached();
        let mut calls = vec![];
        let r: Result<u32, String> = run(
            &quick(5),
            &"op",
            &retries,
            |e: &String| e == "transient",
            |attempt| {
                calls.push(attempt);
                if attempt < 3 {
                    Err("transient".to_string())
                } else {
                    Ok(attempt)
                }
            },
        );
        assert_eq!(r.unwrap(), 3);
        assert_eq!(calls, [1, 2, 3]);
        assert_eq!(retries.get(), 2);
    }

    #[test]
    fn gives_up_after_the_last_attempt_and_never_retries_permanent_errors() {
        let retries = crate::transport::Counter::detached();
        let mut n = 0;
        let r: Result<(), String> = run(
            &quick(3),
            &"op",
            &retries,
            |e: &String| e == "transient",
            |_| {
                n += 1;
                Err("transient".into())
            },
        );
        assert_eq!(r.unwrap_err(), "transient");
        assert_eq!(n, 3);
        assert_eq!(retries.get(), 2);

        let retries = crate::transport::Counter::detached();
        let mut n = 0;
        let r: Result<(), String> = run(
            &quick(3),
            &"op",
            &retries,
            |e: &String| e == "transient",
            |_| {
                n += 1;
                Err("permanent".into())
            },
        );
        assert_eq!(r.unwrap_err(), "permanent");
        assert_eq!(n, 1);
        assert_eq!(retries.get(), 0);

        // attempts = 0 still tries once.
        let mut n = 0;
        let _: Result<(), String> = run(
            &quick(0),
            &"op",
            &crate::transport::Counter::detached(),
            |_| true,
            |_| {
                n += 1;
                Err("x".into())
            },
        );
        assert_eq!(n, 1);
    }
}
