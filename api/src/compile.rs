//! `compile()`: a valid ApiPolicy becomes the `SidecarConfig` the sidecar runs. Every default
//! of the resource is applied here and nowhere else.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    Algorithm, ApiPolicy, CacheMode, Encoding, EscapedSlashes, HeaderMatch, LimitMode, Method, MissingKey,
    PriorityClass, ProtectAction, ProtectWhen, RouteSettings, Scope, StoreFailure, ValidationError,
    types::{CheckTiming, PathMatch},
    validate::{DEFAULT_ROUTE, validate},
};

/// Defaults, in one place; each is also written on its field's documentation.
pub mod defaults {
    pub const UPSTREAM_TIMEOUT_MS: u64 = 30_000;
    pub const CONNECT_TIMEOUT_MS: u64 = 1_000;
    pub const IDLE_TIMEOUT_MS: u64 = 90_000;
    pub const REDIS_TIMEOUT_MS: u64 = 50;
    pub const REDIS_SECRET_KEY: &str = "url";
    pub const MAX_ENTRY_SIZE: u64 = 1 << 20;
    pub const RETRY_ATTEMPTS: u32 = 2;
    /// The targeted cache-control field (RFC 9213) a cache obeys unless told otherwise.
    pub const TARGETED_FIELD: &str = "cdn-cache-control";
    pub const COMPRESSION_MIN_SIZE: u64 = 1024;
    pub const ALGORITHMS: [super::Encoding; 3] =
        [super::Encoding::Br, super::Encoding::Zstd, super::Encoding::Gzip];
    pub const CONTENT_TYPES: [&str; 7] = [
        "text/*",
        "application/json",
        "application/*+json",
        "application/javascript",
        "application/xml",
        "application/*+xml",
        "image/svg+xml",
    ];
    pub const REJECT_STATUS: u16 = 401;
    pub const SLO_WINDOW_MS: u64 = 30 * 86_400_000;
    pub const CHECK_INTERVAL_MS: u64 = 5_000;
    pub const CHECK_TIMEOUT_MS: u64 = 1_000;
    pub const UNHEALTHY_THRESHOLD: u32 = 3;
    pub const HEALTHY_THRESHOLD: u32 = 2;
    pub const STREAM_IDLE_TIMEOUT_MS: u64 = 300_000;
    pub const MAX_KEYS: u32 = 100_000;
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What the sidecar runs: a compiled policy, its revision, and whose it is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarConfig {
    /// `sha256:` and the hex SHA-256 of the canonical JSON of `spec`.
    pub revision: String,
    pub policy: PolicyRef,
    pub spec: CompiledSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct PolicyRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CompiledSpec {
    pub upstream: UpstreamConfig,
    pub trusted_proxies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
    /// In match order; the last one is always `default`, which matches every request.
    pub routes: Vec<RouteConfig>,
    pub slos: Vec<SloConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub priorities: Vec<PriorityConfig>,
    pub health_checks: HealthConfig,
    /// Left out of the JSON when it is the default, so that the revisions of policies that
    /// leave it out stay as they were.
    #[serde(default, skip_serializing_if = "PathNormalizationConfig::is_default")]
    pub path_normalization: PathNormalizationConfig,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PathNormalizationConfig {
    pub escaped_slashes: EscapedSlashes,
    pub merge_slashes: bool,
}

impl Default for PathNormalizationConfig {
    fn default() -> Self {
        Self { escaped_slashes: EscapedSlashes::Reject, merge_slashes: true }
    }
}

impl PathNormalizationConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamConfig {
    pub port: u16,
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub idle_timeout_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RedisConfig {
    /// Empty when the URL comes from `secret`.
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretConfig>,
    pub cluster: bool,
    pub timeout_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretConfig {
    pub name: String,
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: MatchConfig,
    pub timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_concurrency: Option<AdaptiveConfig>,
    #[serde(default = "stream_idle_timeout_default", skip_serializing_if = "is_stream_idle_timeout_default")]
    pub stream_idle_timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderRulesConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
}

/// `retry`, with its defaults filled in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetryConfig {
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// The budget's ratio in thousandths.
    pub budget_permille: u32,
    pub budget_min_per_second: u32,
    pub budget_ttl_ms: u64,
}

/// One condition of `retry.on`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RetryOn {
    ConnectFailure,
    Reset,
    Timeout,
    GatewayError,
    ServerError,
    Status(u16),
}

impl RetryOn {
    /// Reads one `retry.on` entry.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "connect-failure" => Self::ConnectFailure,
            "reset" => Self::Reset,
            "timeout" => Self::Timeout,
            "gateway-error" => Self::GatewayError,
            "5xx" => Self::ServerError,
            code => match code.parse::<u16>() {
                Ok(n) if (400..600).contains(&n) && code.len() == 3 => Self::Status(n),
                _ => return None,
            },
        })
    }
}

