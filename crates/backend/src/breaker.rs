//! A circuit breaker per backend (one HTTP origin: a registry host, a blob
//! server), so that a backend that is down for minutes costs a bounded number
//! of requests and readers get a clear error in a bounded, configured time.
//!
//! States:
//! * **closed**: requests go out; [`BreakerPolicy::threshold`] consecutive
//!   failures of the kinds that mean "down" (those
//!   [`RegistryError::is_retryable`](crate::RegistryError::is_retryable)
//!   accepts: refused or reset connections, timeouts, 5xx, short bodies)
//!   open it. Any answer (a success, but also a 404 or a 401) resets the
//!   count: the backend is up.
//! * **open** (since T, with the last cause): no request goes out. A caller
//!   waits for the breaker to close, at most until its own give-up time
//!   (the daemon's `outage_timeout_secs`, or for ever with `"wait"`), then
//!   fails fast with [`BackendDown`], which names the backend, how long it has
//!   been down and the last cause. After a cool-down one caller becomes the
//!   probe:
//! * **half-open**: one request (the probe) is out, everyone else waits for
//!   it. Its success closes the breaker and wakes the waiters; its failure
//!   opens it again for twice the cool-down, at most
//!   [`BreakerPolicy::max_cooldown`].
//!
//! So while a backend is down it sees at most one request per cool-down
//! however many readers there are. Each change of state (open, closed) is
//! logged once; probes at debug level. It owns no thread: a probe is the
//! request of a caller that was waiting anyway, so an idle daemon sends
//! nothing to a backend that is down.
//!
//! It uses std locks and condvars, like the rest of this crate: callers are
//! plain threads (see [`HttpBlob`](crate::HttpBlob)), never async tasks.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// When a backend counts as down and how often it is probed then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Without it, every request goes out whatever happened before (each
    /// caller runs its own retry schedule). Default on.
    pub enabled: bool,
    /// Consecutive "down" failures that open the breaker (0 counts as 1).
    /// Default 5, the default number of tries of one request.
    pub threshold: u32,
    /// The first cool-down: how long after opening the first probe may go.
    /// Default 1 s.
    pub cooldown: Duration,
    /// The cool-down doubles after every failed probe, up to this. Default
    /// 10 s: a backend that returns is noticed within 10 s by a waiting
    /// reader.
    pub max_cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            enabled: true,
            threshold: 5,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(10),
        }
    }
}

/// A request refused because its backend is down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendDown {
    /// The backend (`scheme://host:port`).
    pub backend: String,
    /// How long it has been down (since its breaker opened).
    pub down_for: Duration,
    /// Why its last request failed.
    pub cause: String,
    /// How long this caller waited for it to come back.
    pub waited: Duration,
}

impl fmt::Display for BackendDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backend {} is down (for {:.1} s; last error: {}); gave up after waiting {:.1} s \
             for it (outage_timeout_secs)",
            self.backend,
            self.down_for.as_secs_f64(),
            self.cause,
            self.waited.as_secs_f64()
        )
    }
}

/// The state of one backend's breaker (in `lazypull status`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BackendHealth {
    /// `scheme://host:port`.
    pub backend: String,
    /// `closed`, `open` or `half-open`.
    pub state: &'static str,
    /// While not closed: when it opened, in seconds since the Unix epoch.
    pub down_since_unix: Option<u64>,
    /// While not closed: for how long it has been down, in seconds.
    pub down_secs: Option<f64>,
    /// The last failure that counted (kept after it closes again).
    pub last_cause: Option<String>,
    /// Consecutive failures now.
    pub consecutive_failures: u32,
    /// Times it opened.
    pub opens: u64,
    /// Requests refused without being sent (their callers gave up waiting).
    pub fast_failures: u64,
    /// Probes sent while it was open.
    pub probes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    failures: u32,
    /// When it opened (while not closed).
    since: Option<(Instant, SystemTime)>,
    last_cause: Option<String>,
    cooldown: Duration,
    /// While open: when the next probe may go.
    probe_at: Instant,
}

/// One backend's breaker, shared by every caller of that backend.
#[derive(Debug)]
pub struct Breaker {
    backend: String,
    policy: BreakerPolicy,
    state: Mutex<State>,
    changed: Condvar,
    opens: AtomicU64,
    fast_failures: AtomicU64,
    probes: AtomicU64,
}

/// The right to send one request; say how it went with [`up`](Self::up) or
/// [`down`](Self::down). A probe dropped unanswered (its caller panicked)
/// lets the next caller probe at once.
#[must_use]
pub struct Pass<'a> {
    breaker: &'a Breaker,
    probe: bool,
    done: bool,
}

