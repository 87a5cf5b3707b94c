//! The one way a request goes upstream. Pass-through requests ([`Forward`]) and the cache's
//! own requests (fills, revalidations, background refreshes) all turn their head into the
//! upstream's with [`prepare`] and go out through the upstream-side layers down to [`Upstream`]: so framing, the route's timeout,
//! the upstream metrics and the hop-by-hop rules apply to every one of them alike.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header, request::Parts,
    uri::PathAndQuery,
};
use http_body_util::Limited;
use hyper_util::rt::TokioIo;

use crate::{
    accounting::Accounting,
    body::{IdleTimer, ProxyBody, UpstreamBody},
    error::ProxyError,
    headers::X_REQUEST_ID,
    pipeline::{AppRequest, ClientRequest, Cx, Service, Tried, rescue},
    runtime::{PolicyRuntime, RouteRuntime},
    upstream::SendError,
};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Pass-through: the client's request goes to the app through the upstream-side layers below
/// (`U`), its body streaming (bounded by `maxRequestBody`, watched by `streamIdleTimeout`),
/// and the app's answer streams back; an upgrade (WebSocket) is joined end to end.
#[derive(Clone, Copy)]
pub struct Forward<U>(pub U);

impl<U> Forward<U> {
    /// The upstream-side layers, for the requests the cache makes itself (fills,
    /// revalidations, background refreshes).
    pub fn upstream(&self) -> &U {
        &self.0
    }
}

impl<U> Service<ClientRequest> for Forward<U>
where
    U: Service<AppRequest, Response = Tried>,
{
    type Response = Response<ProxyBody>;

    async fn call(&self, req: ClientRequest, cx: &mut Cx<'_>) -> Response<ProxyBody> {
        match forward(&self.0, req, cx).await {
            Ok(resp) => resp,
            Err(e) => rescue(e, cx),
        }
    }
}

async fn forward<U>(
    upstream: &U,
    mut req: ClientRequest,
    cx: &mut Cx<'_>,
) -> Result<Response<ProxyBody>, ProxyError>
where
    U: Service<AppRequest, Response = Tried>,
{
    let route = cx.route;
    if let Some(limit) = route.max_body
        && content_length(req.headers()).is_some_and(|len| len > limit)
    {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let upgrade = wants_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut *req));

    let (mut parts, body) = (*req).into_parts();
    prepare(&mut parts, cx.peer, cx.id, upgrade)?;
    let idle = IdleTimer::new(route.stream_idle_timeout);
    let body = match route.max_body {
        Some(limit) => UpstreamBody::Limited {
            body: Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)),
            idle,
        },
        None => UpstreamBody::Client { body, idle },
    };
    let mut resp = upstream.call(Box::new(Request::from_parts(parts, body)), cx).await?;

    if let Some(client_upgrade) = client_upgrade
        && resp.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(client), Ok(upstream)) = tokio::join!(client_upgrade, upstream_upgrade) {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(upstream))
                    .await;
            }
        });
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, ProxyBody::empty()));
    }
    Ok(resp.map(ProxyBody::upstream))
}

/// Turns a client's request head into the upstream's: origin form (every pooled connection
/// goes to the upstream), HTTP/1.1, a Host header, no hop-by-hop headers, `X-Forwarded-*` and
/// the request id.
pub fn prepare(
    parts: &mut Parts,
    peer: SocketAddr,
    id: &HeaderValue,
    upgrade: bool,
) -> Result<(), ProxyError> {
    if !parts.headers.contains_key(header::HOST) {
        // HTTP/2 carries the host in :authority; HTTP/1.1 apps expect a Host header.
        let host = parts.uri.authority().map(|a| HeaderValue::from_str(a.as_str()));
        match host {
            Some(Ok(v)) => {
                parts.headers.insert(header::HOST, v);
            }
            _ => return Err(ProxyError::BadRequest("the request has no Host header")),
        }
    }
    // HTTP/1.1 requests come in origin form already; HTTP/2 ones (and absolute-form ones) are
    // cut down to their path and query.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() || parts.uri.path_and_query().is_none()
    {
        let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut uri = http::uri::Parts::default();
        uri.path_and_query = Some(path);
        parts.uri =
            Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest("the request target is invalid"))?;
    }
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    // Room for the three headers added below at once (a map sized to the request grows at
    // each insert otherwise).
    parts.headers.reserve(3);
    append_forwarded(&mut parts.headers, peer);
    parts.headers.insert(X_REQUEST_ID.clone(), id.clone());
    Ok(())
}

/// The app: a prepared request sent on a pooled connection under the route's timeout. Every
/// request the sidecar sends upstream ends here (pass-through, cache fill, revalidation,
/// background refresh), and here its head is framed by the body that is sent, whatever the
/// client's head said.
#[derive(Clone, Copy)]
pub struct Upstream;

impl Service<AppRequest> for Upstream {
    type Response = Tried;

    async fn call(&self, req: AppRequest, cx: &mut Cx<'_>) -> Self::Response {
        send(cx.active, cx.route, req, cx.finish, cx.try_limit).await
    }
}

