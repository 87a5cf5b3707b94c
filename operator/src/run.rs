//! `apipolicy-operator run`: the caches, the controller, leader election, the injection webhook,
//! the agent API, the certificates and the metrics endpoint, wired together and stopped in order
//! on SIGTERM or Ctrl-C.

use std::{
    collections::HashMap,
    future::{Future, ready},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use apipolicy_api::ApiPolicy;
use futures::{StreamExt, channel::mpsc};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodSpec, PodStatus};
use kube::{
    Api, Client, ResourceExt,
    core::GroupVersionKind,
    runtime::{Controller, WatchStreamExt, reflector, watcher},
};
use tokio::sync::{oneshot, watch};

use crate::{
    agent::{AgentApi, Forwarding},
    args::RunArgs,
    caches::Cache,
    certs::{self, Bundle, CertStore},
    context::{Clock, Context, Stores, key_of, system_clock},
    controller,
    error::{Error, Result},
    inject::InjectConfig,
    leader::{self, Candidate},
    metrics::{self, Metrics},
    render::MANAGED_BY_SELECTOR,
    serve::{self, Handler},
    tls::ServerTls,
    webhook::{self, FailurePolicy, Target, Webhook},
};

/// Events a shared cache buffers for a slow subscriber before it waits.
const SUBSCRIBE_BUFFER: usize = 1024;
/// The default identity's stem when the host has no name.
const SERVICE: &str = "apipolicy-operator";
const RULES_CHECK: Duration = Duration::from_secs(300);
const TLS_RELOAD_CHECK: Duration = Duration::from_secs(30);
/// After a failed certificate check, the next try comes sooner than the hourly one.
const CERT_RETRY: Duration = Duration::from_secs(60);

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

/// The bound ports: bound before any task starts, so that a taken port fails the start.
struct Listeners {
    metrics: tokio::net::TcpListener,
    agent: tokio::net::TcpListener,
    webhook: tokio::net::TcpListener,
}

/// Serves the metrics and probes (plain HTTP), the agent API and the injection webhook until
/// the operator stops.
fn serve_all(
    args: &RunArgs,
    ctx: &Arc<Context>,
    tls: &ServerTls,
    listeners: Listeners,
    inject_config: InjectConfig,
    forwarding: Forwarding,
    stopping: &Stopping,
) -> [tokio::task::JoinHandle<()>; 3] {
    let admin: Handler = {
        let (metrics, ready_flag) = (ctx.metrics.clone(), ctx.ready.clone());
        Arc::new(move |req| {
            let reply = metrics::admin(&metrics, &ready_flag, &req);
            Box::pin(async move { reply })
        })
    };
    let webhook = Webhook::new(
        ctx.stores.policies.clone(),
        ctx.caches.watch(),
        inject_config,
        Some(ctx.recorder.clone()),
        ctx.metrics.clone(),
    );
    [
        tokio::spawn(serve::serve(listeners.metrics, None, admin, stopping.wait())),
        tokio::spawn(serve::serve(
            listeners.agent,
            (!args.insecure_agent_api).then(|| tls.acceptor()),
            AgentApi::new(ctx.clone(), args.insecure_agent_api).with_forwarding(forwarding).handler(),
            stopping.wait(),
        )),
        tokio::spawn(serve::serve(
            listeners.webhook,
            Some(tls.acceptor()),
            webhook.handler(),
            stopping.wait(),
        )),
    ]
}

