//! What one rate-limit decision costs, without the network: `cargo bench -p apipolicy-sidecar
//! --bench decision` (bench/run.sh runs it as the `decision` scenario).
//!
//! - `LocalStore::decide`, the `scope: Pod` store, for each algorithm, over 1,000 hot keys
//!   (already-hashed u64s, as the limiter passes them), on one thread and on two threads that
//!   share the same keys (so they meet on the same shards and the same cache lines).
//! - `RouteLimiter::check`, the whole per-request path of a Pod-scope limit: client address,
//!   key hash, the store, the allowed counter and the five response headers. 1,000 client
//!   addresses play the 1,000 hot keys.
//!
//! The limit is so high that every request is allowed (10,000,000 per second, burst 1,000,000):
//! the state of every key changes on every decision, as it does for real traffic under the limit.
//! `decide` gets a clock that moves 100 ns per decision; `check` reads the real clock (a last
//! row shows what those clock reads alone cost).
//!
//! Plain `std::time::Instant` loops: a warm-up, then `SAMPLES` timed batches; the median batch
//! is reported (min and max too). ns/decision is per thread (what a request waits), the
//! aggregate rate is all threads together. "on CPU" is the share of the measured time the
//! threads actually ran (from /proc/thread-self/stat): on a shared machine other processes take
//! turns on the cores, and the wall-clock ns grow by about 1 / that share.
//! Target: under 200 ns per decision.
//!
//! Environment: `DECISION_BENCH_MS` (time per sample, default 60), `DECISION_BENCH_JSON` (also
//! write the results there as JSON, for bench/report.py).

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::pin,
    sync::{Arc, Barrier},
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use apipolicy_api::{Algorithm, RateLimitConfig};
use apipolicy_sidecar::{
    clientip::TrustedProxies,
    metrics::Metrics,
    ratelimit::{RouteLimiter, algo::Params, local::LocalStore},
};
use http::HeaderMap;

const KEYS: usize = 1_000;
const SAMPLES: usize = 7;
const REQUESTS: u32 = 10_000_000;
const PER_MS: u64 = 1_000;
const BURST: u32 = 1_000_000;
const TARGET_NS: f64 = 200.0;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn algo_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::TokenBucket => "TokenBucket",
        Algorithm::Gcra => "GCRA",
        Algorithm::SlidingWindow => "SlidingWindow",
    }
}

struct Row {
    name: String,
    algorithm: &'static str,
    threads: usize,
    /// Per-thread ns per decision: median, min, max over the samples.
    ns: [f64; 3],
    /// All threads together, decisions per second (from the median sample).
    rate: f64,
    /// The share of the measured wall time the threads were on a CPU (the lowest of the
    /// threads), from /proc/thread-self/stat; below 1 when other processes took the core.
    cpu_share: Option<f64>,
}

/// User + system CPU time of the calling thread, in clock ticks (Linux; `None` elsewhere).
fn thread_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // After the ")" that ends the command name: state is field 0, utime 11, stime 12.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// Runs `op(thread, i)` for `threads` threads; each sample runs `batch` iterations per thread.
/// Returns per-thread ns/op for each sample (the slowest thread of that sample), and the
/// lowest share of its measured time any thread spent on a CPU.
fn measure<F>(threads: usize, batch: u64, op: F) -> (Vec<f64>, Option<f64>)
where
    F: Fn(usize, u64) + Sync,
{
    let barrier = Barrier::new(threads);
    let mut samples = Vec::with_capacity(SAMPLES);
    let mut share = None;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, op) = (&barrier, &op);
                s.spawn(move || {
                    let mut mine = Vec::with_capacity(SAMPLES);
                    // Warm-up: the maps fill, caches and branch predictors settle.
                    barrier.wait();
                    for i in 0..batch {
                        op(t, i);
                    }
                    let mut base = batch;
                    let mut cpu = 0u64;
                    for _ in 0..SAMPLES {
                        barrier.wait();
                        let ticks = thread_cpu_ticks();
                        let start = Instant::now();
                        for i in base..base + batch {
                            op(t, i);
                        }
                        mine.push(start.elapsed());
                        cpu += thread_cpu_ticks().zip(ticks).map_or(0, |(b, a)| b.saturating_sub(a));
                        base += batch;
                    }
                    let wall: Duration = mine.iter().sum();
                    let share =
                        thread_cpu_ticks().map(|_| (cpu as f64 / TICKS_PER_S / wall.as_secs_f64()).min(1.0));
                    (mine, share)
                })
            })
            .collect();
        let per_thread: Vec<(Vec<Duration>, Option<f64>)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        for i in 0..SAMPLES {
            let slowest = per_thread.iter().map(|(v, _)| v[i]).max().unwrap();
            samples.push(slowest.as_nanos() as f64 / batch as f64);
        }
        share = per_thread
            .iter()
            .map(|(_, s)| *s)
            .collect::<Option<Vec<f64>>>()
            .map(|v| v.into_iter().fold(f64::INFINITY, f64::min));
    });
    (samples, share)
}

/// How many iterations fill about `ms` milliseconds, from a short trial.
fn calibrate(ms: u64, op: &dyn Fn(u64)) -> u64 {
    let trial = 20_000u64;
    let start = Instant::now();
    for i in 0..trial {
        op(i);
    }
    let ns = (start.elapsed().as_nanos() as f64 / trial as f64).max(1.0);
    ((ms as f64 * 1e6 / ns) as u64).max(10_000)
}

fn row(
    name: &str,
    algorithm: &'static str,
    threads: usize,
    (mut samples, cpu_share): (Vec<f64>, Option<f64>),
) -> Row {
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    Row {
        name: name.to_owned(),
        algorithm,
        threads,
        ns: [median, samples[0], samples[samples.len() - 1]],
        rate: threads as f64 * 1e9 / median,
        cpu_share,
    }
}

