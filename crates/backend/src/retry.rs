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
use std::time::{Duration, Instant};

use crate::breaker::{BackendDown, Breaker};

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

/// The backend a request goes to, and how long its caller waits for it while
/// its breaker is open (None: until it is back).
pub(crate) struct Guard<'a> {
    pub breaker: &'a Breaker,
    pub outage_timeout: Option<Duration>,
}

/// Runs `op` until it succeeds, fails with an error `retryable` rejects, or
/// the policy's attempts are used up; returns the last result. `op` gets the
/// attempt number (1-based). Each retry on its own schedule is logged with
/// `what` and the cause; every try after the first is counted in `retries`,
/// whether it followed a pause of the schedule or waited for the breaker (so
/// `retries` is always tries minus calls, however the breaker behaved).
///
/// With a `guard`, every try first passes the backend's breaker: while it is
/// open the caller's own schedule is suspended (no sleeps, no tries, no
/// attempts used) and it waits for the breaker instead, until its
/// `outage_timeout` since the call (or the outage, if older) began has
/// passed; then the call fails with `down(BackendDown)`. Retryable failures count against the breaker, any
/// other outcome tells it the backend is up.
pub(crate) fn run<T, E: Display>(
    policy: &RetryPolicy,
    what: &dyn Display,
    retries: &crate::transport::Counter,
    guard: Option<&Guard<'_>>,
    retryable: impl Fn(&E) -> bool,
    down: impl Fn(BackendDown) -> E,
    mut op: impl FnMut(u32) -> Result<T, E>,
) -> Result<T, E> {
    let attempts = policy.total_attempts();
    let started = Instant::now();
    // For our own pauses: the breaker bounds the waits for it.
    let give_up_at = guard.and_then(|g| g.outage_timeout.map(|t| started + t));
    let mut attempt = 1;
    let mut tried = false;
    loop {
        let pass = match guard {
            Some(g) => Some(g.breaker.admit(started, g.outage_timeout).map_err(&down)?),
            None => None,
        };
        if tried {
            retries.add(1);
        }
        tried = true;
        let r = op(attempt);
        let e = match r {
            Ok(v) => {
                if let Some(p) = pass {
                    p.up();
                }
                return Ok(v);
            }
            Err(e) => e,
        };
        if !retryable(&e) {
            if let Some(p) = pass {
                p.up();
            }
            return Err(e);
        }
        if let Some(p) = pass {
            p.down(&e);
        }
        if guard.is_some_and(|g| g.breaker.is_down()) {
            // The backend is down: wait for its breaker (in `admit`), not
            // on our own schedule.
            continue;
        }
        if attempt >= attempts {
            return Err(e);
        }
        let mut pause = policy.delay(attempt);
        if let Some(t) = give_up_at {
            pause = pause.min(t.saturating_duration_since(Instant::now()));
        }
        tracing::warn!(
            target: "lazypull::backend",
            "{what}: attempt {attempt} of {attempts} failed, retrying in {pause:?}: {e}"
        );
        std::thread::sleep(pause);
        attempt += 1;
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
            None,
            |e: &String| e == "transient",
            |d| d.to_string(),
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
            None,
            |e: &String| e == "transient",
            |d| d.to_string(),
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
            None,
            |e: &String| e == "transient",
            |d| d.to_string(),
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
            None,
            |_| true,
            |d| d.to_string(),
            |_| {
                n += 1;
                Err("x".into())
            },
        );
        assert_eq!(n, 1);
    }

    fn breaker(threshold: u32, cooldown: u64) -> Breaker {
        Breaker::new(
            "http://down:1",
            crate::breaker::BreakerPolicy {
                enabled: true,
                threshold,
                cooldown: ms(cooldown),
                max_cooldown: ms(cooldown),
            },
        )
    }

    #[test]
    fn an_open_breaker_stops_the_retry_schedule_and_fails_at_the_outage_timeout() {
        let b = breaker(3, 60_000);
        let guard = Guard {
            breaker: &b,
            outage_timeout: Some(ms(300)),
        };
        let mut n = 0;
        let t = Instant::now();
        let r: Result<(), String> = run(
            &quick(100),
            &"op",
            &crate::transport::Counter::detached(),
            Some(&guard),
            |_| true,
            |d| format!("down: {d}"),
            |_| {
                n += 1;
                Err("refused".into())
            },
        );
        let took = t.elapsed();
        let e = r.unwrap_err();
        assert!(e.starts_with("down: backend http://down:1 is down"), "{e}");
        assert!(e.contains("refused"), "{e}");
        assert_eq!(n, 3, "tries stop when the breaker opens");
        assert!(took >= ms(300) && took < ms(2000), "{took:?}");
        // The next caller does not try at all; with no time to wait, it
        // fails at once.
        let instant = Guard {
            breaker: &b,
            outage_timeout: Some(Duration::ZERO),
        };
        let t = Instant::now();
        let r: Result<(), String> = run(
            &quick(100),
            &"op",
            &crate::transport::Counter::detached(),
            Some(&instant),
            |_| true,
            |d| d.to_string(),
            |_| panic!("no request while the breaker is open"),
        );
        assert!(r.is_err() && t.elapsed() < ms(200));
        assert_eq!(b.health().fast_failures, 2);
    }

    #[test]
    fn many_callers_of_a_down_backend_send_a_bounded_number_of_requests() {
        let b = std::sync::Arc::new(breaker(5, 100));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t = Instant::now();
        let callers: Vec<_> = (0..16)
            .map(|_| {
                let (b, sent) = (b.clone(), sent.clone());
                std::thread::spawn(move || {
                    let guard = Guard {
                        breaker: &b,
                        outage_timeout: Some(ms(1000)),
                    };
                    let r: Result<(), String> = run(
                        &RetryPolicy {
                            attempts: 5,
                            base_delay: ms(10),
                            max_delay: ms(10),
                        },
                        &"op",
                        &crate::transport::Counter::detached(),
                        Some(&guard),
                        |_| true,
                        |d| d.to_string(),
                        |_| {
                            sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            std::thread::sleep(ms(5));
                            Err("reset".into())
                        },
                    );
                    r.unwrap_err()
                })
            })
            .collect();
        for c in callers {
            assert!(c.join().unwrap().contains("is down"));
        }
        let took = t.elapsed();
        assert!(took < ms(2500), "{took:?}");
        // Without the breaker: 16 callers x 5 tries = 80. With it: the
        // tries in flight when it opened (at most one per caller), then one
        // probe per 100 ms cool-down for a second.
        let n = sent.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n <= 16 + 5 + 11, "{n} requests");
        assert!(b.health().probes <= 11, "{:?}", b.health());
    }

    #[test]
    fn with_no_outage_timeout_a_caller_waits_until_a_probe_succeeds() {
        let b = breaker(2, 50);
        let guard = Guard {
            breaker: &b,
            outage_timeout: None,
        };
        let back_at = Instant::now() + ms(500);
        let mut n = 0;
        let retries = crate::transport::Counter::detached();
        let r: Result<u32, String> = run(
            &quick(3),
            &"op",
            &retries,
            Some(&guard),
            |_| true,
            |d| d.to_string(),
            |_| {
                n += 1;
                if Instant::now() < back_at {
                    Err("refused".into())
                } else {
                    Ok(n)
                }
            },
        );
        assert!(Instant::now() >= back_at);
        let tries = r.unwrap();
        // More tries than its 3 attempts (probes), but one per cool-down.
        assert!(tries > 3 && tries <= 2 + 11, "{tries}");
        // Every try after the first is a retry, also those the breaker let
        // through (the guest fault scenario counts on it: its concurrent
        // ranges can open the breaker).
        assert_eq!(retries.get(), u64::from(tries) - 1);
        assert_eq!(b.health().state, "closed");
    }
}
