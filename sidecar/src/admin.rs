//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/slo`, `/config`, `POST /purge`.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::json;

use crate::{health::Status, server::Sidecar};

pub async fn handle(sidecar: Arc<Sidecar>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => readyz(&sidecar).await,
        (&Method::GET | &Method::HEAD, "/metrics") => {
            sidecar.proxy.active.load().store.update_gauges();
            let mut resp = Response::new(Full::new(Bytes::from(sidecar.metrics.render())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET | &Method::HEAD, "/slo") => {
            let active = sidecar.proxy.active.load_full();
            json_response(StatusCode::OK, &sidecar.settings.slos.document(&active.slos))
        }
        (&Method::GET | &Method::HEAD, "/config") => {
            let active = sidecar.proxy.active.load();
            json_response(
                StatusCode::OK,
                &json!({"revision": active.config.revision, "upstream": active.upstream.authority.as_str(), "config": active.config}),
            )
        }
        (&Method::POST, "/purge") => purge(&sidecar, req).await,
        (_, "/healthz" | "/readyz" | "/metrics" | "/config" | "/slo" | "/purge") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics, /slo, /config or POST /purge\n",
        ),
    }
}

/// Ready when the config is loaded (always, once started), the sidecar is not draining, the
/// upstream is healthy (its active check, or else a TCP connect now) and every critical
/// dependency is up. The body lists every check.
async fn readyz(sidecar: &Sidecar) -> Response<Full<Bytes>> {
    let active = sidecar.proxy.active.load_full();
    let draining = sidecar.draining();
    let health = &active.health;
    let mut checks = Vec::new();
    let upstream_up = match &health.upstream_check {
        Some(check) => check.status() == Status::Up,
        None => {
            let address = active.upstream.address();
            let timeout = Duration::from_millis(active.config.spec.upstream.connect_timeout_ms);
            let probe = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&address)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("cannot connect to {address}: {e}")),
                Err(_) => Err(format!("no connection to {address} within {} ms", timeout.as_millis())),
            };
            checks.push(json!({
                "name": "upstream",
                "status": if probe.is_ok() { "up" } else { "down" },
                "critical": true,
                "lastError": probe.as_ref().err(),
                "target": format!("tcp {address}"),
            }));
            probe.is_ok()
        }
    };
    checks.extend(health.reports().into_iter().map(|r| serde_json::to_value(r).unwrap_or_default()));
    let ready = !draining && upstream_up && health.dependencies_ready();
    let body = json!({
        "ready": ready,
        "revision": active.config.revision,
        "draining": draining,
        "checks": checks,
    });
    json_response(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
}

/// `POST /purge` with `{"keys": [...]}` (surrogate keys) or `{"paths": [...]}`: removes the
/// matching cache entries and answers how many URLs went.
async fn purge(sidecar: &Sidecar, req: Request<Incoming>) -> Response<Full<Bytes>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Purge {
        #[serde(default)]
        keys: Vec<String>,
        #[serde(default)]
        paths: Vec<String>,
    }
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the purge request could not be read: {e}"),
            );
        }
    };
    let purge: Purge = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"keys\": [...]}} or {{\"paths\": [...]}}: {e}"),
            );
        }
    };
    if purge.keys.is_empty() && purge.paths.is_empty() {
        return problem(StatusCode::BAD_REQUEST, "name at least one surrogate key (keys) or path (paths)");
    }
    let active = sidecar.proxy.active.load_full();
    let purged = active.store.purge_keys(&purge.keys) + active.store.purge_paths(&purge.paths);
    // With Redis, every pod of the policy purges too, and the shared tier is retired.
    let shared = match &active.shared_cache {
        Some(s) => s.purge(&purge.keys, &purge.paths).await,
        None => false,
    };
    tracing::info!(keys = ?purge.keys, paths = ?purge.paths, purged, shared, "cache purged");
    json_response(StatusCode::OK, &json!({ "purged": purged, "shared": shared }))
}

fn problem(status: StatusCode, detail: &str) -> Response<Full<Bytes>> {
    let body = json!({
        "type": "https://apipolicy.dev/problems/bad-purge",
        "title": "Bad purge request",
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut resp = json_response(status, &body);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(serde_json::to_vec_pretty(body).unwrap_or_default())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