/// The three caches' watches, each feeding its shared store (and through it the controller and
/// the webhook) and telling the readiness tracker when it is filled.
fn reflectors(
    client: &Client,
    ctx: &Arc<Context>,
    policy_writer: reflector::store::Writer<ApiPolicy>,
    pod_writer: reflector::store::Writer<Pod>,
    config_map_writer: reflector::store::Writer<ConfigMap>,
) -> [tokio::task::JoinHandle<()>; 3] {
    let wc = watcher::Config::default();
    let policy_reflector = {
        let ctx = ctx.clone();
        let mut generations: HashMap<String, Option<i64>> = HashMap::new();
        watcher(Api::<ApiPolicy>::all(client.clone()), wc.clone())
            .default_backoff()
            .reflect_shared(policy_writer)
            .inspect(log_watch_error("ApiPolicies"))
            .for_each(move |event| {
                ctx.caches.see(Cache::Policies, &event);
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
                ctx.caches.see(Cache::Pods, &event);
                if let Ok(watcher::Event::Delete(pod)) = event
                    && let Some(uid) = pod.uid()
                {
                    ctx.configs.forget_pod(&uid);
                }
                ready(())
            })
    };
    let config_map_reflector = {
        let ctx = ctx.clone();
        watcher(Api::<ConfigMap>::all(client.clone()), wc.clone().labels(MANAGED_BY_SELECTOR))
            .default_backoff()
            .reflect_shared(config_map_writer)
            .inspect(log_watch_error("ConfigMaps"))
            .for_each(move |event| {
                ctx.caches.see(Cache::ConfigMaps, &event);
                ready(())
            })
    };
    [tokio::spawn(policy_reflector), tokio::spawn(pod_reflector), tokio::spawn(config_map_reflector)]
}

/// The certificate the webhook and the agent API serve, the CA it chains to (which the API
/// server's caBundle and the sidecars' ca.crt trust), and the Secret store when the operator
/// issues them itself.
async fn certificates(
    args: &RunArgs,
    client: &Client,
    namespace: &str,
    agent_url: &str,
    clock: &Clock,
) -> Result<(ServerTls, Option<String>, Option<CertStore>)> {
    Ok(match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => (ServerTls::from_files(cert, key)?, read_ca(args)?, None),
        _ => {
            let urls: Vec<&str> = args.webhook_url.iter().map(String::as_str).chain([agent_url]).collect();
            let store =
                CertStore::new(client.clone(), namespace, certs::names(&args.service_name, namespace, &urls));
            let (bundle, renewal) = store.ensure(clock()).await?;
            if let Some(why) = renewal {
                tracing::info!(why = ?why, secret = %format!("{namespace}/{}", certs::SECRET), "issued certificates");
            }
            (ServerTls::from_pem(&bundle.cert, &bundle.key)?, Some(bundle.ca_cert), Some(store))
        }
    })
}

/// Where the other replicas reach this one's agent API: --advertise-url, else POD_IP with the
/// agent port, else --agent-addr when it names one address.
fn advertise_url(args: &RunArgs) -> Option<String> {
    if let Some(url) = &args.advertise_url {
        return Some(url.clone());
    }
    let scheme = if args.insecure_agent_api { "http" } else { "https" };
    let port = args.agent_addr.port();
    let pod_ip = std::env::var("POD_IP").ok().and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
    let ip = pod_ip.or_else(|| (!args.agent_addr.ip().is_unspecified()).then(|| args.agent_addr.ip()))?;
    Some(format!("{scheme}://{}", std::net::SocketAddr::new(ip, port)))
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| SERVICE.to_owned());
    let suffix: String = std::iter::repeat_with(fastrand::lowercase).take(6).collect();
    format!("{host}-{suffix}")
}

/// Keeps only what the operator reads of a pod, so that caching every pod stays cheap: its
/// metadata, phase and readiness, and the containers' ports (to explain pods whose port the
/// injector cannot take over).
fn slim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.spec = pod.spec.take().map(|s| PodSpec {
        containers: s
            .containers
            .into_iter()
            .map(|c| Container { name: c.name, ports: c.ports, ..Container::default() })
            .collect(),
        host_network: s.host_network,
        ..PodSpec::default()
    });
    if let Some(s) = pod.status.as_mut() {
        *s = PodStatus {
            phase: s.phase.take(),
            conditions: s.conditions.take().map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect()),
            ..PodStatus::default()
        };
    }
}

/// Kubernetes routes a Service's named port to a native sidecar's port from 1.32 on
/// (kubernetes/kubernetes#127976); before, the port move needs a plain container.
pub fn routes_named_sidecar_ports(major: &str, minor: &str) -> bool {
    let number = |s: &str| s.trim_end_matches(|c: char| !c.is_ascii_digit()).parse::<u32>().ok();
    matches!((number(major), number(minor)), (Some(1), Some(m)) if m >= 32)
        || number(major).is_some_and(|m| m > 1)
}

