//! The running sidecar as its parts share it: the proxy with the active config, the metrics,
//! what outlives a config (caches, SLO histories), the flags it was started with, and how a
//! new config is swapped in.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use apipolicy_api::{SidecarConfig, contract::env};
use clap::Args;
use http::Uri;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioTimer},
    server::conn::auto,
};

use crate::{
    clock::Clock,
    metrics::Metrics,
    proxy::Proxy,
    runtime::{PolicyRuntime, ProcessState},
};

/// How to run the sidecar (the command line, less logging and threads).
#[derive(Clone, Debug)]
pub struct Flags {
    pub policy: PathBuf,
    pub upstream: Option<String>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub reload_interval: Duration,
    /// After a stop signal, how long to keep accepting while `/readyz` fails, so that load
    /// balancers stop sending new requests first.
    pub drain_delay: Duration,
    /// How long requests in flight may take to finish after the listener closes.
    pub shutdown_timeout: Duration,
    pub access_log: bool,
    /// Ready replicas of the policy's pods, which `scope: Replicas` limits divide by.
    pub replicas: u32,
    /// Redis for `scope: Global` limits, over `spec.redis.url`; several comma-separated URLs
    /// are the seed nodes of a Redis Cluster.
    pub redis: Option<String>,
    /// The operator's agent API, for config updates and SLO reports.
    pub operator: Option<AgentFlags>,
    /// The most bytes the response cache holds.
    pub cache_bytes: u64,
    /// Whether plain cache hits on HTTP/1.1 are answered by the fast path ([`crate::fast_path`]).
    pub hit_lane: bool,
    /// What `/config` and `POST /purge` require (see [`crate::admin`]).
    pub admin_token: Option<String>,
    /// The most client connections open at once.
    pub max_connections: u32,
    /// How long a client connection may wait for a request head (idle keep-alive included).
    pub idle_timeout: Duration,
    /// The clock of limits, cache freshness and SLO windows (tests move it).
    pub clock: Clock,
}

#[derive(Clone, Debug)]
pub struct AgentFlags {
    /// `https://host:port` (or `http://` for an operator run with `--insecure-agent-api`).
    pub url: Uri,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// This pod's name, for reports.
    pub pod: String,
    pub report_interval: Duration,
}

/// What the listeners share.
pub struct Sidecar {
    pub proxy: Proxy,
    pub metrics: Metrics,
    draining: AtomicBool,
    pub process: ProcessState,
    pub(crate) flags: Flags,
}

impl Sidecar {
    pub fn new(proxy: Proxy, metrics: Metrics, process: ProcessState, flags: Flags) -> Self {
        Self { proxy, metrics, draining: AtomicBool::new(false), process, flags }
    }

    /// From now on `/readyz` fails.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// How proxy connections are served: hyper's builders, shared by every connection.
pub struct Conns {
    pub sidecar: Arc<Sidecar>,
    /// For whole connections: HTTP/1.1 or HTTP/2, with upgrades.
    pub auto: auto::Builder<TokioExecutor>,
    /// For one request the cache-hit fast path hands over ([`crate::fast_path`]); it gives the socket back.
    pub one: hyper::server::conn::http1::Builder,
    pub header_read_timeout: Duration,
}

impl Conns {
    pub fn new(sidecar: Arc<Sidecar>) -> Self {
        let header_read_timeout = sidecar.flags.idle_timeout;
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout).keep_alive(true);
        auto.http2().timer(TokioTimer::new()).max_concurrent_streams(1024);
        let mut one = hyper::server::conn::http1::Builder::new();
        one.timer(TokioTimer::new()).header_read_timeout(header_read_timeout).keep_alive(true);
        Self { sidecar, auto, one, header_read_timeout }
    }
}

/// The proxy as a hyper service for one client connection.
pub fn proxy_service(
    sidecar: Arc<Sidecar>,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<crate::body::ProxyBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<hyper::Response<crate::body::ProxyBody>, Infallible>> + Send + 'static,
> + Clone
+ Send
+ 'static {
    service_fn(move |req| {
        let sc = sidecar.clone();
        let req = Box::new(req);
        async move { Ok::<_, Infallible>(sc.proxy.handle(req, peer).await) }
    })
}

