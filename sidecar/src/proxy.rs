//! The request path. Order of work (DESIGN.md): request id → route match → rate limit →
//! cache lookup (fresh hit, 304, stale-while-revalidate, coalesced miss) → load shedding →
//! upstream (pooled keep-alive connection, route timeout) → cache store, ETag,
//! Cache-Control, compression → metrics, SLO counters and the access log when the response
//! body ends.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
    request::Parts, uri::PathAndQuery,
};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::{
    body::{ClientBodyError, IdleTimer, ProxyBody, Stalled, UpstreamBody},
    compress,
    error::ProxyError,
    headers::{Raw, RequestHeaders},
    routes::PathError,
    state::{Active, RouteRuntime},
    upstream::SendError,
};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The proxy: the active config, swapped whole on reload.
pub struct Proxy {
    pub active: ArcSwap<Active>,
    ids: RequestIds,
}

impl Proxy {
    pub fn new(active: Active) -> Self {
        Self { active: ArcSwap::from_pointee(active), ids: RequestIds::new() }
    }

    pub async fn handle(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let start = Instant::now();
        // One snapshot per request: a reload in the middle of it does not change its config.
        let active = self.active.load_full();
        let id = self.ids.for_request(req.headers());
        // Before anything reads them: the limiter's key, the cache key and the app.
        crate::forwarded::own(req.headers_mut(), peer, &active.trusted);
        // Routes match the path the app will get; a path refused here goes to no route.
        let (index, bad_path) = match normalize_target(&active.router, &mut req) {
            Ok(()) => (active.router.route(req.method(), req.uri().path(), req.headers()), None),
            Err(e) => (active.routes.len() - 1, Some(e)),
        };
        active.in_flight.inc();
        let mut finish =
            Finish::request(&active, req.method(), index, &id, start, || req.uri().path_and_query().cloned());
        let route = &active.routes[index];
        let method = req.method().clone();
        let accept_encoding =
            route.compression.as_ref().and(req.headers().get(header::ACCEPT_ENCODING).cloned());
        // Unsafe requests invalidate what the cache holds for their URL (RFC 9111 §4.4).
        let safe = matches!(method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE);
        let invalidates = (!safe)
            .then(|| crate::cache::flow::target(&req, route.cache.as_ref().is_some_and(|c| c.sort_query)));

        let mut limit_headers = None;
        let outcome = async {
            if let Some(e) = bad_path {
                return Err(ProxyError::InvalidPath(e));
            }
            // Rate limit first: a refused request costs nothing further.
            if let Some(limiter) = &route.limiter {
                limit_headers = limiter.check(req.headers(), peer, &active.trusted).await?;
            }
            // The cache answers hits itself; only what goes on to the app takes a
            // concurrency slot, so a burst of hits is never shed.
            if let Some(cache) = &route.cache {
                let asks = crate::cache::Asks::of(req.headers());
                match crate::cache::flow::eligible(cache, &req, asks) {
                    Some(true) => {
                        return crate::cache::flow::serve(&active, route, req, asks, peer, &id, &mut finish)
                            .await;
                    }
                    Some(false) => route.cache_lookups.bypass.inc(),
                    None => {}
                }
            }
            if let Some(c) = &route.concurrency {
                c.admit()?;
                finish.holds_slot = true;
            }
            forward(&active, route, req, peer, &id, &mut finish).await
        }
        .await;
        let mut resp = match outcome {
            Ok(resp) => resp,
            Err(e) => {
                finish.policy_answer = e.is_policy();
                e.into_response(&id)
            }
        };
        if let Some(target) = invalidates
            && (resp.status().is_success() || resp.status().is_redirection())
        {
            crate::cache::flow::invalidate(&active, &target, resp.headers());
        }
        if let Some(applied) = limit_headers {
            applied.write(resp.headers_mut());
        }
        if let Some(config) = &route.compression
            && method != Method::HEAD
        {
            resp = compress_streaming(resp, config, accept_encoding.as_ref());
        }
        resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
        finish.status = resp.status().as_u16();
        if resp.body().streams() {
            resp.body_mut().idle_timeout(route.stream_idle_timeout);
        }
        resp.body_mut().on_finish(finish);
        resp
    }
}

/// Puts the normalized path ([`crate::routes::Router::normalize`]) into the request, so that
/// the app gets the path its route was chosen by; or says why the path is refused.
fn normalize_target<B>(router: &crate::routes::Router, req: &mut Request<B>) -> Result<(), PathError> {
    let std::borrow::Cow::Owned(path) = router.normalize(req.uri().path())? else { return Ok(()) };
    let target = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(target).ok();
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    Ok(())
}

