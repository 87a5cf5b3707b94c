//! `apipolicy-operator run`: the caches, the controller, leader election, the agent API and
//! the metrics endpoint, wired together and stopped in order on SIGTERM or Ctrl-C.

use std::{
    collections::HashMap,
    future::{Future, ready},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use apipolicy_api::ApiPolicy;
use futures::{StreamExt, channel::mpsc};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodStatus};
use kube::{
    Api, Client, ResourceExt,
    core::GroupVersionKind,
    runtime::{Controller, WatchStreamExt, reflector, watcher},
};
use tokio::sync::{oneshot, watch};

use crate::{
    agent::AgentApi,
    cli::RunArgs,
    context::{Context, Stores, key_of, system_clock},
    controller,
    error::{Error, Result},
    leader,
    metrics::{self, Metrics},
    render::MANAGED_BY_SELECTOR,
    serve::{self, Handler},
    tls::ServerTls,
};

/// Events a shared cache buffers for a slow subscriber before it waits.
const SUBSCRIBE_BUFFER: usize = 1024;
/// The operator's Service: the names its generated certificate is for.
const SERVICE: &str = "apipolicy-operator";
const RULES_CHECK: Duration = Duration::from_secs(300);
const TLS_RELOAD_CHECK: Duration = Duration::from_secs(30);

/// Resolves once shutdown began.
#[derive(Clone)]
struct Stopping(watch::Receiver<bool>);

impl Stopping {
    fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

fn on_signal() -> Stopping {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM can be handled");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    Stopping(rx)
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| SERVICE.to_owned());
    let suffix: String = std::iter::repeat_with(fastrand::lowercase).take(6).collect();
    format!("{host}-{suffix}")
}

/// Keeps only what the operator reads of a pod, so that caching every pod stays cheap.
fn slim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.spec = None;
    if let Some(s) = pod.status.as_mut() {
        *s = PodStatus {
            phase: s.phase.take(),
            conditions: s.conditions.take().map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect()),
            ..PodStatus::default()
        };
    }
}

fn log_watch_error<K>(what: &'static str) -> impl FnMut(&std::result::Result<K, watcher::Error>) {
    move |event| {
        if let Err(e) = event {
            tracing::warn!(error = %e, "watching {what} failed; retrying");
        }
    }
}

pub async fn run(args: RunArgs) -> Result<()> {
    if args.insecure_agent_api {
        let banner = "INSECURE: --insecure-agent-api serves the agent API over plain HTTP without checking \
                      tokens. Anyone who reaches it can read every policy's config and forge SLO reports. Use \
                      it for local development only.";
        eprintln!("\n*** {banner} ***\n");
        tracing::warn!("{banner}");
    }
    let client = Client::try_default().await.map_err(Error::Connect)?;
    let namespace = args.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let metrics = Arc::new(Metrics::new()?);
    let stopping = on_signal();

    let tls = if args.insecure_agent_api {
        None
    } else {
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => ServerTls::from_files(cert, key)?,
            _ => {
                let names = vec![
                    format!("{SERVICE}.{namespace}.svc"),
                    format!("{SERVICE}.{namespace}.svc.cluster.local"),
                    "localhost".to_owned(),
                ];
                let (tls, ca) = ServerTls::generate(&names)?;
                tracing::warn!(%ca, "no --tls-cert/--tls-key: the agent API serves a certificate from a CA made at start, which sidecars trust only when given this CA");
                tls
            }
        };
        Some(tls)
    };
    // Bind before anything else, so a taken port fails the start rather than a later task.
    let metrics_listener = serve::bind(args.metrics_addr).await?;
    let agent_listener = serve::bind(args.agent_addr).await?;

    let (election_stop, election_stopped) = oneshot::channel::<()>();
    let (leader, election) = leader::elect(client.clone(), &namespace, &identity, async move {
        let _ = election_stopped.await;
    })
    .await?;
    tracing::info!(%identity, %namespace, lease = leader::LEASE, "competing for leadership");

    let (policies, policy_writer) = reflector::store_shared::<ApiPolicy>(SUBSCRIBE_BUFFER);
    let (pods, pod_writer) = reflector::store_shared::<Pod>(SUBSCRIBE_BUFFER);
    let (config_maps, config_map_writer) = reflector::store_shared::<ConfigMap>(SUBSCRIBE_BUFFER);
    let policy_events = policy_writer.subscribe().expect("a shared store has subscribers");
    let pod_events = pod_writer.subscribe().expect("a shared store has subscribers");
    let config_map_events = config_map_writer.subscribe().expect("a shared store has subscribers");
    let stores = Stores { policies: policies.clone(), pods: pods.clone(), config_maps: config_maps.clone() };
    let (triggers, triggered) = mpsc::channel(SUBSCRIBE_BUFFER);
    let ctx = Arc::new(Context::new(
        client.clone(),
        stores,
        leader.clone(),
        metrics.clone(),
        &identity,
        triggers,
        system_clock(),
    ));

    let wc = watcher::Config::default();
    let policy_reflector = {
        let ctx = ctx.clone();
        let mut generations: HashMap<String, Option<i64>> = HashMap::new();
        watcher(Api::<ApiPolicy>::all(client.clone()), wc.clone())
            .default_backoff()
            .reflect_shared(policy_writer)
            .inspect(log_watch_error("ApiPolicies"))
            .for_each(move |event| {
                on_policy_event(&ctx, &mut generations, event);
                ready(())
            })
    };
    let pod_reflector = {
        let ctx = ctx.clone();
        watcher(Api::<Pod>::all(client.clone()), wc.clone())
            .default_backoff()
            .modify(slim_pod)
            .reflect_shared(pod_writer)
            .inspect(log_watch_error("pods"))
            .for_each(move |event| {
                if let Ok(watcher::Event::Delete(pod)) = event
                    && let Some(uid) = pod.uid()
                {
                    ctx.configs.forget_pod(&uid);
                }
                ready(())
            })
    };
    let config_map_reflector =
        watcher(Api::<ConfigMap>::all(client.clone()), wc.clone().labels(MANAGED_BY_SELECTOR))
            .default_backoff()
            .reflect_shared(config_map_writer)
            .inspect(log_watch_error("ConfigMaps"))
            .for_each(|_| ready(()));
    let mut background = vec![
        tokio::spawn(policy_reflector),
        tokio::spawn(pod_reflector),
        tokio::spawn(config_map_reflector),
        tokio::spawn(mark_ready(ctx.clone())),
        tokio::spawn(follow_leadership(ctx.clone())),
        tokio::spawn(discover_prometheus_rules(ctx.clone())),
    ];
    if let Some(tls) = &tls {
        background.push(tokio::spawn(reload_tls(tls.clone())));
    }

    let admin: Handler = {
        let (metrics, ready_flag) = (metrics.clone(), ctx.ready.clone());
        Arc::new(move |req| {
            let reply = metrics::admin(&metrics, &ready_flag, &req);
            Box::pin(async move { reply })
        })
    };
    let servers = [
        tokio::spawn(serve::serve(metrics_listener, None, admin, stopping.wait())),
        tokio::spawn(serve::serve(
            agent_listener,
            tls.as_ref().map(ServerTls::acceptor),
            AgentApi::new(ctx.clone(), args.insecure_agent_api).handler(),
            stopping.wait(),
        )),
    ];
    tracing::info!(agent = %args.agent_addr, metrics = %args.metrics_addr, tls = tls.is_some(), "serving");

    let mapper_store = policies.clone();
    Controller::for_shared_stream(policy_events, policies)
        .owns_shared_stream(config_map_events)
        .watches_shared_stream(pod_events, move |pod: Arc<Pod>| {
            controller::policies_for_pod(&mapper_store.state(), &pod)
        })
        .reconcile_on(triggered)
        .reconcile_all_on(leader.gained())
        .graceful_shutdown_on(stopping.wait())
        .run(controller::reconcile, controller::error_policy, ctx.clone())
        .for_each(|_| ready(()))
        .await;

    // In order: no more reconciles; save what the sidecars were told is saved; hand over.
    for server in servers {
        let _ = server.await;
    }
    controller::save_all_histories(&ctx).await;
    let _ = election_stop.send(());
    let _ = election.await;
    for task in background {
        task.abort();
    }
    Ok(())
}