/// Swaps in `config` (from the policy file or the operator) unless it is what runs already.
pub fn apply_config(sidecar: &Sidecar, config: SidecarConfig, replicas: u32, source: &str) {
    let current = sidecar.proxy.active.load_full();
    if config.revision == current.config.revision && replicas == current.replicas {
        return;
    }
    if config.revision != SidecarConfig::revision_of(&config.spec) {
        sidecar.metrics.config_reload_errors.inc();
        tracing::warn!(source, revision = %config.revision, "config refused: its revision does not match its content");
        return;
    }
    match PolicyRuntime::build(config, &sidecar.process, Some(&current), replicas) {
        Ok(active) => {
            let revision = active.config.revision.clone();
            sidecar.proxy.active.store(Arc::new(active));
            sidecar.metrics.set_revision(Some(&current.config.revision), &revision);
            tracing::info!(source, from = %current.config.revision, to = %revision, replicas, "config applied");
        }
        Err(e) => {
            sidecar.metrics.config_reload_errors.inc();
            tracing::warn!(source, error = %e, "config refused; keeping the last good one");
        }
    }
}

/// The flags that tune a sidecar, shared by the sidecar and `demo`.
#[derive(Args, Debug, Clone)]
pub struct Tuning {
    /// How often the policy file is checked for changes.
    #[arg(long, env = "APIPOLICY_RELOAD_INTERVAL", default_value = "1s", value_parser = duration)]
    pub reload_interval: Duration,
    /// After SIGTERM, how long to go on accepting while `/readyz` fails.
    #[arg(long, env = env::DRAIN_DELAY, default_value = "0s", value_parser = duration)]
    pub drain_delay: Duration,
    /// After the listener closes, how long requests in flight may take to finish.
    #[arg(long, env = "APIPOLICY_SHUTDOWN_TIMEOUT", default_value = "25s", value_parser = duration)]
    pub shutdown_timeout: Duration,
    /// Write a JSON access log line per request to stdout.
    #[arg(long, env = "APIPOLICY_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,
    /// Answer plain cache hits on HTTP/1.1 connections from the parsed request bytes (the
    /// cache-hit fast path); `false` sends every request through hyper.
    #[arg(long, env = "APIPOLICY_HIT_LANE", default_value_t = true, action = clap::ArgAction::Set)]
    pub hit_lane: bool,
    /// The most the response cache holds (a Kubernetes quantity: 64Mi, 1Gi).
    #[arg(long, env = "APIPOLICY_CACHE_SIZE", default_value = "64Mi", value_parser = size)]
    pub cache_size: u64,
    /// Ready replicas of the policy's pods, which `scope: Replicas` limits divide by (in a
    /// cluster the operator sends it; this is for local mode).
    #[arg(long, env = "APIPOLICY_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub replicas: u32,
    /// A bearer token that `/config` and `POST /purge` on the admin listener require from
    /// every peer; without one they answer loopback peers only.
    #[arg(long, env = "APIPOLICY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The most client connections open at once; past it new ones are closed at once (and
    /// counted in `apipolicy_connections_refused_total`).
    #[arg(long, env = "APIPOLICY_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// How long a client connection may stay idle (no request head arriving) before it is
    /// closed; also the time a request head may take to arrive whole.
    #[arg(long, env = "APIPOLICY_IDLE_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub idle_timeout: Duration,
}

impl Tuning {
    pub fn flags(
        &self,
        policy: PathBuf,
        upstream: Option<String>,
        listen: SocketAddr,
        admin: SocketAddr,
    ) -> Flags {
        Flags {
            policy,
            upstream,
            listen,
            admin,
            reload_interval: self.reload_interval,
            drain_delay: self.drain_delay,
            shutdown_timeout: self.shutdown_timeout,
            access_log: self.access_log,
            hit_lane: self.hit_lane,
            replicas: self.replicas,
            redis: None,
            operator: None,
            cache_bytes: self.cache_size,
            admin_token: self.admin_token.clone(),
            max_connections: self.max_connections,
            idle_timeout: self.idle_timeout,
            clock: crate::clock::Clock::default(),
        }
    }
}

/// A size flag (`64Mi`).
pub fn size(s: &str) -> Result<u64, String> {
    s.parse::<apipolicy_api::ByteSize>().map(|q| q.bytes()).map_err(|e| e.to_string())
}

/// A duration flag (`10s`).
pub fn duration(s: &str) -> Result<Duration, String> {
    s.parse::<apipolicy_api::Duration>().map(|d| d.as_std()).map_err(|e| e.to_string())
}
