//! The `ApiPolicy` custom resource (`apipolicy.dev/v1alpha1`).
//!
//! The rustdoc on each field becomes its description in the CRD. Every default is applied in
//! one place, [`crate::compile`], and written on the field it concerns; the spec itself keeps
//! what the user wrote so that it round-trips unchanged.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{ByteSize, Duration};

/// Performance and protection for one HTTP API: caching, rate limits, compression, timeouts,
/// health checks and SLOs, enforced by the ApiPolicy sidecar in every pod the policy selects.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "apipolicy.dev",
    version = "v1alpha1",
    kind = "ApiPolicy",
    plural = "apipolicies",
    shortname = "apol",
    namespaced,
    status = "ApiPolicyStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Pods","type":"string","jsonPath":".status.pods.summary"}"#,
    printcolumn = r#"{"name":"Budget","type":"number","jsonPath":".status.lowestErrorBudgetRemaining"}"#,
    printcolumn = r#"{"name":"SLO","type":"string","jsonPath":".status.sloState"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    cel,
    validation = Rule::new("!has(self.routes) || self.routes.all(r, r.name != 'default')").message("the route name 'default' is reserved for requests that no route matches"),
    validation = Rule::new("!has(self.slos) || self.slos.all(s, !has(s.routes) || s.routes.all(n, n == 'default' || (has(self.routes) && self.routes.exists(r, r.name == n))))").message("every route an SLO names must exist in spec.routes"),
)]
#[serde(rename_all = "camelCase")]
pub struct ApiPolicySpec {
    /// The pods this policy governs, in the policy's namespace. It must select something: an
    /// empty selector would put the sidecar into every pod of the namespace.
    pub selector: LabelSelector,

    /// The application inside the pod, as the sidecar reaches it.
    pub upstream: Upstream,

    /// How the client's address is found, for `clientIp` rate-limit keys and logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIp>,

    /// The Redis (or Redis Cluster) that `scope: Global` rate limits and the shared cache tier
    /// use. Needed by `scope: Global`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<Redis>,

    /// Settings for every route that does not set them itself, and for requests that no route
    /// matches (they are reported as the route `default`). A route's setting replaces the
    /// default one whole; the two are not merged field by field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<RouteSettings>,

    /// The routes, tried in order: the first whose `match` fits the request applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub routes: Vec<Route>,

    /// Service level objectives, measured by the sidecar on every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub slos: Vec<Slo>,

    /// Request classes for SLO protection's `ShedByPriority`, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub priorities: Vec<Priority>,

    /// Active health checks of the app and its dependencies, which decide `/readyz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_checks: Option<HealthChecks>,

    /// How request paths are normalized before routes match them. The normalized path is the
    /// one forwarded, so routes always match what the app receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_normalization: Option<PathNormalization>,
}

/// How request paths are normalized (in the manner of Envoy's `normalize_path`,
/// `merge_slashes` and `path_with_escaped_slashes_action`). Dot segments are always removed and
/// percent-encoded unreserved characters always decoded (RFC 3986 §6.2.2).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathNormalization {
    /// What to do with a path holding an escaped slash (`%2F`, `%5C`, any case), which many
    /// frameworks decode into a `/` after the proxy has matched routes: `Reject` (400),
    /// `DecodeAndForward` (decoded to `/`, then normalized, matched and forwarded so), or
    /// `Keep` (matched and forwarded as sent: a route for `/a/b` does not see `/a%2Fb`).
    /// Default: `Reject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escaped_slashes: Option<EscapedSlashes>,

    /// Whether repeated slashes are merged (`/api//login` is `/api/login`). Default: `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_slashes: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum EscapedSlashes {
    Reject,
    DecodeAndForward,
    Keep,
}

/// The application inside the pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// The app container's port, which the sidecar forwards to on the pod's loopback address.
    /// The injector renames this port on the app container and gives its name to the sidecar.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,

    /// The longest any request may wait for the app's response headers; route timeouts may not
    /// exceed it. Default: `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,

    /// How long to wait for a new connection to the app. Default: `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,

    /// How long an idle keep-alive connection to the app is kept in the pool. Default: `90s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
}

/// How the client's address is found.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClientIp {
    /// Addresses or CIDR ranges of proxies in front of the pod (load balancers, ingress). When
    /// the peer is one of them, the client is the right-most address of `X-Forwarded-For` that
    /// is not trusted; the left-most, which a client can forge, is never used. Default: none,
    /// so the client is the TCP peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub trusted_proxies: Vec<String>,
}

