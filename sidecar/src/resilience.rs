//! The state of a route's resilience: its retry budget and its circuit breaker. Pure
//! bookkeeping over the sidecar's [`Clock`], lock-free; the layers that use them
//! ([`crate::layers::retry`], [`crate::layers::breaker`]) decide what a try's outcome is.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use std::time::{Duration, Instant};

use apipolicy_api::{AdaptiveConfig, CircuitBreakerConfig, RetryConfig};
use prometheus::{IntCounter, IntGauge};

use crate::clock::Clock;

/// Buckets of a sliding window.
const BUCKETS: u64 = 10;

/// Two counts over a sliding window of [`BUCKETS`] buckets. Approximate under races (a bucket
/// reset by one thread may lose another's count of the same instant): good enough for a
/// budget or a ratio, and free of locks.
struct Window {
    bucket_ns: u64,
    buckets: [Bucket; BUCKETS as usize],
}

#[derive(Default)]
struct Bucket {
    /// Which bucket of time this one holds now (`now / bucket_ns`), plus one (0: never used).
    epoch: AtomicU64,
    a: AtomicU64,
    b: AtomicU64,
}

impl Window {
    fn new(length_ns: u64) -> Self {
        Self { bucket_ns: (length_ns / BUCKETS).max(1), buckets: Default::default() }
    }

    fn current(&self, now_ns: u64) -> &Bucket {
        let epoch = now_ns / self.bucket_ns + 1;
        let bucket = &self.buckets[(epoch % BUCKETS) as usize];
        let seen = bucket.epoch.load(Ordering::Acquire);
        if seen != epoch
            && bucket.epoch.compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            bucket.a.store(0, Ordering::Relaxed);
            bucket.b.store(0, Ordering::Relaxed);
        }
        bucket
    }

    fn add(&self, now_ns: u64, a: u64, b: u64) {
        let bucket = self.current(now_ns);
        if a > 0 {
            bucket.a.fetch_add(a, Ordering::Relaxed);
        }
        if b > 0 {
            bucket.b.fetch_add(b, Ordering::Relaxed);
        }
    }

    /// Both counts over the window that ends now.
    fn sums(&self, now_ns: u64) -> (u64, u64) {
        let epoch = now_ns / self.bucket_ns + 1;
        let oldest = epoch.saturating_sub(BUCKETS - 1);
        self.buckets
            .iter()
            .filter(|b| (oldest..=epoch).contains(&b.epoch.load(Ordering::Acquire)))
            .fold((0, 0), |(a, b), x| (a + x.a.load(Ordering::Relaxed), b + x.b.load(Ordering::Relaxed)))
    }

    fn clear(&self) {
        for b in &self.buckets {
            b.epoch.store(0, Ordering::Release);
        }
    }
}

/// A route's retry policy and budget (as Linkerd's): over the last `ttl`, retries may number
/// at most `ratio` × the requests sent, plus `minPerSecond` × `ttl` seconds.
pub struct RetryBudget {
    pub config: RetryConfig,
    /// Requests (a) and retries (b).
    window: Window,
    reserve: u64,
    clock: Clock,
    pub retried_success: IntCounter,
    pub retried_failure: IntCounter,
    pub exhausted: IntCounter,
}

impl RetryBudget {
    pub fn new(config: RetryConfig, clock: Clock, metrics: (IntCounter, IntCounter, IntCounter)) -> Self {
        let reserve = u64::from(config.budget_min_per_second) * config.budget_ttl_ms / 1000;
        Self {
            window: Window::new(config.budget_ttl_ms * 1_000_000),
            reserve,
            config,
            clock,
            retried_success: metrics.0,
            retried_failure: metrics.1,
            exhausted: metrics.2,
        }
    }

    /// Counts a request (its first try), which began `at`.
    pub fn deposit(&self, at: Instant) {
        self.window.add(self.clock.ns_at(at), 1, 0);
    }

    /// Takes one retry from the budget; `false` (counted) when it is spent.
    pub fn withdraw(&self) -> bool {
        let now = self.clock.now_ns();
        let (requests, retries) = self.window.sums(now);
        let allowed = requests * u64::from(self.config.budget_permille) + self.reserve * 1000;
        if (retries + 1) * 1000 > allowed {
            self.exhausted.inc();
            return false;
        }
        self.window.add(now, 0, 1);
        true
    }
}

const CLOSED: u8 = 0;
const HALF_OPEN: u8 = 1;
const OPEN: u8 = 2;

/// What the breaker let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// A try while the circuit is closed.
    Normal,
    /// One of the half-open circuit's probes.
    Probe,
}

