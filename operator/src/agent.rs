//! The agent API, which sidecars call:
//!
//! - `GET /v1/policies/{ns}/{name}/config?revision=R`: the config (`AgentConfig`) at once when
//!   its revision is not R, else held up to 30 s and answered the moment the config or the
//!   ready-replica count changes (long-poll); at the deadline, the current config again.
//! - `POST /v1/policies/{ns}/{name}/reports`: an `SloReport`, answered with a `ReportAck`.
//!
//! Every call carries the pod's projected service-account token, checked by a TokenReview; a
//! pod may call only for the policy that governs it. Refusals are problem+json (RFC 9457).

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use apipolicy_api::{contract, report::SloReport};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};
use serde::Serialize;

use crate::{
    auth::{self, Caller, Denial},
    context::Context,
    error::Error,
    hub::PolicyKey,
    serve::Handler,
};

/// How long a long-poll is held when nothing changes.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// Three days of minute buckets for 32 SLOs fit well within this.
const MAX_REPORT_BYTES: usize = 16 << 20;

/// How long a follower waits on the leader for a forwarded report.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// Set on a report a follower forwards (its value: the follower's identity), so that a report
/// is forwarded at most once even while leadership moves.
const FORWARDED_BY: &str = "apipolicy-forwarded-by";

pub struct AgentApi {
    ctx: Arc<Context>,
    /// No token checks: local development only.
    insecure: bool,
    poll_timeout: Duration,
    forwarding: Forwarding,
}

/// How a follower reaches the leader's agent API.
#[derive(Clone, Debug, Default)]
pub struct Forwarding {
    /// This replica's identity in the Lease.
    pub identity: String,
    /// The name the agent API's certificate carries (the Service's DNS name): the leader is
    /// reached at its pod's address, and its certificate verified against this name and the CA.
    pub tls_name: Option<String>,
}

type Reply = Response<Full<Bytes>>;

