//! The policy as it runs ([`PolicyRuntime`], its routes [`RouteRuntime`]): everything a request
//! needs, built once per config revision and swapped atomically on reload (requests in flight
//! keep the snapshot they started with); and [`ProcessState`], what outlives every revision.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use apipolicy_api::{CacheConfig, CompressionConfig, SidecarConfig};
use prometheus::{IntCounter, IntGauge};

use crate::{
    accounting::{Accounting, Ledger},
    cache::{Store, shared::SharedTier},
    clientip::TrustedProxies,
    clock::Clock,
    error::ProxyError,
    headers::HeaderRules,
    health::Health,
    metrics::{CacheLookups, Metrics, RouteMetrics},
    priority::{Class, Priorities, Protection},
    ratelimit::RouteLimiter,
    redis_client::Redis,
    resilience::{Breaker, Gradient, RetryBudget},
    routes::{Router, RouterError},
    slo::{Slos, Tracker},
    upstream::{Upstream, UpstreamPool},
};

/// One revision of the policy, compiled and running: its router and routes, the upstream pool,
/// the stores and SLOs it uses. [`crate::proxy::Proxy`] holds the active one.
pub struct PolicyRuntime {
    pub config: SidecarConfig,
    pub router: Router,
    pub routes: Vec<RouteRuntime>,
    pub upstream: Upstream,
    pub client: Arc<UpstreamPool>,
    pub in_flight: IntGauge,
    pub access_log: bool,
    pub trusted: TrustedProxies,
    /// The replica count `scope: Replicas` limits divide by.
    pub replicas: u32,
    /// The store of `scope: Global` limits, when a route has one.
    pub redis: Option<Arc<Redis>>,
    pub health: Arc<Health>,
    /// The response cache, shared by every config.
    pub store: Arc<Store>,
    /// Its tier in Redis, when the policy has Redis.
    pub shared_cache: Option<Arc<SharedTier>>,
    /// The SLOs, in config order, and for each route the ones that count it.
    pub slos: Vec<Arc<Tracker>>,
    pub route_slos: Vec<Vec<usize>>,
    /// Unique to this build of a config (never 0): what is remembered about a config, such as
    /// whether a cache entry is compressible on a route, is remembered with it.
    pub generation: u64,
    /// The sidecar's clock (limits, cache freshness).
    pub clock: Clock,
    /// `spec.priorities`.
    pub priorities: Priorities,
    /// Per route: whether an SLO that counts it has `protect`.
    protectable: Vec<bool>,
}

static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// What the sidecar process keeps across config reloads: the flags that override the policy,
/// the metrics, the SLO histories, the cache store and the clock.
pub struct ProcessState {
    /// `--upstream`, over the policy's port.
    pub upstream: Option<Upstream>,
    /// `--redis`, over `spec.redis.url` (the way a Secret's URL arrives).
    pub redis: Option<String>,
    pub metrics: Metrics,
    pub access_log: bool,
    pub slos: Arc<Slos>,
    pub store: Arc<Store>,
    pub clock: Clock,
}

/// The Redis store for this config: the previous one when its address did not change.
fn redis_store(
    config: &SidecarConfig,
    process: &ProcessState,
    previous: Option<&PolicyRuntime>,
) -> Option<Arc<Redis>> {
    let global = config
        .spec
        .routes
        .iter()
        .filter_map(|r| r.rate_limit.as_ref())
        .any(|l| l.scope == apipolicy_api::Scope::Global);
    let shared_cache = config.spec.routes.iter().any(|r| r.cache.as_ref().is_some_and(|c| c.store));
    let configured = config.spec.redis.is_some() || process.redis.is_some();
    if !(global || (shared_cache && configured)) {
        return None;
    }
    let spec = config.spec.redis.as_ref();
    let urls: Vec<String> = match &process.redis {
        Some(flag) => flag.split(',').map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect(),
        None => spec.map(|r| r.urls.clone()).unwrap_or_default(),
    };
    if urls.is_empty() {
        tracing::warn!(
            "spec.redis names a Secret: pass --redis (APIPOLICY_REDIS) with its URL; until then Global limits apply onStoreFailure and the cache stays in memory"
        );
        return None;
    }
    let cluster = spec.is_some_and(|r| r.cluster) || urls.len() > 1;
    let timeout =
        Duration::from_millis(spec.map_or(apipolicy_api::defaults::REDIS_TIMEOUT_MS, |r| r.timeout_ms));
    if let Some(prev) = previous.and_then(|p| p.redis.as_ref())
        && prev.urls == urls
        && prev.cluster == cluster
        && prev.timeout == timeout
    {
        return Some(prev.clone());
    }
    let (errors, latency) = process.metrics.redis();
    match Redis::new(urls, cluster, timeout, errors, latency) {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            tracing::warn!(error = %e, "the Redis address is invalid; onStoreFailure applies");
            None
        }
    }
}