/// A route's circuit breaker: closed, open (fail fast) or half-open (a few probes).
pub struct Breaker {
    config: CircuitBreakerConfig,
    clock: Clock,
    state: AtomicU8,
    opened_ns: AtomicU64,
    consecutive: AtomicU32,
    /// Successes (a) and failures (b) over `window`.
    window: Window,
    probes: AtomicU32,
    probes_ok: AtomicU32,
    /// 0 closed, 1 half-open, 2 open.
    gauge: IntGauge,
}

impl Breaker {
    pub fn new(config: CircuitBreakerConfig, clock: Clock, gauge: IntGauge) -> Self {
        gauge.set(i64::from(CLOSED));
        Self {
            window: Window::new(config.window_ms * 1_000_000),
            config,
            clock,
            state: AtomicU8::new(CLOSED),
            opened_ns: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            probes: AtomicU32::new(0),
            probes_ok: AtomicU32::new(0),
            gauge,
        }
    }

    /// Lets a try through, or says in how many seconds the circuit may let one through.
    pub fn admit(&self) -> Result<Admitted, u64> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Ok(Admitted::Normal),
            OPEN => {
                let opened = self.opened_ns.load(Ordering::Acquire);
                let reopens = opened + self.config.open_for_ms * 1_000_000;
                let now = self.clock.now_ns();
                if now < reopens {
                    return Err((reopens - now).div_ceil(1_000_000_000));
                }
                if self.state.compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    self.probes.store(0, Ordering::Release);
                    self.probes_ok.store(0, Ordering::Release);
                    self.gauge.set(i64::from(HALF_OPEN));
                }
                self.admit()
            }
            _ => {
                if self.probes.fetch_add(1, Ordering::AcqRel) < self.config.half_open_requests {
                    Ok(Admitted::Probe)
                } else {
                    self.probes.fetch_sub(1, Ordering::AcqRel);
                    Err(1)
                }
            }
        }
    }

    /// Records how an admitted try went: `Some(true)` failed, `Some(false)` succeeded, `None`
    /// tells nothing of the app (the client's body broke, the try was cancelled).
    pub fn record(&self, admitted: Admitted, failed: Option<bool>) {
        let now = self.clock.now_ns();
        match (admitted, failed) {
            (Admitted::Probe, None) => {
                self.probes.fetch_sub(1, Ordering::AcqRel);
            }
            (_, None) => {}
            (Admitted::Probe, Some(true)) => self.open(now),
            (Admitted::Probe, Some(false)) => {
                let ok = self.probes_ok.fetch_add(1, Ordering::AcqRel) + 1;
                if ok >= self.config.half_open_requests
                    && self
                        .state
                        .compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    self.consecutive.store(0, Ordering::Release);
                    self.window.clear();
                    self.gauge.set(i64::from(CLOSED));
                    tracing::info!("circuit closed: the app answered the probes");
                }
            }
            (Admitted::Normal, Some(false)) => {
                self.consecutive.store(0, Ordering::Release);
                self.window.add(now, 1, 0);
            }
            (Admitted::Normal, Some(true)) => {
                let run = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
                self.window.add(now, 0, 1);
                let by_ratio = self.config.failure_permille.is_some_and(|permille| {
                    let (ok, failed) = self.window.sums(now);
                    let total = ok + failed;
                    total >= u64::from(self.config.min_requests)
                        && failed * 1000 >= total * u64::from(permille)
                });
                if (run >= self.config.consecutive_failures || by_ratio)
                    && self.state.load(Ordering::Acquire) == CLOSED
                {
                    self.open(now);
                }
            }
        }
    }

    fn open(&self, now: u64) {
        self.opened_ns.store(now, Ordering::Release);
        if self.state.swap(OPEN, Ordering::AcqRel) != OPEN {
            self.gauge.set(i64::from(OPEN));
            tracing::warn!(open_for_ms = self.config.open_for_ms, "circuit opened: the app keeps failing");
        }
    }

    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.config
    }

    /// Whether the circuit is closed (for reports and tests).
    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) == CLOSED
    }
}

