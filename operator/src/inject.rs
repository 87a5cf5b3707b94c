//! Sidecar injection: which pods get the sidecar, and the JSON patch that gives it to them.
//! Pure: the webhook hands in the pod under admission and the policies of its cache and answers
//! with what comes out; the controller uses [`upstream_port`] to explain the pods it cannot take
//! over.
//!
//! The sidecar takes over the app's traffic without any change to the Service: the app
//! container's port that `spec.upstream.port` names is renamed (`http` → `app-http`) and the
//! sidecar declares the original name on its own port, so a Service whose `targetPort` is that
//! name reaches the sidecar, which forwards to the app on the pod's loopback address.

use apipolicy_api::contract::{
    CPU_LIMIT_ANNOTATION, CPU_REQUEST_ANNOTATION, INJECT_ANNOTATION, INJECTED_REVISION_ANNOTATION,
    MEMORY_LIMIT_ANNOTATION, MEMORY_REQUEST_ANNOTATION, POLICY_ANNOTATION, PROXY_PORT_ANNOTATION,
    TOKEN_AUDIENCE, env as vars,
};
use std::collections::{BTreeMap, BTreeSet};

use apipolicy_api::ApiPolicy;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation, jsonptr::PointerBuf};
use k8s_openapi::{
    api::core::v1::{
        Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
        ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
        SecretKeySelector, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
        VolumeProjection,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::{
    conflict::governing,
    render::{CA_KEY, CONFIG_KEY, config_map_name},
};

/// The sidecar container's name, by which an injected pod is recognised.
pub const SIDECAR: &str = "apipolicy-sidecar";

/// Where the sidecar listens for the app's clients, unless the pod says otherwise.
pub const DEFAULT_PROXY_PORT: u16 = 15080;
/// The sidecar's admin listener (probes, `/metrics`); the PodMonitor scrapes it by name.
pub const ADMIN_PORT: u16 = 15090;
pub const ADMIN_PORT_NAME: &str = "apipolicy-admin";
pub const CONFIG_VOLUME: &str = "apipolicy-config";
pub const TOKEN_VOLUME: &str = "apipolicy-token";
const CONFIG_DIR: &str = "/etc/apipolicy";
const TOKEN_DIR: &str = "/var/run/secrets/apipolicy.dev";
const TOKEN_FILE: &str = "token";
const TOKEN_SECONDS: i64 = 3600;
/// Long enough for endpoints to drop the pod before the sidecar stops accepting.
const DRAIN_DELAY: &str = "5s";
const DEFAULT_THREADS: usize = 2;
/// The image's non-root user (distroless `nonroot`).
const SIDECAR_UID: i64 = 65532;
/// Kubernetes caps port names (IANA service names) at 15 characters.
const MAX_PORT_NAME: usize = 15;

/// The sidecar's resources; `None` leaves the field unset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

impl Resources {
    /// The chart's defaults: a small request, a memory limit, no CPU limit (throttling a proxy
    /// hurts every request of the pod).
    pub fn defaults() -> Self {
        Self {
            cpu_request: Some("50m".into()),
            memory_request: Some("32Mi".into()),
            cpu_limit: None,
            memory_limit: Some("128Mi".into()),
        }
    }
}

/// What the operator's flags decide about every injection.
#[derive(Clone, Debug)]
pub struct InjectConfig {
    pub image: String,
    /// An init container with `restartPolicy: Always`, which starts before the app and stops
    /// after it; else a plain container, for clusters that lack native sidecars.
    pub native_sidecar: bool,
    /// The agent API as sidecars reach it; without it they run from the ConfigMap alone.
    pub operator_url: Option<String>,
    /// Whether the policies' ConfigMaps carry `ca.crt`, the CA of the agent API's certificate.
    pub ca: bool,
    pub resources: Resources,
}

impl InjectConfig {
    pub fn new(image: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            native_sidecar: true,
            operator_url: None,
            ca: false,
            resources: Resources::defaults(),
        }
    }
}

/// The image of this very release.
pub fn default_image() -> String {
    format!("ghcr.io/apipolicy/apipolicy:{}", env!("CARGO_PKG_VERSION"))
}

/// Why a pod that a policy selects cannot get the sidecar. Each says what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The app declares the upstream port without a name, so no Service can name it.
    PortUnnamed { container: String, port: u16 },
    /// No container declares the upstream port.
    PortNotDeclared { port: u16 },
    /// A container already uses a port the sidecar needs.
    PortTaken { container: String, port: u16 },
    /// The pod already has a volume by the name the sidecar's needs.
    VolumeTaken { volume: String },
    /// The policy never compiled: there is no config to mount.
    NoConfig,
}

