//! The three algorithms, as pure functions of (state, parameters, now). Times are nanoseconds
//! on one clock (the sidecar's monotonic clock, or Redis's for `scope: Global`, whose Lua
//! scripts implement the same arithmetic).
//!
//! Semantics, for `requests` per `per` with `burst`:
//! - `TokenBucket`: a bucket of `capacity = max(burst, 1)` tokens, refilled continuously at
//!   `requests / per`; a request takes one token or is refused. Tokens are kept as
//!   nanoseconds of credit (one token = `interval = per / requests`), so refill is exact.
//! - `GCRA`: the same decisions as the token bucket, kept as one "theoretical arrival time";
//!   a request is allowed while it is no more than `(capacity - 1) × interval` early.
//! - `SlidingWindow`: at most `requests` in any window of length `per`, estimated as
//!   `previous window's count × the share of it still inside the sliding window + the current
//!   window's count` (the Cloudflare estimate); `burst` does not apply.

/// The parameters of one limit, derived once per config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// The most requests allowed at once (token bucket and GCRA).
    pub capacity: u64,
    /// `per / requests`: the time one token takes to come back.
    pub interval_ns: u64,
    /// The limit of a sliding window.
    pub requests: u64,
    /// `per`.
    pub window_ns: u64,
}

impl Params {
    /// `requests` per `per_ms` with `burst`, divided among `share` replicas (1 for a pod alone):
    /// each gets `1/share` of the rate and of the burst (at least one request).
    pub fn new(requests: u32, per_ms: u64, burst: u32, share: u32) -> Self {
        let share = u64::from(share.max(1));
        let requests = u64::from(requests.max(1));
        let window_ns = per_ms.max(1) * 1_000_000;
        Self {
            capacity: u64::from(burst).div_ceil(share).max(1),
            interval_ns: (window_ns as u128 * share as u128 / requests as u128).max(1) as u64,
            requests: requests.div_ceil(share).max(1),
            window_ns,
        }
    }

    fn capacity_ns(&self) -> u64 {
        self.capacity.saturating_mul(self.interval_ns)
    }
}

/// The outcome of one request against one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests that could still be made right now.
    pub remaining: u64,
    /// When refused: how long until one request would be allowed.
    pub retry_after_ns: u64,
    /// How long until the key is back to its full allowance.
    pub reset_ns: u64,
}

/// Per-key state. A key whose state is [`State::idle`] behaves exactly like a key never seen,
/// so idle keys can be forgotten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Tokens as nanoseconds of credit, and when they were counted.
    Bucket { credit_ns: u64, at_ns: u64 },
    /// Theoretical arrival time.
    Gcra { tat_ns: u64 },
    /// Window index (now / window) and the counts of it and the one before.
    Window { index: u64, current: u64, previous: u64 },
}

impl State {
    pub fn idle(&self, p: &Params, now: u64) -> bool {
        match *self {
            Self::Bucket { credit_ns, at_ns } => {
                credit_ns.saturating_add(now.saturating_sub(at_ns)) >= p.capacity_ns()
            }
            Self::Gcra { tat_ns } => tat_ns <= now,
            Self::Window { index, .. } => index + 1 < now / p.window_ns,
        }
    }
}

pub fn token_bucket(state: Option<State>, p: &Params, now: u64) -> (State, Decision) {
    let cap = p.capacity_ns();
    let credit = match state {
        Some(State::Bucket { credit_ns, at_ns }) => {
            credit_ns.saturating_add(now.saturating_sub(at_ns)).min(cap)
        }
        _ => cap,
    };
    if credit >= p.interval_ns {
        let left = credit - p.interval_ns;
        let d = Decision {
            allowed: true,
            remaining: left / p.interval_ns,
            retry_after_ns: 0,
            reset_ns: cap - left,
        };
        (State::Bucket { credit_ns: left, at_ns: now }, d)
    } else {
        let d = Decision {
            allowed: false,
            remaining: 0,
            retry_after_ns: p.interval_ns - credit,
            reset_ns: cap - credit,
        };
        (State::Bucket { credit_ns: credit, at_ns: now }, d)
    }
}

