//! Rate limits: who a request counts against, whether it may pass, and the headers that tell
//! the client (IETF `RateLimit-Policy`/`RateLimit` and the common `X-RateLimit-*`).

pub mod algo;
pub mod applied;
pub mod local;
pub mod redis;

use std::{
    collections::HashMap,
    hash::BuildHasher,
    net::SocketAddr,
    sync::{Arc, LazyLock},
};

use apipolicy_api::{LimitMode, MissingKey, RateLimitConfig, Scope, StoreFailure};
use http::{HeaderName, HeaderValue};
use prometheus::IntCounter;

use crate::{
    clientip::{Client, TrustedProxies},
    clock::Clock,
    error::ProxyError,
    headers::{RequestHeaders, text},
    metrics::Metrics,
    redis_client::Redis,
    values::{self, Text},
};
use algo::{Decision, Params};
pub use applied::{Applied, HEADER_NAMES};
use local::LocalStore;

static SEED: LazyLock<foldhash::fast::RandomState> = LazyLock::new(foldhash::fast::RandomState::default);
/// Global keys are hashed alike in every pod; a collision would only make two clients share a
/// count, never cost Redis more.
static GLOBAL_KEYS: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x6170_6970_6f6c_6963);

/// One route's limiter, rebuilt on reload; its store is kept when the limit did not change.
pub struct RouteLimiter {
    route: String,
    pub config: RateLimitConfig,
    /// The parameters for everyone, then one per override.
    params: Vec<Params>,
    /// Override value → index into `params`.
    overrides: HashMap<String, usize>,
    /// One store per entry of `params`, so each key's idleness is judged by its own limit.
    stores: Vec<Arc<LocalStore>>,
    /// The key's header, when the key has one (the config is validated: a bad name has none).
    key_header: Option<HeaderName>,
    /// `RateLimit-Policy` and `X-RateLimit-Limit`, per entry of `params`.
    policy_headers: Vec<(HeaderValue, HeaderValue)>,
    /// `scope: Global`: the Redis store and this route's key prefix.
    global: Option<(Arc<Redis>, String)>,
    allowed: IntCounter,
    limited: IntCounter,
    shadow_limited: IntCounter,
    clock: Clock,
}

impl RouteLimiter {
    /// `replicas` divides the limit for `scope: Replicas`; `previous` is this route's limiter in
    /// the config before, whose counts carry over when the limit is the same.
    pub fn new(
        route: &str,
        config: &RateLimitConfig,
        replicas: u32,
        metrics: &Metrics,
        previous: Option<&RouteLimiter>,
        global: Option<(Arc<Redis>, String)>,
        clock: Clock,
    ) -> Self {
        let share = if config.scope == Scope::Replicas { replicas } else { 1 };
        let mut params =
            vec![Params::new(config.limit.requests, config.limit.per_ms, config.limit.burst, share)];
        let mut limits = vec![config.limit];
        let mut overrides = HashMap::new();
        for o in &config.overrides {
            params.push(Params::new(o.limit.requests, o.limit.per_ms, o.limit.burst, share));
            limits.push(o.limit);
            for v in &o.values {
                overrides.insert(v.clone(), params.len() - 1);
            }
        }
        let sliding = config.algorithm == apipolicy_api::Algorithm::SlidingWindow;
        let policy_headers = params
            .iter()
            .zip(&limits)
            .map(|(p, l)| {
                // One quota for both header families, the one this pod enforces: a sliding window
                // allows `requests` per `per`; a bucket holds `capacity` (the burst) and refills
                // whole in capacity × interval. So r ≤ q = X-RateLimit-Limit, and t ≤ w.
                let (limit, window_ns) = if sliding {
                    (p.requests, l.per_ms.saturating_mul(1_000_000))
                } else {
                    (p.capacity, p.capacity.saturating_mul(p.interval_ns))
                };
                let window_s = window_ns.div_ceil(1_000_000_000).max(1);
                let policy = format!("\"{route}\";q={limit};w={window_s}");
                (
                    HeaderValue::from_str(&policy).unwrap_or(HeaderValue::from_static("\"default\"")),
                    HeaderValue::from(limit),
                )
            })
            .collect();
        let stores = match previous {
            Some(prev) if prev.config == *config && prev.params == params => prev.stores.clone(),
            _ => params
                .iter()
                .map(|_| Arc::new(LocalStore::new(config.algorithm, config.max_keys as usize)))
                .collect(),
        };
        let decisions = metrics.ratelimit_decisions(route);
        Self {
            route: route.to_owned(),
            config: config.clone(),
            key_header: config.key.header.as_deref().and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            params,
            overrides,
            stores,
            policy_headers,
            global,
            allowed: decisions.0,
            limited: decisions.1,
            shadow_limited: decisions.2,
            clock,
        }
    }

