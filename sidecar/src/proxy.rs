//! The request path. Order of work (DESIGN.md): request id → route match → rate limit →
//! cache lookup (fresh hit, 304, stale-while-revalidate, coalesced miss) → load shedding →
//! upstream (pooled keep-alive connection, route timeout) → cache store, ETag,
//! Cache-Control, compression → metrics, SLO counters and the access log when the response
//! body ends.

use std::{net::SocketAddr, time::Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri, header, uri::PathAndQuery};
use hyper::body::Incoming;

use crate::{
    accounting::Finish,
    body::ProxyBody,
    compress,
    error::ProxyError,
    headers::{Raw, RequestHeaders, X_REQUEST_ID},
    request_id::RequestIds,
    routes::PathError,
    state::Active,
};

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
        let mut finish = Finish::request(active.clone(), req.method(), index, &id, start, || {
            req.uri().path_and_query().cloned()
        });
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
            crate::outbound::forward(&active, route, req, peer, &id, &mut finish).await
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
        let mut finish = Finish::request(active.clone(), req.method, index, &id, start, || {
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