/// Where Redis is. Exactly one of `url` and `secretRef`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    cel,
    validation = Rule::new("has(self.url) != has(self.secretRef)").message("set exactly one of url and secretRef"),
)]
#[serde(rename_all = "camelCase")]
pub struct Redis {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` for TLS. Several URLs separated
    /// by commas are the seed nodes of a Redis Cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,

    /// A key of a Secret in the policy's namespace that holds the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,

    /// Treat the URL as a Redis Cluster even when it names one seed node. Default: false (true
    /// when `url` lists several nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<bool>,

    /// The longest one Redis call may hold a request; past it `onStoreFailure` decides.
    /// Default: `50ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// A key of a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within the Secret. Default: `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A route: which requests it matches and what applies to them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// The route's name, used in metrics, logs and SLOs: lower-case letters, digits and `-`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,

    /// Which requests the route matches.
    #[serde(rename = "match")]
    pub matches: RouteMatch,

    /// What applies to the matched requests; each setting left out comes from `defaults`.
    #[serde(flatten)]
    pub settings: RouteSettings,
}

/// Which requests a route matches: all of the given conditions must hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// The request path (without the query string).
    pub path: PathMatch,

    /// The methods matched. Default: every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<Method>,

    /// Request headers that must be present, or have a given value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HeaderMatch>,
}

/// How a path is matched: exactly one of `prefix`, `exact` and `regex`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    cel,
    validation = Rule::new("[has(self.prefix), has(self.exact), has(self.regex)].filter(x, x).size() == 1").message("set exactly one of prefix, exact and regex"),
    validation = Rule::new("!has(self.prefix) || self.prefix.startsWith('/')").message("a path prefix must start with /"),
    validation = Rule::new("!has(self.exact) || self.exact.startsWith('/')").message("an exact path must start with /"),
)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    /// Matches this path and every path below it, segment by segment: `/api/products` matches
    /// `/api/products` and `/api/products/7`, not `/api/productsearch`. A prefix ending in `/`
    /// matches what starts with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub prefix: Option<String>,

    /// Matches this path only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub exact: Option<String>,

    /// A regular expression (Rust `regex` syntax, linear time) that must match the whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub regex: Option<String>,

    /// Whether letters match in any case (`/API/Login` matches `exact: /api/login`), for apps
    /// whose framework routes so. Default: `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_case: Option<bool>,

    /// Whether one trailing `/` of the request path is ignored (`/api/login/` matches
    /// `exact: /api/login`), for apps whose framework routes so. Default: `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_trailing_slash: Option<bool>,
}

/// An HTTP method.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
            Self::Delete => "DELETE",
            Self::Options => "OPTIONS",
        }
    }
}

/// A request header condition: present (no `value`), or equal to `value` (case-sensitive).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct HeaderMatch {
    /// The header name (case-insensitive).
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub name: String,
    /// The exact value; leave out to match any request that carries the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Settings of a route. In `defaults` they apply to every route that leaves them out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteSettings {
    /// How long the app may take to send its response headers before the sidecar answers 504.
    /// Default: `upstream.timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,

    /// Response caching and cache headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,

    /// A rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,

    /// Response compression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,

    /// A cap on requests in flight to the app; past it requests are shed at once with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_limit: Option<ConcurrencyLimit>,

    /// The largest request body accepted; larger ones get 413 before they reach the app.
    /// Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body: Option<ByteSize>,

    /// How long a response body may stall between two chunks once its headers came (and the
    /// client's request body, while it is sent) before the sidecar ends the exchange. Default:
    /// `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout: Option<Duration>,

    /// Retries of requests the app failed, within a retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,

    /// Fail fast while the app keeps failing, and probe it before sending it everything again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,

    /// Headers set on, or removed from, every request the route sends the app (pass-through
    /// and cache fills alike), after the cache key is taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderRules>,
}

/// Changes to request headers, as Envoy's `request_headers_to_add`/`_remove` and nginx's
/// `proxy_set_header`. Names are case-insensitive. Headers that frame the message, route it
/// hop by hop, or that the sidecar owns (`Host`, `X-Request-Id`, the `X-Forwarded-*` and
/// `Forwarded` family) cannot be changed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderRules {
    /// Headers to set, replacing any the client sent: name → value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub set: BTreeMap<String, String>,
    /// Headers to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub remove: Vec<String>,
}