    /// Decides one request. `Ok(None)`: the limit does not show (shadow mode).
    /// `tighten`: SLO protection's share of the rate (thousandths) the limit keeps for now.
    pub async fn check(
        &self,
        headers: &impl RequestHeaders,
        peer: SocketAddr,
        trusted: &TrustedProxies,
        tighten: Option<u32>,
    ) -> Result<Option<Applied>, ProxyError> {
        let Some((store, scope)) = &self.global else {
            return self.decide_here(headers, peer, trusted, tighten);
        };
        let (which, material) = self.key(headers, peer, trusted)?;
        // Every pod must name a key alike: a fixed hash, not this process's random one.
        let key = format!("apipolicy:{{{scope}/{which}/{:016x}}}", GLOBAL_KEYS.hash_one(material));
        // Boxed: the Redis call's future is large, and a local limit's request should not carry
        // (and copy) its room.
        let params = tightened(&self.params[which], tighten);
        match Box::pin(redis::decide(store, self.config.algorithm, &key, &params)).await {
            Ok(decision) => self.finish(decision, which),
            Err(e) => {
                tracing::debug!(error = %e, "rate-limit store failure");
                match self.config.on_store_failure {
                    StoreFailure::FailOpen => {
                        self.allowed.inc();
                        Ok(None)
                    }
                    StoreFailure::FailClosed => Err(ProxyError::LimitStoreUnavailable(e.to_string())),
                    StoreFailure::LocalFallback => self.decide_here(headers, peer, trusted, tighten),
                }
            }
        }
    }

    /// Decides one request at once when the limit is kept in this pod (`scope: Pod` or
    /// `Replicas`), as [`RouteLimiter::check`] does; `None` for a `Global` limit (it asks Redis).
    pub fn check_local(
        &self,
        headers: &impl RequestHeaders,
        peer: SocketAddr,
        trusted: &TrustedProxies,
    ) -> Option<Result<Option<Applied>, ProxyError>> {
        self.global.is_none().then(|| self.decide_here(headers, peer, trusted, None))
    }

    /// The decision of this pod's own store: a local limit's, or a `Global` one's fallback.
    fn decide_here(
        &self,
        headers: &impl RequestHeaders,
        peer: SocketAddr,
        trusted: &TrustedProxies,
        tighten: Option<u32>,
    ) -> Result<Option<Applied>, ProxyError> {
        let (which, material) = self.key(headers, peer, trusted)?;
        let params = tightened(&self.params[which], tighten);
        let decision = self.stores[which].decide(SEED.hash_one(material), &params, self.clock.now_ns());
        self.finish(decision, which)
    }