/// An adaptive concurrency limit (a gradient limiter). Each `sampleWindow`, the slowest time
/// to response headers of the window's requests is compared with the app's ideal (the lowest
/// window average seen, which the limit's low start measures). While even the slowest stays
/// within `latencyTolerance` × ideal the limit grows (by its square root while the slowest is
/// within half the tolerance, by one past that while one more would stay within it); beyond it, the
/// limit is scaled by tolerance × ideal / slowest, by at least a tenth and at most a half.
/// Judging by the slowest request rather than the average is what keeps the tail of admitted
/// requests, not just their middle, within the tolerance. The ideal drifts a tenth of the way
/// towards the window's average every 50 windows, so an app that became slower for good is
/// learnt again.
pub struct Gradient {
    config: AdaptiveConfig,
    clock: Clock,
    limit: AtomicU32,
    window_start: AtomicU64,
    sum_ns: AtomicU64,
    samples: AtomicU64,
    slowest_ns: AtomicU64,
    ideal_ns: AtomicU64,
    windows: AtomicU64,
    gauge: IntGauge,
}

impl Gradient {
    pub fn new(config: AdaptiveConfig, clock: Clock, gauge: IntGauge) -> Self {
        gauge.set(i64::from(config.min_limit));
        Self {
            limit: AtomicU32::new(config.min_limit),
            window_start: AtomicU64::new(clock.now_ns()),
            config,
            clock,
            sum_ns: AtomicU64::new(0),
            samples: AtomicU64::new(0),
            slowest_ns: AtomicU64::new(0),
            ideal_ns: AtomicU64::new(0),
            windows: AtomicU64::new(0),
            gauge,
        }
    }

    pub fn config(&self) -> &AdaptiveConfig {
        &self.config
    }

    /// Requests that may be in flight now.
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// The app's ideal latency as learnt so far (zero before the first window).
    pub fn ideal(&self) -> Duration {
        Duration::from_nanos(self.ideal_ns.load(Ordering::Relaxed))
    }