/// The state a route had before a reload (`prior`), when its settings are still `config`: an
/// open circuit stays open, a limit keeps the latency it learnt; otherwise a new one.
fn carried<T, C: PartialEq>(
    prior: Option<&Arc<T>>,
    config: &C,
    config_of: impl Fn(&T) -> &C,
    new: impl FnOnce() -> T,
) -> Arc<T> {
    match prior.filter(|p| config_of(p) == config) {
        Some(p) => p.clone(),
        None => Arc::new(new()),
    }
}

pub struct RouteRuntime {
    /// Its place in [`PolicyRuntime::routes`].
    pub index: usize,
    pub name: String,
    pub timeout: Duration,
    pub max_body: Option<u64>,
    /// How long a body may stall between two chunks (`streamIdleTimeout`).
    pub stream_idle_timeout: Duration,
    pub metrics: RouteMetrics,
    pub limiter: Option<RouteLimiter>,
    pub concurrency: Option<Concurrency>,
    pub cache: Option<CacheConfig>,
    pub compression: Option<CompressionConfig>,
    pub cache_lookups: CacheLookups,
    /// Bytes into and out of compression of cached bodies.
    pub compression_bytes: (IntCounter, IntCounter),
    /// `requestHeaders`.
    pub request_headers: Option<HeaderRules>,
    /// `retry`, with its budget.
    pub retry: Option<RetryBudget>,
    /// `circuitBreaker`.
    pub breaker: Option<Arc<Breaker>>,
    /// Shed counters by priority class, when an SLO may shed the route's requests.
    pub shed: Option<[IntCounter; 3]>,
}

/// A route's cap on requests in flight. The count carries over a reload that keeps the route,
/// so a reload cannot let twice the cap through.
pub struct Concurrency {
    max: u32,
    /// An adaptive limit's state (`max` is then its ceiling).
    pub adaptive: Option<Arc<Gradient>>,
    count: Arc<AtomicU32>,
    gauge: IntGauge,
    /// By priority class.
    shed: [IntCounter; 3],
}

impl Concurrency {
    /// Takes a slot for a request of `class`, or refuses at once: nothing queues.
    pub fn admit(&self, class: Class) -> Result<(), ProxyError> {
        let max = self.adaptive.as_ref().map_or(self.max, |g| g.limit());
        if self.count.fetch_add(1, Ordering::AcqRel) >= max {
            self.count.fetch_sub(1, Ordering::AcqRel);
            self.shed[class.index()].inc();
            return Err(ProxyError::Overloaded { max_in_flight: max });
        }
        self.gauge.inc();
        Ok(())
    }