/// A request head as the cache-hit lane ([`crate::lane`]) parsed it: an HTTP/1.1 GET or HEAD in
/// origin form, without a body.
pub struct LaneRequest<'a> {
    pub peer: SocketAddr,
    pub method: &'a Method,
    /// The request target: `path[?query]`.
    pub target: &'a str,
    pub headers: Raw<'a>,
}

/// What the lane writes, and what it records once written: a hit (with the route's limit
/// headers), or the limit's refusal.
pub enum LaneAnswer {
    Hit {
        hit: crate::cache::flow::LaneHit,
        id: HeaderValue,
        // Boxed, as the refusal: a plain hit's answer stays small (it is moved a few times).
        limit: Option<Box<crate::ratelimit::Applied>>,
        finish: Finish,
    },
    Refused {
        response: Box<Response<ProxyBody>>,
        finish: Finish,
    },
}

impl Proxy {
    /// Answers a plain hit for the lane, doing what [`Proxy::handle`] does for it (request
    /// id, route, a limit kept in this pod, cache hit, metrics, SLOs and access log through
    /// [`Finish`]); `None` when the request needs more than that (a miss, a `Global` limit, a
    /// conditional, a `Cache-Control` of the client's…): the lane hands it to hyper and
    /// [`Proxy::handle`]. The limit is asked only once the hit is certain, so that a request
    /// handed over is never counted twice.
    pub fn lane_hit(&self, req: &LaneRequest<'_>) -> Option<LaneAnswer> {
        let start = Instant::now();
        let active = self.active.load_full();
        let (path, query) = match req.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (req.target, None),
        };
        // A path that needs normalizing (or is refused), or forwarding headers of a trusted
        // proxy (which count in the cache key), take the full path.
        if !matches!(active.router.normalize(path), Ok(std::borrow::Cow::Borrowed(_)))
            || (req.headers.0.iter().any(|h| crate::forwarded::is_forwarding(h.name))
                && active.trusted.trusts(req.peer.ip()))
        {
            return None;
        }
        let index = active.router.route(req.method, path, &req.headers);
        let route = &active.routes[index];
        if route.cache.is_none() || route.limiter.as_ref().is_some_and(|l| l.is_global()) {
            return None;
        }
        let asks = crate::cache::Asks::of_raw(req.headers.0);
        if !asks.plain() {
            return None;
        }
        // As `flow::host` reads it: a Host that is not visible ASCII counts as none.
        let host =
            req.headers.first(&header::HOST).filter(|h| crate::headers::is_text(h)).unwrap_or_default();
        let hit = crate::cache::flow::lane_hit(&active, route, &req.headers, asks, (host, path, query))?;
        if route.limiter.is_some() && hit.head.limit_headers {
            return None;
        }
        // A limit kept elsewhere (Global) is never skipped: such a request goes to hyper.
        let decided = match &route.limiter {
            None => None,
            Some(l) => Some(l.check_local(&req.headers, req.peer, &active.trusted)?),
        };
        let id = self.ids.for_raw(req.headers.first(&X_REQUEST_ID));
        active.in_flight.inc();
        let mut finish = Finish::request(&active, req.method, index, &id, start, || {
            PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(req.target.as_bytes())).ok()
        });
        finish.status = hit.status.as_u16();
        let limit = match decided {
            None => None,
            Some(Ok(applied)) => applied.map(Box::new),
            Some(Err(e)) => {
                finish.policy_answer = e.is_policy();
                let mut response = e.into_response(&id);
                // As `handle` does: a compressing route marks its problem answers `Vary`.
                if let Some(config) = &route.compression
                    && *req.method != Method::HEAD
                {
                    response = compress_streaming(response, config, None);
                }
                response.headers_mut().insert(X_REQUEST_ID.clone(), id);
                finish.status = response.status().as_u16();
                return Some(LaneAnswer::Refused { response: Box::new(response), finish });
            }
        };
        route.cache_lookups.hit.inc();
        Some(LaneAnswer::Hit { hit, id, limit, finish })
    }
}