/// Caching of responses and the cache headers sent to clients.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    cel,
    validation = Rule::new("!has(self.mode) || self.mode != 'Origin' || (!has(self.maxAge) && !has(self.staleWhileRevalidate) && !has(self.staleIfError))").message("with mode Origin the app's own Cache-Control decides freshness: leave out maxAge, staleWhileRevalidate and staleIfError"),
)]
#[serde(rename_all = "camelCase")]
pub struct Cache {
    /// `Override`: the policy writes `Cache-Control` and decides freshness. `Origin`: the
    /// sidecar is an RFC 9111 shared cache that honours what the app sends. Default: `Override`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<CacheMode>,

    /// How long a response is fresh (`max-age`). Required with mode `Override`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,

    /// How long past freshness a stale response may be served while it is revalidated in the
    /// background (RFC 5861).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_while_revalidate: Option<Duration>,

    /// How long past freshness a stale response may be served when the app fails (RFC 5861).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_if_error: Option<Duration>,

    /// `Cache-Control: private`: browsers may cache, shared caches (the sidecar included) may
    /// not. Default: false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private: Option<bool>,

    /// Request headers that select a different cached response (`Vary`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub vary: Vec<String>,

    /// Add a strong `ETag` when the app sends none, and answer `If-None-Match` with 304.
    /// Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<bool>,

    /// The sidecar's own response store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<CacheStore>,

    /// Tags put on every stored response of the route, for `POST /purge {"keys": [...]}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub surrogate_keys: Vec<String>,

    /// Whether the query's parameters are put in order of their names for the cache key, so
    /// that `?b=2&a=1` and `?a=1&b=2` share an entry. Parameters of the same name keep their
    /// order (`?a=2&a=1` is never `?a=1&a=2`). Only for apps that read the query so.
    /// Default: `false`, the query is keyed as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort_query: Option<bool>,
    /// Targeted cache-control fields (RFC 9213) this cache obeys, first present wins: when a
    /// response carries one, its directives replace `Cache-Control` (and `Expires`) for the
    /// sidecar's store, and every field listed is removed before the response leaves, so that
    /// clients and caches behind see only `Cache-Control`. Default: `[CDN-Cache-Control]`;
    /// `[]` obeys `Cache-Control` alone. `Surrogate-Control` is read the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4))]
    pub targeted: Option<Vec<String>>,

    /// Response statuses the route may store. Default: the statuses RFC 9110 §15.1 makes
    /// heuristically cacheable (200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501), and
    /// with mode `Origin` also any other final status the app makes explicitly cacheable
    /// (`max-age`, `s-maxage`, `Expires` or `public`), 206 aside. With mode `Override` the
    /// policy's `Cache-Control` goes on these statuses only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub statuses: Option<Vec<u16>>,
}

/// Who decides a response's freshness.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum CacheMode {
    #[default]
    Override,
    Origin,
}

/// The sidecar's response store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheStore {
    /// Store responses in the sidecar. Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Larger responses stream through uncached. Default: `1Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_entry_size: Option<ByteSize>,
    /// Store responses that set cookies. Default: false, since a cookie is usually meant for
    /// one client only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_set_cookie: Option<bool>,
}