impl Problem {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::PortUnnamed { .. } => "PortUnnamed",
            Self::PortNotDeclared { .. } => "PortNotDeclared",
            Self::PortTaken { .. } => "PortTaken",
            Self::VolumeTaken { .. } => "VolumeTaken",
            Self::NoConfig => "NoConfig",
        }
    }

    /// What is wrong and what to change, for an admission warning, an event and a condition.
    pub fn message(&self, policy: &str) -> String {
        match self {
            Self::PortUnnamed { container, port } => format!(
                "ApiPolicy {policy}: container {container} declares port {port} without a name, so the sidecar \
                 cannot take it over; name it (e.g. http), set the Service's targetPort to that name, recreate the pods"
            ),
            Self::PortNotDeclared { port } => format!(
                "ApiPolicy {policy}: no container declares port {port} (spec.upstream.port); declare it with a \
                 name (e.g. http), set the Service's targetPort to that name, recreate the pods"
            ),
            Self::PortTaken { container, port } => format!(
                "ApiPolicy {policy}: container {container} uses port {port}, which the sidecar needs; choose \
                 another proxy port with the annotation {PROXY_PORT_ANNOTATION} (the admin port is {ADMIN_PORT})"
            ),
            Self::VolumeTaken { volume } => format!(
                "ApiPolicy {policy}: the pod already has a volume named {volume}, which the sidecar needs; rename it"
            ),
            Self::NoConfig => format!(
                "ApiPolicy {policy} has no valid config yet, so no sidecar was added; see its Accepted condition"
            ),
        }
    }
}

/// Why a pod is left as it is, with nothing to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Not a pod being created: the webhook is asked about nothing else.
    NotCreate,
    OptedOut,
    HostNetwork,
    AlreadyInjected,
    NoPolicy,
}

impl Skip {
    /// A bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotCreate => "not_create",
            Self::OptedOut => "opted_out",
            Self::HostNetwork => "host_network",
            Self::AlreadyInjected => "already_injected",
            Self::NoPolicy => "no_policy",
        }
    }
}

/// The patch that injects the sidecar, and what the user should know about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injection {
    pub patch: Patch,
    /// Annotations that were ignored or adjusted, said in a sentence each.
    pub warnings: Vec<String>,
}

/// What the webhook does with a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected {
        policy: String,
        injection: Injection,
    },
    Skipped(Skip),
    /// A policy selects the pod but the sidecar cannot be added: the pod is admitted unchanged
    /// and the problem reported.
    Refused {
        policy: String,
        problem: Problem,
    },
}

/// Decides for a pod being created in `namespace`: the oldest policy of the namespace that
/// selects it (as the controller decides) governs it.
pub fn admit<'a>(
    pod: &Pod,
    namespace: &str,
    policies: impl IntoIterator<Item = &'a ApiPolicy>,
    cfg: &InjectConfig,
) -> Outcome {
    if let Some(skip) = skip(pod) {
        return Outcome::Skipped(skip);
    }
    let Some(policy) = governing(namespace, pod.labels(), policies) else {
        return Outcome::Skipped(Skip::NoPolicy);
    };
    match build(pod, policy, cfg) {
        Ok(injection) => Outcome::Injected { policy: policy.name_any(), injection },
        Err(problem) => Outcome::Refused { policy: policy.name_any(), problem },
    }
}

