//! Prometheus metrics. Names and labels are the contract of DESIGN.md; labels stay bounded
//! (route names from the policy, fixed method names, status codes).

use std::sync::OnceLock;

use http::Method;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Seconds; from half a millisecond (a cache hit) to the longest timeouts.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    config_revision: IntGaugeVec,
    pub config_reload_errors: IntCounter,
    pub in_flight: IntGauge,
    pub connections: IntGauge,
    pub connections_refused: IntCounter,
    ratelimit_decisions: IntCounterVec,
    shed: IntCounterVec,
    route_in_flight: IntGaugeVec,
    redis_errors: IntCounterVec,
    redis_latency: Histogram,
    health_up: IntGaugeVec,
    health_duration: HistogramVec,
    slo: SloVecs,
    cache: CacheVecs,
    resilience: ResilienceMetrics,
}

/// The SLO series, by SLO.
#[derive(Clone)]
struct SloVecs {
    requests: IntCounterVec,
    excluded: IntCounterVec,
    budget: GaugeVec,
    burn: GaugeVec,
}

impl SloVecs {
    fn register(registry: &Registry) -> Self {
        let slo_requests = counters(
            "apipolicy_slo_requests_total",
            "Requests an SLO counted, good or bad.",
            &["slo", "result"],
        );
        let slo_excluded = counters(
            "apipolicy_slo_excluded_requests_total",
            "Requests an SLO left out: the sidecar's own 429s, load-shedding 503s and missing-key refusals.",
            &["slo"],
        );
        let slo_budget = float_gauges(
            "apipolicy_slo_error_budget_remaining",
            "Error budget left over the SLO window, in percent (floored at -100), as this pod sees it.",
            &["slo"],
        );
        let slo_burn = float_gauges(
            "apipolicy_slo_burn_rate",
            "Error budget burn rate over a window, as this pod sees it (1 = on budget).",
            &["slo", "window"],
        );
        for c in [
            Box::new(slo_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(slo_excluded.clone()),
            Box::new(slo_budget.clone()),
            Box::new(slo_burn.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self { requests: slo_requests, excluded: slo_excluded, budget: slo_budget, burn: slo_burn }
    }
}

/// The cache's series: lookups and compression by route, and the store's size.
#[derive(Clone)]
struct CacheVecs {
    lookups: IntCounterVec,
    compression_bytes: IntCounterVec,
    bytes: IntGauge,
    entries: IntGauge,
    evictions: IntCounter,
    coalesced: IntCounter,
}

impl CacheVecs {
    fn register(registry: &Registry) -> Self {
        let cache_lookups = counters(
            "apipolicy_cache_lookups_total",
            "Cache lookups by result: hit (fresh), stale (served stale), miss, revalidated (304 from the app), bypass.",
            &["route", "result"],
        );
        let compression_bytes = counters(
            "apipolicy_compression_bytes_total",
            "Bytes into and out of compression of cached bodies.",
            &["route", "direction"],
        );
        let cache_bytes = IntGauge::new("apipolicy_cache_store_bytes", "Bytes the response cache holds.")
            .expect("valid metric");
        let cache_entries = IntGauge::new("apipolicy_cache_store_entries", "URLs the response cache holds.")
            .expect("valid metric");
        let cache_evictions = IntCounter::new(
            "apipolicy_cache_evictions_total",
            "Cached URLs evicted to stay within the cache's size.",
        )
        .expect("valid metric");
        let cache_coalesced = IntCounter::new(
            "apipolicy_cache_coalesced_total",
            "Cache misses that waited for a request in flight for the same URL instead of asking the app.",
        )
        .expect("valid metric");
        for c in [
            Box::new(cache_lookups.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(compression_bytes.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(cache_entries.clone()),
            Box::new(cache_evictions.clone()),
            Box::new(cache_coalesced.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            lookups: cache_lookups,
            compression_bytes,
            bytes: cache_bytes,
            entries: cache_entries,
            evictions: cache_evictions,
            coalesced: cache_coalesced,
        }
    }
}

/// Retries and circuit breakers, by route.
#[derive(Clone)]
struct ResilienceMetrics {
    retries: IntCounterVec,
    budget_exhausted: IntCounterVec,
    circuit_state: IntGaugeVec,
    concurrency_limit: IntGaugeVec,
    protection_active: IntGaugeVec,
}

impl ResilienceMetrics {
    fn register(registry: &Registry) -> Self {
        let retries = counters(
            "apipolicy_retries_total",
            "Requests that were retried, by how they ended: success (a retry got an answer the route does not retry) or failure (the last try failed too, or no time or budget was left).",
            &["route", "result"],
        );
        let budget_exhausted = counters(
            "apipolicy_retry_budget_exhausted_total",
            "Retries not made because the route's retry budget was spent.",
            &["route"],
        );
        let circuit_state = gauges(
            "apipolicy_circuit_state",
            "The route's circuit breaker: 0 closed, 1 half-open (probing), 2 open (failing fast).",
            &["route"],
        );
        let concurrency_limit = gauges(
            "apipolicy_concurrency_limit",
            "The route's adaptive concurrency limit now: requests it lets in flight to the app.",
            &["route"],
        );
        let protection_active = gauges(
            "apipolicy_protection_active",
            "1 while an SLO's protection (slos[].protect) is on, as this pod sees the SLO.",
            &["slo"],
        );
        for c in [
            Box::new(retries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(budget_exhausted.clone()),
            Box::new(circuit_state.clone()),
            Box::new(concurrency_limit.clone()),
            Box::new(protection_active.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self { retries, budget_exhausted, circuit_state, concurrency_limit, protection_active }
    }
}

fn counters(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauges(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn float_gauges(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

/// The cache lookup counters of one route, by result.
pub struct CacheLookups {
    pub hit: IntCounter,
    pub stale: IntCounter,
    pub miss: IntCounter,
    pub revalidated: IntCounter,
    pub bypass: IntCounter,
}

/// The series of one SLO.
pub struct SloMetrics {
    pub good: IntCounter,
    pub bad: IntCounter,
    pub excluded: IntCounter,
    pub budget: Gauge,
    /// In the order of `apipolicy_api::slo::BURN_WINDOWS`.
    pub burn: Vec<Gauge>,
    /// 1 while the SLO's protection is on.
    pub protection: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = counters(
            "apipolicy_requests_total",
            "Requests answered, by route, method and status code.",
            &["route", "method", "code"],
        );
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "apipolicy_request_duration_seconds",
                "Time from the request's arrival to the last byte of the response, as the sidecar sees it.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "apipolicy_upstream_duration_seconds",
                "Time the upstream took to send its response headers.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let config_revision = gauges(
            "apipolicy_config_revision_info",
            "The config revision the sidecar runs (value 1).",
            &["revision"],
        );
        let config_reload_errors = IntCounter::new(
            "apipolicy_config_reload_errors_total",
            "Config files that were refused; the last good config stayed active.",
        )
        .expect("valid metric");
        let in_flight = IntGauge::new("apipolicy_requests_in_flight", "Requests being handled now.")
            .expect("valid metric");
        let connections = IntGauge::new("apipolicy_connections_open", "Client connections open now.")
            .expect("valid metric");
        let connections_refused = IntCounter::new(
            "apipolicy_connections_refused_total",
            "Client connections closed at once because --max-connections were open.",
        )
        .expect("valid metric");
        let ratelimit_decisions = counters(
            "apipolicy_ratelimit_decisions_total",
            "Rate-limit decisions: allowed, limited (429), or shadow_limited (would have been limited; Shadow mode).",
            &["route", "decision"],
        );
        let shed = counters(
            "apipolicy_shed_total",
            "Requests refused with 503 by load shedding: the route's concurrency limit was reached, or SLO protection shed the request's priority class (critical, default, sheddable).",
            &["route", "priority"],
        );
        let route_in_flight = gauges(
            "apipolicy_route_in_flight",
            "Requests of a route with a concurrency limit in flight now.",
            &["route"],
        );
        let redis_errors = counters(
            "apipolicy_ratelimit_store_errors_total",
            "Rate-limit decisions of scope: Global made without Redis (and shared-cache calls that got no answer), by reason: error, timeout, circuit_open.",
            &["reason"],
        );
        for reason in StoreErrors::REASONS {
            redis_errors.with_label_values(&[reason]);
        }
        let redis_latency = Histogram::with_opts(
            HistogramOpts::new(
                "apipolicy_ratelimit_store_duration_seconds",
                "Time of one Redis rate-limit call.",
            )
            .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]),
        )
        .expect("valid metric");
        let health_up = gauges(
            "apipolicy_health_check_up",
            "1 when the health check is up, 0 when it is down or has no result yet.",
            &["check"],
        );
        let health_duration = HistogramVec::new(
            HistogramOpts::new("apipolicy_health_check_duration_seconds", "Time one health check took.")
                .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &["check"],
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(config_revision.clone()),
            Box::new(config_reload_errors.clone()),
            Box::new(in_flight.clone()),
            Box::new(connections.clone()),
            Box::new(connections_refused.clone()),
            Box::new(ratelimit_decisions.clone()),
            Box::new(shed.clone()),
            Box::new(route_in_flight.clone()),
            Box::new(redis_errors.clone()),
            Box::new(redis_latency.clone()),
            Box::new(health_up.clone()),
            Box::new(health_duration.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        let resilience = ResilienceMetrics::register(&registry);
        let slo = SloVecs::register(&registry);
        let cache = CacheVecs::register(&registry);
        Self {
            resilience,
            slo,
            cache,
            registry,
            requests,
            request_duration,
            upstream_duration,
            config_revision,
            config_reload_errors,
            in_flight,
            connections,
            connections_refused,
            ratelimit_decisions,
            shed,
            route_in_flight,
            redis_errors,
            redis_latency,
            health_up,
            health_duration,
        }
    }

    pub fn cache_lookups(&self, route: &str) -> CacheLookups {
        let c = |r| self.cache.lookups.with_label_values(&[route, r]);
        CacheLookups {
            hit: c("hit"),
            stale: c("stale"),
            miss: c("miss"),
            revalidated: c("revalidated"),
            bypass: c("bypass"),
        }
    }

    /// Bytes in and out of compression for a route.
    pub fn compression_bytes(&self, route: &str) -> (IntCounter, IntCounter) {
        (
            self.cache.compression_bytes.with_label_values(&[route, "in"]),
            self.cache.compression_bytes.with_label_values(&[route, "out"]),
        )
    }

    pub fn health_check(&self, check: &str) -> (IntGauge, Histogram) {
        (self.health_up.with_label_values(&[check]), self.health_duration.with_label_values(&[check]))
    }

    pub fn slo(&self, slo: &str) -> SloMetrics {
        SloMetrics {
            good: self.slo.requests.with_label_values(&[slo, "good"]),
            bad: self.slo.requests.with_label_values(&[slo, "bad"]),
            excluded: self.slo.excluded.with_label_values(&[slo]),
            budget: self.slo.budget.with_label_values(&[slo]),
            burn: apipolicy_api::slo::BURN_WINDOWS
                .iter()
                .map(|(w, _)| self.slo.burn.with_label_values(&[slo, w]))
                .collect(),
            protection: self.resilience.protection_active.with_label_values(&[slo]),
        }
    }

    /// Drops the series of an SLO that left the config.
    pub fn forget_slo(&self, slo: &str) {
        for result in ["good", "bad"] {
            let _ = self.slo.requests.remove_label_values(&[slo, result]);
        }
        let _ = self.slo.excluded.remove_label_values(&[slo]);
        let _ = self.slo.budget.remove_label_values(&[slo]);
        for (w, _) in apipolicy_api::slo::BURN_WINDOWS {
            let _ = self.slo.burn.remove_label_values(&[slo, w]);
        }
        let _ = self.resilience.protection_active.remove_label_values(&[slo]);
    }

    /// The Redis error counters and call latency histogram.
    pub fn redis(&self) -> (StoreErrors, Histogram) {
        let c = |reason| self.redis_errors.with_label_values(&[reason]);
        (
            StoreErrors { error: c("error"), timeout: c("timeout"), circuit_open: c("circuit_open") },
            self.redis_latency.clone(),
        )
    }

    /// The allowed, limited and shadow_limited counters of a route.
    pub fn ratelimit_decisions(&self, route: &str) -> (IntCounter, IntCounter, IntCounter) {
        let c = |d| self.ratelimit_decisions.with_label_values(&[route, d]);
        (c("allowed"), c("limited"), c("shadow_limited"))
    }

    /// The retried-success, retried-failure and budget-exhausted counters of a route.
    pub fn retries(&self, route: &str) -> (IntCounter, IntCounter, IntCounter) {
        let r = &self.resilience;
        (
            r.retries.with_label_values(&[route, "success"]),
            r.retries.with_label_values(&[route, "failure"]),
            r.budget_exhausted.with_label_values(&[route]),
        )
    }

    /// The response store's series (its size, evictions, coalesced misses).
    pub fn cache_store(&self) -> (IntGauge, IntGauge, IntCounter, IntCounter) {
        let c = &self.cache;
        (c.bytes.clone(), c.entries.clone(), c.evictions.clone(), c.coalesced.clone())
    }

    /// The adaptive concurrency limit gauge of a route.
    pub fn concurrency_limit(&self, route: &str) -> IntGauge {
        self.resilience.concurrency_limit.with_label_values(&[route])
    }

    /// The circuit-state gauge of a route.
    pub fn circuit_state(&self, route: &str) -> IntGauge {
        self.resilience.circuit_state.with_label_values(&[route])
    }

    /// The shed counters (by priority class: critical, default, sheddable) and the in-flight
    /// gauge of a route.
    pub fn shedding(&self, route: &str) -> ([IntCounter; 3], IntGauge) {
        let shed = crate::priority::Class::ALL.map(|c| self.shed.with_label_values(&[route, c.as_str()]));
        (shed, self.route_in_flight.with_label_values(&[route]))
    }

    /// Handles for one route, resolved once per config so requests do no label lookups.
    pub fn route(&self, name: &str) -> RouteMetrics {
        RouteMetrics {
            name: name.to_owned(),
            request_duration: self.request_duration.with_label_values(&[name]),
            upstream_duration: self.upstream_duration.with_label_values(&[name]),
            codes: CounterCache::default(),
            requests: self.requests.clone(),
        }
    }

    pub fn set_revision(&self, old: Option<&str>, new: &str) {
        if let Some(old) = old
            && old != new
        {
            let _ = self.config_revision.remove_label_values(&[old]);
        }
        self.config_revision.with_label_values(&[new]).set(1);
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub struct RouteMetrics {
    pub name: String,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    codes: CounterCache,
    requests: IntCounterVec,
}

impl RouteMetrics {
    pub fn count(&self, method: &Method, status: u16) {
        let m = method_index(method);
        self.codes.inc(status, m, || {
            let buf = itoa_u16(status);
            let code = std::str::from_utf8(&buf).unwrap_or("0");
            self.requests.with_label_values(&[self.name.as_str(), METHODS[m as usize], code])
        });
    }
}

const METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"];

fn method_index(m: &Method) -> u8 {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::PATCH => 4,
        Method::DELETE => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

fn itoa_u16(n: u16) -> [u8; 3] {
    let n = n.min(999);
    [b'0' + (n / 100) as u8, b'0' + (n / 10 % 10) as u8, b'0' + (n % 10) as u8]
}

/// A lock-free cache of the few (status, method) counters a route really sees, so counting a
/// request is a short scan and an atomic add instead of a locked label lookup. Each slot is
/// claimed once; rare combinations past the last slot fall back to the labelled lookup.
#[derive(Default)]
struct CounterCache {
    slots: [OnceLock<(u16, u8, IntCounter)>; 24],
}

impl CounterCache {
    fn inc(&self, status: u16, method: u8, make: impl Fn() -> IntCounter) {
        for slot in &self.slots {
            let (s, m, c) = match slot.get() {
                Some(entry) => entry,
                None => slot.get_or_init(|| (status, method, make())),
            };
            if *s == status && *m == method {
                c.inc();
                return;
            }
        }
        make().inc();
    }
}

/// `apipolicy_ratelimit_store_errors_total` by reason, resolved once (no label lookup per
/// decision).
#[derive(Clone)]
pub struct StoreErrors {
    pub error: IntCounter,
    pub timeout: IntCounter,
    pub circuit_open: IntCounter,
}

impl StoreErrors {
    pub const REASONS: [&str; 3] = ["error", "timeout", "circuit_open"];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_on_the_right_series() {
        let m = Metrics::new();
        let r = m.route("list");
        for _ in 0..3 {
            r.count(&Method::GET, 200);
        }
        r.count(&Method::POST, 503);
        r.count(&Method::from_bytes(b"PURGE").unwrap(), 404);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(r#"apipolicy_requests_total{code="200",method="GET",route="list"} 3"#),
            "{text}"
        );
        assert!(text.contains(r#"apipolicy_requests_total{code="503",method="POST",route="list"} 1"#));
        assert!(text.contains(r#"apipolicy_requests_total{code="404",method="OTHER",route="list"} 1"#));
    }

    #[test]
    fn the_cache_overflows_into_labelled_lookups() {
        let m = Metrics::new();
        let r = m.route("r");
        for status in 100..200u16 {
            r.count(&Method::GET, status);
            r.count(&Method::GET, status);
        }
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(r#"apipolicy_requests_total{code="199",method="GET",route="r"} 2"#));
        assert!(text.contains(r#"apipolicy_requests_total{code="100",method="GET",route="r"} 2"#));
    }
}
