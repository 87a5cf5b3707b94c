//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/config`.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use crate::server::Sidecar;

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
        (&Method::GET | &Method::HEAD, "/config") => {
            let active = sidecar.proxy.active.load();
            json_response(
                StatusCode::OK,
                &json!({"revision": active.config.revision, "upstream": active.upstream.authority.as_str(), "config": active.config}),
            )
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/config") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz, /metrics or /config\n"),
    }
}

/// Ready when the config is loaded (always, once started), the sidecar is not draining, and
/// the upstream accepts connections.
async fn readyz(sidecar: &Sidecar) -> Response<Full<Bytes>> {
    let active = sidecar.proxy.active.load_full();
    let draining = sidecar.draining();
    let address = active.upstream.address();
    let timeout = Duration::from_millis(active.config.spec.upstream.connect_timeout_ms);
    let upstream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&address)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot connect to {address}: {e}")),
        Err(_) => Err(format!("no connection to {address} within {} ms", timeout.as_millis())),
    };
    let ready = !draining && upstream.is_ok();
    let body = json!({
        "ready": ready,
        "revision": active.config.revision,
        "draining": draining,
        "checks": [{
            "name": "upstream",
            "up": upstream.is_ok(),
            "error": upstream.err(),
        }],
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