    /// Which limit applies (0, or an override's) and the key material to hash; a missing key
    /// header refused when the policy says so.
    #[allow(clippy::type_complexity)]
    fn key<'h>(
        &self,
        headers: &'h impl RequestHeaders,
        peer: SocketAddr,
        trusted: &TrustedProxies,
    ) -> Result<(usize, (Option<Client<'h>>, Option<&'h [u8]>)), ProxyError> {
        let key = &self.config.key;
        // A key header sent twice has no one value: which one a limit counted would be the
        // client's choice (one value per pod, another per proxy in front), so it is refused.
        if let Some(name) = &self.key_header
            && headers.all(name).nth(1).is_some()
        {
            return Err(ProxyError::AmbiguousKey { header: name.to_string() });
        }
        let header =
            key.header.as_ref().map(|_| self.key_header.as_ref().and_then(|name| headers.first(name)));
        if let Some(None) = header
            && self.config.key.on_missing == MissingKey::Reject
        {
            return Err(ProxyError::MissingKey {
                header: key.header.clone().unwrap_or_default(),
                status: key.reject_status,
            });
        }
        let client = key.client_ip.then(|| trusted.client(peer, headers));
        let header = header.flatten();
        // An override matches the header value, else the client address.
        let which = header
            .and_then(text)
            .and_then(|v| self.overrides.get(v))
            .or_else(|| match client {
                Some(Client::Ip(ip)) if !self.overrides.is_empty() => self.overrides.get(&ip.to_string()),
                Some(Client::Raw(raw)) => self.overrides.get(raw),
                _ => None,
            })
            .copied()
            .unwrap_or(0);
        Ok((which, (client, header)))
    }

    fn finish(&self, d: Decision, which: usize) -> Result<Option<Applied>, ProxyError> {
        let shadow = self.config.mode == LimitMode::Shadow;
        if d.allowed {
            self.allowed.inc();
        } else if shadow {
            self.shadow_limited.inc();
        } else {
            self.limited.inc();
        }
        if shadow {
            return Ok(None);
        }
        let (policy, limit) = &self.policy_headers[which];
        let reset_s = d.reset_ns.div_ceil(1_000_000_000);
        let epoch = self.clock.now_ms() / 1000;
        let mut ratelimit = Text::default();
        ratelimit.push(b"\"").push(self.route.as_bytes()).push(b"\";r=").push_u64(d.remaining);
        ratelimit.push(b";t=").push_u64(reset_s);
        let (mut remaining, mut reset) = (Text::default(), Text::default());
        remaining.push_u64(d.remaining);
        reset.push_u64(epoch + reset_s);
        let [ratelimit, remaining, reset] = ratelimit
            .fits()
            .then(|| values::cut_all([ratelimit.as_bytes(), remaining.as_bytes(), reset.as_bytes()]))
            .flatten()
            .unwrap_or_else(|| {
                // A route name too long for the stack (or not a valid value).
                let text = format!("\"{}\";r={};t={reset_s}", self.route, d.remaining);
                [
                    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("\"default\"")),
                    HeaderValue::from(d.remaining),
                    HeaderValue::from(epoch + reset_s),
                ]
            });
        let applied = Applied::new(policy.clone(), ratelimit, limit.clone(), remaining, reset);
        if d.allowed {
            Ok(Some(applied))
        } else {
            Err(ProxyError::RateLimited {
                retry_after_s: d.retry_after_ns.div_ceil(1_000_000_000).max(1),
                headers: Box::new(applied),
            })
        }
    }

    /// Whether the count is kept in Redis (`scope: Global`).
    pub fn is_global(&self) -> bool {
        self.global.is_some()
    }

    /// Forgets idle keys.
    pub fn sweep(&self) {
        let now = self.clock.now_ns();
        for (store, params) in self.stores.iter().zip(&self.params) {
            store.sweep(params, now);
        }
    }
}

