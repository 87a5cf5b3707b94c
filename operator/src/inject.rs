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
mod tests {
    use apipolicy_api::ApiPolicyStatus;
    use k8s_openapi::api::core::v1::PodSpec;

    use super::*;
    use crate::fixtures::policy_at;

    /// A pod of namespace `shop` as a user writes it in a Deployment's template.
    fn pod(value: Value) -> Pod {
        let mut v = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "web-", "namespace": "shop"}});
        merge(&mut v, value);
        serde_json::from_value(v).expect("a pod")
    }

    fn merge(into: &mut Value, from: Value) {
        match (into, from) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    /// One app container `app` with the port `http` 8080 and a readiness probe on it.
    fn web(extra: Value) -> Pod {
        let mut v = json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{
                "name": "app", "image": "web:1",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                "livenessProbe": {"tcpSocket": {"port": 8080}},
            }]},
        });
        merge(&mut v, extra);
        pod(v)
    }

    fn cfg() -> InjectConfig {
        InjectConfig {
            operator_url: Some("https://apipolicy-operator.apipolicy-system.svc:8443".into()),
            ca: true,
            ..InjectConfig::new("ghcr.io/apipolicy/apipolicy:test")
        }
    }

    /// The pod the API server stores after applying the patch.
    fn patched(pod: &Pod, patch: &Patch) -> Pod {
        let mut doc = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut doc, patch).expect("the patch applies");
        serde_json::from_value(doc).expect("the patched pod is a pod")
    }

    fn injected(outcome: Outcome) -> (String, Injection) {
        match outcome {
            Outcome::Injected { policy, injection } => (policy, injection),
            other => panic!("expected an injection, got {other:?}"),
        }
    }

    fn sidecar(pod: &Pod) -> &Container {
        all_containers(pod).find(|c| c.name == SIDECAR).expect("the sidecar")
    }

    fn env_of(c: &Container) -> BTreeMap<String, String> {
        c.env.iter().flatten().filter_map(|e| Some((e.name.clone(), e.value.clone()?))).collect()
    }

    #[test]
    fn a_named_port_moves_to_the_native_sidecar_with_everything_it_needs() {
        let policy = policy_at("web", "app", "web", 1);
        let before = web(json!({}));
        let (name, injection) = injected(admit(&before, "shop", [&policy], &cfg()));
        assert_eq!(name, "web");
        assert!(injection.warnings.is_empty(), "{:?}", injection.warnings);
        let after = patched(&before, &injection.patch);
        let spec = after.spec.as_ref().unwrap();

        // The app gave up its port's name, and its probe follows the new one.
        let app = &spec.containers[0];
        assert_eq!(app.ports.as_ref().unwrap()[0].name.as_deref(), Some("app-http"));
        assert_eq!(app.ports.as_ref().unwrap()[0].container_port, 8080);
        assert_eq!(
            app.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().port,
            IntOrString::String("app-http".into())
        );
        assert_eq!(app.liveness_probe, before.spec.as_ref().unwrap().containers[0].liveness_probe);
        assert_eq!(spec.containers.len(), 1, "nothing else among the containers");

        let s = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(s.name, SIDECAR);
        assert_eq!(s.restart_policy.as_deref(), Some("Always"));
        assert_eq!(s.image.as_deref(), Some("ghcr.io/apipolicy/apipolicy:test"));
        assert_eq!(s.command.as_deref(), Some(&["apipolicy-sidecar".to_owned()][..]));
        let ports: Vec<(Option<&str>, i32)> =
            s.ports.iter().flatten().map(|p| (p.name.as_deref(), p.container_port)).collect();
        assert_eq!(ports, [(Some("http"), 15080), (Some("apipolicy-admin"), 15090)]);
        let env = env_of(s);
        let expected = [
            ("APIPOLICY_POLICY", "/etc/apipolicy/config.json"),
            ("APIPOLICY_UPSTREAM", "http://127.0.0.1:8080"),
            ("APIPOLICY_LISTEN", "0.0.0.0:15080"),
            ("APIPOLICY_ADMIN", "0.0.0.0:15090"),
            ("APIPOLICY_OPERATOR", "https://apipolicy-operator.apipolicy-system.svc:8443"),
            ("APIPOLICY_TOKEN_FILE", "/var/run/secrets/apipolicy.dev/token"),
            ("APIPOLICY_CA_FILE", "/etc/apipolicy/ca.crt"),
            ("APIPOLICY_DRAIN_DELAY", "5s"),
            ("APIPOLICY_THREADS", "2"),
        ];
        for (k, v) in expected {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
        let downward: Vec<(&str, &str)> = s
            .env
            .iter()
            .flatten()
            .filter_map(|e| {
                Some((e.name.as_str(), e.value_from.as_ref()?.field_ref.as_ref()?.field_path.as_str()))
            })
            .collect();
        assert_eq!(downward, [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")]);
        assert!(!env.contains_key("APIPOLICY_REDIS"));

        let ready = s.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(
            (ready.path.as_deref(), &ready.port),
            (Some("/readyz"), &IntOrString::String("apipolicy-admin".into()))
        );
        let live = s.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));

        let resources = s.resources.as_ref().unwrap();
        let requests = resources.requests.as_ref().unwrap();
        assert_eq!((requests["cpu"].0.as_str(), requests["memory"].0.as_str()), ("50m", "32Mi"));
        let limits = resources.limits.as_ref().unwrap();
        assert_eq!(limits.len(), 1);
        assert_eq!(limits["memory"].0, "128Mi");

        let sc = s.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");

        let mounts: Vec<(&str, &str, Option<bool>)> = s
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
            .collect();
        assert_eq!(
            mounts,
            [
                ("apipolicy-config", "/etc/apipolicy", Some(true)),
                ("apipolicy-token", "/var/run/secrets/apipolicy.dev", Some(true))
            ]
        );
        let volumes = spec.volumes.as_ref().unwrap();
        assert_eq!(volumes[0].config_map.as_ref().unwrap().name, "apipolicy-web");
        let token = volumes[1].projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .as_ref()
            .unwrap();
        assert_eq!(
            (token.audience.as_deref(), token.expiration_seconds, token.path.as_str()),
            (Some("apipolicy.dev"), Some(3600), "token")
        );

        let annotations = after.annotations();
        assert_eq!(annotations[POLICY_ANNOTATION], "web");
        assert_eq!(
            annotations[INJECTED_REVISION_ANNOTATION],
            apipolicy_api::compile(&policy).unwrap().revision
        );

        // Reinvocation, or a second admission of the injected pod, changes nothing.
        assert_eq!(admit(&after, "shop", [&policy], &cfg()), Outcome::Skipped(Skip::AlreadyInjected));
        assert_eq!(inject(&after, &policy, &cfg()), Ok(None));
    }

    #[test]
    fn the_patch_touches_only_what_it_must() {
        let policy = policy_at("web", "app", "web", 1);
        let (_, injection) = injected(admit(&web(json!({})), "shop", [&policy], &cfg()));
        let ops: Vec<(String, String)> = serde_json::to_value(&injection.patch)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|op| (op["op"].as_str().unwrap().to_owned(), op["path"].as_str().unwrap().to_owned()))
            .collect();
        let expected = [
            ("replace", "/spec/containers/0/ports/0/name"),
            ("replace", "/spec/containers/0/readinessProbe/httpGet/port"),
            ("add", "/spec/initContainers"),
            ("add", "/spec/volumes"),
            ("add", "/metadata/annotations"),
        ];
        assert_eq!(ops, expected.map(|(a, b)| (a.to_owned(), b.to_owned())));

        // With annotations and volumes already there: added one by one, keys escaped.
        let before = web(json!({
            "metadata": {"annotations": {"team": "shop"}},
            "spec": {"volumes": [{"name": "data", "emptyDir": {}}]},
        }));
        let (_, injection) = injected(admit(&before, "shop", [&policy], &cfg()));
        let paths: Vec<String> = injection.patch.iter().map(|op| op.path().to_string()).collect();
        assert!(paths.contains(&"/spec/volumes/-".to_owned()), "{paths:?}");
        assert!(paths.contains(&"/metadata/annotations/apipolicy.dev~1policy".to_owned()), "{paths:?}");
        assert!(
            paths.contains(&"/metadata/annotations/apipolicy.dev~1injected-revision".to_owned()),
            "{paths:?}"
        );
        let after = patched(&before, &injection.patch);
        assert_eq!(after.annotations()["team"], "shop");
        let names: Vec<&str> =
            after.spec.as_ref().unwrap().volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["data", CONFIG_VOLUME, TOKEN_VOLUME]);
    }

    #[test]
    fn other_containers_and_existing_sidecars_are_left_alone() {
        let policy = policy_at("web", "app", "web", 1);
        let before = web(json!({"spec": {
            "containers": [
                {"name": "log-shipper", "image": "fluent:1", "ports": [{"name": "metrics", "containerPort": 9100}]},
                {"name": "app", "image": "web:1", "ports": [
                    {"name": "dns", "containerPort": 8080, "protocol": "UDP"},
                    {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                ], "livenessProbe": {"httpGet": {"path": "/", "port": "http"}},
                   "lifecycle": {"preStop": {"httpGet": {"path": "/stop", "port": "http"}}}},
            ],
            "initContainers": [
                {"name": "migrate", "image": "web:1", "command": ["migrate"]},
                {"name": "mesh-proxy", "image": "proxy:1", "restartPolicy": "Always", "ports": [{"name": "mesh", "containerPort": 15001}]},
            ],
        }}));
        let (_, injection) = injected(admit(&before, "shop", [&policy], &cfg()));
        let after = patched(&before, &injection.patch);
        let (b, a) = (before.spec.as_ref().unwrap(), after.spec.as_ref().unwrap());
        assert_eq!(a.containers[0], b.containers[0], "the log shipper is untouched");
        let app = &a.containers[1];
        let ports: Vec<(Option<&str>, Option<&str>)> =
            app.ports.iter().flatten().map(|p| (p.name.as_deref(), p.protocol.as_deref())).collect();
        assert_eq!(
            ports,
            [(Some("dns"), Some("UDP")), (Some("app-http"), Some("TCP"))],
            "only the TCP port moves"
        );
        assert_eq!(
            app.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().port,
            IntOrString::String("app-http".into())
        );
        let pre_stop = app.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
        assert_eq!(pre_stop.http_get.as_ref().unwrap().port, IntOrString::String("app-http".into()));
        let init = a.init_containers.as_ref().unwrap();
        assert_eq!(
            &init[..2],
            &b.init_containers.as_ref().unwrap()[..],
            "existing init containers first, unchanged"
        );
        assert_eq!(init[2].name, SIDECAR);
        assert_eq!(init.len(), 3);
    }

    #[test]
    fn pods_left_unchanged() {
        let web_policy = policy_at("web", "app", "web", 1);
        let policies = [&web_policy];
        let table: Vec<(&str, Pod, Skip)> = vec![
            (
                "opted out",
                web(json!({"metadata": {"annotations": {INJECT_ANNOTATION: "false"}}})),
                Skip::OptedOut,
            ),
            ("host network", web(json!({"spec": {"hostNetwork": true}})), Skip::HostNetwork),
            ("no policy selects it", web(json!({"metadata": {"labels": {"app": "db"}}})), Skip::NoPolicy),
            (
                "no labels",
                pod(
                    json!({"spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]}}),
                ),
                Skip::NoPolicy,
            ),
            (
                "sidecar already there as a plain container",
                web(json!({"spec": {"containers": [{"name": SIDECAR}]}})),
                Skip::AlreadyInjected,
            ),
        ];
        for (case, pod, skip) in table {
            assert_eq!(admit(&pod, "shop", policies, &cfg()), Outcome::Skipped(skip), "{case}");
            assert_eq!(
                inject(&pod, &web_policy, &cfg()).map(|i| i.is_some()),
                Ok(skip == Skip::NoPolicy),
                "{case}"
            );
        }
        // A policy of another namespace does not count.
        assert_eq!(admit(&web(json!({})), "elsewhere", policies, &cfg()), Outcome::Skipped(Skip::NoPolicy));
        // Opting in explicitly is no opt-out.
        let opted_in = web(json!({"metadata": {"annotations": {INJECT_ANNOTATION: "true"}}}));
        assert!(matches!(admit(&opted_in, "shop", policies, &cfg()), Outcome::Injected { .. }));
    }

    #[test]
    fn pods_that_cannot_take_the_sidecar_are_refused_with_what_to_change() {
        let policy = policy_at("web", "app", "web", 1);
        let mut broken = policy_at("web", "app", "web", 1);
        broken.spec.upstream.port = 0;
        let table: Vec<(&str, Pod, &ApiPolicy, Problem)> = vec![
            (
                "unnamed port",
                web(json!({"spec": {"containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]}})),
                &policy,
                Problem::PortUnnamed { container: "app".into(), port: 8080 },
            ),
            (
                "undeclared port",
                web(
                    json!({"spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 9000}]}]}}),
                ),
                &policy,
                Problem::PortNotDeclared { port: 8080 },
            ),
            (
                "no ports at all",
                web(
                    json!({"spec": {"containers": [{"name": "app", "ports": null, "readinessProbe": null}]}}),
                ),
                &policy,
                Problem::PortNotDeclared { port: 8080 },
            ),
            (
                "the admin port is taken",
                web(
                    json!({"spec": {"initContainers": [{"name": "agent", "ports": [{"containerPort": 15090}]}]}}),
                ),
                &policy,
                Problem::PortTaken { container: "agent".into(), port: 15090 },
            ),
            (
                "a volume name is taken",
                web(json!({"spec": {"volumes": [{"name": TOKEN_VOLUME, "emptyDir": {}}]}})),
                &policy,
                Problem::VolumeTaken { volume: TOKEN_VOLUME.into() },
            ),
            (
                "the policy never compiled",
                web(
                    json!({"spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 0}]}]}}),
                ),
                &broken,
                Problem::NoConfig,
            ),
        ];
        for (case, pod, policy, problem) in table {
            let outcome = admit(&pod, "shop", [policy], &cfg());
            assert_eq!(
                outcome,
                Outcome::Refused { policy: "web".into(), problem: problem.clone() },
                "{case}"
            );
            assert_eq!(inject(&pod, policy, &cfg()), Err(problem.clone()), "{case}");
            let message = problem.message("web");
            assert!(message.starts_with("ApiPolicy web"), "{case}: {message}");
            assert!(message.len() <= 256, "{case}: a warning the API server passes on whole: {message}");
        }
        let unnamed = Problem::PortUnnamed { container: "app".into(), port: 8080 }.message("web");
        assert!(unnamed.contains("targetPort"), "{unnamed}");

        // An invalid spec with a last valid revision still injects it: the ConfigMap holds it.
        broken.status =
            Some(ApiPolicyStatus { config_revision: Some("sha256:last".into()), ..Default::default() });
        let pod = web(
            json!({"spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 0}]}]}}),
        );
        let (_, injection) = injected(admit(&pod, "shop", [&broken], &cfg()));
        assert_eq!(
            patched(&pod, &injection.patch).annotations()[INJECTED_REVISION_ANNOTATION],
            "sha256:last"
        );
    }

    #[test]
    fn the_older_of_two_matching_policies_wins() {
        let newer = policy_at("newer", "app", "web", 200);
        let older = policy_at("older", "tier", "front", 100);
        let pod = web(json!({"metadata": {"labels": {"tier": "front"}}}));
        let (name, injection) = injected(admit(&pod, "shop", [&newer, &older], &cfg()));
        assert_eq!(name, "older");
        let after = patched(&pod, &injection.patch);
        assert_eq!(after.annotations()[POLICY_ANNOTATION], "older");
        assert_eq!(
            after.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0].config_map.as_ref().unwrap().name,
            "apipolicy-older"
        );
    }

    #[test]
    fn annotations_tune_resources_and_the_proxy_port() {
        let policy = policy_at("web", "app", "web", 1);
        // (annotations, requests, limits, threads, warnings containing)
        type Row<'a> = (Value, [(&'a str, &'a str); 2], Vec<(&'a str, &'a str)>, &'a str, Vec<&'a str>);
        let table: Vec<Row> = vec![
            (json!({}), [("cpu", "50m"), ("memory", "32Mi")], vec![("memory", "128Mi")], "2", vec![]),
            (
                json!({CPU_REQUEST_ANNOTATION: "250m", CPU_LIMIT_ANNOTATION: "1500m", MEMORY_LIMIT_ANNOTATION: "256Mi"}),
                [("cpu", "250m"), ("memory", "32Mi")],
                vec![("cpu", "1500m"), ("memory", "256Mi")],
                "2",
                vec![],
            ),
            (
                json!({CPU_LIMIT_ANNOTATION: "4"}),
                [("cpu", "50m"), ("memory", "32Mi")],
                vec![("cpu", "4"), ("memory", "128Mi")],
                "4",
                vec![],
            ),
            (
                json!({MEMORY_REQUEST_ANNOTATION: "lots", MEMORY_LIMIT_ANNOTATION: ""}),
                [("cpu", "50m"), ("memory", "32Mi")],
                vec![],
                "2",
                vec!["\"lots\" is not a Kubernetes quantity; using 32Mi"],
            ),
            (
                json!({MEMORY_REQUEST_ANNOTATION: "256Mi"}),
                [("cpu", "50m"), ("memory", "256Mi")],
                vec![("memory", "256Mi")],
                "2",
                vec!["memory limit 128Mi is below its request 256Mi; raised to 256Mi"],
            ),
            (
                json!({MEMORY_LIMIT_ANNOTATION: "16Mi", CPU_LIMIT_ANNOTATION: "10m"}),
                [("cpu", "10m"), ("memory", "16Mi")],
                vec![("cpu", "10m"), ("memory", "16Mi")],
                "1",
                vec![
                    "cpu request 50m is above its limit 10m; lowered to 10m",
                    "memory request 32Mi is above",
                ],
            ),
        ];
        for (annotations, requests, limits, threads, warned) in table {
            let pod = web(json!({"metadata": {"annotations": annotations.clone()}}));
            let (_, injection) = injected(admit(&pod, "shop", [&policy], &cfg()));
            for w in &warned {
                assert!(
                    injection.warnings.iter().any(|x| x.contains(w)),
                    "{annotations}: {:?} lacks {w}",
                    injection.warnings
                );
            }
            assert_eq!(injection.warnings.len(), warned.len(), "{annotations}: {:?}", injection.warnings);
            let after = patched(&pod, &injection.patch);
            let r = sidecar(&after).resources.clone().unwrap();
            let got = |m: Option<BTreeMap<String, Quantity>>| -> Vec<(String, String)> {
                m.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect()
            };
            let want = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
                pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
            };
            assert_eq!(got(r.requests), want(&requests), "{annotations}");
            assert_eq!(got(r.limits), want(&limits), "{annotations}");
            assert_eq!(env_of(sidecar(&after))["APIPOLICY_THREADS"], threads, "{annotations}");
        }

        let moved = web(json!({"metadata": {"annotations": {PROXY_PORT_ANNOTATION: "8000"}}}));
        let (_, injection) = injected(admit(&moved, "shop", [&policy], &cfg()));
        let s = patched(&moved, &injection.patch);
        assert_eq!(sidecar(&s).ports.as_ref().unwrap()[0].container_port, 8000);
        assert_eq!(env_of(sidecar(&s))["APIPOLICY_LISTEN"], "0.0.0.0:8000");
        for bad in ["15090", "0", "http", "70000"] {
            let pod = web(json!({"metadata": {"annotations": {PROXY_PORT_ANNOTATION: bad}}}));
            let (_, injection) = injected(admit(&pod, "shop", [&policy], &cfg()));
            assert!(injection.warnings[0].contains("the sidecar listens on 15080"), "{bad}");
        }
        // The app listens on the proxy port it asked for: refused.
        let clash = web(json!({"metadata": {"annotations": {PROXY_PORT_ANNOTATION: "8080"}}}));
        assert_eq!(
            inject(&clash, &policy, &cfg()),
            Err(Problem::PortTaken { container: "app".into(), port: 8080 })
        );
    }

    #[test]
    fn the_fallback_is_a_plain_container_and_redis_comes_from_the_secret() {
        let mut policy = policy_at("web", "app", "web", 1);
        policy.spec.redis = serde_json::from_value(json!({"secretRef": {"name": "redis"}})).unwrap();
        let plain = InjectConfig { native_sidecar: false, operator_url: None, ca: false, ..cfg() };
        let before = web(json!({}));
        let (_, injection) = injected(admit(&before, "shop", [&policy], &plain));
        let after = patched(&before, &injection.patch);
        let spec = after.spec.as_ref().unwrap();
        assert!(spec.init_containers.is_none());
        assert_eq!(spec.containers.len(), 2);
        assert_eq!(spec.containers[0].name, "app", "the app stays the default container");
        let s = &spec.containers[1];
        assert_eq!((s.name.as_str(), s.restart_policy.as_deref()), (SIDECAR, None));
        let env = env_of(s);
        assert!(!env.contains_key("APIPOLICY_OPERATOR") && !env.contains_key("APIPOLICY_CA_FILE"));
        let redis = s.env.iter().flatten().find(|e| e.name == "APIPOLICY_REDIS").unwrap();
        let secret = redis.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((secret.name.as_str(), secret.key.as_str()), ("redis", "url"));
    }

    #[test]
    fn renamed_ports_stay_valid_and_unique() {
        let with_ports =
            |ports: Value| -> Pod { pod(json!({"spec": {"containers": [{"name": "app", "ports": ports}]}})) };
        let table = [
            (json!([{"name": "http", "containerPort": 8080}]), "http", "app-http"),
            (
                json!([{"name": "http-metrics-01", "containerPort": 8080}]),
                "http-metrics-01",
                "app-http-metric",
            ),
            (
                json!([{"name": "http", "containerPort": 8080}, {"name": "app-http", "containerPort": 1}]),
                "http",
                "a-http",
            ),
            (
                json!([{"name": "http", "containerPort": 8080}, {"name": "app-http", "containerPort": 1}, {"name": "a-http", "containerPort": 2}]),
                "http",
                "app-8080",
            ),
        ];
        for (ports, name, expected) in table {
            let got = free_port_name(&with_ports(ports), name, 8080);
            assert_eq!(got, expected);
            assert!(got.len() <= MAX_PORT_NAME && !got.ends_with('-') && !got.contains("--"));
        }
    }

    #[test]
    fn quantities() {
        let table = [
            ("50m", Some(0.05)),
            ("1", Some(1.0)),
            ("1.5", Some(1.5)),
            ("+2", Some(2.0)),
            ("128Mi", Some(134_217_728.0)),
            ("1k", Some(1000.0)),
            ("1e3", Some(1000.0)),
            ("2E-3", Some(0.002)),
            ("", None),
            ("-1", None),
            ("Mi", None),
            ("1.2.3", None),
            ("12 Mi", None),
            ("1MB", None),
        ];
        for (text, value) in table {
            assert_eq!(quantity_value(text), value, "{text}");
        }
    }

    #[test]
    fn a_pod_without_a_spec_has_no_port_to_take() {
        let empty = Pod { spec: Some(PodSpec::default()), ..web(json!({})) };
        assert_eq!(upstream_port(&empty, 8080), Err(Problem::PortNotDeclared { port: 8080 }));
        assert_eq!(upstream_port(&web(json!({})), 8080), Ok((0, 0, "http".into())));
    }
}