/// An RFC 9457 problem.
fn problem(status: StatusCode, slug: &str, title: &str, detail: impl Into<String>) -> Reply {
    let body = serde_json::json!({
        "type": format!("https://apipolicy.dev/problems/{slug}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    r
}

fn json(value: &impl Serialize) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec(value).expect("serializable"))));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn denied(d: Denial) -> Reply {
    match d {
        Denial::Unauthenticated(detail) => {
            let mut r = problem(StatusCode::UNAUTHORIZED, "unauthenticated", "Unauthenticated", detail);
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
        Denial::Forbidden(detail) => problem(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail),
    }
}

fn unavailable(detail: impl Into<String>) -> Reply {
    let mut r = problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service Unavailable", detail);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

enum Endpoint {
    Config,
    Reports,
}

/// `/v1/policies/{ns}/{name}/{config|reports}` → the policy and the endpoint.
fn route(path: &str) -> Option<(PolicyKey, Endpoint)> {
    let rest = path.strip_prefix(contract::AGENT_PREFIX)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["", ns, name, tail] if !ns.is_empty() && !name.is_empty() => {
            let endpoint = match *tail {
                contract::CONFIG_ENDPOINT => Endpoint::Config,
                contract::REPORTS_ENDPOINT => Endpoint::Reports,
                _ => return None,
            };
            Some((((*ns).to_owned(), (*name).to_owned()), endpoint))
        }
        _ => None,
    }
}

/// The `revision` query parameter, percent-decoded.
fn revision_param(query: Option<&str>) -> String {
    let raw = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("revision="))
        .unwrap_or_default();
    let bytes = raw.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 3 <= bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(high * 16 + low);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl AgentApi {
    pub fn new(ctx: Arc<Context>, insecure: bool) -> Self {
        Self { ctx, insecure, poll_timeout: POLL_TIMEOUT, forwarding: Forwarding::default() }
    }

    pub fn with_forwarding(self, forwarding: Forwarding) -> Self {
        Self { forwarding, ..self }
    }

    pub fn with_poll_timeout(self, poll_timeout: Duration) -> Self {
        Self { poll_timeout, ..self }
    }

    pub fn handler(self) -> Handler {
        let api = Arc::new(self);
        Arc::new(move |req| {
            let api = api.clone();
            Box::pin(async move { api.handle(req).await })
        })
    }

    async fn handle(&self, req: Request<Incoming>) -> Reply {
        let (label, reply) = match route(req.uri().path()) {
            None => ("other", problem(StatusCode::NOT_FOUND, "not-found", "Not Found", "no such endpoint")),
            Some((key, Endpoint::Config)) if req.method() == Method::GET => {
                ("config", self.config(req, key).await)
            }
            Some((key, Endpoint::Reports)) if req.method() == Method::POST => {
                ("reports", self.reports(req, key).await)
            }
            Some((_, endpoint)) => {
                let allow = match endpoint {
                    Endpoint::Config => "GET",
                    Endpoint::Reports => "POST",
                };
                let mut r = problem(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method-not-allowed",
                    "Method Not Allowed",
                    format!("use {allow}"),
                );
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
                ("other", r)
            }
        };
        self.ctx.metrics.agent_requests.with_label_values(&[label, reply.status().as_str()]).inc();
        reply
    }

    /// The pod making the call, when it may use the policy; `None` in insecure mode.
    async fn caller(
        &self,
        req: &Request<Incoming>,
        key: &PolicyKey,
    ) -> Result<Option<(Caller, Arc<Pod>)>, Reply> {
        if self.insecure {
            return Ok(None);
        }
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(denied(Denial::Unauthenticated(
                "send the pod's projected service-account token as `Authorization: Bearer …`".into(),
            )));
        };
        let ctx = &self.ctx;
        let caller = match ctx.tokens.review(&ctx.client, token, ctx.now_ms(), &ctx.metrics).await {
            Ok(Ok(c)) => c,
            Ok(Err(d)) => return Err(denied(d)),
            Err(e) => {
                tracing::warn!(error = %e, "a token review failed");
                return Err(unavailable("the token could not be checked; try again"));
            }
        };
        let pod = if caller.namespace == key.0 {
            match ctx.pod(&caller.namespace, &caller.pod) {
                Some(p) => Some(p),
                // A pod that just started may not be in the cache yet.
                None => Api::<Pod>::namespaced(ctx.client.clone(), &caller.namespace)
                    .get_opt(&caller.pod)
                    .await
                    .map_err(|source| {
                        let e = Error::GetPod {
                            namespace: caller.namespace.clone(),
                            name: caller.pod.clone(),
                            source,
                        };
                        tracing::warn!(error = %e, "looking up a calling pod failed");
                        unavailable("the calling pod could not be looked up; try again")
                    })?
                    .map(Arc::new),
            }
        } else {
            None
        };
        let policies = ctx.stores.policies.state();
        auth::authorize(&caller, pod.as_deref(), &key.0, &key.1, &policies).map_err(denied)?;
        Ok(pod.map(|p| (caller, p)))
    }

    /// Notes the revision a pod's sidecar runs; a change re-counts the policy's pods.
    fn note_revision(&self, key: &PolicyKey, pod: &Pod, revision: &str) {
        if let Some(uid) = pod.metadata.uid.as_deref()
            && !revision.is_empty()
            && self.ctx.configs.report_revision(uid, revision)
        {
            self.ctx.trigger(key);
        }
    }

    async fn config(&self, req: Request<Incoming>, key: PolicyKey) -> Reply {
        let who = match self.caller(&req, &key).await {
            Ok(w) => w,
            Err(reply) => return reply,
        };
        if self.ctx.policy(&key).is_none() {
            return problem(
                StatusCode::NOT_FOUND,
                "no-policy",
                "Not Found",
                format!("no ApiPolicy {}/{}", key.0, key.1),
            );
        }
        let revision = revision_param(req.uri().query());
        if let Some((_, pod)) = &who {
            self.note_revision(&key, pod, &revision);
        }
        let mut rx = self.ctx.configs.subscribe(&key);
        let first = rx.borrow_and_update().clone();
        if let Some(c) = &first
            && c.config.revision != revision
        {
            return json(&**c);
        }
        let ready_then = first.map(|c| c.ready_replicas);
        let deadline = tokio::time::sleep(self.poll_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return problem(
                            StatusCode::NOT_FOUND,
                            "no-policy",
                            "Not Found",
                            format!("ApiPolicy {}/{} was deleted or no longer applies", key.0, key.1),
                        );
                    }
                    let now = rx.borrow_and_update().clone();
                    if let Some(c) = now
                        && (c.config.revision != revision || Some(c.ready_replicas) != ready_then)
                    {
                        return json(&*c);
                    }
                }
                () = &mut deadline => {
                    let now = rx.borrow().clone();
                    return match now {
                        Some(c) => json(&*c),
                        None => problem(
                            StatusCode::NOT_FOUND,
                            "no-config",
                            "Not Found",
                            format!("ApiPolicy {}/{} has no valid config yet", key.0, key.1),
                        ),
                    };
                }
            }
        }
    }

    async fn reports(&self, req: Request<Incoming>, key: PolicyKey) -> Reply {
        if !self.ctx.leader.is_leader() {
            // The leader alone keeps the histories: hand the report over as it came; the leader
            // checks the token.
            return self.hand_to_leader(req).await;
        }
        let who = match self.caller(&req, &key).await {
            Ok(w) => w,
            Err(reply) => return reply,
        };
        let ctx = &self.ctx;
        if !ctx.ready.load(Ordering::Acquire) {
            return unavailable("the operator is starting; retry");
        }
        let body = match read_report(req.into_body()).await {
            Ok(b) => b,
            Err(reply) => return reply,
        };
        let report: SloReport = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "invalid-report",
                    "Bad Request",
                    format!("not an SloReport: {e}"),
                );
            }
        };
        let pod = match &who {
            Some((caller, pod)) if report.pod != caller.pod => {
                return denied(Denial::Forbidden(format!(
                    "pod {} may not report for pod {}",
                    caller.pod, report.pod
                )));
            }
            Some((_, pod)) => Some(pod.clone()),
            None => ctx.pod(&key.0, &report.pod),
        };
        if let Some(pod) = pod {
            self.note_revision(&key, &pod, &report.revision);
        }
        let Some(policy) = ctx.policy(&key) else {
            return problem(
                StatusCode::NOT_FOUND,
                "no-policy",
                "Not Found",
                format!("no ApiPolicy {}/{}", key.0, key.1),
            );
        };
        let Some(current) = ctx.configs.current(&key) else {
            return problem(
                StatusCode::CONFLICT,
                "no-config",
                "Conflict",
                format!("ApiPolicy {}/{} has no valid config, so no SLOs to report on", key.0, key.1),
            );
        };
        let names: Vec<&str> = current.config.spec.slos.iter().map(|s| s.name.as_str()).collect();
        match ctx.budgets.merge(&key, &names, &report, ctx.now_ms(), || ctx.load_history(&policy)) {
            Ok(merged) => {
                if !merged.unknown_slos.is_empty() {
                    tracing::debug!(policy = %policy.name_any(), slos = %merged.unknown_slos.join(", "), "ignored reports of unknown SLOs");
                }
                json(&merged.ack)
            }
            Err(e) => problem(StatusCode::BAD_REQUEST, "invalid-report", "Bad Request", e.to_string()),
        }
    }
}

