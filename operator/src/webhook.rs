//! The injection webhook: `POST /mutate` takes the AdmissionReview (v1) of a pod being created
//! and answers from the policy cache, never calling the API server on the way; and the
//! MutatingWebhookConfiguration that sends those pods to it.

use apipolicy_api::contract::INJECTION_LABEL;
use std::{sync::Arc, time::Duration};

use apipolicy_api::ApiPolicy;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{
            MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
            WebhookClientConfig,
        },
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    runtime::{
        events::{Event, EventType, Recorder},
        reflector::{ObjectRef, Store},
    },
};

use tokio::sync::watch;

use crate::{
    caches::Filled,
    error::{Error, Result},
    inject::{self, InjectConfig, Outcome},
    metrics::Metrics,
    render::{MANAGED_BY_LABEL, MANAGER},
    serve::Handler,
};

/// Where the API server sends reviews.
pub const PATH: &str = "/mutate";
/// The configuration the operator keeps, unless told not to.
pub const CONFIGURATION: &str = "apipolicy-injector";
const WEBHOOK: &str = "inject.apipolicy.dev";
/// Pod creation waits on the webhook: better a pod without sidecar than a stuck rollout.
const TIMEOUT_SECONDS: i32 = 5;
/// The API server's limit on an object is 3 MiB; the review around it adds little.
const MAX_REVIEW_BYTES: usize = 6 << 20;
/// At start, an admission waits this long for the policy cache to fill before it is refused
/// (and the failure policy decides).
const CACHE_WAIT: Duration = Duration::from_secs(2);

/// What the API server does with a pod when the webhook cannot answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Create the pod without the sidecar, so pods still start while the operator is down.
    #[value(name = "Ignore")]
    Ignore,
    /// Refuse the pod: no pod of a labelled namespace runs without its policy.
    #[value(name = "Fail")]
    Fail,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ignore => "Ignore",
            Self::Fail => "Fail",
        }
    }
}

/// How the API server reaches the webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
    /// Outside the cluster: a URL the API server can reach.
    Url(String),
}

/// The MutatingWebhookConfiguration: pods being created in namespaces labelled
/// `apipolicy.dev/injection=enabled`, except the operator's own (which must never wait on it).
pub fn configuration(
    name: &str,
    target: &Target,
    ca: Option<&str>,
    failure: FailurePolicy,
    operator_namespace: &str,
) -> MutatingWebhookConfiguration {
    let ca_bundle = ca.map(|pem| ByteString(pem.as_bytes().to_vec()));
    let client_config = match target {
        Target::Service { namespace, name, port } => WebhookClientConfig {
            ca_bundle,
            service: Some(ServiceReference {
                name: name.clone(),
                namespace: namespace.clone(),
                path: Some(PATH.into()),
                port: Some(i32::from(*port)),
            }),
            url: None,
        },
        Target::Url(url) => WebhookClientConfig { ca_bundle, service: None, url: Some(url.clone()) },
    };
    let strings = |items: &[&str]| Some(items.iter().map(|s| (*s).to_owned()).collect());
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned())].into()),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: WEBHOOK.into(),
            admission_review_versions: vec!["v1".into()],
            client_config,
            failure_policy: Some(failure.as_str().into()),
            match_policy: Some("Equivalent".into()),
            namespace_selector: Some(LabelSelector {
                match_labels: Some([(INJECTION_LABEL.to_owned(), "enabled".to_owned())].into()),
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "kubernetes.io/metadata.name".into(),
                    operator: "NotIn".into(),
                    values: Some(vec![operator_namespace.to_owned()]),
                }]),
            }),
            // Annotations cannot be selected on: the opt-out is checked in `inject`.
            object_selector: None,
            // Another webhook that adds containers after this one runs it again; it then finds
            // the sidecar and changes nothing.
            reinvocation_policy: Some("IfNeeded".into()),
            rules: Some(vec![RuleWithOperations {
                api_groups: strings(&[""]),
                api_versions: strings(&["v1"]),
                operations: strings(&["CREATE"]),
                resources: strings(&["pods"]),
                scope: Some("Namespaced".into()),
            }]),
            side_effects: "None".into(),
            timeout_seconds: Some(TIMEOUT_SECONDS),
            match_conditions: None,
        }]),
    }
}