/// The patch that gives `pod` the sidecar of `policy`; `None` when the pod opted out, uses the
/// host's network, or already has the sidecar (so a reinvocation changes nothing).
pub fn inject(pod: &Pod, policy: &ApiPolicy, cfg: &InjectConfig) -> Result<Option<Injection>, Problem> {
    if skip(pod).is_some() {
        return Ok(None);
    }
    build(pod, policy, cfg).map(Some)
}

/// Whether the pod carries `apipolicy.dev/inject: "false"`.
pub fn opted_out(pod: &Pod) -> bool {
    pod.annotations().get(INJECT_ANNOTATION).is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
}

fn skip(pod: &Pod) -> Option<Skip> {
    let spec = pod.spec.as_ref();
    if opted_out(pod) {
        Some(Skip::OptedOut)
    } else if spec.and_then(|s| s.host_network) == Some(true) {
        // The sidecar's ports would be the node's.
        Some(Skip::HostNetwork)
    } else if all_containers(pod).any(|c| c.name == SIDECAR) {
        Some(Skip::AlreadyInjected)
    } else {
        None
    }
}

fn all_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    spec.map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .chain(spec.and_then(|s| s.init_containers.as_deref()).unwrap_or_default())
}

fn is_tcp(port: &ContainerPort) -> bool {
    port.protocol.as_deref().is_none_or(|p| p == "TCP")
}

/// Where the app declares the policy's upstream port: the container's index, the port's index
/// in it, and the port's name.
pub fn upstream_port(pod: &Pod, port: u16) -> Result<(usize, usize, String), Problem> {
    let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    for (ci, container) in containers.iter().enumerate() {
        for (pi, p) in container.ports.iter().flatten().enumerate() {
            if p.container_port == i32::from(port) && is_tcp(p) {
                return match p.name.as_deref().filter(|n| !n.is_empty()) {
                    Some(name) => Ok((ci, pi, name.to_owned())),
                    None => Err(Problem::PortUnnamed { container: container.name.clone(), port }),
                };
            }
        }
    }
    Err(Problem::PortNotDeclared { port })
}

/// The revision the pod starts with: what the spec compiles to now, else (the spec being
/// invalid) the last valid one, which the ConfigMap still holds.
fn revision(policy: &ApiPolicy) -> Option<String> {
    match apipolicy_api::compile(policy) {
        Ok(config) => Some(config.revision),
        Err(_) => policy.status.as_ref().and_then(|s| s.config_revision.clone()),
    }
}

