//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/slo`, `/config`.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use crate::{health::Status, server::Sidecar};

pub async fn handle(sidecar: Arc<Sidecar>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => readyz(&sidecar).await,
        (&Method::GET | &Method::HEAD, "/metrics") => {
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
        (_, "/healthz" | "/readyz" | "/metrics" | "/config" | "/slo") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz, /metrics, /slo or /config\n"),
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
