//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/slo`, `/config`, `POST /purge`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::json;

use crate::{health::Status, sidecar::Sidecar};

/// Probes and scrapers reach `/healthz`, `/readyz`, `/metrics` and `/slo` as they must;
/// `/config` and `POST /purge` are refused as [`refusal`] says.
pub async fn handle(
    sidecar: Arc<Sidecar>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if matches!(req.uri().path(), "/config" | "/purge")
        && let Some(refused) = refusal(sidecar.flags.admin_token.as_deref(), &req, peer)
    {
        return refused;
    }
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
            json_response(StatusCode::OK, &sidecar.process.slos.document(&active.slos))
        }
        (&Method::GET | &Method::HEAD, "/config") => {
            let active = sidecar.proxy.active.load();
            json_response(
                StatusCode::OK,
                &json!({"revision": active.config.revision, "upstream": active.upstream.authority.as_str(), "config": active.config.redacted()}),
            )
        }
        (&Method::POST, "/purge") => purge(&sidecar, req).await,
        (_, "/purge") => not_allowed("POST"),
        (_, "/healthz" | "/readyz" | "/metrics" | "/config" | "/slo") => not_allowed("GET, HEAD"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics, /slo, /config or POST /purge\n",
        ),
    }
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// The answer to a peer that may not read the config or purge the cache; `None` when it may.
/// With `--admin-token`, every peer must send it as a bearer token (compared in constant
/// time); without one, only loopback peers may (`kubectl port-forward` and `kubectl exec`
/// arrive so), never the pod network.
pub fn refusal<B>(token: Option<&str>, req: &Request<B>, peer: SocketAddr) -> Option<Response<Full<Bytes>>> {
    let refuse = |status, detail: &str| {
        let body = json!({
            "type": "https://apipolicy.dev/problems/admin-unauthorized",
            "title": "Not authorized",
            "status": u16::from(status),
            "detail": detail,
        });
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Some(resp)
    };
    match token {
        Some(token) => {
            let sent = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                .unwrap_or_default();
            if constant_time_eq(sent, token.as_bytes()) {
                None
            } else {
                refuse(
                    StatusCode::UNAUTHORIZED,
                    "this endpoint needs the admin token as `Authorization: Bearer …`",
                )
            }
        }
        None if peer.ip().to_canonical().is_loopback() => None,
        None => refuse(
            StatusCode::FORBIDDEN,
            "this endpoint answers loopback peers only; start the sidecar with --admin-token to allow others",
        ),
    }
}

/// Compares without stopping at the first difference, so that timing tells nothing of the
/// token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    tracing::info!(keys = %purge.keys.join(", "), paths = %purge.paths.join(", "), purged, shared, "cache purged");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_purge_need_loopback_or_the_token() {
        let req = |auth: Option<&str>| {
            let mut r = Request::get("/config");
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            r.body(()).unwrap()
        };
        let (local, remote): (SocketAddr, SocketAddr) =
            ("127.0.0.1:5000".parse().unwrap(), "10.1.2.3:5000".parse().unwrap());
        let status = |r: Option<Response<Full<Bytes>>>| r.map(|r| r.status());
        assert_eq!(status(refusal(None, &req(None), local)), None);
        assert_eq!(status(refusal(None, &req(None), "[::ffff:127.0.0.1]:1".parse().unwrap())), None);
        assert_eq!(status(refusal(None, &req(None), remote)), Some(StatusCode::FORBIDDEN));
        assert_eq!(status(refusal(Some("t0k"), &req(None), local)), Some(StatusCode::UNAUTHORIZED));
        assert_eq!(
            status(refusal(Some("t0k"), &req(Some("Bearer t0")), remote)),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(status(refusal(Some("t0k"), &req(Some("Bearer t0k")), remote)), None);
    }
}