impl Pass<'_> {
    /// Whether this request is the probe of an open breaker.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The backend answered (whatever the answer): it is up.
    pub fn up(mut self) {
        self.done = true;
        self.breaker.record_up(self.probe);
    }

    /// The request failed in a way that means the backend is down.
    pub fn down(mut self, cause: &dyn fmt::Display) {
        self.done = true;
        self.breaker.record_down(self.probe, cause.to_string());
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if self.probe && !self.done {
            let mut st = self.breaker.lock();
            if st.phase == Phase::HalfOpen {
                st.phase = Phase::Open;
                st.probe_at = Instant::now();
            }
            drop(st);
            self.breaker.changed.notify_all();
        }
    }
}

impl Breaker {
    pub fn new(backend: &str, policy: BreakerPolicy) -> Breaker {
        Breaker {
            backend: backend.to_string(),
            policy,
            state: Mutex::new(State {
                phase: Phase::Closed,
                failures: 0,
                since: None,
                last_cause: None,
                cooldown: policy.cooldown,
                probe_at: Instant::now(),
            }),
            changed: Condvar::new(),
            opens: AtomicU64::new(0),
            fast_failures: AtomicU64::new(0),
            probes: AtomicU64::new(0),
        }
    }

    pub fn backend(&self) -> &str {
        &self.backend
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the breaker is open or half-open now.
    pub fn is_down(&self) -> bool {
        self.policy.enabled && self.lock().phase != Phase::Closed
    }

    /// Waits until a request may go: at once while closed; while open, until
    /// it closes or this caller may probe. Once `timeout` (None: never) has
    /// passed since the caller `started` or since the backend went down,
    /// whichever was first, it fails with [`BackendDown`] instead: a caller
    /// never waits longer than `timeout`, and once an outage is older than
    /// that, callers fail at once (but for the probe, when one is due).
    pub fn admit(
        &self,
        started: Instant,
        timeout: Option<Duration>,
    ) -> Result<Pass<'_>, BackendDown> {
        let pass = |probe| Pass {
            breaker: self,
            probe,
            done: false,
        };
        if !self.policy.enabled {
            return Ok(pass(false));
        }
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            match st.phase {
                Phase::Closed => return Ok(pass(false)),
                Phase::Open if now >= st.probe_at => {
                    st.phase = Phase::HalfOpen;
                    self.probes.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        target: "lazypull::backend",
                        backend = %self.backend,
                        "backend {} is down: probing it", self.backend
                    );
                    return Ok(pass(true));
                }
                _ => {}
            }
            let give_up_at = timeout.map(|t| {
                let from = match st.since {
                    Some((since, _)) => since.min(started),
                    None => started,
                };
                from + t
            });
            if give_up_at.is_some_and(|t| now >= t) {
                self.fast_failures.fetch_add(1, Ordering::Relaxed);
                return Err(BackendDown {
                    backend: self.backend.clone(),
                    down_for: st.since.map(|(t, _)| now - t).unwrap_or_default(),
                    cause: st.last_cause.clone().unwrap_or_default(),
                    waited: now.saturating_duration_since(started),
                });
            }
            // Wake at the next probe time (while open) or the give-up time,
            // whichever is first; a state change wakes everyone earlier.
            let mut until = give_up_at;
            if st.phase == Phase::Open {
                until = Some(until.map_or(st.probe_at, |t| t.min(st.probe_at)));
            }
            st = match until {
                Some(t) => {
                    self.changed
                        .wait_timeout(st, t.saturating_duration_since(now))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    fn record_up(&self, probe: bool) {
        let mut st = self.lock();
        st.failures = 0;
        if st.phase == Phase::Closed {
            return;
        }
        // A probe's success, or a request sent before the breaker opened
        // that got an answer after all: either way the backend is up.
        let down_for = st.since.map(|(t, _)| t.elapsed()).unwrap_or_default();
        st.phase = Phase::Closed;
        st.since = None;
        st.cooldown = self.policy.cooldown;
        drop(st);
        tracing::info!(
            target: "lazypull::backend",
            backend = %self.backend,
            "backend {} is back after {:.1} s down{}: circuit closed",
            self.backend,
            down_for.as_secs_f64(),
            if probe { "" } else { " (a request sent before it opened was answered)" }
        );
        self.changed.notify_all();
    }

    fn record_down(&self, probe: bool, cause: String) {
        let mut st = self.lock();
        st.failures = st.failures.saturating_add(1);
        if !self.policy.enabled {
            // Kept for the status, but a disabled breaker never opens.
            st.last_cause = Some(cause);
            return;
        }
        match st.phase {
            Phase::HalfOpen if probe => {
                st.cooldown = (st.cooldown * 2).min(self.policy.max_cooldown);
                st.phase = Phase::Open;
                st.probe_at = Instant::now() + st.cooldown;
                tracing::debug!(
                    target: "lazypull::backend",
                    backend = %self.backend,
                    "backend {}: probe failed ({cause}); next probe in {:?}",
                    self.backend, st.cooldown
                );
                st.last_cause = Some(cause);
                drop(st);
                self.changed.notify_all();
            }
            Phase::Closed if st.failures >= self.policy.threshold.max(1) => {
                let now = Instant::now();
                st.phase = Phase::Open;
                st.since = Some((now, SystemTime::now()));
                st.cooldown = self.policy.cooldown;
                st.probe_at = now + st.cooldown;
                self.opens.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    target: "lazypull::backend",
                    backend = %self.backend,
                    "backend {} is down ({} consecutive failures, the last: {cause}): circuit \
                     open, its requests wait for it (probed every {:?} to {:?}) instead of \
                     retrying",
                    self.backend, st.failures, self.policy.cooldown, self.policy.max_cooldown
                );
                st.last_cause = Some(cause);
            }
            // A request that was in flight when the breaker opened: nothing
            // changes but the cause.
            _ => st.last_cause = Some(cause),
        }
    }

    /// The breaker's state now.
    pub fn health(&self) -> BackendHealth {
        let st = self.lock();
        let phase = if self.policy.enabled {
            st.phase
        } else {
            Phase::Closed
        };
        let since = st.since.filter(|_| phase != Phase::Closed);
        BackendHealth {
            backend: self.backend.clone(),
            state: match phase {
                Phase::Closed => "closed",
                Phase::Open => "open",
                Phase::HalfOpen => "half-open",
            },
            down_since_unix: since.map(|(_, wall)| {
                wall.duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            }),
            down_secs: since.map(|(t, _)| (t.elapsed().as_secs_f64() * 10.0).round() / 10.0),
            last_cause: st.last_cause.clone(),
            consecutive_failures: st.failures,
            opens: self.opens.load(Ordering::Relaxed),
            fast_failures: self.fast_failures.load(Ordering::Relaxed),
            probes: self.probes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy(threshold: u32, cooldown: u64, max: u64) -> BreakerPolicy {
        BreakerPolicy {
            enabled: true,
            threshold,
            cooldown: ms(cooldown),
            max_cooldown: ms(max),
        }
    }

    fn fail(b: &Breaker, n: u32) {
        for _ in 0..n {
            b.admit(Instant::now(), None).unwrap().down(&"refused");
        }
    }

    #[test]
    fn opens_after_the_threshold_of_consecutive_failures_only() {
        let b = Breaker::new("http://h:1", policy(3, 1000, 1000));
        fail(&b, 2);
        // An answer (any) resets the count.
        b.admit(Instant::now(), None).unwrap().up();
        fail(&b, 2);
        assert_eq!(b.health().state, "closed");
        assert_eq!(b.health().consecutive_failures, 2);
        fail(&b, 1);
        let h = b.health();
        assert_eq!((h.state, h.opens), ("open", 1));
        assert_eq!(h.last_cause.as_deref(), Some("refused"));
        assert!(h.down_since_unix.is_some() && h.down_secs.is_some());
        assert!(b.is_down());
    }

    #[test]
    fn while_open_callers_fail_fast_with_the_backend_and_the_cause() {
        let b = Breaker::new("http://h:1", policy(1, 60_000, 60_000));
        fail(&b, 1);
        let t = Instant::now();
        // Given up already: at once.
        let e = b.admit(t, Some(Duration::ZERO)).err().unwrap();
        assert!(t.elapsed() < ms(100));
        assert_eq!(e.backend, "http://h:1");
        assert_eq!(e.cause, "refused");
        let msg = e.to_string();
        assert!(
            msg.contains("http://h:1") && msg.contains("refused"),
            "{msg}"
        );
        // Given 200 ms: waits until the outage is 200 ms old, not more.
        let t = Instant::now();
        let e = b.admit(t, Some(ms(200))).err().unwrap();
        let waited = t.elapsed();
        assert!(waited >= ms(150) && waited < ms(1000), "{waited:?}");
        assert!(e.down_for >= ms(200));
        // The outage is older than that now: the next caller fails at once.
        let t = Instant::now();
        let e = b.admit(t, Some(ms(200))).err().unwrap();
        assert!(t.elapsed() < ms(50) && e.waited < ms(50));
        assert_eq!(b.health().fast_failures, 3);
        assert_eq!(b.health().probes, 0, "no request went out");
    }

    #[test]
    fn one_probe_per_cooldown_its_success_closes_and_wakes_every_waiter() {
        let b = Arc::new(Breaker::new("http://h:1", policy(1, 100, 100)));
        fail(&b, 1);
        let probe_at = Instant::now() + ms(100);
        // 8 waiters with no give-up time: exactly one becomes the probe, at
        // the end of the cool-down; the others wait for its outcome.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let pass = b.admit(Instant::now(), None).unwrap();
                    let probe = pass.is_probe();
                    tx.send(probe).unwrap();
                    if probe {
                        std::thread::sleep(ms(100));
                        pass.up();
                    } else {
                        pass.up();
                    }
                    (probe, Instant::now())
                })
            })
            .collect();
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(first, "the first one through is the probe");
        assert!(
            Instant::now() + ms(5) >= probe_at,
            "not before the cool-down"
        );
        // While the probe is out, nobody else passes.
        assert!(rx.recv_timeout(ms(50)).is_err());
        assert_eq!(b.health().state, "half-open");
        let results: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|(p, _)| *p).count(), 1);
        let h = b.health();
        assert_eq!((h.state, h.probes, h.opens), ("closed", 1, 1));
        assert_eq!(h.down_secs, None);
    }

    #[test]
    fn failed_probes_double_the_cooldown_up_to_the_cap() {
        let b = Breaker::new("http://h:1", policy(1, 40, 100));
        fail(&b, 1);
        let mut gaps = Vec::new();
        let mut last = Instant::now();
        for _ in 0..4 {
            let pass = b.admit(Instant::now(), None).unwrap();
            assert!(pass.is_probe());
            gaps.push(last.elapsed());
            last = Instant::now();
            pass.down(&"still refused");
        }
        // 40, 80, 100 (capped), 100 ms.
        for (gap, want) in gaps.iter().zip([40, 80, 100, 100]) {
            assert!(*gap + ms(5) >= ms(want), "{gaps:?}");
            assert!(*gap < ms(want + 500), "{gaps:?}");
        }
        let h = b.health();
        assert_eq!((h.state, h.probes, h.opens), ("open", 4, 1));
        assert_eq!(h.last_cause.as_deref(), Some("still refused"));
        // Back: the cool-down starts over at the next outage.
        b.admit(Instant::now(), None).unwrap().up();
        fail(&b, 1);
        let t = Instant::now();
        let pass = b.admit(t, None).unwrap();
        assert!(t.elapsed() < ms(90), "{:?}", t.elapsed());
        pass.up();
        assert_eq!(b.health().opens, 2);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_caller_probe_at_once() {
        let b = Breaker::new("http://h:1", policy(1, 30, 60_000));
        fail(&b, 1);
        let pass = b.admit(Instant::now(), None).unwrap();
        assert!(pass.is_probe());
        drop(pass);
        assert_eq!(b.health().state, "open");
        let t = Instant::now();
        let pass = b.admit(t, Some(ms(1000))).unwrap();
        assert!(pass.is_probe() && t.elapsed() < ms(100));
        pass.up();
        assert_eq!(b.health().state, "closed");
    }

    #[test]
    fn a_late_answer_from_before_the_opening_closes_it_and_late_failures_change_nothing() {
        let b = Breaker::new("http://h:1", policy(2, 60_000, 60_000));
        let early = b.admit(Instant::now(), None).unwrap();
        let early2 = b.admit(Instant::now(), None).unwrap();
        fail(&b, 2);
        assert_eq!(b.health().state, "open");
        early2.down(&"late failure");
        assert_eq!(b.health().state, "open");
        assert_eq!(b.health().opens, 1);
        early.up();
        assert_eq!(b.health().state, "closed");
    }

    #[test]
    fn disabled_it_never_opens() {
        let b = Breaker::new(
            "http://h:1",
            BreakerPolicy {
                enabled: false,
                ..policy(1, 60_000, 60_000)
            },
        );
        fail(&b, 10);
        assert_eq!(b.health().state, "closed");
        assert_eq!(b.health().opens, 0);
        assert_eq!(b.health().consecutive_failures, 10);
        assert!(!b.is_down());
        let t = Instant::now();
        assert!(!b.admit(t, Some(Duration::ZERO)).unwrap().is_probe());
    }
}