/// `concurrencyLimit.adaptive`, with its defaults filled in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AdaptiveConfig {
    pub min_limit: u32,
    pub max_limit: u32,
    pub sample_window_ms: u64,
    /// `latencyTolerance` in thousandths.
    pub tolerance_permille: u32,
}

/// `circuitBreaker`, with its defaults filled in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerConfig {
    pub consecutive_failures: u32,
    /// The failure ratio in thousandths; `None`: not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_permille: Option<u32>,
    pub min_requests: u32,
    pub window_ms: u64,
    pub open_for_ms: u64,
    pub half_open_requests: u32,
}

/// `requestHeaders`, names lower-cased, in the order they apply: removals, then sets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HeaderRulesConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
}

fn stream_idle_timeout_default() -> u64 {
    defaults::STREAM_IDLE_TIMEOUT_MS
}

fn is_stream_idle_timeout_default(ms: &u64) -> bool {
    *ms == defaults::STREAM_IDLE_TIMEOUT_MS
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MatchConfig {
    pub path: PathConfig,
    /// Empty: every method.
    pub methods: Vec<Method>,
    /// Header names lower-cased.
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ignore_case: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ignore_trailing_slash: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PathConfig {
    Any,
    Prefix(String),
    Exact(String),
    /// Matches the whole path (see `validate::compile_path_regex`).
    Regex(String),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CacheConfig {
    pub mode: CacheMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    pub stale_while_revalidate_ms: u64,
    pub stale_if_error_ms: u64,
    pub private: bool,
    /// Lower-cased header names.
    pub vary: Vec<String>,
    pub etag: bool,
    pub store: bool,
    pub max_entry_size: u64,
    pub store_set_cookie: bool,
    pub surrogate_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub sort_query: bool,
    /// Lower-cased names of the targeted fields obeyed, in precedence order.
    #[serde(default = "targeted_default", skip_serializing_if = "is_targeted_default")]
    pub targeted: Vec<String>,
    /// The statuses the route stores; `None`: the default set of its mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statuses: Option<Vec<u16>>,
}

fn targeted_default() -> Vec<String> {
    vec![defaults::TARGETED_FIELD.to_owned()]
}

fn is_targeted_default(t: &[String]) -> bool {
    matches!(t, [one] if one == defaults::TARGETED_FIELD)
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitConfig {
    pub algorithm: Algorithm,
    pub limit: Limit,
    pub key: KeyConfig,
    pub scope: Scope,
    pub mode: LimitMode,
    pub on_store_failure: StoreFailure,
    pub overrides: Vec<OverrideConfig>,
    #[serde(default = "max_keys_default", skip_serializing_if = "is_max_keys_default")]
    pub max_keys: u32,
}

fn max_keys_default() -> u32 {
    defaults::MAX_KEYS
}

fn is_max_keys_default(n: &u32) -> bool {
    *n == defaults::MAX_KEYS
}

/// `requests` per `per_ms` with a bucket of `burst` (0: requests evenly spaced).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Limit {
    pub requests: u32,
    pub per_ms: u64,
    pub burst: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeyConfig {
    pub client_ip: bool,
    /// Lower-cased header name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    pub on_missing: MissingKey,
    pub reject_status: u16,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OverrideConfig {
    pub values: Vec<String>,
    pub limit: Limit,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CompressionConfig {
    pub algorithms: Vec<Encoding>,
    pub min_size: u64,
    pub content_types: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SloConfig {
    pub name: String,
    /// Percent good, 0 < objective < 100.
    pub objective: f64,
    pub window_ms: u64,
    pub indicator: IndicatorConfig,
    /// Route names counted, `default` included when it is counted.
    pub routes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protect: Option<ProtectConfig>,
}

/// `slos[].protect`, with its defaults filled in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProtectConfig {
    /// Warning: protect from Warning on; else from Critical only.
    pub from_warning: bool,
    pub serve_stale: bool,
    pub shed_by_priority: bool,
    /// `TightenLimits`: the share of their rate limits keep, in thousandths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tighten_permille: Option<u32>,
}

/// `spec.priorities[]`, header names lower-cased.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PriorityConfig {
    pub sheddable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<(String, Vec<String>)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum IndicatorConfig {
    Availability,
    Latency { threshold_ms: u64 },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct HealthConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<CheckConfig>,
    pub dependencies: Vec<CheckConfig>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CheckConfig {
    pub name: String,
    pub target: CheckTarget,
    pub critical: bool,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum CheckTarget {
    /// A GET of this path on the upstream.
    UpstreamPath(String),
    Tcp(String),
    Http {
        url: String,
        expected_status: Option<u16>,
    },
}

impl SidecarConfig {
    /// The revision `spec` must carry: `sha256:` and the hex digest of its canonical JSON.
    pub fn revision_of(spec: &CompiledSpec) -> String {
        // Struct fields serialize in declaration order and there are no maps, so the JSON is
        // canonical: the same spec always gives the same bytes.
        let json = serde_json::to_vec(spec).expect("a CompiledSpec always serializes");
        format!("sha256:{}", hex::encode(Sha256::digest(json)))
    }

    /// The config with every credential hidden ([`redact_url`]), for printing.
    pub fn redacted(&self) -> Self {
        let mut c = self.clone();
        if let Some(r) = &mut c.spec.redis {
            for url in &mut r.urls {
                *url = redact_url(url);
            }
        }
        c
    }

    /// The route that applies when no other does.
    pub fn default_route(&self) -> &RouteConfig {
        self.spec.routes.last().expect("compile always adds the default route")
    }
}

/// A URL with the password of its user info (or the whole user info, when it is one word:
/// Redis reads `redis://secret@host` as a password) replaced by `***`, for printing.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_owned() };
    let user = match rest[..at].split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{scheme}://{user}{}", &rest[at..])
}

/// Validates `policy` and compiles it into the sidecar's config.
pub fn compile(policy: &ApiPolicy) -> Result<SidecarConfig, Vec<ValidationError>> {
    validate(policy)?;
    let s = &policy.spec;
    let upstream_timeout =
        s.upstream.timeout.as_ref().map_or(defaults::UPSTREAM_TIMEOUT_MS, |d| d.as_millis());
    let defaults = s.defaults.clone().unwrap_or_default();

    let mut routes: Vec<RouteConfig> = s
        .routes
        .iter()
        .map(|r| {
            let settings = merge(&r.settings, &defaults);
            route(
                r.name.clone(),
                MatchConfig {
                    path: match &r.matches.path {
                        PathMatch { prefix: Some(p), .. } => PathConfig::Prefix(p.clone()),
                        PathMatch { exact: Some(p), .. } => PathConfig::Exact(p.clone()),
                        PathMatch { regex: Some(p), .. } => PathConfig::Regex(p.clone()),
                        _ => unreachable!("validate() requires exactly one path match"),
                    },
                    methods: r.matches.methods.clone(),
                    headers: r
                        .matches
                        .headers
                        .iter()
                        .map(|h| HeaderMatch { name: h.name.to_ascii_lowercase(), value: h.value.clone() })
                        .collect(),
                    ignore_case: r.matches.path.ignore_case.unwrap_or(false),
                    ignore_trailing_slash: r.matches.path.ignore_trailing_slash.unwrap_or(false),
                },
                &settings,
                upstream_timeout,
            )
        })
        .collect();
    routes.push(route(
        DEFAULT_ROUTE.to_owned(),
        MatchConfig {
            path: PathConfig::Any,
            methods: vec![],
            headers: vec![],
            ignore_case: false,
            ignore_trailing_slash: false,
        },
        &defaults,
        upstream_timeout,
    ));

    let all_routes: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
    let slos = s
        .slos
        .iter()
        .map(|slo| SloConfig {
            name: slo.name.clone(),
            objective: slo.objective,
            window_ms: slo.window.as_ref().map_or(defaults::SLO_WINDOW_MS, |d| d.as_millis()),
            indicator: match &slo.indicator.latency {
                Some(l) => IndicatorConfig::Latency { threshold_ms: l.threshold.as_millis() },
                None => IndicatorConfig::Availability,
            },
            routes: slo.routes.clone().unwrap_or_else(|| all_routes.clone()),
            protect: slo.protect.as_ref().map(|p| {
                let actions = if p.actions.is_empty() {
                    vec![ProtectAction::ServeStale, ProtectAction::ShedByPriority]
                } else {
                    p.actions.clone()
                };
                ProtectConfig {
                    from_warning: p.when == Some(ProtectWhen::Warning),
                    serve_stale: actions.contains(&ProtectAction::ServeStale),
                    shed_by_priority: actions.contains(&ProtectAction::ShedByPriority),
                    tighten_permille: actions
                        .contains(&ProtectAction::TightenLimits)
                        .then(|| (p.tighten_to.unwrap_or(0.5) * 1000.0).round() as u32),
                }
            }),
        })
        .collect();

    let health_checks = s.health_checks.as_ref().map_or_else(HealthConfig::default, |hc| HealthConfig {
        upstream: hc.upstream.as_ref().map(|u| {
            check("upstream".to_owned(), CheckTarget::UpstreamPath(u.path.clone()), true, &u.timing)
        }),
        dependencies: hc
            .dependencies
            .iter()
            .map(|d| {
                let target = match (&d.tcp, &d.http) {
                    (Some(t), _) => CheckTarget::Tcp(t.address.clone()),
                    (None, Some(h)) => {
                        CheckTarget::Http { url: h.url.clone(), expected_status: h.expected_status }
                    }
                    (None, None) => unreachable!("validate() requires tcp or http"),
                };
                check(d.name.clone(), target, d.critical.unwrap_or(true), &d.timing)
            })
            .collect(),
    });

    let spec = CompiledSpec {
        upstream: UpstreamConfig {
            port: s.upstream.port,
            timeout_ms: upstream_timeout,
            connect_timeout_ms: s
                .upstream
                .connect_timeout
                .as_ref()
                .map_or(defaults::CONNECT_TIMEOUT_MS, |d| d.as_millis()),
            idle_timeout_ms: s
                .upstream
                .idle_timeout
                .as_ref()
                .map_or(defaults::IDLE_TIMEOUT_MS, |d| d.as_millis()),
        },
        trusted_proxies: s.client_ip.as_ref().map(|c| c.trusted_proxies.clone()).unwrap_or_default(),
        redis: s.redis.as_ref().map(|r| {
            let urls: Vec<String> =
                r.url.iter().flat_map(|u| u.split(',')).map(|u| u.trim().to_owned()).collect();
            RedisConfig {
                cluster: r.cluster.unwrap_or(urls.len() > 1),
                urls,
                secret: r.secret_ref.as_ref().map(|s| SecretConfig {
                    name: s.name.clone(),
                    key: s.key.clone().unwrap_or_else(|| defaults::REDIS_SECRET_KEY.to_owned()),
                }),
                timeout_ms: r.timeout.as_ref().map_or(defaults::REDIS_TIMEOUT_MS, |d| d.as_millis()),
            }
        }),
        routes,
        slos,
        priorities: s
            .priorities
            .iter()
            .map(|p| PriorityConfig {
                sheddable: p.class == PriorityClass::Sheddable,
                header: p.header.as_ref().map(|h| (h.name.to_ascii_lowercase(), h.values.clone())),
                routes: p.routes.clone(),
            })
            .collect(),
        health_checks,
        path_normalization: s.path_normalization.as_ref().map_or_else(
            PathNormalizationConfig::default,
            |p| PathNormalizationConfig {
                escaped_slashes: p.escaped_slashes.unwrap_or(EscapedSlashes::Reject),
                merge_slashes: p.merge_slashes.unwrap_or(true),
            },
        ),
    };
    Ok(SidecarConfig {
        revision: SidecarConfig::revision_of(&spec),
        policy: PolicyRef {
            namespace: policy.metadata.namespace.clone(),
            name: policy.metadata.name.clone().unwrap_or_default(),
        },
        spec,
    })
}

/// Each setting the route leaves out comes whole from `defaults`.
fn merge(route: &RouteSettings, defaults: &RouteSettings) -> RouteSettings {
    RouteSettings {
        timeout: route.timeout.clone().or_else(|| defaults.timeout.clone()),
        cache: route.cache.clone().or_else(|| defaults.cache.clone()),
        rate_limit: route.rate_limit.clone().or_else(|| defaults.rate_limit.clone()),
        compression: route.compression.clone().or_else(|| defaults.compression.clone()),
        concurrency_limit: route.concurrency_limit.clone().or_else(|| defaults.concurrency_limit.clone()),
        max_request_body: route.max_request_body.clone().or_else(|| defaults.max_request_body.clone()),
        stream_idle_timeout: route
            .stream_idle_timeout
            .clone()
            .or_else(|| defaults.stream_idle_timeout.clone()),
        request_headers: route.request_headers.clone().or_else(|| defaults.request_headers.clone()),
        retry: route.retry.clone().or_else(|| defaults.retry.clone()),
        circuit_breaker: route.circuit_breaker.clone().or_else(|| defaults.circuit_breaker.clone()),
    }
}

fn route(name: String, matches: MatchConfig, s: &RouteSettings, upstream_timeout: u64) -> RouteConfig {
    RouteConfig {
        name,
        matches,
        timeout_ms: s.timeout.as_ref().map_or(upstream_timeout, |d| d.as_millis()),
        max_request_body: s.max_request_body.as_ref().map(|q| q.bytes()),
        cache: s.cache.as_ref().map(|c| {
            let private = c.private.unwrap_or(false);
            let store = c.store.as_ref();
            CacheConfig {
                mode: c.mode.unwrap_or_default(),
                max_age_ms: c.max_age.as_ref().map(|d| d.as_millis()),
                stale_while_revalidate_ms: c.stale_while_revalidate.as_ref().map_or(0, |d| d.as_millis()),
                stale_if_error_ms: c.stale_if_error.as_ref().map_or(0, |d| d.as_millis()),
                private,
                vary: c.vary.iter().map(|v| v.to_ascii_lowercase()).collect(),
                etag: c.etag.unwrap_or(true),
                // A private response is for one client; the sidecar is a shared cache.
                store: store.and_then(|s| s.enabled).unwrap_or(!private),
                max_entry_size: store
                    .and_then(|s| s.max_entry_size.as_ref())
                    .map_or(defaults::MAX_ENTRY_SIZE, |q| q.bytes()),
                store_set_cookie: store.and_then(|s| s.store_set_cookie).unwrap_or(false),
                surrogate_keys: c.surrogate_keys.clone(),
                sort_query: c.sort_query.unwrap_or(false),
                targeted: c
                    .targeted
                    .as_ref()
                    .map_or_else(targeted_default, |t| t.iter().map(|f| f.to_ascii_lowercase()).collect()),
                statuses: c.statuses.clone(),
            }
        }),
        rate_limit: s.rate_limit.as_ref().map(|rl| {
            let per_ms = rl.per.as_millis();
            RateLimitConfig {
                algorithm: rl.algorithm.unwrap_or_default(),
                limit: Limit { requests: rl.requests, per_ms, burst: rl.burst.unwrap_or(rl.requests) },
                key: match &rl.key {
                    None => KeyConfig {
                        client_ip: true,
                        header: None,
                        on_missing: MissingKey::Anonymous,
                        reject_status: defaults::REJECT_STATUS,
                    },
                    Some(k) => KeyConfig {
                        client_ip: k.client_ip.is_some(),
                        header: k.header.as_ref().map(|h| h.name.to_ascii_lowercase()),
                        on_missing: k.header.as_ref().and_then(|h| h.on_missing).unwrap_or_default(),
                        reject_status: k
                            .header
                            .as_ref()
                            .and_then(|h| h.reject_status)
                            .unwrap_or(defaults::REJECT_STATUS),
                    },
                },
                scope: rl.scope.unwrap_or_default(),
                mode: rl.mode.unwrap_or_default(),
                on_store_failure: rl.on_store_failure.unwrap_or_default(),
                overrides: rl
                    .overrides
                    .iter()
                    .map(|o| OverrideConfig {
                        values: o.values.clone(),
                        limit: Limit {
                            requests: o.requests,
                            per_ms: o.per.as_ref().map_or(per_ms, |d| d.as_millis()),
                            burst: o.burst.unwrap_or(o.requests),
                        },
                    })
                    .collect(),
                max_keys: rl.max_keys.unwrap_or(defaults::MAX_KEYS),
            }
        }),
        compression: s.compression.as_ref().filter(|c| c.enabled != Some(false)).map(|c| CompressionConfig {
            algorithms: if c.algorithms.is_empty() {
                defaults::ALGORITHMS.to_vec()
            } else {
                c.algorithms.clone()
            },
            min_size: c.min_size.as_ref().map_or(defaults::COMPRESSION_MIN_SIZE, |q| q.bytes()),
            content_types: if c.content_types.is_empty() {
                defaults::CONTENT_TYPES.iter().map(|s| (*s).to_owned()).collect()
            } else {
                c.content_types.iter().map(|s| s.to_ascii_lowercase()).collect()
            },
        }),
        max_in_flight: s.concurrency_limit.as_ref().and_then(|c| c.max_in_flight),
        adaptive_concurrency: s.concurrency_limit.as_ref().and_then(|c| c.adaptive.as_ref()).map(|a| {
            let min_limit = a.min_limit.unwrap_or(1);
            AdaptiveConfig {
                min_limit,
                max_limit: a.max_limit.unwrap_or(1000).max(min_limit),
                sample_window_ms: a.sample_window.as_ref().map_or(250, |d| d.as_millis()),
                tolerance_permille: a.latency_tolerance.map_or(1500, |t| (t * 1000.0).round() as u32),
            }
        }),
        stream_idle_timeout_ms: s
            .stream_idle_timeout
            .as_ref()
            .map_or(defaults::STREAM_IDLE_TIMEOUT_MS, |d| d.as_millis()),
        request_headers: s
            .request_headers
            .as_ref()
            .filter(|r| !r.set.is_empty() || !r.remove.is_empty())
            .map(|r| HeaderRulesConfig {
                remove: r.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
                set: r.set.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect(),
            }),
        retry: s.retry.as_ref().map(|r| {
            let budget = r.budget.as_ref();
            let backoff = r.backoff.as_ref();
            RetryConfig {
                attempts: r.attempts.unwrap_or(defaults::RETRY_ATTEMPTS),
                on: if r.on.is_empty() {
                    vec![RetryOn::ConnectFailure, RetryOn::Reset, RetryOn::GatewayError]
                } else {
                    r.on.iter().filter_map(|o| RetryOn::parse(o)).collect()
                },
                per_try_timeout_ms: r.per_try_timeout.as_ref().map(|d| d.as_millis()),
                backoff_base_ms: backoff.and_then(|b| b.base.as_ref()).map_or(25, |d| d.as_millis()),
                backoff_max_ms: backoff.and_then(|b| b.max.as_ref()).map_or(250, |d| d.as_millis()),
                budget_permille: budget.and_then(|b| b.ratio).map_or(200, |r| (r * 1000.0).round() as u32),
                budget_min_per_second: budget.and_then(|b| b.min_per_second).unwrap_or(10),
                budget_ttl_ms: budget.and_then(|b| b.ttl.as_ref()).map_or(10_000, |d| d.as_millis()),
            }
        }),
        circuit_breaker: s.circuit_breaker.as_ref().map(|c| CircuitBreakerConfig {
            consecutive_failures: c.consecutive_failures.unwrap_or(5),
            failure_permille: c.failure_ratio.map(|r| (r * 1000.0).round() as u32),
            min_requests: c.min_requests.unwrap_or(20),
            window_ms: c.window.as_ref().map_or(10_000, |d| d.as_millis()),
            open_for_ms: c.open_for.as_ref().map_or(30_000, |d| d.as_millis()),
            half_open_requests: c.half_open_requests.unwrap_or(1),
        }),
    }
}

fn check(name: String, target: CheckTarget, critical: bool, t: &CheckTiming) -> CheckConfig {
    CheckConfig {
        name,
        target,
        critical,
        interval_ms: t.interval.as_ref().map_or(defaults::CHECK_INTERVAL_MS, |d| d.as_millis()),
        timeout_ms: t.timeout.as_ref().map_or(defaults::CHECK_TIMEOUT_MS, |d| d.as_millis()),
        unhealthy_threshold: t.unhealthy_threshold.unwrap_or(defaults::UNHEALTHY_THRESHOLD),
        healthy_threshold: t.healthy_threshold.unwrap_or(defaults::HEALTHY_THRESHOLD),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn credentials_are_hidden() {
        for (url, want) in [
            ("redis://:s3cret@redis:6379", "redis://:***@redis:6379"),
            ("rediss://app:s3cret@redis:6379/0", "rediss://app:***@redis:6379/0"),
            ("redis://s3cret@redis", "redis://***@redis"),
            ("redis://redis:6379", "redis://redis:6379"),
            ("redis://redis/0?x=a@b", "redis://redis/0?x=a@b"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }
}