/// Forgets deleted policies, and asks the other policies of a namespace to look again when a
/// policy comes, goes or changes its spec: their conflicts may have started or ended.
fn on_policy_event(
    ctx: &Context,
    generations: &mut HashMap<String, Option<i64>>,
    event: std::result::Result<watcher::Event<ApiPolicy>, watcher::Error>,
) {
    let (policy, gone) = match event {
        Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, false),
        Ok(watcher::Event::Delete(p)) => (p, true),
        _ => return,
    };
    let key = key_of(&policy);
    let uid = policy.uid().unwrap_or_default();
    if gone {
        generations.remove(&uid);
        ctx.forget(&key);
    } else if generations.insert(uid, policy.metadata.generation) == Some(policy.metadata.generation) {
        return;
    }
    for sibling in controller::siblings(&ctx.stores.policies.state(), &key) {
        ctx.trigger(&sibling);
    }
}

async fn mark_ready(ctx: Arc<Context>) {
    let s = &ctx.stores;
    let filled = futures::future::join3(
        s.policies.wait_until_ready(),
        s.pods.wait_until_ready(),
        s.config_maps.wait_until_ready(),
    )
    .await;
    if let (Ok(()), Ok(()), Ok(())) = filled {
        ctx.ready.store(true, Ordering::Release);
        tracing::info!("caches filled; ready");
    }
}

/// Tracks leadership: the gauge, and the SLO histories held in memory, which another replica
/// may have written meanwhile.
async fn follow_leadership(ctx: Arc<Context>) {
    let mut changes = std::pin::pin!(ctx.leader.changes());
    while let Some(leads) = changes.next().await {
        ctx.metrics.leader.set(i64::from(leads));
        ctx.budgets.clear();
    }
}

/// Looks for the PrometheusRule API now and then: the prometheus-operator may be installed
/// after the operator starts.
async fn discover_prometheus_rules(ctx: Arc<Context>) {
    let gvk = GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PrometheusRule");
    loop {
        let found = kube::discovery::pinned_kind(&ctx.client, &gvk)
            .await
            .ok()
            .map(|(resource, _)| Arc::new(resource));
        let had = ctx.prometheus_rules.load().is_some();
        if found.is_some() != had {
            tracing::info!(available = found.is_some(), "PrometheusRule API availability changed");
        }
        ctx.prometheus_rules.store(found);
        tokio::time::sleep(RULES_CHECK).await;
    }
}

async fn reload_tls(tls: ServerTls) {
    loop {
        tokio::time::sleep(TLS_RELOAD_CHECK).await;
        match tls.reload() {
            Ok(true) => tracing::info!("reloaded the agent API's certificate"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "the new certificate files are unusable; serving the previous ones")
            }
        }
    }
}