/// A rate limit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    cel,
    validation = Rule::new("!has(self.algorithm) || self.algorithm != 'SlidingWindow' || !has(self.burst)").message("burst has no meaning for SlidingWindow: the window allows `requests` per `per`"),
)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// `TokenBucket`: a bucket of `burst` tokens refilled with `requests` every `per`.
    /// `SlidingWindow`: at most `requests` in any window of length `per`, estimated from the
    /// current and previous fixed windows. `GCRA`: the token bucket's decisions, kept as one
    /// timestamp per key. Default: `TokenBucket`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,

    /// Requests allowed per `per` in the long run.
    #[schemars(range(min = 1))]
    pub requests: u32,

    /// The period `requests` are counted over.
    pub per: Duration,

    /// How many requests may arrive at once (the bucket's capacity). `0` spaces requests
    /// evenly, one every `per / requests`. Default: `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub burst: Option<u32>,

    /// What a request is counted by. Default: the client address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RateLimitKey>,

    /// `Pod`: each pod counts alone. `Replicas`: each pod allows the limit divided by the
    /// number of ready replicas (approximately global, no network call). `Global`: one count
    /// in Redis for all pods. Default: `Pod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,

    /// `Enforce` rejects with 429; `Shadow` only counts what would have been rejected.
    /// Default: `Enforce`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<LimitMode>,

    /// With `scope: Global`, what happens when Redis fails or is slower than its timeout.
    /// Default: `LocalFallback`, the pod-scope limiter with the same parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_store_failure: Option<StoreFailure>,

    /// Other limits for some key values, for example API-key tiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub overrides: Vec<RateLimitOverride>,

    /// With `scope: Pod` or `Replicas` (and `Global`'s `LocalFallback`), how many keys the
    /// pod keeps state for, per limit (each override has its own); past it idle keys are
    /// forgotten first, then an eighth of the rest (a forgotten key starts again with a full
    /// allowance). Each key costs about 40 bytes of table. Default: 100000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000000))]
    pub max_keys: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Algorithm {
    #[default]
    TokenBucket,
    SlidingWindow,
    #[serde(rename = "GCRA")]
    Gcra,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Scope {
    #[default]
    Pod,
    Replicas,
    Global,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum LimitMode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum StoreFailure {
    /// Allow every request while Redis is away.
    FailOpen,
    /// Reject every request with 503 while Redis is away.
    FailClosed,
    /// Limit each pod on its own with the same parameters while Redis is away.
    #[default]
    LocalFallback,
}

/// What a request is counted by: the client address, a header, or both together.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    cel,
    validation = Rule::new("has(self.clientIp) || has(self.header)").message("set clientIp, header, or both"),
)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitKey {
    /// Count by client address (see `spec.clientIp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpKey>,
    /// Count by a request header's value, such as an API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderKey>,
}

/// Count by client address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct ClientIpKey {}

/// Count by a header's value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderKey {
    /// The header, such as `X-Api-Key`.
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub name: String,
    /// Requests without the header: `Anonymous` counts them all in one shared bucket,
    /// `Reject` answers them with `rejectStatus`. Default: `Anonymous`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_missing: Option<MissingKey>,
    /// The status for `onMissing: Reject`: 401 or 429. Default: 401.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject_status: Option<u16>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum MissingKey {
    #[default]
    Anonymous,
    Reject,
}

/// A limit for some key values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitOverride {
    /// The key values (header values or client addresses) this limit applies to.
    #[schemars(length(min = 1, max = 1024))]
    pub values: Vec<String>,
    /// Requests allowed per `per`.
    #[schemars(range(min = 1))]
    pub requests: u32,
    /// The period. Default: the limit's own `per`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<Duration>,
    /// The burst. Default: this override's `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// Response compression, negotiated from `Accept-Encoding`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Compression {
    /// Compress responses. Default: true; `false` turns off a default compression for a route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The encodings offered, in the server's order of preference. Default: `[br, zstd, gzip]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub algorithms: Vec<Encoding>,
    /// Smaller bodies are sent as they are. Default: `1Ki`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_size: Option<ByteSize>,
    /// Media types compressed; `text/*` style wildcards allowed. Default: `text/*`,
    /// `application/json`, `application/*+json`, `application/javascript`, `application/xml`,
    /// `application/*+xml`, `image/svg+xml`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub content_types: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Br,
    Zstd,
    Gzip,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Br => "br",
            Self::Zstd => "zstd",
            Self::Gzip => "gzip",
        }
    }
}

/// A cap on concurrent requests to the app: fixed (`maxInFlight`) or adaptive. Requests over
/// it get 503 with `Retry-After` at once: nothing queues.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConcurrencyLimit {
    /// Requests of the route in flight at once, per pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_in_flight: Option<u32>,
    /// A limit that follows the app's latency instead (a gradient limiter, as Envoy's adaptive
    /// concurrency filter and Netflix's concurrency-limits): the lowest average latency seen
    /// is the app's ideal; each `sampleWindow` the limit grows while the sampled latency stays
    /// within `latencyTolerance` × ideal, and shrinks by their ratio (at most by half) when it
    /// does not. Give this or `maxInFlight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveConcurrency>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdaptiveConcurrency {
    /// The limit never goes below this (and starts here). Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_limit: Option<u32>,
    /// Nor above this. Default: 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_limit: Option<u32>,
    /// How often the limit moves, from 10ms to 1m. Default: 250ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_window: Option<Duration>,
    /// How much slower than its ideal the app may answer before the limit shrinks, as a
    /// factor from 1 to 10. Default: 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub latency_tolerance: Option<f64>,
}