    /// Adds one admitted request's latency; the first sample after a window ends moves the limit.
    pub fn sample(&self, latency: Duration) {
        let ns = latency.as_nanos() as u64;
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.samples.fetch_add(1, Ordering::Relaxed);
        self.slowest_ns.fetch_max(ns, Ordering::Relaxed);
        let now = self.clock.now_ns();
        let start = self.window_start.load(Ordering::Acquire);
        if now < start + self.config.sample_window_ms * 1_000_000
            || self.window_start.compare_exchange(start, now, Ordering::AcqRel, Ordering::Acquire).is_err()
        {
            return;
        }
        let (sum, n) = (self.sum_ns.swap(0, Ordering::AcqRel), self.samples.swap(0, Ordering::AcqRel));
        let slowest = self.slowest_ns.swap(0, Ordering::AcqRel);
        if n == 0 {
            return;
        }
        let average = sum / n;
        let mut ideal = match self.ideal_ns.load(Ordering::Relaxed) {
            0 => average,
            known => known.min(average),
        };
        if self.windows.fetch_add(1, Ordering::Relaxed) % 50 == 49 {
            ideal += (average.saturating_sub(ideal)) / 10;
        }
        self.ideal_ns.store(ideal.max(1), Ordering::Relaxed);
        let limit = f64::from(self.limit());
        let tolerance = f64::from(self.config.tolerance_permille) / 1000.0;
        let slowest = slowest.max(1) as f64 / ideal as f64;
        let next = if slowest <= 1.0 + (tolerance - 1.0) / 2.0 {
            limit + limit.sqrt().max(1.0)
        } else if slowest <= tolerance {
            // One more in flight adds about a request's share of the queue: grow only while
            // that still keeps the slowest within the tolerance.
            if slowest * (limit + 1.0) / limit <= tolerance { limit + 1.0 } else { limit }
        } else {
            (limit * (tolerance / slowest).clamp(0.5, 0.9)).floor()
        };
        let next = (next.round() as u32).clamp(self.config.min_limit, self.config.max_limit);
        self.limit.store(next, Ordering::Relaxed);
        self.gauge.set(i64::from(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> IntCounter {
        IntCounter::new("c", "c").unwrap()
    }

    fn retry(permille: u32, min_per_second: u32) -> RetryBudget {
        let config = RetryConfig {
            attempts: 2,
            on: vec![],
            per_try_timeout_ms: None,
            backoff_base_ms: 1,
            backoff_max_ms: 1,
            budget_permille: permille,
            budget_min_per_second: min_per_second,
            budget_ttl_ms: 10_000,
        };
        RetryBudget::new(config, Clock::default(), (counter(), counter(), counter()))
    }

    #[test]
    fn retries_stay_within_the_ratio_and_the_reserve() {
        let b = retry(200, 1);
        for _ in 0..100 {
            b.deposit(Instant::now());
        }
        // 20 % of 100, plus 1/s over 10 s.
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 30);
        assert_eq!(b.exhausted.get(), 70);
    }

    #[test]
    fn the_budget_forgets_after_its_ttl() {
        let b = retry(500, 0);
        for _ in 0..10 {
            b.deposit(Instant::now());
        }
        assert_eq!((0..10).filter(|_| b.withdraw()).count(), 5);
        b.clock.advance(Duration::from_secs(11));
        assert!(!b.withdraw(), "no requests in the window: no retries");
        b.deposit(Instant::now());
        b.deposit(Instant::now());
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }

    fn breaker(consecutive: u32, permille: Option<u32>, probes: u32) -> Breaker {
        let config = CircuitBreakerConfig {
            consecutive_failures: consecutive,
            failure_permille: permille,
            min_requests: 10,
            window_ms: 10_000,
            open_for_ms: 5_000,
            half_open_requests: probes,
        };
        Breaker::new(config, Clock::default(), IntGauge::new("g", "g").unwrap())
    }

    #[test]
    fn consecutive_failures_open_and_probes_close() {
        let b = breaker(3, None, 2);
        for _ in 0..2 {
            b.record(b.admit().unwrap(), Some(true));
        }
        b.record(b.admit().unwrap(), Some(false));
        for _ in 0..2 {
            b.record(b.admit().unwrap(), Some(true));
        }
        assert!(b.is_closed(), "a success broke the run");
        b.record(b.admit().unwrap(), Some(true));
        assert_eq!(b.admit(), Err(5));
        assert_eq!(b.gauge.get(), 2);
        b.clock.advance(Duration::from_millis(5_001));
        let (p1, p2) = (b.admit(), b.admit());
        assert_eq!((p1, p2), (Ok(Admitted::Probe), Ok(Admitted::Probe)));
        assert_eq!(b.admit(), Err(1), "only two probes at once");
        b.record(Admitted::Probe, Some(false));
        assert!(!b.is_closed());
        b.record(Admitted::Probe, Some(false));
        assert!(b.is_closed());
        assert_eq!(b.gauge.get(), 0);
    }

    #[test]
    fn a_failed_probe_opens_again_and_a_silent_one_frees_its_place() {
        let b = breaker(1, None, 1);
        b.record(b.admit().unwrap(), Some(true));
        b.clock.advance(Duration::from_secs(6));
        assert_eq!(b.admit(), Ok(Admitted::Probe));
        b.record(Admitted::Probe, None);
        assert_eq!(b.admit(), Ok(Admitted::Probe), "the cancelled probe gave its place back");
        b.record(Admitted::Probe, Some(true));
        assert_eq!(b.admit(), Err(5), "open again, for a whole openFor");
    }

    fn gradient() -> Gradient {
        let config =
            AdaptiveConfig { min_limit: 2, max_limit: 50, sample_window_ms: 100, tolerance_permille: 1500 };
        Gradient::new(config, Clock::default(), IntGauge::new("l", "l").unwrap())
    }

    /// One window of samples of `ms` each, ended by the next window's first sample.
    fn window(g: &Gradient, ms: u64) {
        for _ in 0..10 {
            g.sample(Duration::from_millis(ms));
        }
        g.clock.advance(Duration::from_millis(101));
    }

    #[test]
    fn the_limit_grows_while_fast_and_shrinks_when_slow() {
        let g = gradient();
        window(&g, 20);
        g.sample(Duration::from_millis(20));
        assert_eq!(g.ideal(), Duration::from_millis(20));
        assert_eq!(g.limit(), 3, "2 + √2");
        for _ in 0..10 {
            window(&g, 25);
        }
        assert!(g.limit() > 12, "within 1.5 × ideal it keeps growing: {}", g.limit());
        // Its first sample closes the last fast window.
        window(&g, 60);
        let high = g.limit();
        g.sample(Duration::from_millis(60));
        assert_eq!(g.limit(), (f64::from(high) * 0.5).floor() as u32, "1.5 × 20 / 60 = 0.5");
        for _ in 0..20 {
            window(&g, 200);
        }
        assert_eq!(g.limit(), 2, "never below minLimit");
        assert_eq!(g.ideal(), Duration::from_millis(20), "the ideal is the lowest average seen");
        for _ in 0..40 {
            window(&g, 1);
        }
        assert_eq!(g.limit(), 50, "never above maxLimit");
    }

    #[test]
    fn the_failure_ratio_opens_after_min_requests() {
        let b = breaker(100, Some(500), 1);
        for i in 0..9 {
            b.record(b.admit().unwrap(), Some(i % 2 == 0));
        }
        assert!(b.is_closed(), "fewer than minRequests");
        b.record(b.admit().unwrap(), Some(true));
        assert!(!b.is_closed(), "6 of 10 failed");
    }
}