pub fn gcra(state: Option<State>, p: &Params, now: u64) -> (State, Decision) {
    let tat = match state {
        Some(State::Gcra { tat_ns }) => tat_ns.max(now),
        _ => now,
    };
    let tolerance = p.capacity_ns() - p.interval_ns;
    let debt = tat - now;
    if debt <= tolerance {
        let new_tat = tat + p.interval_ns;
        let debt = new_tat - now;
        let d = Decision {
            allowed: true,
            remaining: (p.capacity_ns() - debt) / p.interval_ns,
            retry_after_ns: 0,
            reset_ns: debt,
        };
        (State::Gcra { tat_ns: new_tat }, d)
    } else {
        let d = Decision { allowed: false, remaining: 0, retry_after_ns: debt - tolerance, reset_ns: debt };
        (State::Gcra { tat_ns: tat }, d)
    }
}

pub fn sliding_window(state: Option<State>, p: &Params, now: u64) -> (State, Decision) {
    let w = p.window_ns;
    let index = now / w;
    let (current, previous) = match state {
        Some(State::Window { index: i, current, previous }) if i == index => (current, previous),
        Some(State::Window { index: i, current, .. }) if i + 1 == index => (0, current),
        _ => (0, 0),
    };
    let into = now - index * w;
    let n = p.requests;
    // previous × (w - into) / w, in integers; the estimate counts this request too.
    let weighted =
        |prev: u64, elapsed: u64| (prev as u128 * (w - elapsed) as u128).div_ceil(w as u128) as u64;
    let estimate = weighted(previous, into) + current;
    if estimate < n {
        let used = estimate + 1;
        let d = Decision {
            allowed: true,
            remaining: n - used,
            retry_after_ns: 0,
            reset_ns: reset(current + 1, previous, into, w),
        };
        (State::Window { index, current: current + 1, previous }, d)
    } else {
        let d = Decision {
            allowed: false,
            remaining: 0,
            retry_after_ns: retry(current, previous, into, w, n),
            reset_ns: reset(current, previous, into, w),
        };
        (State::Window { index, current, previous }, d)
    }
}

/// Until the estimate has room for one more request.
fn retry(current: u64, previous: u64, into: u64, w: u64, n: u64) -> u64 {
    if current < n && previous > 0 {
        // previous × (w - x) / w + current ≤ n - 1  ⇔  x ≥ w × (1 - (n - 1 - current) / previous)
        let room = (n - 1 - current) as u128;
        let x =
            (w as u128 * (previous as u128 - room.min(previous as u128))).div_ceil(previous as u128) as u64;
        x.saturating_sub(into).max(1)
    } else {
        // This window alone is full: wait for the next one, where it becomes "previous".
        let to_next = w - into;
        let x = (w as u128 * (current as u128 - (n - 1).min(current) as u128))
            .div_ceil(current.max(1) as u128) as u64;
        to_next + x
    }
}

