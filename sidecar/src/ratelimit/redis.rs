//! `scope: Global`: one count per key for every pod, kept in Redis (or a Redis Cluster).
//!
//! Each algorithm is one Lua script, loaded once and run with EVALSHA (the `redis` crate
//! reloads it on NOSCRIPT), so a decision is one atomic round trip. Time comes from the Redis
//! server (`TIME`), the one clock all pods share. Keys carry a hash tag, so a Redis Cluster
//! keeps each key's state on one slot, and an expiry, so idle keys disappear on their own.
//! A call never holds a request longer than the configured timeout; after repeated failures
//! a circuit breaker stops calling for a second, and `onStoreFailure` decides meanwhile.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use apipolicy_api::Algorithm;
use arc_swap::ArcSwapOption;
use prometheus::Histogram;

use crate::metrics::StoreErrors;
use redis::{
    AsyncCommands as _, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

use super::algo::{Decision, Params};

/// Shared by the three scripts: `now` in microseconds from the server's clock.
const NOW: &str = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n";

/// KEYS[1]: hash {c = credit µs, a = at µs}. ARGV: capacity µs, interval µs.
const TOKEN_BUCKET: &str = r"
local cap = tonumber(ARGV[1]) local interval = tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'c', 'a')
local credit = cap
if s[1] then credit = math.min(cap, tonumber(s[1]) + math.max(0, now - tonumber(s[2]))) end
local allowed = 0 local retry = 0
if credit >= interval then credit = credit - interval allowed = 1 else retry = interval - credit end
redis.call('HSET', KEYS[1], 'c', credit, 'a', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((cap - credit) / 1000) + 1000)
return {allowed, math.floor(credit / interval), retry, cap - credit}
";

/// KEYS[1]: the theoretical arrival time in µs. ARGV: capacity µs, interval µs.
const GCRA: &str = r"
local cap = tonumber(ARGV[1]) local interval = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local tolerance = cap - interval
local debt = tat - now
if debt <= tolerance then
  tat = tat + interval
  redis.call('SET', KEYS[1], tat, 'PX', math.ceil((tat - now) / 1000) + 1000)
  return {1, math.floor((cap - (tat - now)) / interval), 0, tat - now}
end
return {0, 0, debt - tolerance, debt}
";

/// KEYS[1]: hash {i = window index, c = its count, p = the previous window's}. ARGV: window
/// µs, limit. The same arithmetic as `algo::sliding_window`.
const SLIDING_WINDOW: &str = r"
local w = tonumber(ARGV[1]) local n = tonumber(ARGV[2])
local idx = math.floor(now / w)
local s = redis.call('HMGET', KEYS[1], 'i', 'c', 'p')
local cur = 0 local prev = 0
if s[1] then
  local i = tonumber(s[1])
  if i == idx then cur = tonumber(s[2]) prev = tonumber(s[3]) elseif i == idx - 1 then prev = tonumber(s[2]) end
end
local into = now - idx * w
local est = math.ceil(prev * (w - into) / w) + cur
local function reset(c, p) if c > 0 then return 2 * w - into elseif p > 0 then return w - into else return 0 end end
if est < n then
  cur = cur + 1
  redis.call('HSET', KEYS[1], 'i', idx, 'c', cur, 'p', prev)
  redis.call('PEXPIRE', KEYS[1], math.ceil(2 * w / 1000) + 1000)
  return {1, n - est - 1, 0, reset(cur, prev)}
end
local retry
if cur < n and prev > 0 then
  local x = math.ceil(w * (prev - math.min(n - 1 - cur, prev)) / prev)
  retry = math.max(x - into, 1)
else
  retry = (w - into) + math.ceil(w * (cur - math.min(n - 1, cur)) / math.max(cur, 1))
end
return {0, 0, retry, reset(cur, prev)}
";

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Why Redis gave no decision.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis is not connected yet")]
    NotConnected,
    #[error("the circuit breaker is open after repeated Redis failures")]
    CircuitOpen,
}

/// Consecutive failures that open the breaker, and how long it stays open.
const BREAKER_FAILURES: u32 = 5;
const BREAKER_OPEN: Duration = Duration::from_secs(1);

pub struct RedisStore {
    /// The URLs this store was made for (to keep it across reloads that do not change them).
    pub urls: Vec<String>,
    pub cluster: bool,
    conn: Arc<ArcSwapOption<Conn>>,
    pub timeout: Duration,
    token_bucket: Script,
    gcra: Script,
    sliding_window: Script,
    failures: AtomicU32,
    open_until_ms: AtomicU64,
    epoch: Instant,
    errors: StoreErrors,
    latency: Histogram,
}