    pub fn release(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

impl PolicyRuntime {
    /// What the SLOs covering route `route` ask of its requests now.
    pub fn protection(&self, route: usize) -> Protection {
        if !self.protectable.get(route).copied().unwrap_or(false) {
            return Protection::default();
        }
        self.route_slos[route]
            .iter()
            .filter_map(|&i| self.slos.get(i))
            .filter(|t| t.protecting())
            .filter_map(|t| {
                t.config.load().protect.as_ref().map(|p| Protection {
                    serve_stale: p.serve_stale,
                    shed: p.shed_by_priority,
                    tighten_permille: p.tighten_permille,
                })
            })
            .fold(Protection::default(), Protection::and)
    }

    /// The priority class of a request on route `route`.
    pub fn class(&self, route: usize, headers: &impl crate::headers::RequestHeaders) -> Class {
        if self.priorities.is_empty() { Class::Default } else { self.priorities.classify(route, headers) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Router(#[from] RouterError),
}

impl PolicyRuntime {
    /// Builds the runtime form of `config`. The upstream client (and its pool of keep-alive
    /// connections) is taken over from `previous` when its settings did not change.
    pub fn build(
        config: SidecarConfig,
        process: &ProcessState,
        previous: Option<&PolicyRuntime>,
        replicas: u32,
    ) -> Result<Self, BuildError> {
        let metrics = &process.metrics;
        let access_log = process.access_log;
        let upstream_override = process.upstream.as_ref();
        let router = Router::new(&config.spec)?;
        let redis = redis_store(&config, process, previous);
        let scope =
            format!("{}/{}", config.policy.namespace.as_deref().unwrap_or("default"), config.policy.name);
        let before = |name: &str| previous.and_then(|p| p.routes.iter().find(|r| r.name == name));
        let routes = config
            .spec
            .routes
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let prior = before(&r.name);
                RouteRuntime {
                    index,
                    name: r.name.clone(),
                    timeout: Duration::from_millis(r.timeout_ms),
                    max_body: r.max_request_body,
                    stream_idle_timeout: Duration::from_millis(r.stream_idle_timeout_ms),
                    metrics: metrics.route(&r.name),
                    cache: r.cache.clone(),
                    compression: r.compression.clone(),
                    cache_lookups: metrics.cache_lookups(&r.name),
                    compression_bytes: metrics.compression_bytes(&r.name),
                    request_headers: r.request_headers.as_ref().and_then(|rules| {
                        HeaderRules::new(rules)
                            .inspect_err(
                                |e| tracing::warn!(route = %r.name, error = %e, "requestHeaders left out"),
                            )
                            .ok()
                    }),
                    limiter: r.rate_limit.as_ref().map(|rl| {
                        let global =
                            (rl.scope == apipolicy_api::Scope::Global).then(|| redis.clone()).flatten();
                        RouteLimiter::new(
                            &r.name,
                            rl,
                            replicas,
                            metrics,
                            prior.and_then(|p| p.limiter.as_ref()),
                            global.map(|store| (store, format!("{scope}/{}", r.name))),
                            process.clock.clone(),
                        )
                    }),
                    shed: config
                        .spec
                        .slos
                        .iter()
                        .any(|s| {
                            s.routes.contains(&r.name)
                                && s.protect.as_ref().is_some_and(|p| p.shed_by_priority)
                        })
                        .then(|| metrics.shedding(&r.name).0),
                    retry: r.retry.as_ref().map(|c| {
                        RetryBudget::new(c.clone(), process.clock.clone(), metrics.retries(&r.name))
                    }),
                    // A breaker carries over a reload that keeps its settings: an open circuit
                    // stays open.
                    breaker: r.circuit_breaker.as_ref().map(|c| {
                        carried(prior.and_then(|p| p.breaker.as_ref()), c, Breaker::config, || {
                            Breaker::new(c.clone(), process.clock.clone(), metrics.circuit_state(&r.name))
                        })
                    }),
                    concurrency: r
                        .max_in_flight
                        .or(r.adaptive_concurrency.as_ref().map(|a| a.max_limit))
                        .map(|max| {
                            let (shed, gauge) = metrics.shedding(&r.name);
                            let prior = prior.and_then(|p| p.concurrency.as_ref());
                            let count =
                                prior.map_or_else(|| Arc::new(AtomicU32::new(0)), |c| c.count.clone());
                            // A limit that learnt the app's latency keeps it over a reload with the
                            // same settings.
                            let adaptive = r.adaptive_concurrency.as_ref().map(|a| {
                                carried(prior.and_then(|c| c.adaptive.as_ref()), a, Gradient::config, || {
                                    Gradient::new(
                                        a.clone(),
                                        process.clock.clone(),
                                        metrics.concurrency_limit(&r.name),
                                    )
                                })
                            });
                            Concurrency { max, adaptive, count, gauge, shed }
                        }),
                }
            })
            .collect();
        let upstream =
            upstream_override.cloned().unwrap_or_else(|| Upstream::loopback(config.spec.upstream.port));
        let client = match previous {
            Some(p)
                if p.config.spec.upstream.connect_timeout_ms == config.spec.upstream.connect_timeout_ms
                    && p.config.spec.upstream.idle_timeout_ms == config.spec.upstream.idle_timeout_ms
                    && p.upstream == upstream =>
            {
                p.client.clone()
            }
            _ => UpstreamPool::new(
                upstream.address(),
                Duration::from_millis(config.spec.upstream.connect_timeout_ms),
                Duration::from_millis(config.spec.upstream.idle_timeout_ms),
            ),
        };
        let config_trusted = config.spec.trusted_proxies.clone();
        let health = match previous {
            Some(p) if p.health.config == config.spec.health_checks && p.health.upstream == upstream => {
                p.health.clone()
            }
            _ => Arc::new(Health::start(&config.spec.health_checks, &upstream, metrics)),
        };
        let slos = process.slos.apply(&config);
        let shared_cache = redis
            .as_ref()
            .filter(|_| config.spec.routes.iter().any(|r| r.cache.is_some()))
            .map(|r| match previous.and_then(|p| p.shared_cache.clone()).filter(|s| s.same(r, &scope)) {
                Some(s) => s,
                None => SharedTier::new(r.clone(), scope.clone(), process.store.clone()),
            });
        let route_slos: Vec<Vec<usize>> = config
            .spec
            .routes
            .iter()
            .map(|r| {
                config
                    .spec
                    .slos
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.routes.contains(&r.name))
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        let protectable = route_slos
            .iter()
            .map(|slos| slos.iter().any(|&i| config.spec.slos[i].protect.is_some()))
            .collect();
        let priorities = Priorities::new(&config.spec.priorities, |name| {
            config.spec.routes.iter().position(|r| r.name == name)
        });
        Ok(Self {
            clock: process.clock.clone(),
            config,
            router,
            routes,
            upstream,
            client,
            in_flight: metrics.in_flight.clone(),
            access_log,
            trusted: TrustedProxies::new(&config_trusted),
            replicas: replicas.max(1),
            redis,
            health,
            store: process.store.clone(),
            shared_cache,
            slos,
            route_slos,
            generation: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            priorities,
            protectable,
        })
    }
}

impl Ledger for PolicyRuntime {
    fn logs_access(&self) -> bool {
        self.access_log
    }

    fn record(&self, entry: &Accounting, elapsed: Duration, bytes: u64) {
        let route = &self.routes[entry.route()];
        route.metrics.request_duration.observe(elapsed.as_secs_f64());
        let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
        for i in &self.route_slos[entry.route()] {
            self.slos[*i].record(entry.status, elapsed_ms, entry.policy_answer);
        }
        route.metrics.count(&entry.method, entry.status);
        self.in_flight.dec();
        if self.access_log {
            tracing::info!(
                target: "access",
                request_id = entry.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or_default(),
                route = route.metrics.name.as_str(),
                method = entry.method.as_str(),
                path = entry.path.as_ref().map_or("/", |p| p.as_str()),
                status = entry.status,
                duration_ms = elapsed_ms,
                upstream_ms = entry.upstream_ms,
                bytes,
            );
        }
    }

    fn abandon(&self, entry: &Accounting, elapsed: Duration) {
        let route = &self.routes[entry.route()];
        route.metrics.request_duration.observe(elapsed.as_secs_f64());
        route.metrics.count(&entry.method, 499);
        self.in_flight.dec();
    }

    fn release_slot(&self, route: usize) {
        if let Some(c) = &self.routes[route].concurrency {
            c.release();
        }
    }
}
