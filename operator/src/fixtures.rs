//! Test fixtures: objects, and a mocked API server (tower-test) that checks each request of a
//! scenario and answers it, in the manner of kube-rs controller-rs.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use apipolicy_api::{
    ApiPolicy, ApiPolicyStatus, SloState,
    report::{Bucket, SloCounters, SloReport},
    slo::MINUTE_MS,
};
use futures::channel::mpsc;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::{
    api::{
        authentication::v1::{TokenReview, TokenReviewStatus},
        core::v1::{ConfigMap, Pod, PodStatus},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Client, ResourceExt,
    client::Body,
    core::GroupVersionKind,
    discovery::ApiResource,
    runtime::{reflector, watcher},
};
use serde_json::Value;

use crate::{
    budgets::Budgets,
    context::{Context, Stores, key_of},
    leader::Leader,
    metrics::Metrics,
    render,
    status::{self, Census, Observed, Verdict},
};

/// The tests' "now": a minute boundary.
pub const TEST_NOW_MS: u64 = 1_800_000_000_000;

pub fn quickstart() -> ApiPolicy {
    let text = include_str!("../../examples/quickstart.yaml");
    let mut p: ApiPolicy = serde_yaml::from_str(text).expect("the quickstart example parses");
    stamp(&mut p, 1_700_000_000);
    p
}

fn stamp(p: &mut ApiPolicy, created_s: i64) {
    let name = p.name_any();
    p.metadata.uid = Some(format!("uid-{name}"));
    p.metadata.generation = Some(1);
    p.metadata.resource_version = Some("1".into());
    p.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created_s).expect("a valid time")));
}

/// A small valid policy in namespace `shop` selecting `key=value`, created at `created_s`.
pub fn policy_at(name: &str, key: &str, value: &str, created_s: i64) -> ApiPolicy {
    let mut p: ApiPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "apipolicy.dev/v1alpha1",
        "kind": "ApiPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {key: value}}, "upstream": {"port": 8080}},
    }))
    .expect("a valid policy");
    stamp(&mut p, created_s);
    p
}

/// A running pod of namespace `shop`, with the injector's annotations when given.
pub fn pod(name: &str, labels: &[(&str, &str)], policy: Option<&str>, revision: Option<&str>) -> Pod {
    let mut annotations = BTreeMap::new();
    if let Some(p) = policy {
        annotations.insert(apipolicy_api::contract::POLICY_ANNOTATION.to_owned(), p.to_owned());
    }
    if let Some(r) = revision {
        annotations.insert(apipolicy_api::contract::INJECTED_REVISION_ANNOTATION.to_owned(), r.to_owned());
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            uid: Some(format!("uid-{name}")),
            labels: Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(PodStatus { phase: Some("Running".into()), ..PodStatus::default() }),
    }
}

/// One SLO report of a pod: a single minute bucket of the availability SLO.
pub fn report(pod: &str, sent_at_ms: u64, good: u64, total: u64) -> SloReport {
    SloReport {
        pod: pod.into(),
        started_at_ms: TEST_NOW_MS - 3_600_000,
        sent_at_ms,
        revision: "sha256:any".into(),
        slos: vec![SloCounters {
            name: "availability".into(),
            buckets: vec![Bucket {
                start_ms: sent_at_ms / MINUTE_MS * MINUTE_MS,
                width_ms: MINUTE_MS,
                good,
                total,
            }],
        }],
    }
}

pub fn prometheus_rule_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PrometheusRule"))
}

/// The policy as the controller leaves it at `TEST_NOW_MS` without pods, and its ConfigMap.
pub fn reconciled(mut policy: ApiPolicy) -> (ApiPolicy, ConfigMap) {
    let config = apipolicy_api::compile(&policy).expect("a valid policy");
    let figures =
        Budgets::default().statuses(&key_of(&policy), &config.spec.slos, TEST_NOW_MS, Default::default);
    let status = status::desired(Observed {
        policy: &policy,
        verdict: &Verdict::Accepted,
        revision: Some(config.revision.clone()),
        census: Census::default(),
        slos: figures,
        port_problems: Vec::new(),
        now: Timestamp::from_millisecond(TEST_NOW_MS as i64).expect("a valid time"),
    });
    policy.status = Some(status);
    let cm = render::config_map(&policy, &config, None);
    (policy, cm)
}