/// Retries of failed tries to the app (as Envoy's retry policy), bounded by a budget (as
/// Linkerd's): only idempotent requests (GET, HEAD, OPTIONS, PUT, DELETE) or those with an
/// `Idempotency-Key` are retried, and only while their body fits the replay buffer (64 KiB).
/// The route's `timeout` bounds all tries together.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// Tries in all, the first included, from 2 to 5. Default: 2 (one retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 5))]
    pub attempts: Option<u32>,

    /// What makes a try worth retrying: `connect-failure` (the app could not be reached),
    /// `reset` (the connection broke before the response headers), `timeout` (the try ran past
    /// `perTryTimeout`), `gateway-error` (502, 503, 504), `5xx`, or one status such as `503`
    /// or `429`. Default: `[connect-failure, reset, gateway-error]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub on: Vec<String>,

    /// How long one try may wait for the response headers. Default: the route's `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,

    /// The wait before each retry: a random time up to `base × 2^(retry − 1)`, at most `max`
    /// (full jitter). The app's `Retry-After` is a floor. Default: `{base: 25ms, max: 250ms}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,

    /// How many retries the route may add to the requests it sends. Default:
    /// `{ratio: 0.2, minPerSecond: 10, ttl: 10s}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Duration>,
}

/// Retries may add at most `ratio` of the requests of the last `ttl`, plus `minPerSecond`
/// × `ttl` seconds: a failing app never sees a retry storm.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// From 0 to 1. Default: 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ratio: Option<f64>,
    /// Default: 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<u32>,
    /// From 1s to 60s. Default: 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
}

/// A circuit breaker: it opens after `consecutiveFailures` failed tries in a row, or when at
/// least `minRequests` tries of the last `window` failed at `failureRatio` or more; while
/// open, requests fail at once (503, `type …/circuit-open`, `Retry-After`), or get a stale
/// cache entry when the route has one within its `staleIfError`; after `openFor`, up to
/// `halfOpenRequests` probes go to the app: all must succeed to close it, one failure opens
/// it again. A failure is a try that could not reach the app, broke, timed out, or got a 5xx.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Default: 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub consecutive_failures: Option<u32>,
    /// From 0 (exclusive) to 1; unset: only consecutive failures open the circuit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_ratio: Option<f64>,
    /// Default: 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u32>,
    /// From 1s to 10m. Default: 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
    /// From 100ms to 10m. Default: 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<Duration>,
    /// Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub half_open_requests: Option<u32>,
}

/// A service level objective.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Slo {
    /// The SLO's name, used in status, metrics and alerts.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// The target share of good requests, in percent, strictly between 0 and 100 (`99.9`).
    #[schemars(range(min = 0.0, max = 100.0), extend("exclusiveMinimum" = true, "exclusiveMaximum" = true))]
    pub objective: f64,
    /// The rolling window the objective is measured over, from `1h` to `90d`. Default: `30d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
    /// What makes a request good.
    pub indicator: Indicator,
    /// The routes counted (by name; `default` is the requests no route matches). Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub routes: Option<Vec<String>>,
    /// What the routes this SLO counts do while it burns its budget too fast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protect: Option<Protect>,
}

/// SLO-driven protection. It starts when the SLO's multi-window burn rate reaches `when`, as
/// each sidecar measures it, and lifts once the SLO has stayed below that for a minute.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Protect {
    /// `Critical` (the page rules) or `Warning` (the ticket rules, and anything worse).
    /// Default: `Critical`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<ProtectWhen>,
    /// `ServeStale`: cached routes answer with any stored entry, however stale, instead of
    /// asking the app. `ShedByPriority`: requests of class `Sheddable` (see
    /// `spec.priorities`) that would reach the app get 503 at once. `TightenLimits`: rate
    /// limits allow `tightenTo` of their rate. Default: `[ServeStale, ShedByPriority]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ProtectAction>,
    /// The share of its rate a limit keeps under `TightenLimits`, above 0 and below 1.
    /// Default: 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tighten_to: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ProtectWhen {
    Critical,
    Warning,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ProtectAction {
    ServeStale,
    ShedByPriority,
    TightenLimits,
}

