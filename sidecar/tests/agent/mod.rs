//! `--operator`: the sidecar against a stand-in for the operator's agent API, over plain HTTP
//! and over HTTPS with a CA made here.

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use apipolicy_api::{
    SidecarConfig, compile,
    report::{AgentConfig, ReportAck, SloReport},
};
use apipolicy_sidecar::{agent::AgentFlags, server::start};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::watch};

use crate::support::*;

const TOKEN: &str = "projected-token-of-test-pod";

/// The operator's agent API, as far as a sidecar can tell.
struct Operator {
    config: watch::Sender<AgentConfig>,
    /// Drops every open connection without an answer.
    cut: Arc<tokio::sync::Notify>,
    reports: Arc<Mutex<Vec<SloReport>>>,
    /// Config requests (long-polls) received so far.
    polls: Arc<AtomicUsize>,
    url: String,
}

fn compiled(text: &str) -> SidecarConfig {
    compile(&serde_yaml::from_str(text).unwrap()).unwrap()
}

async fn serve_operator(first: AgentConfig, tls: Option<tokio_rustls::TlsAcceptor>) -> Operator {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (config, _) = watch::channel(first);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let scheme = if tls.is_some() { "https" } else { "http" };
    let (tx, store) = (config.clone(), reports.clone());
    let polls = Arc::new(AtomicUsize::new(0));
    let counted = polls.clone();
    let cut = Arc::new(tokio::sync::Notify::new());
    let cuts = cut.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (tx, store, tls, cut) = (tx.clone(), store.clone(), tls.clone(), cuts.clone());
            let counted = counted.clone();
            let service = service_fn(move |req| {
                let (tx, store, counted) = (tx.clone(), store.clone(), counted.clone());
                async move { Ok::<_, Infallible>(agent_api(req, tx, store, &counted).await) }
            });
            tokio::spawn(async move {
                let builder = auto::Builder::new(TokioExecutor::new());
                let cut = cut.notified();
                match tls {
                    Some(acceptor) => {
                        let stream = acceptor.accept(stream).await.unwrap();
                        tokio::select! {
                            _ = builder.serve_connection(TokioIo::new(stream), service) => {}
                            () = cut => {}
                        }
                    }
                    None => {
                        tokio::select! {
                            _ = builder.serve_connection(TokioIo::new(stream), service) => {}
                            () = cut => {}
                        }
                    }
                }
            });
        }
    });
    Operator { config, cut, reports, polls, url: format!("{scheme}://localhost:{port}") }
}

async fn agent_api(
    req: Request<Incoming>,
    config: watch::Sender<AgentConfig>,
    reports: Arc<Mutex<Vec<SloReport>>>,
    polls: &AtomicUsize,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.headers().get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
        return reply(StatusCode::UNAUTHORIZED, b"no token".to_vec());
    }
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/v1/policies/default/test/config" => {
            polls.fetch_add(1, Ordering::SeqCst);
            let known = req.uri().query().and_then(|q| q.strip_prefix("revision=")).unwrap_or("").to_owned();
            let mut rx = config.subscribe();
            if rx.borrow().config.revision == known {
                // The long-poll: answer on a change, or after a while with what there is.
                let _ = tokio::time::timeout(Duration::from_secs(5), rx.changed()).await;
            }
            let body = serde_json::to_vec(&*rx.borrow()).unwrap();
            reply(StatusCode::OK, body)
        }
        "/v1/policies/default/test/reports" => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let report: SloReport = serde_json::from_slice(&body).unwrap();
            reports.lock().unwrap().push(report);
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
                as u64;
            reply(StatusCode::OK, serde_json::to_vec(&ReportAck { ack_ms: now }).unwrap())
        }
        _ => reply(StatusCode::NOT_FOUND, Vec::new()),
    }
}

const V1: &str = "  - name: limited
    match: {path: {prefix: /limited}}
    rateLimit: {requests: 4, per: 1m, burst: 4, scope: Replicas}
  slos:
  - name: availability
    objective: 99
    indicator: {availability: {}}
";

async fn revision_of(admin: std::net::SocketAddr) -> String {
    let (_, _, body) = get(&client(), format!("http://{admin}/config")).await;
    serde_json::from_slice::<serde_json::Value>(&body).unwrap()["revision"].as_str().unwrap().to_owned()
}