fn bench_decide(algorithm: Algorithm, threads: usize, ms: u64) -> Row {
    let store = LocalStore::new(algorithm, apipolicy_api::defaults::MAX_KEYS as usize);
    // SlidingWindow has no burst; Params ignores `capacity` for it.
    let params = Params::new(REQUESTS, PER_MS, BURST, 1);
    let keys: Vec<u64> = (0..KEYS as u64).map(splitmix64).collect();
    let op = |t: usize, i: u64| {
        // The threads walk the same keys from different starting points.
        let k = keys[(i as usize + t * (KEYS / 2)) % KEYS];
        let now = 1_000_000_000 + i * 100;
        black_box(store.decide(black_box(k), black_box(&params), black_box(now)));
    };
    let batch = calibrate(ms, &|i| op(0, i));
    row("LocalStore::decide", algo_name(algorithm), threads, measure(threads, batch, op))
}

fn config(algorithm: Algorithm) -> RateLimitConfig {
    let burst = if algorithm == Algorithm::SlidingWindow { REQUESTS } else { BURST };
    serde_json::from_value(serde_json::json!({
        "algorithm": algorithm,
        "limit": {"requests": REQUESTS, "perMs": PER_MS, "burst": burst},
        "key": {"clientIp": true, "onMissing": "Anonymous", "rejectStatus": 401},
        "scope": "Pod", "mode": "Enforce", "onStoreFailure": "LocalFallback",
        "overrides": []
    }))
    .expect("a valid RateLimitConfig")
}

/// `check` is async but never waits with `scope: Pod`: one poll finishes it.
fn poll_once<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a Pod-scope check waited"),
    }
}

fn bench_check(algorithm: Algorithm, threads: usize, ms: u64) -> Row {
    let metrics = Metrics::new();
    let limiter =
        Arc::new(RouteLimiter::new("bench", &config(algorithm), 1, &metrics, None, None, Default::default()));
    let trusted = TrustedProxies::default();
    let headers = HeaderMap::new();
    let peers: Vec<SocketAddr> = (0..KEYS as u32)
        .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i)), 40_000))
        .collect();
    let op = |t: usize, i: u64| {
        let peer = peers[(i as usize + t * (KEYS / 2)) % KEYS];
        let applied = poll_once(limiter.check(black_box(&headers), black_box(peer), &trusted, None));
        assert!(matches!(applied, Ok(Some(_))), "every request is under the limit");
        black_box(applied.ok());
    };
    let batch = calibrate(ms, &|i| op(0, i));
    row("RouteLimiter::check", algo_name(algorithm), threads, measure(threads, batch, op))
}

/// For scale: the two clock reads `check` makes per request (`now_ns` and the epoch for
/// `X-RateLimit-Reset`).
fn bench_clocks(ms: u64) -> Row {
    let clock = apipolicy_sidecar::clock::Clock::default();
    let op = |_t: usize, _i: u64| {
        black_box(clock.now_ns());
        black_box(clock.now_ms());
    };
    let batch = calibrate(ms, &|i| op(0, i));
    row("clock reads (context)", "-", 1, measure(1, batch, op))
}

fn main() {
    let ms = std::env::var("DECISION_BENCH_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(60u64);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    for algorithm in [Algorithm::TokenBucket, Algorithm::Gcra, Algorithm::SlidingWindow] {
        for threads in [1, 2] {
            rows.push(bench_decide(algorithm, threads, ms));
        }
    }
    for algorithm in [Algorithm::TokenBucket, Algorithm::Gcra, Algorithm::SlidingWindow] {
        for threads in [1, 2] {
            rows.push(bench_check(algorithm, threads, ms));
        }
    }

    rows.push(bench_clocks(ms));

    println!(
        "rate-limit decision cost: {KEYS} hot keys, {REQUESTS} req/{PER_MS}ms burst {BURST} (all allowed), \
         {SAMPLES} samples of ~{ms} ms each, {cpus} CPUs; ns/decision per thread (median [min..max])"
    );
    println!(
        "{:<22} {:<14} {:>7} {:>28} {:>16} {:>7}",
        "path", "algorithm", "threads", "ns/decision", "decisions/s", "on CPU"
    );
    for r in &rows {
        println!(
            "{:<22} {:<14} {:>7} {:>10.1} [{:>6.1}..{:>6.1}] {:>16.0} {:>7}{}",
            r.name,
            r.algorithm,
            r.threads,
            r.ns[0],
            r.ns[1],
            r.ns[2],
            r.rate,
            r.cpu_share.map_or("?".to_owned(), |s| format!("{:.0}%", s * 100.0)),
            if r.ns[0] < TARGET_NS || r.algorithm == "-" { "" } else { "  (over the 200 ns target)" }
        );
    }

    if let Ok(path) = std::env::var("DECISION_BENCH_JSON") {
        let json = serde_json::json!({
            "keys": KEYS,
            "samples": SAMPLES,
            "sample_ms": ms,
            "cpus": cpus,
            "limit": {"requests": REQUESTS, "per_ms": PER_MS, "burst": BURST},
            "target_ns": TARGET_NS,
            "rows": rows.iter().map(|r| serde_json::json!({
                "path": r.name,
                "algorithm": r.algorithm,
                "threads": r.threads,
                "ns_per_decision": r.ns[0],
                "ns_min": r.ns[1],
                "ns_max": r.ns[2],
                "decisions_per_s": r.rate,
                "cpu_share": r.cpu_share,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap() + "\n")
            .unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
}