/// What the caches hold at the start of a test.
#[derive(Default)]
pub struct Seed {
    pub policies: Vec<ApiPolicy>,
    pub pods: Vec<Pod>,
    pub config_maps: Vec<ConfigMap>,
    /// Leads unless set to false.
    pub leader: Option<bool>,
    /// A follower of this leader (`leader` is then ignored).
    pub following: Option<crate::leader::Holder>,
}

impl Seed {
    pub fn with_policies(policies: Vec<ApiPolicy>) -> Self {
        Self { policies, ..Self::default() }
    }
}

fn filled<K>(objects: Vec<K>) -> reflector::Store<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Plays the API server for one scenario: each expected request is checked and answered.
pub struct ApiServerVerifier(pub(crate) ApiServerHandle);

/// The requests a reconciliation (or the agent API) should make, in order.
pub enum Scenario {
    /// No request at all.
    Nothing,
    /// A new policy: its ConfigMap, an accepted status, a ConfigUpdated event.
    Created(ApiPolicy),
    /// A changed spec: the ConfigMap and status again, with the new revision and generation.
    Updated(ApiPolicy),
    /// An invalid spec: a rejected status with every problem, and a warning.
    Invalid(ApiPolicy),
    /// The newer of two policies on the same pods: rejected, naming the winner.
    Conflicted(ApiPolicy, String),
    /// The status patch is refused with 409.
    StatusConflict(ApiPolicy),
    /// Merged SLO reports: the history ConfigMap, then the status with the figures.
    SloFigures(ApiPolicy),
    /// A history too large for a ConfigMap whole: saved trimmed, with this many processes, then
    /// the status.
    SloHistoryTrimmed(ApiPolicy, usize),
    /// The API server refuses the history ConfigMap; the status is written all the same.
    SloHistoryRefused(ApiPolicy),
    /// The PrometheusRule.
    PrometheusRule(ApiPolicy),
    /// TokenReviews, answered in order: (expected token, answer).
    TokenReviews(Vec<(String, Option<TokenReviewStatus>)>),
    /// The ConfigMap written again, now with this CA beside the config; nothing else.
    CaWritten(ApiPolicy, String),
    /// A status with the PortUnnamed condition naming this pod.
    PortUnnamed(ApiPolicy, String),
}

pub async fn timeout_after_1s(handle: tokio::task::JoinHandle<ApiServerVerifier>) -> ApiServerVerifier {
    tokio::time::timeout(Duration::from_secs(1), handle)
        .await
        .expect("the scenario finished within a second")
        .expect("the scenario's checks passed")
}

fn ok(body: Vec<u8>) -> Response<Body> {
    Response::builder().body(Body::from(body)).expect("a response")
}

/// An API server's refusal: a `Status` object with this code, reason and message.
fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let status = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
        "code": code.as_u16(), "message": message,
    });
    Response::builder()
        .status(code)
        .body(Body::from(serde_json::to_vec(&status).unwrap()))
        .expect("a response")
}