impl AgentApi {
    /// A follower's answer to a report: the leader's answer to it, or 503 (with the connection
    /// closed, so that the sidecar's retry may reach another replica) when there is no leader to
    /// hand it to.
    async fn hand_to_leader(&self, req: Request<Incoming>) -> Reply {
        let me = &self.forwarding.identity;
        let not_leader = |detail: String| {
            let mut r = unavailable(detail);
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        };
        if let Some(by) = req.headers().get(FORWARDED_BY) {
            let by = String::from_utf8_lossy(by.as_bytes()).into_owned();
            return not_leader(format!(
                "replica {by} forwarded this report here, but this replica is not the leader either \
                 (leadership is moving); retry"
            ));
        }
        let leader = self.ctx.leader.holder().filter(|h| h.identity != *me);
        let Some(leader) = leader else {
            return not_leader(
                "this replica is not the leader and no leader holds the Lease now; retry".into(),
            );
        };
        let Some(url) = leader.agent_url.clone() else {
            return not_leader(format!(
                "this replica is not the leader, and the leader {} gives no agent URL in the Lease to \
                 forward to (set --advertise-url or POD_IP there); retry",
                leader.identity
            ));
        };
        let (parts, body) = req.into_parts();
        let body = match read_report(body).await {
            Ok(b) => b,
            Err(reply) => return reply,
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let forwarded = self.forward(&url, path, parts.headers.get(header::AUTHORIZATION), body);
        match tokio::time::timeout(FORWARD_TIMEOUT, forwarded).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(why)) => {
                tracing::warn!(leader = %leader.identity, %url, error = %why, "forwarding a report to the leader failed");
                not_leader(format!(
                    "this replica is not the leader, and the leader {} at {url} cannot be reached: {why}; retry",
                    leader.identity
                ))
            }
            Err(_) => not_leader(format!(
                "this replica is not the leader, and the leader {} at {url} did not answer within {FORWARD_TIMEOUT:?}; retry",
                leader.identity
            )),
        }
    }

    /// One POST to the leader on a fresh connection, verified against the operator's CA.
    async fn forward(
        &self,
        url: &str,
        path: &str,
        authorization: Option<&HeaderValue>,
        body: Bytes,
    ) -> Result<Reply, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("the agent URL {url:?} is not valid: {e}"))?;
        let host = uri.host().ok_or_else(|| format!("the agent URL {url:?} has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("the agent URL {url:?} is neither https:// nor http://")),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let mut request = Request::post(path)
            .header(header::HOST, uri.authority().map_or(host, |a| a.as_str()))
            .header(header::CONTENT_TYPE, "application/json")
            .header(FORWARDED_BY, &self.forwarding.identity);
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let response = if https {
            let ca = self
                .ctx
                .ca
                .load_full()
                .ok_or("the operator's CA is unknown, so the leader cannot be verified")?;
            let name = self.forwarding.tls_name.as_deref().unwrap_or(host).to_owned();
            let stream = crate::tls::connect(&ca, &name, tcp).await?;
            send_once(TokioIo::new(stream), request).await?
        } else {
            send_once(TokioIo::new(tcp), request).await?
        };
        let (parts, body) = response.into_parts();
        let bytes = Limited::new(body, 1 << 20).collect().await.map_err(|e| e.to_string())?.to_bytes();
        let mut reply = Response::new(Full::new(bytes));
        *reply.status_mut() = parts.status;
        for name in
            [header::CONTENT_TYPE, header::RETRY_AFTER, header::WWW_AUTHENTICATE, header::CACHE_CONTROL]
        {
            if let Some(value) = parts.headers.get(&name) {
                reply.headers_mut().insert(name, value.clone());
            }
        }
        Ok(reply)
    }
}

