//! `scope: Global`: one count per key for every pod, kept in Redis (or a Redis Cluster).
//!
//! Each algorithm is one Lua script, loaded once and run with EVALSHA (the `redis` crate
//! reloads it on NOSCRIPT), so a decision is one atomic round trip. Time comes from the Redis
//! server (`TIME`), the one clock all pods share. Keys carry a hash tag, so a Redis Cluster
//! keeps each key's state on one slot, and an expiry, so idle keys disappear on their own.
//! Calls go through the shared client ([`crate::redis_client`]: timeout, circuit breaker);
//! when it gives no decision, `onStoreFailure` decides.

use std::sync::LazyLock;

use apipolicy_api::Algorithm;
use redis::Script;

use super::algo::{Decision, Params};
use crate::redis_client::{Redis, StoreError};

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

static TOKEN_BUCKET_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{NOW}{TOKEN_BUCKET}")));
static GCRA_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{NOW}{GCRA}")));
static SLIDING_WINDOW_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{NOW}{SLIDING_WINDOW}")));

/// One decision for `key`, made by Redis. Never waits longer than the client's timeout; every
/// decision Redis does not make is counted, the circuit breaker's included.
pub async fn decide(
    redis: &Redis,
    algorithm: Algorithm,
    key: &str,
    p: &Params,
) -> Result<Decision, StoreError> {
    let (script, a, b) = match algorithm {
        Algorithm::TokenBucket => {
            (&*TOKEN_BUCKET_SCRIPT, p.capacity * p.interval_ns / 1000, p.interval_ns / 1000)
        }
        Algorithm::Gcra => (&*GCRA_SCRIPT, p.capacity * p.interval_ns / 1000, p.interval_ns / 1000),
        Algorithm::SlidingWindow => (&*SLIDING_WINDOW_SCRIPT, p.window_ns / 1000, p.requests),
    };
    let mut invocation = script.key(key);
    invocation.arg(a.max(1)).arg(b.max(1));
    let (allowed, remaining, retry_us, reset_us) = redis.invoke::<(u64, u64, u64, u64)>(&invocation).await?;
    Ok(Decision {
        allowed: allowed == 1,
        remaining,
        retry_after_ns: retry_us * 1000,
        reset_ns: reset_us * 1000,
    })
}