/// A class of requests for `ShedByPriority`: requests that match `header` (one of its
/// values) or come on one of `routes`. The first entry a request matches gives its class;
/// requests that match none are `Default`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Priority {
    pub class: PriorityClass,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<PriorityHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub routes: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct PriorityHeader {
    pub name: String,
    #[schemars(length(min = 1, max = 32))]
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PriorityClass {
    Critical,
    Sheddable,
}

/// What makes a request good: exactly one of `availability` and `latency`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    cel,
    validation = Rule::new("has(self.availability) != has(self.latency)").message("set exactly one of availability and latency"),
)]
pub struct Indicator {
    /// Good when the response is not a 5xx (the sidecar's own 502/503/504 included; its 429s
    /// and load-shedding 503s are left out of the SLI and counted apart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability: Option<AvailabilityIndicator>,
    /// Good when the whole response took at most `threshold` and was not a 5xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyIndicator>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct AvailabilityIndicator {}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct LatencyIndicator {
    /// The slowest a good response may be, measured at the sidecar.
    pub threshold: Duration,
}

/// Active health checks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthChecks {
    /// An HTTP check of the app itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamCheck>,
    /// Checks of what the app depends on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub dependencies: Vec<DependencyCheck>,
}

/// How often and how strictly a check runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckTiming {
    /// Time between two checks. Default: `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// How long one check may take. Default: `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Failures in a row that make the check down. Default: 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub unhealthy_threshold: Option<u32>,
    /// Successes in a row that make the check up again. Default: 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub healthy_threshold: Option<u32>,
}

/// An HTTP check of the app.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamCheck {
    /// The path requested with GET; a 2xx or 3xx answer is healthy.
    #[schemars(regex(pattern = r"^/"))]
    pub path: String,
    #[serde(flatten)]
    pub timing: CheckTiming,
}

/// A check of something the app depends on: exactly one of `tcp` and `http`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    cel,
    validation = Rule::new("has(self.tcp) != has(self.http)").message("set exactly one of tcp and http"),
)]
#[serde(rename_all = "camelCase")]
pub struct DependencyCheck {
    /// The check's name, in `/readyz` and metrics.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// A TCP connection that must open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    /// An HTTP GET that must answer with the expected status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// When true, the pod is not ready while this dependency is down. Default: true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical: Option<bool>,
    #[serde(flatten)]
    pub timing: CheckTiming,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct TcpCheck {
    /// `host:port`.
    #[schemars(length(min = 3, max = 512))]
    pub address: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCheck {
    /// An `http://` URL.
    #[schemars(length(min = 8, max = 2048))]
    pub url: String,
    /// The status that means healthy. Default: any 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 599))]
    pub expected_status: Option<u16>,
}

/// What the operator observed and computed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The SHA-256 of the compiled sidecar config (`sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_revision: Option<String>,
    /// `Accepted` (the spec is valid and not in conflict) and `Programmed` (pods run it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Pod counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodCounts>,
    /// Each SLO's figures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slos: Vec<SloStatus>,
    /// The lowest `errorBudgetRemaining` of all SLOs (the Budget column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lowest_error_budget_remaining: Option<f64>,
    /// The worst state of all SLOs (the SLO column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo_state: Option<SloState>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct PodCounts {
    /// Pods the selector matches.
    pub matched: u32,
    /// Of those, pods that run the sidecar.
    pub injected: u32,
    /// Of those, pods on the current `configRevision`.
    pub current: u32,
    /// `current/matched`, for the Pods column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

/// One SLO's figures; the sidecar's `/slo` uses the same names.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SloStatus {
    pub name: String,
    /// Good requests over the window, in percent.
    pub sli: f64,
    /// The error budget left, in percent of the budget; negative when over-spent (floored at
    /// -100).
    pub error_budget_remaining: f64,
    /// Burn rates by window (`5m`, `30m`, `1h`, `2h`, `6h`, `1d`, `3d`): 1 spends the budget
    /// exactly over the SLO window.
    #[serde(default)]
    pub burn_rates: BTreeMap<String, f64>,
    pub state: SloState,
    /// `Active since <time>, actions <list>` while the SLO's protection is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<String>,
    pub good_requests: u64,
    pub total_requests: u64,
    /// When these figures were computed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
}

/// The state of an SLO, by the SRE workbook's multi-window, multi-burn-rate rules. Ordered
/// from best to worst, so the worst of several is their maximum.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default, JsonSchema)]
pub enum SloState {
    /// Within budget and not burning fast.
    #[default]
    Healthy,
    /// Burning fast enough to open a ticket: the 1d and 2h rates over 3, or 3d and 6h over 1.
    Warning,
    /// No error budget left over the window.
    Exhausted,
    /// Burning fast enough to page: the 1h and 5m rates over 14.4, or 6h and 30m over 6.
    Critical,
}