/// Until both windows have slid out.
fn reset(current: u64, previous: u64, into: u64, w: u64) -> u64 {
    if current > 0 {
        2 * w - into
    } else if previous > 0 {
        w - into
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000 * MS;

    fn run(
        f: fn(Option<State>, &Params, u64) -> (State, Decision),
        p: &Params,
        times: &[u64],
    ) -> Vec<Decision> {
        let mut state = None;
        times
            .iter()
            .map(|t| {
                let (s, d) = f(state, p, *t);
                state = Some(s);
                d
            })
            .collect()
    }

    fn allowed(ds: &[Decision]) -> Vec<bool> {
        ds.iter().map(|d| d.allowed).collect()
    }

    #[test]
    fn params_divide_rate_and_burst_among_replicas() {
        let p = Params::new(100, 60_000, 20, 1);
        assert_eq!((p.capacity, p.interval_ns, p.requests, p.window_ns), (20, 600 * MS, 100, 60 * S));
        let p = Params::new(100, 60_000, 20, 3);
        assert_eq!((p.capacity, p.interval_ns, p.requests), (7, 1_800 * MS, 34));
        let p = Params::new(1, 10_000, 0, 1);
        assert_eq!(p.capacity, 1, "burst 0 spaces requests evenly");
    }

    /// The guide's login limit: 5 at once, then one per 10 s.
    #[test]
    fn token_bucket_burst_then_refill() {
        let p = Params::new(1, 10_000, 5, 1);
        let t0 = 1_000 * S;
        let ds = run(token_bucket, &p, &[t0, t0, t0, t0, t0, t0, t0 + 9_999 * MS, t0 + 10 * S, t0 + 10 * S]);
        assert_eq!(allowed(&ds), [true, true, true, true, true, false, false, true, false]);
        assert_eq!(ds.iter().map(|d| d.remaining).collect::<Vec<_>>(), [4, 3, 2, 1, 0, 0, 0, 0, 0]);
        assert_eq!(ds[5].retry_after_ns, 10 * S, "the 6th waits a whole interval");
        assert_eq!(ds[6].retry_after_ns, MS);
        assert_eq!(ds[4].reset_ns, 50 * S, "five tokens to refill");
    }

    #[test]
    fn gcra_decides_like_the_token_bucket() {
        let p = Params::new(100, 60_000, 20, 1);
        let mut times = Vec::new();
        let mut t = 5_000 * S;
        for i in 0..500u64 {
            // bursts, pauses and steady traffic, deterministically mixed
            t += match i % 7 {
                0 => 0,
                1 | 2 => 100 * MS,
                3 => 1_500 * MS,
                _ => 300 * MS,
            };
            times.push(t);
        }
        let a = run(token_bucket, &p, &times);
        let b = run(gcra, &p, &times);
        assert_eq!(allowed(&a), allowed(&b));
        assert_eq!(
            a.iter().map(|d| d.remaining).collect::<Vec<_>>(),
            b.iter().map(|d| d.remaining).collect::<Vec<_>>()
        );
        assert_eq!(
            a.iter().map(|d| d.retry_after_ns).collect::<Vec<_>>(),
            b.iter().map(|d| d.retry_after_ns).collect::<Vec<_>>()
        );
        assert!(allowed(&a).contains(&false) && allowed(&a).contains(&true));
    }

    #[test]
    fn gcra_burst_edges() {
        let p = Params::new(10, 1_000, 3, 1); // 3 at once, then one per 100 ms
        let t0 = 7 * S;
        let ds = run(gcra, &p, &[t0, t0, t0, t0, t0 + 99 * MS, t0 + 100 * MS, t0 + 100 * MS]);
        assert_eq!(allowed(&ds), [true, true, true, false, false, true, false]);
        assert_eq!(ds[3].retry_after_ns, 100 * MS);
        assert_eq!(ds[4].retry_after_ns, MS);
        assert_eq!(ds[5].reset_ns, 300 * MS);
    }

    #[test]
    fn sliding_window_edges() {
        let p = Params::new(10, 1_000, 0, 1);
        let w0 = 50 * S; // a window boundary
        // 10 in the first half of a window: all allowed, the 11th refused.
        let mut times: Vec<u64> = (0..11).map(|i| w0 + i * 10 * MS).collect();
        // At 1.5 windows the previous window weighs half: 5 slots of 10 are taken, so 5 more
        // are allowed and the 6th is refused.
        times.extend((0..6).map(|_| w0 + 1_500 * MS));
        let ds = run(sliding_window, &p, &times);
        let a = allowed(&ds);
        assert_eq!(&a[..11], [true; 10].iter().copied().chain([false]).collect::<Vec<_>>().as_slice());
        assert_eq!(&a[11..], [true, true, true, true, true, false]);
        assert_eq!(ds[9].remaining, 0);
        // Refused at 0.1 s into the first window with 10 counted: the next window starts in
        // 0.9 s, where the previous 10 weigh 100% and fall to 9 (room for one) after 0.1 s.
        assert_eq!(ds[10].retry_after_ns, 900 * MS + 100 * MS);
        // Refused at 1.5 windows with 5 current and 10 previous: room for one more when
        // 10 × (1 - x) + 5 ≤ 9, at x = 0.6: 0.1 s from now.
        assert_eq!(ds[16].retry_after_ns, 100 * MS);
        // Two windows later everything is forgotten.
        let (_, d) =
            sliding_window(Some(State::Window { index: 51, current: 10, previous: 10 }), &p, w0 + 3 * S);
        assert_eq!((d.allowed, d.remaining), (true, 9));
    }

    #[test]
    fn idle_states_are_like_new_ones() {
        let p = Params::new(1, 10_000, 5, 1);
        let t0 = 100 * S;
        let (s, _) = token_bucket(None, &p, t0);
        assert!(!s.idle(&p, t0 + 9 * S));
        assert!(s.idle(&p, t0 + 10 * S));
        let (s, _) = gcra(None, &p, t0);
        assert!(!s.idle(&p, t0 + 9 * S) && s.idle(&p, t0 + 10 * S));
        let (s, _) = sliding_window(None, &Params::new(10, 1_000, 0, 1), t0);
        assert!(
            !s.idle(&Params::new(10, 1_000, 0, 1), t0 + S)
                && s.idle(&Params::new(10, 1_000, 0, 1), t0 + 2 * S)
        );
    }
}
