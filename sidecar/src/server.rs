//! Starting, reloading and stopping the sidecar.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use apipolicy_api::{SidecarConfig, manifest::load_sidecar_config};
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

pub use crate::sidecar::Flags;
use crate::{
    agent::Agent,
    cache::{CacheMetrics, Store},
    metrics::Metrics,
    proxy::Proxy,
    runtime::{PolicyRuntime, ProcessState},
    sidecar::{Conns, Sidecar, apply_config, proxy_service},
    slo::Slos,
    upstream::Upstream,
};

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
            .map(|p| match p.position {
                Some(at) => format!(
                    "  line {}, column {}: {}: {}: {}",
                    at.line, at.column, p.document, p.path, p.message
                ),
                None => format!("  {}: {}: {}", p.document, p.path, p.message),
            })
            .collect::<Vec<_>>()
            .join("\n"),
    })?;
    Ok((text, config))
}

/// Loads the policy, binds both listeners and serves until [`Handle::shutdown`].
pub async fn start(flags: Flags) -> Result<Handle, StartError> {
    let (text, config) = read_config(&flags.policy)?;
    let upstream =
        flags.upstream.as_deref().map(Upstream::from_url).transpose().map_err(StartError::Upstream)?;
    let metrics = Metrics::new();
    let slos = Arc::new(Slos::new(metrics.clone(), flags.clock.clone()));
    let process = ProcessState {
        upstream,
        redis: flags.redis.clone(),
        metrics: metrics.clone(),
        access_log: flags.access_log,
        slos: slos.clone(),
        clock: flags.clock.clone(),
        store: Arc::new(Store::new(flags.cache_bytes, {
            let (bytes, entries, evictions, coalesced) = metrics.cache_store();
            CacheMetrics { bytes, entries, evictions, coalesced }
        })),
    };
    let active = PolicyRuntime::build(config, &process, None, flags.replicas)
        .map_err(|e| StartError::Invalid { path: flags.policy.clone(), problems: e.to_string() })?;
    metrics.set_revision(None, &active.config.revision);
    tracing::info!(revision = %active.config.revision, policy = %flags.policy.display(), "config loaded");

    let listener = TcpListener::bind(flags.listen)
        .await
        .map_err(|source| StartError::Listen { addr: flags.listen, source })?;
    let admin = TcpListener::bind(flags.admin)
        .await
        .map_err(|source| StartError::Listen { addr: flags.admin, source })?;
    let proxy_addr = listener.local_addr().expect("a bound listener has an address");
    let admin_addr = admin.local_addr().expect("a bound listener has an address");
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, upstream = %active.upstream.authority, "listening");

    let sidecar = Arc::new(Sidecar::new(Proxy::new(active), metrics, process, flags.clone()));
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
    let slo_task = tokio::spawn(sidecar.process.slos.clone().run());
    let agent_task = match &sidecar.flags.operator {
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
        let deadline = drain_started.map(|t| t + sidecar.flags.drain_delay);
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
                if open.get() >= i64::from(sidecar.flags.max_connections) {
                    sidecar.metrics.connections_refused.inc();
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                open.inc();
                // With a cache in the config, connections start in the cache-hit fast path;
                // without one, the fast path would only hand every request over.
                if sidecar.flags.hit_lane && sidecar.proxy.active.load().routes.iter().any(|r| r.cache.is_some()) {
                    let fast = crate::fast_path::serve(conns.clone(), stream, peer, graceful.watcher(), closing_rx.clone());
                    tokio::spawn(async move {
                        fast.await;
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
                sidecar.start_draining();
                tracing::info!(delay_ms = sidecar.flags.drain_delay.as_millis() as u64, "draining: /readyz now fails");
                drain_started = Some(tokio::time::Instant::now());
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => break,
        }
    }
    drop(listener);
    let in_flight = graceful.count();
    tracing::info!(connections = in_flight, "listener closed; waiting for requests in flight");
    // Idle fast-path connections close now; busy ones once their request is answered.
    let _ = closing.send(true);
    if tokio::time::timeout(sidecar.flags.shutdown_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            timeout_ms = sidecar.flags.shutdown_timeout.as_millis() as u64,
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
    let path = sidecar.flags.policy.clone();
    let mut tick = tokio::time::interval(sidecar.flags.reload_interval);
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
    let path = sidecar.flags.policy.display();
    let config = match load_sidecar_config(text) {
        Ok(c) => c,
        Err(problems) => {
            sidecar.metrics.config_reload_errors.inc();
            for p in &problems {
                let (line, column) = p.position.map_or((None, None), |at| (Some(at.line), Some(at.column)));
                tracing::warn!(path = %path, line, column, document = %p.document, field = %p.path, problem = %p.message, "policy refused; keeping the last good config");
            }
            return;
        }
    };
    let replicas = sidecar.proxy.active.load().replicas;
    apply_config(sidecar, config, replicas, &path.to_string());
}