/// Creates or updates the configuration (server-side apply).
pub async fn apply_configuration(client: &Client, config: &MutatingWebhookConfiguration) -> Result<()> {
    let name = config.name_any();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(config))
        .await
        .map_err(|source| Error::ApplyWebhook { name, source })?;
    Ok(())
}

/// The answer to one review, and what the injector decided. Pure.
pub fn respond(
    request: &AdmissionRequest<Pod>,
    policies: &[Arc<ApiPolicy>],
    cfg: &InjectConfig,
) -> (AdmissionResponse, Outcome) {
    let response = AdmissionResponse::from(request);
    let (Some(pod), Operation::Create) = (&request.object, &request.operation) else {
        return (response, Outcome::Skipped(inject::Skip::NotCreate));
    };
    let namespace = request.namespace.clone().or_else(|| pod.namespace()).unwrap_or_default();
    let outcome = inject::admit(pod, &namespace, policies.iter().map(|p| &**p), cfg);
    let response = match &outcome {
        Outcome::Injected { injection, .. } => {
            let mut r = response.with_patch(injection.patch.clone()).expect("a JSON patch serializes");
            if !injection.warnings.is_empty() {
                r.warnings = Some(injection.warnings.clone());
            }
            r
        }
        Outcome::Refused { policy, problem } => {
            let mut r = response;
            r.warnings = Some(vec![problem.message(policy)]);
            r
        }
        Outcome::Skipped(_) => response,
    };
    (response, outcome)
}

/// The AdmissionReview to answer with, as the API server reads it: the patch base64-encoded, as
/// Go encodes a `[]byte` (kube serializes the bytes as an array of numbers).
pub fn review_json(response: AdmissionResponse) -> Vec<u8> {
    let mut review = serde_json::to_value(response.into_review()).expect("an AdmissionReview serializes");
    if let Some(patch) = review.get_mut("response").and_then(|r| r.get_mut("patch")) {
        let bytes: Vec<u8> = serde_json::from_value(patch.take()).expect("the patch is bytes");
        *patch = serde_json::to_value(ByteString(bytes)).expect("bytes serialize");
    }
    serde_json::to_vec(&review).expect("JSON serializes")
}

/// How a pod under admission is named in an event: it often has no name yet.
fn describe(pod: &Pod) -> String {
    if let Some(name) = pod.metadata.name.as_deref().filter(|n| !n.is_empty()) {
        return format!("pod {name}");
    }
    match pod.owner_references().first() {
        Some(owner) => format!("a new pod of {} {}", owner.kind, owner.name),
        None => format!("a new pod {}…", pod.metadata.generate_name.as_deref().unwrap_or_default()),
    }
}

type Reply = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

pub struct Webhook {
    policies: Store<ApiPolicy>,
    filled: watch::Receiver<Filled>,
    config: InjectConfig,
    /// Events about pods the policy cannot take over; `None` sends none.
    recorder: Option<Recorder>,
    metrics: Arc<Metrics>,
}

impl Webhook {
    /// `filled` says when the policy cache is filled ([`crate::caches`]: never the store's own
    /// readiness, whose wakeup the Controller must keep).
    pub fn new(
        policies: Store<ApiPolicy>,
        filled: watch::Receiver<Filled>,
        config: InjectConfig,
        recorder: Option<Recorder>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { policies, filled, config, recorder, metrics }
    }

    pub fn handler(self) -> Handler {
        let webhook = Arc::new(self);
        Arc::new(move |req| {
            let webhook = webhook.clone();
            Box::pin(async move {
                let (label, reply) = webhook.handle(req).await;
                webhook.metrics.admissions.with_label_values(&[label]).inc();
                reply
            })
        })
    }