/// The CA of --tls-cert: --tls-ca, else `ca.crt` beside the certificate when there is one.
fn read_ca(args: &RunArgs) -> Result<Option<String>> {
    let path = match (&args.tls_ca, &args.tls_cert) {
        (Some(ca), _) => ca.clone(),
        (None, Some(cert)) => {
            let beside = cert.with_file_name("ca.crt");
            if !beside.exists() {
                return Ok(None);
            }
            beside
        }
        (None, None) => return Ok(None),
    };
    std::fs::read_to_string(&path).map(Some).map_err(|source| Error::ReadFile { path, source })
}

/// What the webhook configuration is made of, so it can be written again with a new CA.
struct WebhookSetup {
    name: String,
    target: Target,
    failure: FailurePolicy,
    namespace: String,
}

impl WebhookSetup {
    async fn apply(&self, client: &Client, ca: &str) -> Result<()> {
        let config =
            webhook::configuration(&self.name, &self.target, Some(ca), self.failure, &self.namespace);
        webhook::apply_configuration(client, &config).await?;
        tracing::info!(name = %self.name, failure_policy = self.failure.as_str(), "applied the MutatingWebhookConfiguration");
        Ok(())
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
    let namespace = args
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|n| !n.is_empty()))
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let metrics = Arc::new(Metrics::new()?);
    let clock = system_clock();
    let stopping = on_signal();

    let agent_url = args.agent_url.clone().unwrap_or_else(|| {
        let scheme = if args.insecure_agent_api { "http" } else { "https" };
        format!("{scheme}://{}.{namespace}.svc:{}", args.service_name, args.agent_addr.port())
    });
    let (tls, ca, store) = certificates(&args, &client, &namespace, &agent_url, &clock).await?;
    note_expiry(&metrics, &tls);
    warn_without_ca(&args, ca.as_deref());
    let setup = WebhookSetup {
        name: args.webhook_configuration.clone(),
        target: match &args.webhook_url {
            Some(url) => Target::Url(url.clone()),
            None => Target::Service {
                namespace: namespace.clone(),
                name: args.service_name.clone(),
                port: args.webhook_service_port,
            },
        },
        failure: args.failure_policy,
        namespace: namespace.clone(),
    };
    if args.manage_webhook {
        let Some(ca) = ca.as_deref() else {
            return Err(Error::Configuration(
                "--manage-webhook writes the CA into the webhook configuration, but the CA of --tls-cert is \
                 unknown: give --tls-ca, or drop --tls-cert so that the operator makes its own"
                    .into(),
            ));
        };
        setup.apply(&client, ca).await?;
    }

    let native_sidecar = args.native_sidecar && native_sidecars_route(&client).await;
    let inject_config = InjectConfig {
        image: args.sidecar_image.clone(),
        native_sidecar,
        // Without the CA an https:// agent API cannot be trusted; the sidecars then run from the
        // ConfigMap alone.
        operator_url: (args.insecure_agent_api || ca.is_some()).then(|| agent_url.clone()),
        ca: ca.is_some(),
        resources: args.sidecar_resources(),
    };
    tracing::info!(image = %inject_config.image, native_sidecar, operator = inject_config.operator_url.as_deref(), "injection settings");

    // Bind before any task starts, so a taken port fails the start rather than a later task.
    let metrics_listener = serve::bind(args.metrics_addr).await?;
    let agent_listener = serve::bind(args.agent_addr).await?;
    let webhook_listener = serve::bind(args.webhook_addr).await?;

    let (election_stop, election_stopped) = oneshot::channel::<()>();
    let candidate = Candidate { identity: identity.clone(), agent_url: advertise_url(&args) };
    tracing::info!(%identity, %namespace, lease = leader::LEASE, agent_url = candidate.agent_url.as_deref(), "competing for leadership");
    let (leader, election) =
        leader::elect(client.clone(), &namespace, candidate, leader::Timing::default(), async move {
            let _ = election_stopped.await;
        });

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
        clock.clone(),
    ));
    ctx.ca.store(ca.map(Arc::new));

    let [policy_reflector, pod_reflector, config_map_reflector] =
        reflectors(&client, &ctx, policy_writer, pod_writer, config_map_writer);
    let mut background = vec![
        policy_reflector,
        pod_reflector,
        config_map_reflector,
        tokio::spawn(mark_ready(ctx.clone())),
        tokio::spawn(follow_leadership(ctx.clone())),
        tokio::spawn(discover_prometheus_rules(ctx.clone())),
    ];
    background.push(match store {
        Some(store) => tokio::spawn(rotate_certificates(
            ctx.clone(),
            store,
            tls.clone(),
            clock,
            args.manage_webhook.then_some(setup),
        )),
        None => tokio::spawn(reload_tls(
            ctx.clone(),
            tls.clone(),
            args.clone(),
            args.manage_webhook.then_some(setup),
        )),
    });

    let listeners = Listeners { metrics: metrics_listener, agent: agent_listener, webhook: webhook_listener };
    let forwarding = Forwarding {
        identity: identity.clone(),
        tls_name: agent_url.parse::<http::Uri>().ok().and_then(|u| u.host().map(str::to_owned)),
    };
    let servers = serve_all(&args, &ctx, &tls, listeners, inject_config, forwarding, &stopping);
    tracing::info!(webhook = %args.webhook_addr, agent = %args.agent_addr, metrics = %args.metrics_addr, agent_tls = !args.insecure_agent_api, "serving");

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