async fn send(
    active: &PolicyRuntime,
    route: &RouteRuntime,
    mut req: AppRequest,
    finish: &mut Accounting,
    try_limit: Option<std::time::Duration>,
) -> Tried {
    frame(&mut req);
    let sent_at = Instant::now();
    let limit = try_limit.unwrap_or(route.timeout);
    let timeout_ms = limit.as_millis() as u64;
    let mut resp = match tokio::time::timeout(limit, active.client.send(req)).await {
        Err(_) => return Err(ProxyError::UpstreamTimeout { timeout_ms }),
        Ok(Err(SendError::Connect(e))) => return Err(ProxyError::UpstreamUnavailable(e)),
        Ok(Err(SendError::Http(e))) => {
            return Err(ProxyError::of_exchange(&e, route.max_body, route.stream_idle_timeout));
        }
        Ok(Ok(resp)) => resp,
    };
    let upstream = sent_at.elapsed();
    route.metrics.upstream_duration.observe(upstream.as_secs_f64());
    finish.upstream_ms = Some(upstream.as_secs_f64() * 1000.0);
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    Ok(resp)
}

/// The `Content-Length` of an upstream request is the length of the body sent: a body of
/// known length says it (a cache fill sends none, whatever the client declared, so an app
/// that reads the declared length can never take the next request's bytes for it); a body of
/// unknown length goes chunked (hyper frames it so once no length is given).
/// `Transfer-Encoding` is gone already (hop-by-hop).
fn frame(req: &mut Request<UpstreamBody>) {
    use http_body::Body as _;
    match req.body().size_hint().exact() {
        // No body and no length declared: nothing to say (GET, HEAD…).
        Some(0) if !req.headers().contains_key(header::CONTENT_LENGTH) => {}
        Some(n) => {
            req.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            req.headers_mut().remove(header::CONTENT_LENGTH);
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

const HOP_CONNECTION: u8 = 1;
const HOP_UPGRADE: u8 = 2;
const HOP_OTHER: u8 = 4;

/// Which kind of hop-by-hop header `n` is, if any: an enum or length compare, no hashing.
fn hop_bit(n: &HeaderName) -> u8 {
    if n == header::CONNECTION {
        HOP_CONNECTION
    } else if n == header::UPGRADE {
        HOP_UPGRADE
    } else if n == header::TE
        || n == header::TRAILER
        || n == header::TRANSFER_ENCODING
        || n == KEEP_ALIVE
        || n == PROXY_CONNECTION
    {
        HOP_OTHER
    } else {
        0
    }
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1, and those the Connection header names.
/// An upgrade keeps `Connection: upgrade` and `Upgrade`, which are meant for the next hop.
/// One pass over the names first: a message without hop-by-hop headers (most requests) costs
/// no hash lookup, and only the names present are removed.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let found = headers.keys().fold(0u8, |acc, n| acc | hop_bit(n));
    if found == 0 && !keep_upgrade {
        return;
    }
    if found & HOP_CONNECTION != 0
        && headers.get_all(header::CONNECTION).iter().any(|v| !is_plain_connection_token(v))
    {
        strip_named_and_hop_by_hop(headers, keep_upgrade);
        return;
    }
    if found & HOP_OTHER != 0 {
        for name in
            [&KEEP_ALIVE, &PROXY_CONNECTION, &header::TE, &header::TRAILER, &header::TRANSFER_ENCODING]
        {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        if found & HOP_CONNECTION != 0 {
            headers.remove(header::CONNECTION);
        }
        if found & HOP_UPGRADE != 0 {
            headers.remove(header::UPGRADE);
        }
    }
}

/// The general case: the Connection header names further headers to drop.
fn strip_named_and_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [&KEEP_ALIVE, &PROXY_CONNECTION, &header::TE, &header::TRAILER, &header::TRANSFER_ENCODING] {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// The usual Connection values name no header beyond the fixed list: skip the scan for them.
fn is_plain_connection_token(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    b.eq_ignore_ascii_case(b"keep-alive")
        || b.eq_ignore_ascii_case(b"close")
        || b.eq_ignore_ascii_case(b"upgrade")
}

/// The address as text into `buf`: IPv4 (the usual case) without `core::fmt`, and no heap.
fn ip_text(ip: IpAddr, buf: &mut [u8; 48]) -> &[u8] {
    let n = match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if o >= 100 {
                    buf[n] = b'0' + o / 100;
                    n += 1;
                }
                if o >= 10 {
                    buf[n] = b'0' + o / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + o % 10;
                n += 1;
            }
            n
        }
        IpAddr::V6(v6) => {
            let mut cur = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(cur, "{v6}");
            cur.position() as usize
        }
    };
    &buf[..n]
}

fn append_forwarded(headers: &mut HeaderMap, peer: SocketAddr) {
    let mut buf = [0u8; 48];
    let ip = ip_text(peer.ip(), &mut buf);
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => HeaderValue::from_bytes(&[prior.as_bytes(), b", ", ip].concat()).ok(),
        None => crate::values::cut(ip),
    };
    if let Some(v) = value {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        append_forwarded(&mut h, "[::ffff:10.1.2.3]:5000".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
    }
}
