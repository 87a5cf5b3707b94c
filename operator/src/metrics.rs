//! The operator's own metrics, served on `/metrics` beside `/healthz` and `/readyz`.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounter,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    /// By endpoint (`config`, `reports`, `other`) and status code.
    pub agent_requests: IntCounterVec,
    /// By result: `authenticated`, `rejected`, `cached`.
    pub token_reviews: IntCounterVec,
    pub leader: IntGauge,
    /// 1 once every watched cache is filled; and, while it is not, how long it has been not.
    pub ready: IntGauge,
    pub not_ready_seconds: IntGauge,
    /// Objects written, by kind.
    pub writes: IntCounterVec,
    /// Admission reviews of the injection webhook, by result.
    pub admissions: IntCounterVec,
    /// When the served certificate expires (Unix seconds).
    pub certificate_expiry: IntGauge,
    /// Saves of an SLO history that left something out to fit the ConfigMap, by what.
    pub slo_history_trimmed: IntCounterVec,
}

impl Metrics {
    pub fn new() -> crate::error::Result<Self> {
        let registry = Registry::new();
        let reconciles =
            IntCounter::new("apipolicy_operator_reconciles_total", "Reconciliations of ApiPolicies")?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new("apipolicy_operator_reconcile_errors_total", "Reconciliations that failed, by error"),
            &["error"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "apipolicy_operator_reconcile_duration_seconds",
                "How long a reconciliation took",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )?;
        let agent_requests = IntCounterVec::new(
            Opts::new(
                "apipolicy_operator_agent_requests_total",
                "Agent API requests, by endpoint and status code",
            ),
            &["endpoint", "code"],
        )?;
        let token_reviews = IntCounterVec::new(
            Opts::new("apipolicy_operator_token_reviews_total", "Agent token checks, by result"),
            &["result"],
        )?;
        let leader =
            IntGauge::new("apipolicy_operator_leader", "1 while this replica holds the leader lease")?;
        let ready = IntGauge::new(
            "apipolicy_operator_ready",
            "1 once the ApiPolicy, Pod and ConfigMap caches are filled (the operator reconciles only then)",
        )?;
        let not_ready_seconds = IntGauge::new(
            "apipolicy_operator_not_ready_seconds",
            "Seconds since start without every cache filled; 0 once ready",
        )?;
        let writes = IntCounterVec::new(
            Opts::new("apipolicy_operator_writes_total", "Objects written to the API server, by kind"),
            &["kind"],
        )?;
        let admissions = IntCounterVec::new(
            Opts::new(
                "apipolicy_operator_admissions_total",
                "Pods reviewed by the injection webhook, by result: injected, refused, a skip reason, or error",
            ),
            &["result"],
        )?;
        let certificate_expiry = IntGauge::new(
            "apipolicy_operator_certificate_expiry_timestamp_seconds",
            "When the certificate the webhook and the agent API serve expires",
        )?;
        let slo_history_trimmed = IntCounterVec::new(
            Opts::new(
                "apipolicy_operator_slo_history_trimmed_total",
                "Saves of an SLO history that left something out to fit its ConfigMap, by what was left out",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(slo_history_trimmed.clone()))?;
        registry.register(Box::new(admissions.clone()))?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(agent_requests.clone()))?;
        registry.register(Box::new(token_reviews.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(not_ready_seconds.clone()))?;
        registry.register(Box::new(writes.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            agent_requests,
            token_reviews,
            leader,
            ready,
            not_ready_seconds,
            writes,
            admissions,
            certificate_expiry,
            slo_history_trimmed,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// `/metrics`, `/healthz` (the process serves) and `/readyz` (the caches are filled).
pub fn admin(metrics: &Metrics, ready: &Arc<AtomicBool>, req: &Request<impl Sized>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, content_type: &'static str| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into(), "text/plain");
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, metrics.render(), "text/plain; version=0.0.4"),
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" if ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n".into(), "text/plain"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "caches not yet filled\n".into(), "text/plain"),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn text(r: Response<Full<Bytes>>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn admin_endpoints() {
        let m = Metrics::new().unwrap();
        m.reconciles.inc();
        m.agent_requests.with_label_values(&["config", "200"]).inc();
        let ready = Arc::new(AtomicBool::new(false));
        let get = |path: &str| Request::get(path).body(()).unwrap();
        let metrics = admin(&m, &ready, &get("/metrics"));
        assert_eq!(metrics.status(), StatusCode::OK);
        let body = text(metrics).await;
        assert!(body.contains("apipolicy_operator_reconciles_total 1"), "{body}");
        assert!(
            body.contains(r#"apipolicy_operator_agent_requests_total{code="200",endpoint="config"} 1"#),
            "{body}"
        );
        assert!(body.contains("# TYPE apipolicy_operator_reconcile_duration_seconds histogram"), "{body}");
        assert_eq!(admin(&m, &ready, &get("/healthz")).status(), StatusCode::OK);
        assert_eq!(admin(&m, &ready, &get("/readyz")).status(), StatusCode::SERVICE_UNAVAILABLE);
        ready.store(true, Ordering::Release);
        assert_eq!(admin(&m, &ready, &get("/readyz")).status(), StatusCode::OK);
        assert_eq!(admin(&m, &ready, &get("/nope")).status(), StatusCode::NOT_FOUND);
        let post = Request::post("/metrics").body(()).unwrap();
        assert_eq!(admin(&m, &ready, &post).status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
