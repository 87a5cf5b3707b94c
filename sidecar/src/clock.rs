//! The sidecar's clock: rate limits read its monotonic nanoseconds, the cache and the SLO
//! windows its wall time. One per sidecar, so that a test moves time forward
//! ([`Clock::advance`]) instead of sleeping through a refill or an expiry.

use std::{
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

static START: LazyLock<Instant> = LazyLock::new(Instant::now);

#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// How far this clock is ahead of the machine's (only tests move it).
    ahead_ns: Arc<AtomicU64>,
}

impl Clock {
    fn ahead(&self) -> u64 {
        self.ahead_ns.load(Ordering::Relaxed)
    }

    /// Nanoseconds on a monotonic clock.
    pub fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// The monotonic clock's nanoseconds at `at` (a time read already: no clock read).
    pub fn ns_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(*START).as_nanos() as u64 + self.ahead()
    }

    /// The wall time.
    pub fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_nanos(self.ahead())
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    /// Moves this clock forward: for tests.
    pub fn advance(&self, by: Duration) {
        self.ahead_ns.fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_every_reading() {
        let clock = Clock::default();
        let (ns, wall) = (clock.now_ns(), clock.now());
        clock.advance(Duration::from_secs(60));
        assert!(clock.now_ns() >= ns + 60_000_000_000);
        assert!(clock.now() >= wall + Duration::from_secs(60));
        assert!(Clock::default().now() < clock.now(), "each sidecar has its own");
    }
}