fn build(pod: &Pod, policy: &ApiPolicy, cfg: &InjectConfig) -> Result<Injection, Problem> {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut warnings = Vec::new();
    let (ci, pi, name) = upstream_port(pod, policy.spec.upstream.port)?;
    let proxy_port = proxy_port(pod, &mut warnings);
    for c in all_containers(pod) {
        if let Some(p) =
            c.ports.iter().flatten().find(|p| {
                p.container_port == i32::from(proxy_port) || p.container_port == i32::from(ADMIN_PORT)
            })
        {
            return Err(Problem::PortTaken { container: c.name.clone(), port: p.container_port as u16 });
        }
    }
    if let Some(v) = spec.volumes.iter().flatten().find(|v| v.name == CONFIG_VOLUME || v.name == TOKEN_VOLUME)
    {
        return Err(Problem::VolumeTaken { volume: v.name.clone() });
    }
    let revision = revision(policy).ok_or(Problem::NoConfig)?;
    let resources = resources(pod, &cfg.resources, &mut warnings);

    let mut ops = Vec::new();
    // The port move: the app gives up the name the Services target; its own probes follow it.
    let app = &spec.containers[ci];
    let renamed = free_port_name(pod, &name, policy.spec.upstream.port);
    let at = |tail: &[&str]| {
        let mut path = vec!["spec".to_owned(), "containers".to_owned(), ci.to_string()];
        path.extend(tail.iter().map(|s| (*s).to_owned()));
        path
    };
    ops.push(replace(&at(&["ports", &pi.to_string(), "name"]), json!(renamed)));
    let by_name = Some(IntOrString::String(name.clone()));
    for (field, probe) in [
        ("livenessProbe", &app.liveness_probe),
        ("readinessProbe", &app.readiness_probe),
        ("startupProbe", &app.startup_probe),
    ] {
        let Some(probe) = probe else { continue };
        if probe.http_get.as_ref().map(|h| h.port.clone()) == by_name {
            ops.push(replace(&at(&[field, "httpGet", "port"]), json!(renamed)));
        }
        if probe.tcp_socket.as_ref().map(|t| t.port.clone()) == by_name {
            ops.push(replace(&at(&[field, "tcpSocket", "port"]), json!(renamed)));
        }
    }
    let lifecycle = app.lifecycle.as_ref();
    for (field, handler) in [
        ("postStart", lifecycle.and_then(|l| l.post_start.as_ref())),
        ("preStop", lifecycle.and_then(|l| l.pre_stop.as_ref())),
    ] {
        let Some(handler) = handler else { continue };
        if handler.http_get.as_ref().map(|h| h.port.clone()) == by_name {
            ops.push(replace(&at(&["lifecycle", field, "httpGet", "port"]), json!(renamed)));
        }
        if handler.tcp_socket.as_ref().map(|t| t.port.clone()) == by_name {
            ops.push(replace(&at(&["lifecycle", field, "tcpSocket", "port"]), json!(renamed)));
        }
    }

    // Last among the init containers, so those already there (network setup, migrations) finish
    // before it starts; as a plain container, last so the app stays the default for `kubectl logs`.
    let sidecar = to_value(&sidecar_container(policy, cfg, &name, proxy_port, resources));
    if cfg.native_sidecar {
        append(&mut ops, "initContainers", spec.init_containers.is_some(), vec![sidecar]);
    } else {
        append(&mut ops, "containers", true, vec![sidecar]);
    }
    append(&mut ops, "volumes", spec.volumes.is_some(), volumes(policy));

    let annotations = [(POLICY_ANNOTATION, policy.name_any()), (INJECTED_REVISION_ANNOTATION, revision)];
    if pod.metadata.annotations.is_some() {
        for (key, value) in annotations {
            ops.push(add(&["metadata", "annotations", key], json!(value)));
        }
    } else {
        let map: BTreeMap<&str, String> = annotations.into_iter().collect();
        ops.push(add(&["metadata", "annotations"], json!(map)));
    }
    Ok(Injection { patch: Patch(ops), warnings })
}

fn pointer<S: AsRef<str>>(tokens: &[S]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().map(AsRef::as_ref))
}

fn add<S: AsRef<str>>(path: &[S], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path: pointer(path), value })
}

fn replace<S: AsRef<str>>(path: &[S], value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation { path: pointer(path), value })
}

/// Appends to `spec.<list>`, creating the list when the pod has none.
fn append(ops: &mut Vec<PatchOperation>, list: &str, exists: bool, items: Vec<Value>) {
    if exists {
        ops.extend(items.into_iter().map(|item| add(&["spec", list, "-"], item)));
    } else {
        ops.push(add(&["spec", list], Value::Array(items)));
    }
}

fn to_value(v: &impl serde::Serialize) -> Value {
    serde_json::to_value(v).expect("Kubernetes objects serialize")
}

/// `app-<name>`, or failing that another valid port name no container of the pod uses.
fn free_port_name(pod: &Pod, name: &str, port: u16) -> String {
    let taken: BTreeSet<&str> = all_containers(pod)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| p.name.as_deref())
        .collect();
    let fit = |s: String| {
        let mut s: String = s.chars().take(MAX_PORT_NAME).collect();
        while s.ends_with('-') {
            s.pop();
        }
        s
    };
    [format!("app-{name}"), format!("a-{name}")]
        .into_iter()
        .chain((0..).map(|n| if n == 0 { format!("app-{port}") } else { format!("app-{port}-{n}") }))
        .map(fit)
        .find(|candidate| !taken.contains(candidate.as_str()))
        .expect("an endless list of candidates has a free one")
}