/// A report's body, at most [`MAX_REPORT_BYTES`].
async fn read_report(body: Incoming) -> Result<Bytes, Reply> {
    match Limited::new(body, MAX_REPORT_BYTES).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "report-too-large",
            "Payload Too Large",
            format!("a report may be at most {MAX_REPORT_BYTES} bytes"),
        )),
        Err(e) => Err(problem(StatusCode::BAD_REQUEST, "bad-body", "Bad Request", e.to_string())),
    }
}

async fn send_once<I>(io: I, request: Request<Full<Bytes>>) -> Result<Response<Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(request).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Instant};

    use apipolicy_api::report::{AgentConfig, ReportAck};
    use http::HeaderMap;
    use hyper_util::rt::TokioIo;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    use serde_json::Value;
    use tokio::{net::TcpStream, sync::oneshot};

    use super::*;
    use crate::{
        context::key_of,
        fixtures::{
            ApiServerVerifier, Scenario, Seed, TEST_NOW_MS, pod, quickstart, report, timeout_after_1s,
        },
        leader::Holder,
        tls::ServerTls,
    };

    #[test]
    fn routes_and_query() {
        assert!(
            matches!(route("/v1/policies/shop/products/config"), Some((k, Endpoint::Config)) if k == ("shop".into(), "products".into()))
        );
        assert!(matches!(route("/v1/policies/shop/products/reports"), Some((_, Endpoint::Reports))));
        for bad in [
            "/",
            "/v1/policies/shop/config",
            "/v1/policies//x/config",
            "/v1/policies/a/b/c/config",
            "/v2/policies/a/b/config",
            "/v1/policies/a/b/other",
        ] {
            assert!(route(bad).is_none(), "{bad}");
        }
        assert_eq!(revision_param(Some("revision=sha256%3Aabc&x=1")), "sha256:abc");
        assert_eq!(revision_param(Some("x=1&revision=sha256:abc")), "sha256:abc");
        assert_eq!(revision_param(Some("revision=%zz%")), "%zz%");
        assert_eq!(revision_param(None), "");
    }

    /// A TokenReview's answer for a projected token of pod `shop/<pod>`.
    fn bound_to(pod: &str) -> Option<TokenReviewStatus> {
        Some(TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![apipolicy_api::contract::TOKEN_AUDIENCE.into()]),
            error: None,
            user: Some(UserInfo {
                username: Some("system:serviceaccount:shop:default".into()),
                extra: Some(
                    [
                        ("authentication.kubernetes.io/pod-name".to_owned(), vec![pod.to_owned()]),
                        ("authentication.kubernetes.io/pod-uid".to_owned(), vec![format!("uid-{pod}")]),
                    ]
                    .into(),
                ),
                ..UserInfo::default()
            }),
        })
    }

    fn rejected() -> Option<TokenReviewStatus> {
        Some(TokenReviewStatus {
            authenticated: Some(false),
            error: Some("invalid bearer token".into()),
            ..Default::default()
        })
    }

    #[derive(Clone)]
    struct Server {
        addr: SocketAddr,
        /// The CA to trust; `None` for plain HTTP.
        ca: Option<String>,
        /// The server stops when the last copy is dropped.
        _stop: Arc<oneshot::Sender<()>>,
    }

    async fn start(ctx: Arc<Context>, insecure: bool, poll: Duration) -> Server {
        serve_api(AgentApi::new(ctx, insecure).with_poll_timeout(poll), insecure).await
    }

    async fn serve_api(api: AgentApi, insecure: bool) -> Server {
        let listener = crate::serve::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tls, ca) = if insecure {
            (None, None)
        } else {
            let b = crate::certs::issue(&["localhost".into()], crate::context::system_clock()()).unwrap();
            (Some(ServerTls::from_pem(&b.cert, &b.key).unwrap().acceptor()), Some(b.ca_cert))
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let handler = api.handler();
        tokio::spawn(crate::serve::serve(listener, tls, handler, async move {
            let _ = stopped.await;
        }));
        Server { addr, ca, _stop: Arc::new(stop) }
    }

    /// One request on a fresh connection, over TLS verified against the server's CA.
    async fn call(
        server: &Server,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, HeaderMap, Value) {
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let mut request = Request::builder().method(method).uri(path).header(header::HOST, "localhost");
        if let Some(t) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default()))).unwrap();
        let response = match &server.ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
                let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                    .expect("the certificate verifies");
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
                tokio::spawn(conn);
                sender.send_request(request).await.unwrap()
            }
            None => {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
                tokio::spawn(conn);
                sender.send_request(request).await.unwrap()
            }
        };
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        (parts.status, parts.headers, value)
    }

    fn seed(leads: bool) -> Seed {
        Seed {
            policies: vec![quickstart()],
            pods: vec![pod("products-1", &[("app", "products")], Some("products"), None)],
            leader: Some(leads),
            ..Seed::default()
        }
    }

    fn assert_problem(
        status: StatusCode,
        headers: &HeaderMap,
        body: &Value,
        expected: StatusCode,
        detail: &str,
    ) {
        assert_eq!(status, expected, "{body}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(body["status"], expected.as_u16());
        assert!(body["type"].as_str().unwrap().starts_with("https://apipolicy.dev/problems/"), "{body}");
        assert!(body["title"].is_string(), "{body}");
        assert!(body["detail"].as_str().unwrap().contains(detail), "{body} lacks {detail:?}");
    }

    #[tokio::test]
    async fn a_long_poll_answers_within_100ms_of_a_change() {
        let (ctx, verifier) = Context::test(seed(true));
        let mocks = verifier.run(Scenario::TokenReviews(vec![("good".into(), bound_to("products-1"))]));
        let policy = quickstart();
        let key = key_of(&policy);
        let first = apipolicy_api::compile(&policy).unwrap();
        ctx.configs.publish(&key, first.clone(), 1);
        let server = start(ctx.clone(), false, Duration::from_secs(30)).await;

        // A sidecar without config gets it at once, with the ready count.
        let (status, _, body) =
            call(&server, Method::GET, "/v1/policies/shop/products/config", Some("good"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let got: AgentConfig = serde_json::from_value(body).unwrap();
        assert_eq!((got.config.revision.as_str(), got.ready_replicas), (first.revision.as_str(), 1));
        timeout_after_1s(mocks).await;

        // A sidecar on the current revision waits; the change wakes it at once.
        let path =
            format!("/v1/policies/shop/products/config?revision={}", first.revision.replace(':', "%3A"));
        let waiting = {
            let server = server.clone();
            tokio::spawn(async move {
                let r = call(&server, Method::GET, &path, Some("good"), None).await;
                (r, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "held while nothing changes");
        assert_eq!(ctx.configs.reported_revision("uid-products-1").as_deref(), Some(first.revision.as_str()));
        let mut changed = policy.clone();
        changed.spec.upstream.port = 9999;
        let second = apipolicy_api::compile(&changed).unwrap();
        let published_at = Instant::now();
        ctx.configs.publish(&key, second.clone(), 1);
        let ((status, _, body), answered_at) =
            tokio::time::timeout(Duration::from_secs(2), waiting).await.unwrap().unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["config"]["revision"], second.revision.as_str());
        let latency = answered_at.duration_since(published_at);
        assert!(latency < Duration::from_millis(100), "answered {latency:?} after the change");
        assert_eq!(ctx.metrics.token_reviews.with_label_values(&["cached"]).get(), 1);
    }

    #[tokio::test]
    async fn a_long_poll_wakes_for_a_new_ready_count_and_answers_at_its_deadline() {
        let (ctx, verifier) = Context::test(Seed { leader: Some(true), ..seed(true) });
        let policy = quickstart();
        let key = key_of(&policy);
        let config = apipolicy_api::compile(&policy).unwrap();
        ctx.configs.publish(&key, config.clone(), 1);
        let server = start(ctx.clone(), true, Duration::from_millis(400)).await;
        let path = format!("/v1/policies/shop/products/config?revision={}", config.revision);
        let started = Instant::now();
        let (status, _, body) = call(&server, Method::GET, &path, None, None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(400), "held to the deadline");
        assert_eq!(body["config"]["revision"], config.revision.as_str());

        let ready_change = {
            let ctx = ctx.clone();
            let key = key.clone();
            let config = config.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                ctx.configs.publish(&key, config, 3);
            })
        };
        let started = Instant::now();
        let (_, _, body) = call(&server, Method::GET, &path, None, None).await;
        assert_eq!(body["readyReplicas"], 3);
        assert!(started.elapsed() < Duration::from_millis(350), "woken by the count, not the deadline");
        ready_change.await.unwrap();

        // Deleting the policy ends the wait.
        let forget = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                ctx.forget(&key);
            })
        };
        let (status, headers, body) = call(&server, Method::GET, &path, None, None).await;
        assert_problem(status, &headers, &body, StatusCode::NOT_FOUND, "was deleted or no longer applies");
        forget.await.unwrap();
        let (status, headers, body) =
            call(&server, Method::GET, "/v1/policies/shop/nope/config", None, None).await;
        assert_problem(status, &headers, &body, StatusCode::NOT_FOUND, "no ApiPolicy shop/nope");
        timeout_after_1s(verifier.run(Scenario::Nothing)).await;
    }

    #[tokio::test]
    async fn unauthenticated_and_cross_policy_calls_are_refused() {
        let mut s = seed(true);
        s.policies.push(crate::fixtures::policy_at("other", "app", "other", 1));
        let (ctx, verifier) = Context::test(s);
        let mocks = verifier.run(Scenario::TokenReviews(vec![
            ("forged".into(), rejected()),
            ("good".into(), bound_to("products-1")),
            ("ghost".into(), bound_to("ghost")),
        ]));
        ctx.configs.publish(&key_of(&quickstart()), apipolicy_api::compile(&quickstart()).unwrap(), 1);
        let server = start(ctx.clone(), false, Duration::from_secs(30)).await;
        let config = "/v1/policies/shop/products/config";

        let (status, headers, body) = call(&server, Method::GET, config, None, None).await;
        assert_problem(status, &headers, &body, StatusCode::UNAUTHORIZED, "Authorization: Bearer");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        let (status, headers, body) = call(&server, Method::GET, config, Some("forged"), None).await;
        assert_problem(status, &headers, &body, StatusCode::UNAUTHORIZED, "invalid bearer token");
        let (status, headers, body) =
            call(&server, Method::GET, "/v1/policies/shop/other/config", Some("good"), None).await;
        assert_problem(
            status,
            &headers,
            &body,
            StatusCode::FORBIDDEN,
            "governed by ApiPolicy products, not other",
        );
        let (status, headers, body) =
            call(&server, Method::GET, "/v1/policies/elsewhere/products/config", Some("good"), None).await;
        assert_problem(
            status,
            &headers,
            &body,
            StatusCode::FORBIDDEN,
            "may not use ApiPolicies of namespace elsewhere",
        );
        // A pod that is in no cache and, per the API server, does not exist.
        let ghost = tokio::spawn({
            let server = server.clone();
            async move { call(&server, Method::GET, config, Some("ghost"), None).await }
        });
        let verifier = timeout_after_1s(mocks).await;
        let mocks = tokio::spawn(async move { verifier.pod_not_found("ghost").await });
        let (status, headers, body) = ghost.await.unwrap();
        assert_problem(status, &headers, &body, StatusCode::FORBIDDEN, "pod shop/ghost does not exist");
        mocks.await.unwrap();

        let forged_report = serde_json::to_vec(&report("products-2", TEST_NOW_MS, 1, 1)).unwrap();
        let (status, headers, body) = call(
            &server,
            Method::POST,
            "/v1/policies/shop/products/reports",
            Some("good"),
            Some(forged_report),
        )
        .await;
        assert_problem(status, &headers, &body, StatusCode::FORBIDDEN, "may not report for pod products-2");
        let (status, headers, body) = call(&server, Method::PUT, config, Some("good"), None).await;
        assert_problem(status, &headers, &body, StatusCode::METHOD_NOT_ALLOWED, "use GET");
        assert_eq!(headers[header::ALLOW], "GET");
        assert_eq!(ctx.metrics.agent_requests.with_label_values(&["config", "403"]).get(), 3);
    }

    #[tokio::test]
    async fn reports_are_merged_acknowledged_and_only_by_the_leader() {
        let (ctx, verifier) = Context::test(seed(true));
        let mocks = verifier.run(Scenario::TokenReviews(vec![("good".into(), bound_to("products-1"))]));
        let key = key_of(&quickstart());
        let reports = "/v1/policies/shop/products/reports";
        let server = start(ctx.clone(), false, Duration::from_secs(30)).await;
        let body = serde_json::to_vec(&report("products-1", TEST_NOW_MS, 9, 10)).unwrap();

        let (status, headers, problem) =
            call(&server, Method::POST, reports, Some("good"), Some(body.clone())).await;
        assert_problem(status, &headers, &problem, StatusCode::CONFLICT, "has no valid config");
        timeout_after_1s(mocks).await;

        ctx.configs.publish(&key, apipolicy_api::compile(&quickstart()).unwrap(), 1);
        let (status, _, ack) = call(&server, Method::POST, reports, Some("good"), Some(body.clone())).await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        assert_eq!(serde_json::from_value::<ReportAck>(ack).unwrap(), ReportAck { ack_ms: 0 });
        let (status, _, _) = call(&server, Method::POST, reports, Some("good"), Some(body)).await;
        assert_eq!(status, StatusCode::OK);
        let slos = ctx.configs.current(&key).unwrap().config.spec.slos.clone();
        let figures = ctx.budgets.statuses(&key, &slos, TEST_NOW_MS, || unreachable!());
        assert_eq!((figures[0].good_requests, figures[0].total_requests), (9, 10), "the repeat counted once");
        assert_eq!(ctx.configs.reported_revision("uid-products-1").as_deref(), Some("sha256:any"));

        let (status, headers, problem) =
            call(&server, Method::POST, reports, Some("good"), Some(b"{\"pod\": 1}".to_vec())).await;
        assert_problem(status, &headers, &problem, StatusCode::BAD_REQUEST, "not an SloReport");
        let mut wide = report("products-1", TEST_NOW_MS, 1, 1);
        wide.slos[0].buckets[0].width_ms = 1;
        let (status, headers, problem) =
            call(&server, Method::POST, reports, Some("good"), Some(serde_json::to_vec(&wide).unwrap()))
                .await;
        assert_problem(status, &headers, &problem, StatusCode::BAD_REQUEST, "buckets are one minute");
    }

    /// A follower of `leader`, serving plain HTTP, that trusts `ca`.
    async fn follower(leader: Option<Holder>, ca: Option<&str>) -> (Arc<Context>, ApiServerVerifier, Server) {
        let (ctx, verifier) = Context::test(Seed { following: leader, ..seed(false) });
        ctx.configs.publish(&key_of(&quickstart()), apipolicy_api::compile(&quickstart()).unwrap(), 1);
        ctx.ca.store(ca.map(|c| Arc::new(c.to_owned())));
        let forwarding = Forwarding { identity: "follower".into(), tls_name: Some("localhost".into()) };
        let server = serve_api(AgentApi::new(ctx.clone(), true).with_forwarding(forwarding), true).await;
        (ctx, verifier, server)
    }

    fn leader_at(url: String) -> Holder {
        Holder { identity: "the-leader".into(), agent_url: Some(url) }
    }

    const REPORTS: &str = "/v1/policies/shop/products/reports";

    #[tokio::test]
    async fn a_follower_hands_reports_to_the_leader_and_serves_config_itself() {
        let (leader_ctx, verifier) = Context::test(seed(true));
        let mocks = verifier.run(Scenario::TokenReviews(vec![
            ("good".into(), bound_to("products-1")),
            ("forged".into(), rejected()),
        ]));
        let key = key_of(&quickstart());
        leader_ctx.configs.publish(&key, apipolicy_api::compile(&quickstart()).unwrap(), 1);
        let leader = start(leader_ctx.clone(), false, Duration::from_secs(30)).await;
        let url = format!("https://127.0.0.1:{}", leader.addr.port());
        let (_, follower_api, follower) = follower(Some(leader_at(url)), leader.ca.as_deref()).await;

        // Over TLS to the leader's address, verified for the Service's name; the leader checks the
        // token and merges the report.
        let body = serde_json::to_vec(&report("products-1", TEST_NOW_MS, 9, 10)).unwrap();
        let (status, _, ack) = call(&follower, Method::POST, REPORTS, Some("good"), Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{ack}");
        assert_eq!(serde_json::from_value::<ReportAck>(ack).unwrap(), ReportAck { ack_ms: 0 });
        let slos = leader_ctx.configs.current(&key).unwrap().config.spec.slos.clone();
        let figures = leader_ctx.budgets.statuses(&key, &slos, TEST_NOW_MS, || unreachable!());
        assert_eq!((figures[0].good_requests, figures[0].total_requests), (9, 10));
        assert_eq!(leader_ctx.metrics.agent_requests.with_label_values(&["reports", "200"]).get(), 1);

        // The leader's refusals come back as they are.
        let body = serde_json::to_vec(&report("products-1", TEST_NOW_MS, 1, 1)).unwrap();
        let (status, headers, problem) =
            call(&follower, Method::POST, REPORTS, Some("forged"), Some(body)).await;
        assert_problem(status, &headers, &problem, StatusCode::UNAUTHORIZED, "");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        timeout_after_1s(mocks).await;

        // Config is served by every replica.
        let (status, _, _) =
            call(&follower, Method::GET, "/v1/policies/shop/products/config", None, None).await;
        assert_eq!(status, StatusCode::OK);
        timeout_after_1s(follower_api.run(Scenario::Nothing)).await;
    }

    #[tokio::test]
    async fn a_follower_without_a_leader_to_hand_to_answers_503_and_closes() {
        let body = serde_json::to_vec(&report("products-1", TEST_NOW_MS, 9, 10)).unwrap();
        // Nobody holds the Lease.
        let (_, _, server) = follower(None, None).await;
        let (status, headers, problem) = call(&server, Method::POST, REPORTS, None, Some(body.clone())).await;
        assert_problem(
            status,
            &headers,
            &problem,
            StatusCode::SERVICE_UNAVAILABLE,
            "no leader holds the Lease",
        );
        assert_eq!(headers[header::CONNECTION], "close");
        assert_eq!(headers[header::RETRY_AFTER], "1");

        // The leader gives no URL.
        let (_, _, server) =
            follower(Some(Holder { identity: "the-leader".into(), agent_url: None }), None).await;
        let (status, headers, problem) = call(&server, Method::POST, REPORTS, None, Some(body.clone())).await;
        assert_problem(status, &headers, &problem, StatusCode::SERVICE_UNAVAILABLE, "gives no agent URL");

        // The leader is gone: its address refuses connections.
        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let url = format!("http://{gone}");
        let (_, _, server) = follower(Some(leader_at(url.clone())), None).await;
        let (status, headers, problem) = call(&server, Method::POST, REPORTS, None, Some(body.clone())).await;
        assert_problem(
            status,
            &headers,
            &problem,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the-leader at {url} cannot be reached"),
        );
        assert_eq!(headers[header::CONNECTION], "close");

        // A report another follower forwarded is never forwarded again: the "leader" it was sent
        // to is a follower too, which hands it to another "leader" that is this one.
        let (_, _, first) = follower(None, None).await;
        let (_, _, second) = follower(Some(leader_at(format!("http://{}", first.addr))), None).await;
        let (status, headers, problem) = call(&second, Method::POST, REPORTS, None, Some(body)).await;
        assert_problem(status, &headers, &problem, StatusCode::SERVICE_UNAVAILABLE, "not the leader either");
    }

    impl ApiServerVerifier {
        /// Answers a pod lookup with 404.
        async fn pod_not_found(mut self, name: &str) -> Self {
            let (request, send) = self.0.next_request().await.expect("a pod lookup");
            assert_eq!(request.method(), Method::GET);
            assert_eq!(request.uri().path(), format!("/api/v1/namespaces/shop/pods/{name}"));
            let status = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                "message": format!("pods \"{name}\" not found"),
            });
            send.send_response(
                Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(kube::client::Body::from(serde_json::to_vec(&status).unwrap()))
                    .unwrap(),
            );
            self
        }
    }
}