impl ApiServerVerifier {
    pub fn run(self, scenario: Scenario) -> tokio::task::JoinHandle<Self> {
        tokio::spawn(async move {
            match scenario {
                Scenario::Nothing => self.expect_nothing().await,
                Scenario::Created(p) => {
                    let rev = apipolicy_api::compile(&p).unwrap().revision;
                    self.config_map(&p, &rev)
                        .await
                        .status(&p, |s| {
                            accepted(s, true, "Accepted");
                            assert_eq!(s.config_revision.as_deref(), Some(rev.as_str()));
                            let programmed = &s.conditions[1];
                            assert_eq!(
                                (programmed.status.as_str(), programmed.reason.as_str()),
                                ("True", "Programmed")
                            );
                            assert!(programmed.message.starts_with("0 of 0 pods on revision sha256:"));
                            assert_eq!(s.observed_generation, Some(1));
                            assert_eq!(s.slos.len(), 1);
                            assert_eq!(
                                (s.slos[0].error_budget_remaining, s.slos[0].state),
                                (100.0, SloState::Healthy)
                            );
                            assert_eq!(s.lowest_error_budget_remaining, Some(100.0));
                            assert_eq!(s.pods.as_ref().and_then(|p| p.summary.as_deref()), Some("0/0"));
                        })
                        .await
                        .event("Normal", "ConfigUpdated")
                        .await
                }
                Scenario::Updated(p) => {
                    let rev = apipolicy_api::compile(&p).unwrap().revision;
                    assert_ne!(Some(&rev), p.status.as_ref().and_then(|s| s.config_revision.as_ref()));
                    self.config_map(&p, &rev)
                        .await
                        .status(&p, |s| {
                            accepted(s, true, "Accepted");
                            assert_eq!(s.config_revision.as_deref(), Some(rev.as_str()));
                            assert_eq!(s.observed_generation, Some(2));
                            assert!(s.conditions.iter().all(|c| c.observed_generation == Some(2)));
                        })
                        .await
                        .event("Normal", "ConfigUpdated")
                        .await
                }
                Scenario::Invalid(p) => {
                    self.status(&p, |s| {
                        let c = accepted(s, false, "InvalidSpec");
                        assert!(c.message.starts_with("2 problem(s): "), "{}", c.message);
                        assert!(c.message.contains("spec.upstream.port: "), "{}", c.message);
                        assert!(c.message.contains("spec.slos[0].objective: "), "{}", c.message);
                        assert_eq!(s.conditions[1].status, "False");
                        assert!(s.config_revision.is_none());
                    })
                    .await
                    .event("Warning", "InvalidSpec")
                    .await
                }
                Scenario::Conflicted(p, winner) => {
                    self.status(&p, |s| {
                        let c = accepted(s, false, "Conflicted");
                        assert!(
                            c.message.starts_with(&format!("ApiPolicy {winner} is older")),
                            "{}",
                            c.message
                        );
                        assert_eq!(s.conditions[1].reason, "Conflicted");
                        assert_eq!(s.pods.as_ref().map(|p| p.matched), Some(1));
                    })
                    .await
                    .event("Warning", "Conflicted")
                    .await
                }
                Scenario::StatusConflict(p) => {
                    let rev = apipolicy_api::compile(&p).unwrap().revision;
                    self.config_map(&p, &rev).await.status_conflict(&p).await
                }
                Scenario::SloHistoryTrimmed(p, processes) => {
                    self.slo_history(&p, processes).await.status(&p, |s| assert_eq!(s.slos.len(), 1)).await
                }
                Scenario::SloHistoryRefused(p) => {
                    self.slo_history_refused(&p)
                        .await
                        .status(&p, |s| assert_eq!(s.slos[0].total_requests, 1000))
                        .await
                }
                Scenario::SloFigures(p) => {
                    self.slo_history(&p, 1)
                        .await
                        .status(&p, |s| {
                            let slo = &s.slos[0];
                            assert_eq!((slo.good_requests, slo.total_requests), (990, 1000));
                            assert_eq!(slo.sli, 99.0);
                            // 1% bad on a 0.1% budget: ten budgets spent (floored), and a burn
                            // rate of 10 in every window: over 6 in the 6h and 30m windows.
                            assert_eq!(slo.error_budget_remaining, -100.0);
                            assert_eq!(slo.burn_rates["30m"], 10.0);
                            assert_eq!(slo.state, SloState::Critical);
                            assert_eq!(s.slo_state, Some(SloState::Critical));
                            assert_eq!(s.lowest_error_budget_remaining, Some(-100.0));
                        })
                        .await
                }
                Scenario::PrometheusRule(p) => self.prometheus_rule(&p).await,
                Scenario::CaWritten(p, ca) => self.config_map_with_ca(&p, &ca).await.expect_nothing().await,
                Scenario::PortUnnamed(p, pod) => {
                    self.status(&p, |s| {
                        let c = s
                            .conditions
                            .iter()
                            .find(|c| c.type_ == status::PORT_UNNAMED)
                            .expect("PortUnnamed");
                        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "PortUnnamed"));
                        assert!(c.message.contains(&format!("such as {pod}: ")), "{}", c.message);
                        assert!(c.message.contains("targetPort"), "{}", c.message);
                    })
                    .await
                }
                Scenario::TokenReviews(answers) => {
                    let mut me = self;
                    for (token, answer) in answers {
                        me = me.token_review(&token, answer).await;
                    }
                    me
                }
            }
        })
    }

    async fn next(&mut self) -> (Request<Body>, tower_test::mock::SendResponse<Response<Body>>) {
        self.0.next_request().await.expect("the client made the expected request")
    }

    async fn body(request: Request<Body>) -> Value {
        let bytes = request.into_body().collect_bytes().await.expect("a request body");
        serde_json::from_slice(&bytes).expect("a JSON body")
    }

    async fn expect_nothing(mut self) -> Self {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(100), self.0.next_request()).await
        {
            panic!("unexpected request: {} {}", request.method(), request.uri());
        }
        self
    }

    fn assert_apply(request: &Request<Body>, path: &str) {
        assert_eq!(request.method(), Method::PATCH);
        assert_eq!(request.uri().path(), path);
        let query = request.uri().query().unwrap_or_default();
        assert!(query.contains("fieldManager=apipolicy-operator") && query.contains("force=true"), "{query}");
        assert_eq!(request.headers()["content-type"], "application/apply-patch+yaml");
    }

    async fn config_map(mut self, p: &ApiPolicy, revision: &str) -> Self {
        let (request, send) = self.next().await;
        Self::assert_apply(
            &request,
            &format!("/api/v1/namespaces/shop/configmaps/apipolicy-{}", p.name_any()),
        );
        let body = Self::body(request).await;
        assert_eq!(
            body["metadata"]["annotations"][apipolicy_api::contract::CONFIG_REVISION_ANNOTATION],
            revision
        );
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], p.uid().unwrap());
        let config = &body["data"][render::CONFIG_KEY];
        let config: Value = serde_json::from_str(config.as_str().expect("config text")).unwrap();
        assert_eq!(config["revision"], revision);
        send.send_response(ok(serde_json::to_vec(&body).unwrap()));
        self
    }

    async fn config_map_with_ca(mut self, p: &ApiPolicy, ca: &str) -> Self {
        let (request, send) = self.next().await;
        Self::assert_apply(
            &request,
            &format!("/api/v1/namespaces/shop/configmaps/apipolicy-{}", p.name_any()),
        );
        let body = Self::body(request).await;
        assert_eq!(body["data"][render::CA_KEY], ca);
        assert!(body["data"][render::CONFIG_KEY].is_string());
        send.send_response(ok(serde_json::to_vec(&body).unwrap()));
        self
    }

    /// The history ConfigMap, which the API server and etcd take, with this many processes.
    async fn slo_history(mut self, p: &ApiPolicy, processes: usize) -> Self {
        let (request, send) = self.next().await;
        Self::assert_apply(
            &request,
            &format!("/api/v1/namespaces/shop/configmaps/apipolicy-{}-slo", p.name_any()),
        );
        let raw = request.into_body().collect_bytes().await.expect("a request body");
        // etcd takes values of up to 1.5 MiB; binaryData travels as base64.
        assert!(raw.len() < 1536 * 1024, "{} bytes on the wire", raw.len());
        let body: Value = serde_json::from_slice(&raw).expect("a JSON body");
        let cm: ConfigMap = serde_json::from_value(body.clone()).unwrap();
        let bytes = &cm.binary_data.as_ref().unwrap()[render::HISTORY_KEY].0;
        // The API server's limit counts the decoded bytes of data and binaryData.
        assert!(bytes.len() <= render::HISTORY_MAX_BYTES, "{} bytes of history", bytes.len());
        assert!(cm.data.is_none());
        let history = crate::slo_merge::SloHistory::restore(bytes).expect("a readable history");
        assert_eq!(history.processes(), processes);
        send.send_response(ok(serde_json::to_vec(&body).unwrap()));
        self
    }

    async fn slo_history_refused(mut self, p: &ApiPolicy) -> Self {
        let (request, send) = self.next().await;
        Self::assert_apply(
            &request,
            &format!("/api/v1/namespaces/shop/configmaps/apipolicy-{}-slo", p.name_any()),
        );
        send.send_response(failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "etcdserver: request timed out",
        ));
        self
    }

    async fn status(mut self, p: &ApiPolicy, check: impl FnOnce(&ApiPolicyStatus)) -> Self {
        let (request, send) = self.next().await;
        Self::assert_apply(
            &request,
            &format!("/apis/apipolicy.dev/v1alpha1/namespaces/shop/apipolicies/{}/status", p.name_any()),
        );
        let body = Self::body(request).await;
        assert_eq!(
            (body["apiVersion"].as_str(), body["kind"].as_str()),
            (Some("apipolicy.dev/v1alpha1"), Some("ApiPolicy"))
        );
        let status: ApiPolicyStatus = serde_json::from_value(body["status"].clone()).expect("a status");
        check(&status);
        let mut answer = p.clone();
        answer.status = Some(status);
        send.send_response(ok(serde_json::to_vec(&answer).unwrap()));
        self
    }

    async fn status_conflict(mut self, p: &ApiPolicy) -> Self {
        let (request, send) = self.next().await;
        assert!(request.uri().path().ends_with(&format!("/apipolicies/{}/status", p.name_any())));
        send.send_response(failure(
            StatusCode::CONFLICT,
            "Conflict",
            "Operation cannot be fulfilled: the object has been modified",
        ));
        self
    }

    async fn event(mut self, type_: &str, reason: &str) -> Self {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri().path(), "/apis/events.k8s.io/v1/namespaces/shop/events");
        let body = Self::body(request).await;
        assert_eq!((body["type"].as_str(), body["reason"].as_str()), (Some(type_), Some(reason)), "{body}");
        assert_eq!(body["regarding"]["kind"], "ApiPolicy");
        send.send_response(ok(serde_json::to_vec(&body).unwrap()));
        self
    }

    async fn prometheus_rule(mut self, p: &ApiPolicy) -> Self {
        let (request, send) = self.next().await;
        Self::assert_apply(
            &request,
            &format!(
                "/apis/monitoring.coreos.com/v1/namespaces/shop/prometheusrules/apipolicy-{}",
                p.name_any()
            ),
        );
        let body = Self::body(request).await;
        assert_eq!(body["kind"], "PrometheusRule");
        assert_eq!(body["spec"]["groups"].as_array().map(Vec::len), Some(p.spec.slos.len()));
        send.send_response(ok(serde_json::to_vec(&body).unwrap()));
        self
    }

    async fn token_review(mut self, token: &str, answer: Option<TokenReviewStatus>) -> Self {
        let (request, send) = self.next().await;
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri().path(), "/apis/authentication.k8s.io/v1/tokenreviews");
        let review: TokenReview = serde_json::from_value(Self::body(request).await).unwrap();
        assert_eq!(review.spec.token.as_deref(), Some(token));
        assert_eq!(review.spec.audiences, Some(vec![apipolicy_api::contract::TOKEN_AUDIENCE.to_owned()]));
        let answered = TokenReview { status: answer, ..review };
        send.send_response(ok(serde_json::to_vec(&answered).unwrap()));
        self
    }
}

/// The Accepted condition, checked.
fn accepted<'a>(
    s: &'a ApiPolicyStatus,
    status: bool,
    reason: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let c = &s.conditions[0];
    assert_eq!(c.type_, status::ACCEPTED);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        (if status { "True" } else { "False" }, reason),
        "{c:?}"
    );
    c
}

impl Context {
    /// A context on a mocked API server, with caches filled from `seed` and a fixed clock.
    pub fn test(seed: Seed) -> (Arc<Self>, ApiServerVerifier) {
        let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(mock, "default");
        let stores = Stores {
            policies: filled(seed.policies),
            pods: filled(seed.pods),
            config_maps: filled(seed.config_maps),
        };
        let (triggers, _) = mpsc::channel(16);
        let ctx = Context::new(
            client,
            stores,
            match seed.following {
                Some(holder) => Leader::following(holder),
                None => Leader::fixed(seed.leader.unwrap_or(true)),
            },
            Arc::new(Metrics::new().expect("metrics register")),
            "test",
            triggers,
            Arc::new(|| TEST_NOW_MS),
        );
        ctx.ready.store(true, Ordering::Release);
        (Arc::new(ctx), ApiServerVerifier(handle))
    }
}