fn proxy_port(pod: &Pod, warnings: &mut Vec<String>) -> u16 {
    let Some(text) = pod.annotations().get(PROXY_PORT_ANNOTATION) else { return DEFAULT_PROXY_PORT };
    match text.trim().parse::<u16>() {
        Ok(port) if port != 0 && port != ADMIN_PORT => port,
        _ => {
            warnings.push(format!(
                "annotation {PROXY_PORT_ANNOTATION}: {text:?} is not a port (1-65535, not {ADMIN_PORT}); \
                 the sidecar listens on {DEFAULT_PROXY_PORT}"
            ));
            DEFAULT_PROXY_PORT
        }
    }
}

/// The value of a Kubernetes quantity (`500m`, `1.5`, `128Mi`, `1e3`) in its unit, or `None`
/// when the API server would refuse the text.
pub fn quantity_value(text: &str) -> Option<f64> {
    let text = text.strip_prefix('+').unwrap_or(text);
    let end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(end);
    if !number.bytes().any(|b| b.is_ascii_digit()) || number.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let binary = |power: i32| 1024f64.powi(power);
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => binary(1),
        "Mi" => binary(2),
        "Gi" => binary(3),
        "Ti" => binary(4),
        "Pi" => binary(5),
        "Ei" => binary(6),
        exponent if exponent.starts_with(['e', 'E']) => 10f64.powi(exponent[1..].parse().ok()?),
        _ => return None,
    };
    Some(value * factor)
}

/// The configured resources with the pod's annotations applied. An empty annotation removes the
/// setting; a malformed one is ignored. A request above its limit is brought into line, since the
/// API server would refuse the pod.
fn resources(pod: &Pod, defaults: &Resources, warnings: &mut Vec<String>) -> Resources {
    let mut r = defaults.clone();
    let annotations = pod.annotations();
    let mut annotated = BTreeSet::new();
    for (annotation, slot) in [
        (CPU_REQUEST_ANNOTATION, &mut r.cpu_request),
        (MEMORY_REQUEST_ANNOTATION, &mut r.memory_request),
        (CPU_LIMIT_ANNOTATION, &mut r.cpu_limit),
        (MEMORY_LIMIT_ANNOTATION, &mut r.memory_limit),
    ] {
        let Some(text) = annotations.get(annotation).map(|t| t.trim()) else { continue };
        if text.is_empty() {
            *slot = None;
            annotated.insert(annotation);
        } else if quantity_value(text).is_some() {
            *slot = Some(text.to_owned());
            annotated.insert(annotation);
        } else {
            warnings.push(format!(
                "annotation {annotation}: {text:?} is not a Kubernetes quantity; using {}",
                slot.as_deref().unwrap_or("none")
            ));
        }
    }
    for (resource, request, limit, asked_request, asked_limit) in [
        ("cpu", &mut r.cpu_request, &mut r.cpu_limit, CPU_REQUEST_ANNOTATION, CPU_LIMIT_ANNOTATION),
        (
            "memory",
            &mut r.memory_request,
            &mut r.memory_limit,
            MEMORY_REQUEST_ANNOTATION,
            MEMORY_LIMIT_ANNOTATION,
        ),
    ] {
        let (Some(req), Some(lim)) = (request.clone(), limit.clone()) else { continue };
        if quantity_value(&req) <= quantity_value(&lim) {
            continue;
        }
        // What the pod asked for wins; when it asked for both, the limit does.
        if annotated.contains(asked_request) && !annotated.contains(asked_limit) {
            warnings.push(format!(
                "the sidecar's {resource} limit {lim} is below its request {req}; raised to {req}"
            ));
            *limit = Some(req);
        } else {
            warnings.push(format!(
                "the sidecar's {resource} request {req} is above its limit {lim}; lowered to {lim}"
            ));
            *request = Some(lim);
        }
    }
    r
}

