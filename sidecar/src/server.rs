//! Starting, reloading and stopping the sidecar.

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

use apipolicy_api::{SidecarConfig, manifest::load_sidecar_config};
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    agent::{Agent, AgentOptions},
    cache::{CacheMetrics, Store},
    metrics::Metrics,
    proxy::Proxy,
    slo::Slos,
    state::{Active, Settings},
    upstream::Upstream,
};

/// How to run the sidecar (the command line, less logging and threads).
#[derive(Clone, Debug)]
pub struct Options {
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
    pub operator: Option<AgentOptions>,
    /// The most bytes the response cache holds.
    pub cache_bytes: u64,
    /// Whether plain cache hits on HTTP/1.1 are answered by the lane ([`crate::lane`]).
    pub hit_lane: bool,
    /// What `/config` and `POST /purge` require (see [`crate::admin`]).
    pub admin_token: Option<String>,
    /// The most client connections open at once.
    pub max_connections: u32,
    /// How long a client connection may wait for a request head (idle keep-alive included).
    pub idle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read the policy file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the policy file {path} is invalid:\n{problems}")]
    Invalid { path: PathBuf, problems: String },
    #[error("{0}")]
    Upstream(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

/// What the listeners share.
pub struct Sidecar {
    pub proxy: Proxy,
    pub metrics: Metrics,
    draining: AtomicBool,
    pub settings: Settings,
    pub(crate) options: Options,
}

impl Sidecar {
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// A running sidecar.
pub struct Handle {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub sidecar: Arc<Sidecar>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Handle {
    /// Starts a graceful shutdown, as SIGTERM does.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the sidecar has stopped.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

fn read_config(path: &PathBuf) -> Result<(String, SidecarConfig), StartError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| StartError::Read { path: path.clone(), source })?;
    let config = load_sidecar_config(&text).map_err(|problems| StartError::Invalid {
        path: path.clone(),
        problems: problems
            .iter()
            .map(|p| format!("  {}: {}: {}", p.document, p.path, p.message))
            .collect::<Vec<_>>()
            .join("\n"),
    })?;
    Ok((text, config))
}

/// Loads the policy, binds both listeners and serves until [`Handle::shutdown`].
pub async fn start(options: Options) -> Result<Handle, StartError> {
    let (text, config) = read_config(&options.policy)?;
    let upstream =
        options.upstream.as_deref().map(Upstream::from_url).transpose().map_err(StartError::Upstream)?;
    let metrics = Metrics::new();
    let slos = Arc::new(Slos::new(metrics.clone()));
    let settings = Settings {
        upstream,
        redis: options.redis.clone(),
        metrics: metrics.clone(),
        access_log: options.access_log,
        slos: slos.clone(),
        store: Arc::new(Store::new(
            options.cache_bytes,
            CacheMetrics {
                bytes: metrics.cache_bytes.clone(),
                entries: metrics.cache_entries.clone(),
                evictions: metrics.cache_evictions.clone(),
                coalesced: metrics.cache_coalesced.clone(),
            },
        )),
    };
    let active = Active::build(config, &settings, None, options.replicas)
        .map_err(|e| StartError::Invalid { path: options.policy.clone(), problems: e.to_string() })?;
    metrics.set_revision(None, &active.config.revision);
    tracing::info!(revision = %active.config.revision, policy = %options.policy.display(), "config loaded");

    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|source| StartError::Listen { addr: options.listen, source })?;
    let admin = TcpListener::bind(options.admin)
        .await
        .map_err(|source| StartError::Listen { addr: options.admin, source })?;
    let proxy_addr = listener.local_addr().expect("a bound listener has an address");
    let admin_addr = admin.local_addr().expect("a bound listener has an address");
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, upstream = %active.upstream.authority, "listening");

    let sidecar = Arc::new(Sidecar {
        proxy: Proxy::new(active),
        metrics,
        draining: AtomicBool::new(false),
        settings,
        options: options.clone(),
    });
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run(sidecar.clone(), listener, admin, stopped, text));
    Ok(Handle { proxy_addr, admin_addr, sidecar, stop, task })
}