impl RedisStore {
    /// Starts connecting in the background; decisions fail over to `onStoreFailure` until the
    /// connection is up.
    pub fn new(
        urls: Vec<String>,
        cluster: bool,
        timeout: Duration,
        errors: StoreErrors,
        latency: Histogram,
    ) -> Result<Self, redis::RedisError> {
        let conn = Arc::new(ArcSwapOption::empty());
        if cluster {
            let client = ClusterClient::builder(urls.clone())
                .connection_timeout(timeout.max(Duration::from_millis(250)))
                .response_timeout(timeout)
                .retries(1)
                .build()?;
            let slot = conn.clone();
            tokio::spawn(async move {
                loop {
                    match client.get_async_connection().await {
                        Ok(c) => {
                            slot.store(Some(Arc::new(Conn::Cluster(c))));
                            tracing::info!("connected to the Redis Cluster");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot connect to the Redis Cluster yet; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            });
        } else {
            let client = redis::Client::open(urls[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            let manager = ConnectionManager::new_lazy_with_config(client, config)?;
            conn.store(Some(Arc::new(Conn::Single(manager))));
        }
        Ok(Self {
            urls,
            cluster,
            conn,
            timeout,
            token_bucket: Script::new(&format!("{NOW}{TOKEN_BUCKET}")),
            gcra: Script::new(&format!("{NOW}{GCRA}")),
            sliding_window: Script::new(&format!("{NOW}{SLIDING_WINDOW}")),
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            errors,
            latency,
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Counts a decision or call made without Redis, by why.
    fn count(&self, e: &StoreError) {
        match e {
            StoreError::Timeout(_) => &self.errors.timeout,
            StoreError::CircuitOpen => &self.errors.circuit_open,
            StoreError::Redis(_) | StoreError::NotConnected => &self.errors.error,
        }
        .inc();
    }

    /// One decision for `key`. Never waits longer than the timeout. Every decision Redis does
    /// not make is counted, the circuit breaker's included.
    pub async fn decide(&self, algorithm: Algorithm, key: &str, p: &Params) -> Result<Decision, StoreError> {
        if self.now_ms() < self.open_until_ms.load(Ordering::Relaxed) {
            self.count(&StoreError::CircuitOpen);
            return Err(StoreError::CircuitOpen);
        }
        let result = self.call(algorithm, key, p).await;
        match &result {
            Ok(_) => self.failures.store(0, Ordering::Relaxed),
            Err(e) => {
                self.count(e);
                if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= BREAKER_FAILURES {
                    self.failures.store(0, Ordering::Relaxed);
                    self.open_until_ms
                        .store(self.now_ms() + BREAKER_OPEN.as_millis() as u64, Ordering::Relaxed);
                    tracing::warn!(error = %e, "Redis keeps failing: not calling it for {BREAKER_OPEN:?}");
                }
            }
        }
        result
    }

    async fn call(&self, algorithm: Algorithm, key: &str, p: &Params) -> Result<Decision, StoreError> {
        let conn = self.conn.load_full().ok_or(StoreError::NotConnected)?;
        let (script, a, b) = match algorithm {
            Algorithm::TokenBucket => {
                (&self.token_bucket, p.capacity * p.interval_ns / 1000, p.interval_ns / 1000)
            }
            Algorithm::Gcra => (&self.gcra, p.capacity * p.interval_ns / 1000, p.interval_ns / 1000),
            Algorithm::SlidingWindow => (&self.sliding_window, p.window_ns / 1000, p.requests),
        };
        let mut invocation = script.key(key);
        invocation.arg(a.max(1)).arg(b.max(1));
        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, async {
            match (*conn).clone() {
                Conn::Single(mut c) => invocation.invoke_async::<(u64, u64, u64, u64)>(&mut c).await,
                Conn::Cluster(mut c) => invocation.invoke_async::<(u64, u64, u64, u64)>(&mut c).await,
            }
        })
        .await;
        self.latency.observe(started.elapsed().as_secs_f64());
        let (allowed, remaining, retry_us, reset_us) =
            answer.map_err(|_| StoreError::Timeout(self.timeout))??;
        Ok(Decision {
            allowed: allowed == 1,
            remaining,
            retry_after_ns: retry_us * 1000,
            reset_ns: reset_us * 1000,
        })
    }

    /// Runs one command under the timeout and the circuit breaker (shared with the limits: a
    /// Redis that fails one fails both).
    pub async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        if self.now_ms() < self.open_until_ms.load(Ordering::Relaxed) {
            self.count(&StoreError::CircuitOpen);
            return Err(StoreError::CircuitOpen);
        }
        let Some(conn) = self.conn.load_full() else {
            self.count(&StoreError::NotConnected);
            return Err(StoreError::NotConnected);
        };
        let result = tokio::time::timeout(self.timeout, async {
            match (*conn).clone() {
                Conn::Single(mut c) => cmd.query_async::<T>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<T>(&mut c).await,
            }
        })
        .await;
        match result {
            Ok(Ok(v)) => {
                self.failures.store(0, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => Err(self.fail(StoreError::Redis(e))),
            Err(_) => Err(self.fail(StoreError::Timeout(self.timeout))),
        }
    }

    fn fail(&self, e: StoreError) -> StoreError {
        self.count(&e);
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= BREAKER_FAILURES {
            self.failures.store(0, Ordering::Relaxed);
            self.open_until_ms.store(self.now_ms() + BREAKER_OPEN.as_millis() as u64, Ordering::Relaxed);
        }
        e
    }

    /// Reaches Redis now: for readiness reporting and tests.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let conn = self.conn.load_full().ok_or(StoreError::NotConnected)?;
        let result: Result<Result<(), redis::RedisError>, _> = tokio::time::timeout(self.timeout, async {
            match (*conn).clone() {
                Conn::Single(mut c) => c.ping::<()>().await,
                Conn::Cluster(mut c) => c.ping::<()>().await,
            }
        })
        .await;
        result.map_err(|_| StoreError::Timeout(self.timeout))?.map_err(StoreError::from)
    }
}