/// Worker threads: the CPU limit rounded up, else a default that suits a small request.
fn threads(r: &Resources) -> usize {
    match r.cpu_limit.as_deref().and_then(quantity_value) {
        Some(cores) => (cores.ceil() as usize).max(1),
        None => DEFAULT_THREADS,
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value.into()), value_from: None }
}

fn field_env(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { api_version: None, field_path: field.to_owned() }),
            ..EnvVarSource::default()
        }),
    }
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(ADMIN_PORT_NAME.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn sidecar_container(
    policy: &ApiPolicy,
    cfg: &InjectConfig,
    port_name: &str,
    proxy_port: u16,
    resources: Resources,
) -> Container {
    let mut env_vars = vec![
        field_env(vars::POD_NAME, "metadata.name"),
        field_env(vars::POD_NAMESPACE, "metadata.namespace"),
        env(vars::POLICY, format!("{CONFIG_DIR}/{CONFIG_KEY}")),
        env(vars::UPSTREAM, format!("http://127.0.0.1:{}", policy.spec.upstream.port)),
        env(vars::LISTEN, format!("0.0.0.0:{proxy_port}")),
        env(vars::ADMIN, format!("0.0.0.0:{ADMIN_PORT}")),
        env(vars::DRAIN_DELAY, DRAIN_DELAY),
        env(vars::THREADS, threads(&resources).to_string()),
        env(vars::TOKEN_FILE, format!("{TOKEN_DIR}/{TOKEN_FILE}")),
    ];
    if let Some(url) = &cfg.operator_url {
        env_vars.push(env(vars::OPERATOR, url.clone()));
    }
    if cfg.ca {
        env_vars.push(env(vars::CA_FILE, format!("{CONFIG_DIR}/{CA_KEY}")));
    }
    if let Some(secret) = policy.spec.redis.as_ref().and_then(|r| r.secret_ref.as_ref()) {
        env_vars.push(EnvVar {
            name: vars::REDIS.into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.name.clone(),
                    key: secret.key.clone().unwrap_or_else(|| "url".into()),
                    optional: None,
                }),
                ..EnvVarSource::default()
            }),
        });
    }
    let quantities = |pairs: [(&str, Option<String>); 2]| {
        let map: BTreeMap<String, Quantity> =
            pairs.into_iter().filter_map(|(k, v)| Some((k.to_owned(), Quantity(v?)))).collect();
        (!map.is_empty()).then_some(map)
    };
    let port = |name: &str, number: u16| ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(number),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    Container {
        name: SIDECAR.into(),
        image: Some(cfg.image.clone()),
        command: Some(vec!["apipolicy-sidecar".into()]),
        restart_policy: cfg.native_sidecar.then(|| "Always".to_owned()),
        ports: Some(vec![port(port_name, proxy_port), port(ADMIN_PORT_NAME, ADMIN_PORT)]),
        env: Some(env_vars),
        volume_mounts: Some(vec![mount(CONFIG_VOLUME, CONFIG_DIR), mount(TOKEN_VOLUME, TOKEN_DIR)]),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: Some(ResourceRequirements {
            requests: quantities([
                ("cpu", resources.cpu_request.clone()),
                ("memory", resources.memory_request.clone()),
            ]),
            limits: quantities([("cpu", resources.cpu_limit), ("memory", resources.memory_limit)]),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities { add: None, drop: Some(vec!["ALL".into()]) }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..SecurityContext::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

/// The policy's ConfigMap (config and CA), and a token for the agent API that only the operator
/// accepts and that expires within the hour.
fn volumes(policy: &ApiPolicy) -> Vec<Value> {
    let config = Volume {
        name: CONFIG_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map_name(&policy.name_any()),
            ..Default::default()
        }),
        ..Volume::default()
    };
    let token = Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: None,
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.into()),
                    expiration_seconds: Some(TOKEN_SECONDS),
                    path: TOKEN_FILE.into(),
                }),
                ..VolumeProjection::default()
            }]),
        }),
        ..Volume::default()
    };
    vec![to_value(&config), to_value(&token)]
}

#[cfg(test)]
mod tests;