async fn run(
    sidecar: Arc<Sidecar>,
    listener: TcpListener,
    admin: TcpListener,
    mut stop: watch::Receiver<bool>,
    text: String,
) {
    let reload = tokio::spawn(watch_policy(sidecar.clone(), text));
    let sweep = tokio::spawn(sweep_limiters(sidecar.clone()));
    let slo_task = tokio::spawn(sidecar.settings.slos.clone().run());
    let agent_task = match &sidecar.options.operator {
        Some(o) => match Agent::new(o.clone()) {
            Ok(agent) => Some(tokio::spawn(Arc::new(agent).run(sidecar.clone()))),
            Err(e) => {
                tracing::error!(error = %e, "cannot talk to the operator; running on the policy file alone");
                None
            }
        },
        None => None,
    };
    let admin_task = tokio::spawn(serve_admin(sidecar.clone(), admin));

    let conns = Arc::new(Conns::new(sidecar.clone()));
    let graceful = GracefulShutdown::new();
    let (closing, closing_rx) = watch::channel(false);

    let mut drain_started: Option<tokio::time::Instant> = None;
    loop {
        let deadline = drain_started.map(|t| t + sidecar.options.drain_delay);
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let open = sidecar.metrics.connections.clone();
                // Past the cap a connection is closed at once: each costs memory (buffers,
                // a task), and a flood of idle ones must not take the pod down.
                if open.get() >= i64::from(sidecar.options.max_connections) {
                    sidecar.metrics.connections_refused.inc();
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                open.inc();
                // With a cache in the config, connections start in the cache-hit lane;
                // without one, the lane would only hand every request over.
                if sidecar.options.hit_lane && sidecar.proxy.active.load().routes.iter().any(|r| r.cache.is_some()) {
                    let lane = crate::lane::serve(conns.clone(), stream, peer, graceful.watcher(), closing_rx.clone());
                    tokio::spawn(async move {
                        lane.await;
                        open.dec();
                    });
                } else {
                    let service = proxy_service(sidecar.clone(), peer);
                    let conn = conns.auto.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        open.dec();
                    });
                }
            }
            _ = stop.changed(), if drain_started.is_none() => {
                sidecar.draining.store(true, Ordering::Relaxed);
                tracing::info!(delay_ms = sidecar.options.drain_delay.as_millis() as u64, "draining: /readyz now fails");
                drain_started = Some(tokio::time::Instant::now());
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => break,
        }
    }
    drop(listener);
    let in_flight = graceful.count();
    tracing::info!(connections = in_flight, "listener closed; waiting for requests in flight");
    // Idle lane connections close now; busy ones once their request is answered.
    let _ = closing.send(true);
    if tokio::time::timeout(sidecar.options.shutdown_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            timeout_ms = sidecar.options.shutdown_timeout.as_millis() as u64,
            "requests still in flight at the shutdown deadline were cut"
        );
    }
    reload.abort();
    sweep.abort();
    slo_task.abort();
    if let Some(t) = agent_task {
        t.abort();
    }
    admin_task.abort();
    tracing::info!("stopped");
}

/// How proxy connections are served: hyper's builders, shared by every connection.
pub struct Conns {
    pub sidecar: Arc<Sidecar>,
    /// For whole connections: HTTP/1.1 or HTTP/2, with upgrades.
    pub auto: auto::Builder<TokioExecutor>,
    /// For one request the cache-hit lane hands over ([`crate::lane`]); it gives the socket back.
    pub one: hyper::server::conn::http1::Builder,
    pub header_read_timeout: Duration,
}

impl Conns {
    fn new(sidecar: Arc<Sidecar>) -> Self {
        let header_read_timeout = sidecar.options.idle_timeout;
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1().timer(TokioTimer::new()).header_read_timeout(header_read_timeout).keep_alive(true);
        auto.http2().timer(TokioTimer::new()).max_concurrent_streams(1024);
        let mut one = hyper::server::conn::http1::Builder::new();
        one.timer(TokioTimer::new()).header_read_timeout(header_read_timeout).keep_alive(true);
        Self { sidecar, auto, one, header_read_timeout }
    }
}

/// The proxy as a hyper service for one client connection.
pub(crate) fn proxy_service(
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
        async move { Ok::<_, Infallible>(sc.proxy.handle(req, peer).await) }
    })
}

/// Forgets idle rate-limit keys every few seconds, so memory follows the keys in use.
async fn sweep_limiters(sidecar: Arc<Sidecar>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let active = sidecar.proxy.active.load_full();
        for limiter in active.routes.iter().filter_map(|r| r.limiter.as_ref()) {
            limiter.sweep();
        }
        active.client.sweep();
    }
}

async fn serve_admin(sidecar: Arc<Sidecar>, listener: TcpListener) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let sc = sidecar.clone();
        let service = service_fn(move |req| {
            let sc = sc.clone();
            async move { Ok::<_, Infallible>(crate::admin::handle(sc, req, peer).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        tokio::spawn(conn);
    }
}

/// Polls the policy file and swaps in each valid change. Polling, not inotify, because
/// Kubernetes updates ConfigMap volumes by swapping a symlink, which file watches miss.
async fn watch_policy(sidecar: Arc<Sidecar>, mut last_text: String) {
    let path = sidecar.options.policy.clone();
    let mut tick = tokio::time::interval(sidecar.options.reload_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                if !last_text.is_empty() {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the policy file; keeping the active config");
                    sidecar.metrics.config_reload_errors.inc();
                    last_text.clear();
                }
                continue;
            }
        };
        if text == last_text {
            continue;
        }
        last_text = text;
        apply(&sidecar, &last_text);
    }
}

fn apply(sidecar: &Sidecar, text: &str) {
    let path = sidecar.options.policy.display();
    let config = match load_sidecar_config(text) {
        Ok(c) => c,
        Err(problems) => {
            sidecar.metrics.config_reload_errors.inc();
            for p in &problems {
                tracing::warn!(path = %path, document = %p.document, field = %p.path, problem = %p.message, "policy refused; keeping the last good config");
            }
            return;
        }
    };
    let replicas = sidecar.proxy.active.load().replicas;
    apply_config(sidecar, config, replicas, &path.to_string());
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
    match Active::build(config, &sidecar.settings, Some(&current), replicas) {
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