/// How long the caches may take to fill before the operator says, loudly and again every so
/// often, which ones are not: an operator that silently does nothing is the worst failure.
const NOT_READY_WARNING: Duration = Duration::from_secs(10);

/// Marks the operator ready once every cache is filled; until then `/readyz` fails, and past
/// [`NOT_READY_WARNING`] each period logs an error naming the caches still empty and the
/// metrics say how long it has been.
async fn mark_ready(ctx: Arc<Context>) {
    let started = tokio::time::Instant::now();
    let mut filled = ctx.caches.watch();
    let mut tick = tokio::time::interval_at(started + NOT_READY_WARNING, NOT_READY_WARNING);
    loop {
        tokio::select! {
            done = filled.wait_for(|f| f.all()) => {
                if done.is_ok() {
                    ctx.ready.store(true, Ordering::Release);
                    ctx.metrics.ready.set(1);
                    ctx.metrics.not_ready_seconds.set(0);
                    tracing::info!(after_ms = started.elapsed().as_millis() as u64, "caches filled; ready");
                }
                return;
            }
            _ = tick.tick() => {
                let waited = started.elapsed().as_secs();
                ctx.metrics.not_ready_seconds.set(waited as i64);
                let not_filled = ctx.caches.now().missing();
                tracing::error!(waited_s = waited, not_filled = %not_filled.join(", "), "the caches are still not filled: the operator reconciles nothing and /readyz fails");
            }
        }
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

fn note_expiry(metrics: &Metrics, tls: &ServerTls) {
    if let Some(ms) = certs::der_not_after_ms(&tls.leaf()) {
        metrics.certificate_expiry.set((ms / 1000) as i64);
    }
}

fn warn_without_ca(args: &RunArgs, ca: Option<&str>) {
    if ca.is_none() && !args.insecure_agent_api {
        tracing::warn!(
            "the CA of --tls-cert is unknown (no --tls-ca, no ca.crt beside it): injected sidecars are not given \
             the agent API and run from their ConfigMap alone"
        );
    }
}

/// Whether to inject native sidecars as asked: the API server's version says whether the port
/// move works with them.
async fn native_sidecars_route(client: &Client) -> bool {
    match client.apiserver_version().await {
        Ok(v) if routes_named_sidecar_ports(&v.major, &v.minor) => true,
        Ok(v) => {
            tracing::warn!(
                version = %format!("{}.{}", v.major, v.minor),
                "this cluster does not route a Service's named port to a native sidecar (Kubernetes 1.32 does); \
                 injecting the sidecar as a plain container"
            );
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "the API server's version is unknown; injecting native sidecars as asked");
            true
        }
    }
}

/// Tells every policy to write its ConfigMap again: the CA in it changed.
fn spread_ca(ctx: &Context, ca: String) {
    ctx.ca.store(Some(Arc::new(ca)));
    for policy in ctx.stores.policies.state() {
        ctx.trigger(&key_of(&policy));
    }
}

/// The operator's own certificates: renewed well before expiry and swapped into the running
/// servers; a new CA goes to the webhook configuration and the sidecars' ConfigMaps.
async fn rotate_certificates(
    ctx: Arc<Context>,
    store: CertStore,
    tls: ServerTls,
    clock: Clock,
    webhook: Option<WebhookSetup>,
) {
    let mut written_ca = ctx.ca.load_full().map(|ca| (*ca).clone());
    loop {
        let wait = match rotate_once(&ctx, &store, &tls, &clock).await {
            Ok(bundle) => {
                if written_ca.as_deref() != Some(bundle.ca_cert.as_str()) {
                    tracing::warn!(
                        "the CA changed; updating the webhook configuration and every policy's ConfigMap"
                    );
                    spread_ca(&ctx, bundle.ca_cert.clone());
                    let applied = match &webhook {
                        Some(w) => w.apply(&ctx.client, &bundle.ca_cert).await,
                        None => Ok(()),
                    };
                    match applied {
                        Ok(()) => written_ca = Some(bundle.ca_cert),
                        Err(e) => {
                            tracing::error!(error = %e, "updating the webhook configuration failed; retrying")
                        }
                    }
                }
                if written_ca.is_some() { certs::CHECK_INTERVAL } else { CERT_RETRY }
            }
            Err(e) => {
                tracing::error!(error = %e, "checking the certificates failed; serving the current ones");
                CERT_RETRY
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn rotate_once(ctx: &Context, store: &CertStore, tls: &ServerTls, clock: &Clock) -> Result<Bundle> {
    let (bundle, renewal) = store.ensure(clock()).await?;
    if let Some(why) = renewal {
        tracing::info!(why = ?why, "renewed the certificates");
    }
    if tls.serve_pem(&bundle.cert, &bundle.key)? {
        tracing::info!("serving the renewed certificate");
        note_expiry(&ctx.metrics, tls);
    }
    Ok(bundle)
}

/// Certificates from files (cert-manager): reloaded when the files change, and a new CA passed
/// on to the sidecars and, when the operator keeps it, the webhook configuration.
async fn reload_tls(ctx: Arc<Context>, tls: ServerTls, args: RunArgs, webhook: Option<WebhookSetup>) {
    loop {
        tokio::time::sleep(TLS_RELOAD_CHECK).await;
        match tls.reload() {
            Ok(true) => {
                tracing::info!("reloaded the certificate");
                note_expiry(&ctx.metrics, &tls);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "the new certificate files are unusable; serving the previous ones")
            }
        }
        match read_ca(&args) {
            Ok(Some(ca)) if ctx.ca.load().as_deref() != Some(&ca) => {
                tracing::info!("the CA file changed; passing the new CA on");
                if let Some(w) = &webhook
                    && let Err(e) = w.apply(&ctx.client, &ca).await
                {
                    // The CA is compared again at the next check, and this retried.
                    tracing::error!(error = %e, "updating the webhook configuration failed; retrying");
                    continue;
                }
                spread_ca(&ctx, ca);
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "the CA file is unreadable; keeping the previous CA"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_sidecars_get_named_ports_from_1_32() {
        for (major, minor, expected) in [
            ("1", "28", false),
            ("1", "31+", false),
            ("1", "32", true),
            ("1", "33+", true),
            ("2", "0", true),
            ("", "", false),
        ] {
            assert_eq!(routes_named_sidecar_ports(major, minor), expected, "{major}.{minor}");
        }
    }

    #[test]
    fn slim_pods_keep_ports_and_drop_the_rest() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "managedFields": [{"manager": "kubectl"}]},
            "spec": {"hostNetwork": true, "containers": [{"name": "app", "image": "web:1", "env": [{"name": "A", "value": "1"}],
                     "ports": [{"name": "http", "containerPort": 8080}]}], "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [
                {"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}]},
        }))
        .unwrap();
        slim_pod(&mut pod);
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.host_network, Some(true));
        assert!(spec.volumes.is_none());
        let c = &spec.containers[0];
        assert_eq!((c.name.as_str(), c.image.as_deref(), c.env.as_ref()), ("app", None, None));
        assert_eq!(c.ports.as_ref().unwrap()[0].name.as_deref(), Some("http"));
        let status = pod.status.as_ref().unwrap();
        assert_eq!((status.pod_ip.as_deref(), status.conditions.as_ref().unwrap().len()), (None, 1));
        assert!(pod.metadata.managed_fields.is_none());
    }
}