/// Compresses a response that streams from the app (cached responses come compressed from
/// the cache and are left alone).
fn compress_streaming(
    resp: Response<ProxyBody>,
    config: &apipolicy_api::CompressionConfig,
    accept: Option<&HeaderValue>,
) -> Response<ProxyBody> {
    if !compress::compressible(resp.status(), resp.headers(), config) {
        return resp;
    }
    let (mut parts, mut body) = resp.into_parts();
    compress::add_vary(&mut parts.headers, "accept-encoding");
    let Some(encoding) = compress::negotiate(accept, &config.algorithms) else {
        return Response::from_parts(parts, body);
    };
    let Some(upstream) = body.take_upstream() else {
        return Response::from_parts(parts, body);
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::ACCEPT_RANGES);
    parts.headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding.as_str()));
    if let Some(etag) = parts.headers.get(header::ETAG).cloned() {
        match crate::cache::conditional::encoded_etag(&etag, encoding.as_str()) {
            Some(e) => parts.headers.insert(header::ETAG, e),
            None => parts.headers.remove(header::ETAG),
        };
    }
    Response::from_parts(parts, ProxyBody::boxed(compress::compress_stream(encoding, upstream)))
}

/// Forwards the request to the upstream and returns its response head with the body
/// streaming behind it.
async fn forward(
    active: &Active,
    route: &RouteRuntime,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    id: &HeaderValue,
    finish: &mut Finish,
) -> Result<Response<ProxyBody>, ProxyError> {
    if let Some(limit) = route.max_body
        && content_length(req.headers()).is_some_and(|len| len > limit)
    {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let upgrade = wants_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    prepare(&mut parts, peer, id, upgrade)?;
    let idle = IdleTimer::new(route.stream_idle_timeout);
    let body = match route.max_body {
        Some(limit) => UpstreamBody::Limited {
            body: Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)),
            idle,
        },
        None => UpstreamBody::Client { body, idle },
    };
    let mut resp = send(active, route, Request::from_parts(parts, body), finish).await?;

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
pub(crate) fn prepare(
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

/// Sends a prepared request under the route's timeout. Every request the sidecar sends
/// upstream comes through here (pass-through, cache fill, revalidation, background refresh),
/// and here its head is framed by the body that is sent: whatever the client's head said.
pub(crate) async fn send(
    active: &Active,
    route: &RouteRuntime,
    mut req: Request<UpstreamBody>,
    finish: &mut Finish,
) -> Result<Response<Incoming>, ProxyError> {
    frame(&mut req);
    let sent_at = Instant::now();
    let timeout_ms = route.timeout.as_millis() as u64;
    let mut resp = match tokio::time::timeout(route.timeout, active.client.send(req)).await {
        Err(_) => return Err(ProxyError::UpstreamTimeout { timeout_ms }),
        Ok(Err(SendError::Connect(e))) => return Err(ProxyError::UpstreamUnavailable(e)),
        Ok(Err(SendError::Http(e))) => return Err(classify(&e, route)),
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

/// Whose fault a failed exchange was: the client's body (too large, malformed, stalled) or the
/// upstream's.
fn classify(e: &hyper::Error, route: &RouteRuntime) -> ProxyError {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<LengthLimitError>() {
            return ProxyError::BodyTooLarge { limit: route.max_body.unwrap_or_default() };
        }
        if let Some(bad) = s.downcast_ref::<ClientBodyError>() {
            return ProxyError::BadRequestBody(chain(bad));
        }
        if s.is::<Stalled>() {
            return ProxyError::RequestBodyTimeout {
                timeout_ms: route.stream_idle_timeout.as_millis() as u64,
            };
        }
        source = s.source();
    }
    ProxyError::BadGateway(chain(e))
}

/// An error and its causes, `: `-separated, for problem details and logs.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
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

/// Request ids: the client's `X-Request-Id` when it is sane, else a new one made of a random
/// per-process prefix and a counter (unique without coordination, cheap to make).
struct RequestIds {
    prefix: u64,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        Self { prefix: fastrand::u64(..), next: AtomicU64::new(fastrand::u64(..)) }
    }

    fn for_request(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(v) = headers.get(&X_REQUEST_ID)
            && sane_id(v.as_bytes())
        {
            return v.clone();
        }
        self.make()
    }

    /// The same from the client's value as sent.
    fn for_raw(&self, value: Option<&[u8]>) -> HeaderValue {
        match value.filter(|v| sane_id(v)).and_then(crate::values::cut) {
            Some(v) => v,
            None => self.make(),
        }
    }

    fn make(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        hex16(self.prefix, &mut buf[..16]);
        hex16(n, &mut buf[16..]);
        crate::values::cut(&buf).expect("hex digits are a valid header value")
    }
}

fn sane_id(v: &[u8]) -> bool {
    (1..=128).contains(&v.len()) && v.iter().all(|b| b.is_ascii_graphic())
}

fn hex16(n: u64, out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
}

/// What is recorded when a response ends: metrics and the access log line.
pub struct Finish {
    pub(crate) method: Method,
    /// Only with the access log on.
    path: Option<PathAndQuery>,
    request_id: Option<HeaderValue>,
    route: usize,
    status: u16,
    start: Instant,
    pub(crate) upstream_ms: Option<f64>,
    /// The request holds one of its route's `maxInFlight` slots until the response ends.
    pub(crate) holds_slot: bool,
    /// The sidecar answered because the policy worked as meant (429, shedding): SLOs leave
    /// such requests out.
    policy_answer: bool,
    /// A client's request, counted in flight until [`Finish::done`] (or until dropped: a
    /// request whose client went away before its answer began).
    counted: bool,
    active: Arc<Active>,
}

impl Drop for Finish {
    /// A request dropped before its answer began (its client went away, and hyper dropped the
    /// handler): it gives back its `maxInFlight` slot and its place in flight, and counts as
    /// 499 (nginx's "client closed request") in the request metrics; SLOs do not count it.
    fn drop(&mut self) {
        self.release();
        if std::mem::take(&mut self.counted) {
            let route = &self.active.routes[self.route];
            route.metrics.request_duration.observe(self.start.elapsed().as_secs_f64());
            route.metrics.count(&self.method, 499);
            self.active.in_flight.dec();
        }
    }
}

impl Finish {
    pub(crate) fn route(&self) -> usize {
        self.route
    }

    /// For a client's request (counted in flight by the caller). The path and id are kept for
    /// the access log only: `path` is asked only when it is on.
    fn request(
        active: &Arc<Active>,
        method: &Method,
        route: usize,
        id: &HeaderValue,
        start: Instant,
        path: impl FnOnce() -> Option<PathAndQuery>,
    ) -> Self {
        let log = active.access_log;
        Self {
            method: method.clone(),
            path: if log { path() } else { None },
            request_id: if log { Some(id.clone()) } else { None },
            route,
            status: 0,
            start,
            upstream_ms: None,
            holds_slot: false,
            policy_answer: false,
            counted: true,
            active: active.clone(),
        }
    }

    /// For work the sidecar does on its own (a background revalidation): it counts nothing,
    /// but may hold a concurrency slot, given back by [`Finish::release`].
    pub(crate) fn background(active: Arc<Active>, route: usize) -> Self {
        Self {
            method: Method::GET,
            path: None,
            request_id: Some(HeaderValue::from_static("background")),
            route,
            status: 0,
            start: Instant::now(),
            upstream_ms: None,
            holds_slot: false,
            policy_answer: false,
            counted: false,
            active,
        }
    }

    pub(crate) fn release(&mut self) {
        if std::mem::take(&mut self.holds_slot)
            && let Some(c) = &self.active.routes[self.route].concurrency
        {
            c.release();
        }
    }

    pub fn done(mut self, bytes: u64) {
        self.release();
        // Only a client's request is counted (a background one never reaches here).
        if !std::mem::take(&mut self.counted) {
            return;
        }
        let elapsed = self.start.elapsed();
        let route = &self.active.routes[self.route];
        route.metrics.request_duration.observe(elapsed.as_secs_f64());
        let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
        for i in &self.active.route_slos[self.route] {
            self.active.slos[*i].record(self.status, elapsed_ms, self.policy_answer);
        }
        route.metrics.count(&self.method, self.status);
        self.active.in_flight.dec();
        if self.active.access_log {
            tracing::info!(
                target: "access",
                request_id = self.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or_default(),
                route = route.metrics.name.as_str(),
                method = self.method.as_str(),
                path = self.path.as_ref().map_or("/", |p| p.as_str()),
                status = self.status,
                duration_ms = elapsed_ms,
                upstream_ms = self.upstream_ms,
                bytes,
            );
        }
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

    #[test]
    fn request_ids_are_kept_or_made() {
        let ids = RequestIds::new();
        let mut h = HeaderMap::new();
        let a = ids.for_request(&h);
        let b = ids.for_request(&h);
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(ids.for_request(&h), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        assert_ne!(ids.for_request(&h), "has space");
    }
}
