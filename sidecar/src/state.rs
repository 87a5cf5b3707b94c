//! The active configuration: everything a request needs, built once per config revision and
//! swapped atomically on reload (requests in flight keep the snapshot they started with).

use std::time::Duration;

use apipolicy_api::SidecarConfig;
use http::uri::{Authority, Scheme};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use prometheus::IntGauge;

use crate::{
    body::UpstreamBody,
    metrics::{Metrics, RouteMetrics},
    routes::{Router, RouterError},
};

pub type UpstreamClient = Client<HttpConnector, UpstreamBody>;

pub struct Active {
    pub config: SidecarConfig,
    pub router: Router,
    pub routes: Vec<RouteRuntime>,
    pub upstream: Upstream,
    pub client: UpstreamClient,
    pub in_flight: IntGauge,
    pub access_log: bool,
}

pub struct RouteRuntime {
    pub timeout: Duration,
    pub max_body: Option<u64>,
    pub metrics: RouteMetrics,
}

/// Where requests go: `--upstream`, or the policy's port on the pod's loopback address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl Upstream {
    pub fn from_url(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("--upstream {url:?} is not a URL: {e}"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(format!(
                "--upstream {url:?} must be an http:// URL (the app is on the pod's network)"
            ));
        }
        if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
            return Err(format!("--upstream {url:?} must be scheme://host:port only, without a path"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| format!("--upstream {url:?} has no host"))?;
        Ok(Self { scheme: Scheme::HTTP, authority })
    }

    pub fn loopback(port: u16) -> Self {
        Self {
            scheme: Scheme::HTTP,
            authority: format!("127.0.0.1:{port}").parse().expect("a loopback authority is valid"),
        }
    }

    /// `host:port` for TCP health probes.
    pub fn address(&self) -> String {
        let port = self.authority.port_u16().unwrap_or(80);
        format!("{}:{port}", self.authority.host())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Router(#[from] RouterError),
}

impl Active {
    /// Builds the runtime form of `config`. The upstream client (and its pool of keep-alive
    /// connections) is taken over from `previous` when its settings did not change.
    pub fn build(
        config: SidecarConfig,
        upstream_override: Option<&Upstream>,
        metrics: &Metrics,
        previous: Option<&Active>,
        access_log: bool,
    ) -> Result<Self, BuildError> {
        let router = Router::new(&config.spec)?;
        let routes = config
            .spec
            .routes
            .iter()
            .map(|r| RouteRuntime {
                timeout: Duration::from_millis(r.timeout_ms),
                max_body: r.max_request_body,
                metrics: metrics.route(&r.name),
            })
            .collect();
        let upstream =
            upstream_override.cloned().unwrap_or_else(|| Upstream::loopback(config.spec.upstream.port));
        let client = match previous {
            Some(p)
                if p.config.spec.upstream.connect_timeout_ms == config.spec.upstream.connect_timeout_ms
                    && p.config.spec.upstream.idle_timeout_ms == config.spec.upstream.idle_timeout_ms =>
            {
                p.client.clone()
            }
            _ => client(&config),
        };
        Ok(Self {
            config,
            router,
            routes,
            upstream,
            client,
            in_flight: metrics.in_flight.clone(),
            access_log,
        })
    }
}

fn client(config: &SidecarConfig) -> UpstreamClient {
    let up = &config.spec.upstream;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_millis(up.connect_timeout_ms)));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_millis(up.idle_timeout_ms))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        // The app is on loopback: keep enough idle connections for bursts of concurrency.
        .pool_max_idle_per_host(1024)
        .set_host(false)
        .build(connector)
}

/// Policy features this build accepts but does not enforce yet, named so nobody relies on them
/// unknowingly: `(feature, route)` pairs.
pub fn unenforced(config: &SidecarConfig) -> Vec<(&'static str, &str)> {
    let mut out = Vec::new();
    for r in &config.spec.routes {
        for (feature, set) in [
            ("cache", r.cache.is_some()),
            ("rateLimit", r.rate_limit.is_some()),
            ("compression", r.compression.is_some()),
            ("concurrencyLimit", r.max_in_flight.is_some()),
        ] {
            if set {
                out.push((feature, r.name.as_str()));
            }
        }
    }
    if !config.spec.slos.is_empty() {
        out.push(("slos", "*"));
    }
    if config.spec.health_checks.upstream.is_some() || !config.spec.health_checks.dependencies.is_empty() {
        out.push(("healthChecks", "*"));
    }
    out
}