/// A limit's parameters at `permille` of its rate (SLO protection's `TightenLimits`): the
/// bucket and the window hold that share, and a token takes that much longer to come back.
/// Keys keep their state; they simply refill more slowly while the protection lasts.
fn tightened(params: &Params, permille: Option<u32>) -> Params {
    let Some(permille) = permille else { return *params };
    let share = |n: u64| (n * u64::from(permille) / 1000).max(1);
    Params {
        capacity: share(params.capacity),
        interval_ns: params.interval_ns.saturating_mul(1000) / u64::from(permille.max(1)),
        requests: share(params.requests),
        window_ns: params.window_ns,
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;

    /// A sweep judges each key by its own limit: the busy key of an override with a shorter
    /// memory than the base limit (and the other way round) must not be forgotten.
    #[tokio::test]
    async fn a_sweep_forgets_only_idle_keys() {
        let config: RateLimitConfig = serde_json::from_value(serde_json::json!({
            "algorithm": "TokenBucket",
            "limit": {"requests": 1, "perMs": 60_000, "burst": 2},
            "key": {"clientIp": false, "header": "x-api-key", "onMissing": "Anonymous", "rejectStatus": 401},
            "scope": "Pod", "mode": "Enforce", "onStoreFailure": "LocalFallback",
            "overrides": [{"values": ["gold"], "limit": {"requests": 4, "perMs": 60_000, "burst": 4}}]
        }))
        .unwrap();
        let limiter = RouteLimiter::new("r", &config, 1, &Metrics::new(), None, None, Clock::default());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let trusted = TrustedProxies::default();
        let mut plain = HeaderMap::new();
        plain.insert("x-api-key", HeaderValue::from_static("plain"));
        let mut gold = HeaderMap::new();
        gold.insert("x-api-key", HeaderValue::from_static("gold"));
        assert!(limiter.check(&plain, peer, &trusted, None).await.is_ok());
        for _ in 0..3 {
            assert!(limiter.check(&gold, peer, &trusted, None).await.is_ok());
        }
        limiter.sweep();
        assert!(limiter.check(&plain, peer, &trusted, None).await.is_ok());
        assert!(limiter.check(&plain, peer, &trusted, None).await.is_err(), "the plain key kept its count");
        assert!(limiter.check(&gold, peer, &trusted, None).await.is_ok());
        assert!(limiter.check(&gold, peer, &trusted, None).await.is_err(), "the gold key kept its count");
    }

    /// `rateLimit.maxKeys` bounds what a limit keeps, however many keys clients invent.
    #[tokio::test]
    async fn the_keys_kept_stay_within_max_keys() {
        let config: RateLimitConfig = serde_json::from_value(serde_json::json!({
            "algorithm": "TokenBucket",
            "limit": {"requests": 10, "perMs": 60_000, "burst": 10},
            "key": {"clientIp": false, "header": "x-api-key", "onMissing": "Anonymous", "rejectStatus": 401},
            "scope": "Pod", "mode": "Enforce", "onStoreFailure": "LocalFallback",
            "overrides": [], "maxKeys": 2_000
        }))
        .unwrap();
        let limiter = RouteLimiter::new("r", &config, 1, &Metrics::new(), None, None, Clock::default());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let trusted = TrustedProxies::default();
        for i in 0..50_000 {
            let mut h = HeaderMap::new();
            h.insert("x-api-key", HeaderValue::from(i));
            assert!(limiter.check(&h, peer, &trusted, None).await.is_ok());
        }
        let kept = limiter.stores[0].len();
        assert!((1_000..=2_000).contains(&kept), "{kept} keys kept for maxKeys 2000");
    }

    /// A key header sent twice is refused: which value counts would be the client's choice.
    #[tokio::test]
    async fn a_doubled_key_header_is_refused() {
        let config: RateLimitConfig = serde_json::from_value(serde_json::json!({
            "algorithm": "TokenBucket",
            "limit": {"requests": 10, "perMs": 60_000, "burst": 10},
            "key": {"clientIp": false, "header": "x-api-key", "onMissing": "Anonymous", "rejectStatus": 401},
            "scope": "Pod", "mode": "Enforce", "onStoreFailure": "LocalFallback", "overrides": []
        }))
        .unwrap();
        let limiter = RouteLimiter::new("r", &config, 1, &Metrics::new(), None, None, Clock::default());
        let mut h = HeaderMap::new();
        h.append("x-api-key", HeaderValue::from_static("a"));
        h.append("x-api-key", HeaderValue::from_static("b"));
        let refused =
            limiter.check(&h, "127.0.0.1:1".parse().unwrap(), &TrustedProxies::default(), None).await;
        assert!(matches!(refused, Err(ProxyError::AmbiguousKey { .. })), "{refused:?}");
    }
}