    async fn handle(&self, req: Request<Incoming>) -> (&'static str, Reply) {
        if req.uri().path() != PATH {
            return (
                "bad_request",
                text(StatusCode::NOT_FOUND, format!("not found: the webhook is at {PATH}\n")),
            );
        }
        if req.method() != Method::POST {
            return ("bad_request", text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n"));
        }
        let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return ("bad_request", text(StatusCode::BAD_REQUEST, format!("reading the review: {e}\n")));
            }
        };
        let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return (
                    "bad_request",
                    text(StatusCode::BAD_REQUEST, format!("not an AdmissionReview of a pod: {e}\n")),
                );
            }
        };
        let request: AdmissionRequest<Pod> = match review.try_into() {
            Ok(r) => r,
            Err(e) => return ("bad_request", text(StatusCode::BAD_REQUEST, format!("{e}\n"))),
        };
        // An empty cache would admit every pod without its sidecar; failing lets the failure
        // policy decide, and lets the ReplicaSet retry.
        let mut filled = self.filled.clone();
        if !matches!(tokio::time::timeout(CACHE_WAIT, filled.wait_for(|f| f.policies)).await, Ok(Ok(_))) {
            return (
                "not_ready",
                text(StatusCode::SERVICE_UNAVAILABLE, "the policy cache is not filled yet\n"),
            );
        }
        let (response, outcome) = respond(&request, &self.policies.state(), &self.config);
        let label = match &outcome {
            Outcome::Injected { policy, .. } => {
                tracing::info!(namespace = request.namespace.as_deref(), pod = %request.object.as_ref().map(describe).unwrap_or_default(), %policy, "injecting the sidecar");
                "injected"
            }
            Outcome::Refused { policy, problem } => {
                self.report(&request, policy, problem);
                "refused"
            }
            Outcome::Skipped(skip) => skip.label(),
        };
        let mut reply = Response::new(Full::new(Bytes::from(review_json(response))));
        reply.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        (label, reply)
    }

    /// A warning event on the policy, sent in the background so that the answer never waits on
    /// it. A dry run has no side effects.
    fn report(&self, request: &AdmissionRequest<Pod>, policy: &str, problem: &inject::Problem) {
        let namespace = request.namespace.clone().unwrap_or_default();
        let pod = request.object.as_ref().map(describe).unwrap_or_default();
        tracing::warn!(%namespace, %pod, %policy, reason = problem.reason(), "the sidecar cannot be injected");
        let (Some(recorder), false) = (&self.recorder, request.dry_run) else { return };
        let Some(object) = self.policies.get(&ObjectRef::new(policy).within(&namespace)) else { return };
        let event = Event {
            type_: EventType::Warning,
            reason: problem.reason().into(),
            note: Some(format!("{pod}: {}", problem.message(policy))),
            action: "Inject".into(),
            secondary: None,
        };
        let recorder = recorder.clone();
        let reference = object.object_ref(&());
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, "publishing an event failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        context::Context,
        fixtures::{Seed, policy_at, timeout_after_1s},
    };

    #[test]
    fn the_configuration_sends_created_pods_of_labelled_namespaces() {
        let service = Target::Service {
            namespace: "apipolicy-system".into(),
            name: "apipolicy-operator".into(),
            port: 443,
        };
        let c =
            configuration(CONFIGURATION, &service, Some("CA PEM"), FailurePolicy::Ignore, "apipolicy-system");
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            (v["apiVersion"].as_str(), v["kind"].as_str()),
            (Some("admissionregistration.k8s.io/v1"), Some("MutatingWebhookConfiguration"))
        );
        assert_eq!(v["metadata"]["name"], "apipolicy-injector");
        let w = &v["webhooks"][0];
        assert_eq!(w["clientConfig"]["caBundle"], "Q0EgUEVN", "base64 of the PEM");
        assert_eq!(
            w["clientConfig"]["service"],
            json!({"name": "apipolicy-operator", "namespace": "apipolicy-system", "path": "/mutate", "port": 443})
        );
        assert_eq!(
            w["rules"],
            json!([{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}])
        );
        assert_eq!(w["namespaceSelector"]["matchLabels"], json!({"apipolicy.dev/injection": "enabled"}));
        assert_eq!(
            w["namespaceSelector"]["matchExpressions"],
            json!([{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["apipolicy-system"]}])
        );
        for (field, value) in [
            ("failurePolicy", json!("Ignore")),
            ("sideEffects", json!("None")),
            ("timeoutSeconds", json!(5)),
            ("admissionReviewVersions", json!(["v1"])),
            ("matchPolicy", json!("Equivalent")),
            ("reinvocationPolicy", json!("IfNeeded")),
        ] {
            assert_eq!(w[field], value, "{field}");
        }
        let url = Target::Url("https://172.18.0.1:9443/mutate".into());
        let c = configuration("e2e", &url, None, FailurePolicy::Fail, "ns");
        let w = serde_json::to_value(&c.webhooks.unwrap()[0]).unwrap();
        assert_eq!(w["clientConfig"], json!({"url": "https://172.18.0.1:9443/mutate"}));
        assert_eq!(w["failurePolicy"], "Fail");
    }

    /// A review as the API server sends it for a pod of a Deployment.
    fn review(pod: Value, dry_run: bool) -> AdmissionRequest<Pod> {
        let review: AdmissionReview<Pod> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": "",
                "namespace": "shop",
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": pod,
                "oldObject": null,
                "dryRun": dry_run,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            },
        }))
        .unwrap();
        review.try_into().unwrap()
    }

    fn pod(port: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-5d4f-", "namespace": "shop", "labels": {"app": "web"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d4f", "uid": "u", "controller": true}]},
            "spec": {"containers": [{"name": "app", "image": "web:1", "ports": [port]}]},
        })
    }

    #[test]
    fn answers_carry_the_uid_the_patch_and_warnings() {
        let policies = vec![Arc::new(policy_at("web", "app", "web", 1))];
        let cfg = InjectConfig::new("img");
        let (r, outcome) =
            respond(&review(pod(json!({"name": "http", "containerPort": 8080})), false), &policies, &cfg);
        assert!(matches!(outcome, Outcome::Injected { .. }));
        let v: Value = serde_json::from_slice(&review_json(r)).unwrap();
        assert_eq!(
            (v["apiVersion"].as_str(), v["kind"].as_str()),
            (Some("admission.k8s.io/v1"), Some("AdmissionReview"))
        );
        let response = &v["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(
            (response["allowed"].as_bool(), response["patchType"].as_str()),
            (Some(true), Some("JSONPatch"))
        );
        assert!(
            response["patch"].as_str().is_some_and(|p| p.starts_with("W3si")),
            "base64 of `[{{\"`: {response}"
        );
        let bytes: ByteString = serde_json::from_value(response["patch"].clone()).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes.0).unwrap();
        assert_eq!(patch[0].path().to_string(), "/spec/containers/0/ports/0/name");

        let (r, outcome) = respond(&review(pod(json!({"containerPort": 8080})), false), &policies, &cfg);
        assert!(matches!(outcome, Outcome::Refused { .. }));
        let v: Value = serde_json::from_slice(&review_json(r)).unwrap();
        assert_eq!(v["response"]["allowed"], true, "admitted unchanged");
        assert!(v["response"].get("patch").is_none());
        assert!(v["response"]["warnings"][0].as_str().unwrap().contains("without a name"), "{v}");

        assert_eq!(
            describe(&serde_json::from_value(pod(json!({}))).unwrap()),
            "a new pod of ReplicaSet web-5d4f"
        );
    }

    #[tokio::test]
    async fn a_pod_the_policy_cannot_take_over_is_reported_on_the_policy_without_delaying_the_answer() {
        let policy = policy_at("web", "app", "web", 1);
        let (ctx, verifier) = Context::test(Seed::with_policies(vec![policy.clone()]));
        let webhook = Webhook::new(
            ctx.stores.policies.clone(),
            ctx.caches.watch(),
            InjectConfig::new("img"),
            Some(ctx.recorder.clone()),
            ctx.metrics.clone(),
        );
        let mut handle = verifier.0;
        let unnamed = review(pod(json!({"containerPort": 8080})), false);
        webhook.report(
            &unnamed,
            "web",
            &inject::Problem::PortUnnamed { container: "app".into(), port: 8080 },
        );
        let (request, send) =
            tokio::time::timeout(Duration::from_secs(1), handle.next_request()).await.unwrap().unwrap();
        assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/shop/events");
        let body: Value =
            serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
        assert_eq!((body["type"].as_str(), body["reason"].as_str()), (Some("Warning"), Some("PortUnnamed")));
        assert_eq!(body["regarding"]["kind"], "ApiPolicy");
        assert_eq!(body["regarding"]["name"], "web");
        assert!(
            body["note"]
                .as_str()
                .unwrap()
                .starts_with("a new pod of ReplicaSet web-5d4f: ApiPolicy web: container app"),
            "{body}"
        );
        send.send_response(
            http::Response::builder()
                .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );

        // A dry run sends nothing.
        let verifier = crate::fixtures::ApiServerVerifier(handle);
        let mocks = verifier.run(crate::fixtures::Scenario::Nothing);
        webhook.report(&review(pod(json!({"containerPort": 8080})), true), "web", &inject::Problem::NoConfig);
        timeout_after_1s(mocks).await;
    }
}