async fn wait_for_revision(admin: std::net::SocketAddr, want: &str, within: Duration) -> Duration {
    let t = Instant::now();
    while revision_of(admin).await != want {
        assert!(t.elapsed() < within, "the sidecar did not take {want} within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t.elapsed()
}

async fn run_against(tls: Option<(tokio_rustls::TlsAcceptor, std::path::PathBuf)>) {
    let up = Upstream::start().await;
    let dir = TempDir::new("agent");
    let file = dir.file("policy.yaml", &policy(V1));
    let token = dir.file("token", &format!("{TOKEN}\n"));
    let v2 = compiled(&policy(&V1.replace("objective: 99", "objective: 99.5")));
    let operator = serve_operator(
        AgentConfig { config: v2.clone(), ready_replicas: 2 },
        tls.as_ref().map(|t| t.0.clone()),
    )
    .await;
    let mut o = flags(file, &up.url());
    o.operator = Some(AgentFlags {
        url: operator.url.parse().unwrap(),
        token_file: Some(token),
        ca_file: tls.map(|t| t.1),
        pod: "test-pod".into(),
        report_interval: Duration::from_millis(200),
    });
    let sc = start(o).await.unwrap();
    wait_for_revision(sc.admin_addr, &v2.revision, Duration::from_secs(3)).await;
    // The operator's replica count applies: 4 over 2 replicas is 2 here.
    let c = client();
    let url = format!("http://{}/limited", sc.proxy_addr);
    let codes: Vec<u16> =
        [get(&c, url.clone()).await.0, get(&c, url.clone()).await.0, get(&c, url.clone()).await.0]
            .iter()
            .map(|s| s.as_u16())
            .collect();
    assert_eq!(codes, [200, 200, 429]);

    // A change reaches the sidecar at once through the long-poll.
    let v3 = compiled(&policy(&V1.replace("objective: 99", "objective: 99.9")));
    let sent = Instant::now();
    operator.config.send_replace(AgentConfig { config: v3.clone(), ready_replicas: 2 });
    let took = wait_for_revision(sc.admin_addr, &v3.revision, Duration::from_secs(2)).await;
    assert!(sent.elapsed() < Duration::from_millis(500), "long-poll took {took:?}");

    // The operator drops the held long-poll without an answer (it restarted, or closed the
    // connection as it answered): the sidecar polls again at once, not after a backoff, so the
    // next change still arrives at once.
    let held = || async { operator.config.receiver_count() == 1 };
    eventually("the next long-poll held", Duration::from_secs(5), held).await;
    let polls = operator.polls.load(Ordering::SeqCst);
    operator.cut.notify_waiters();
    let v4 = compiled(&policy(&V1.replace("objective: 99", "objective: 99.95")));
    eventually("the sidecar polls again", Duration::from_secs(5), || async {
        operator.polls.load(Ordering::SeqCst) > polls && held().await
    })
    .await;
    let sent = Instant::now();
    operator.config.send_replace(AgentConfig { config: v4.clone(), ready_replicas: 2 });
    wait_for_revision(sc.admin_addr, &v4.revision, Duration::from_secs(3)).await;
    assert!(
        sent.elapsed() < Duration::from_millis(300),
        "after a dropped long-poll the change took {:?}",
        sent.elapsed()
    );

    // Reports carry what the SLO counted: 2 allowed requests; the 429 is left out.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (total, revision): (u64, String) = {
            let reports = operator.reports.lock().unwrap();
            reports
                .last()
                .map(|r| (r.slos[0].buckets.iter().map(|b| b.total).sum(), r.revision.clone()))
                .unwrap_or_default()
        };
        if total == 2 && revision == v4.revision {
            break;
        }
        assert!(Instant::now() < deadline, "no report with the requests and the last revision arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reports = operator.reports.lock().unwrap().clone();
    let last = reports.last().unwrap();
    assert_eq!(last.pod, "test-pod");
    assert_eq!(last.revision, v4.revision);
    assert_eq!(last.slos[0].name, "availability");
    assert!(last.started_at_ms <= last.sent_at_ms);
    assert!(last.slos[0].buckets.iter().all(|b| b.width_ms == 60_000 && b.start_ms % 60_000 == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_reports_over_http() {
    run_against(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_reports_over_https() {
    let dir = TempDir::new("ca");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let ca_file = dir.file("ca.pem", &ca.pem());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    run_against(Some((tokio_rustls::TlsAcceptor::from(Arc::new(server)), ca_file))).await;
}
