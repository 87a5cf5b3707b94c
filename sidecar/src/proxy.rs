//! The request path: the request id and forwarding headers, path normalization and the route
//! match, then the layers of [`stack`] in request order, and the accounting (metrics, SLO
//! counters, the access log) when the response body ends. The cache-hit fast path
//! ([`Proxy::fast_hit`]) answers plain hits on HTTP/1.1 before hyper parses them.

use std::{net::SocketAddr, time::Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri, header, uri::PathAndQuery};

use tower::{ServiceBuilder, layer::layer_fn};

use crate::{
    accounting::Accounting,
    body::ProxyBody,
    headers::{Raw, RequestHeaders, X_REQUEST_ID},
    layers::{
        breaker::CircuitBreak,
        cache::Cache,
        compress::{Compress, compress_streaming},
        concurrency::ConcurrencyLimit,
        path::RefuseBadPath,
        ratelimit::RateLimit,
        request_headers::SetRequestHeaders,
        retry::Retry,
        shed::ShedByPriority,
    },
    outbound::{Forward, Upstream},
    pipeline::{ClientRequest, Cx, Service},
    request_id::RequestIds,
    routes::PathError,
    runtime::PolicyRuntime,
};

/// The request pipeline below the request id, the route match and the accounting, in
/// request order: each layer sees the request before the ones under it, and their answer
/// after them. The layers hold nothing (each reads its own part of the route a request
/// matched), so building the stack costs nothing and it is built where it is used.
pub fn stack() -> impl Service<ClientRequest, Response = Response<ProxyBody>> {
    ServiceBuilder::new()
        // Outermost: compression sees every answer, problem answers included (they get Vary).
        .layer(layer_fn(Compress))
        // A refused path goes no further, and counts against no limit.
        .layer(layer_fn(RefuseBadPath))
        // Before the cache: a refused request costs nothing further; the limit's headers go
        // on every answer below, cache hits included.
        .layer(layer_fn(RateLimit))
        // Hits are answered here; misses are filled through the upstream side below; an
        // unsafe request the app took makes the cache forget its URL.
        .layer(layer_fn(Cache))
        // While an SLO protects the route, sheddable requests that would reach the app stop
        // here (hits above were still served).
        .layer(layer_fn(ShedByPriority))
        // Pass-through: body limits, streaming, upgrades. Below it, requests are the app's.
        .layer(layer_fn(Forward))
        // The route's header rules, on every request to the app (fills too), after the cache key.
        .layer(layer_fn(SetRequestHeaders))
        // Only what goes to the app takes a maxInFlight slot; hits never do.
        .layer(layer_fn(ConcurrencyLimit))
        // A failed try is tried again within the route's timeout and retry budget; below the
        // slot, so a request and its retries hold one.
        .layer(layer_fn(Retry))
        // Every try (retries too) is admitted and counted by the circuit breaker.
        .layer(layer_fn(CircuitBreak))
        // The app: framing, the route's timeout, the pooled connection, upstream metrics.
        .service(Upstream)
}

/// The proxy: the active config, swapped whole on reload.
pub struct Proxy {
    pub active: ArcSwap<PolicyRuntime>,
    ids: RequestIds,
}

impl Proxy {
    pub fn new(active: PolicyRuntime) -> Self {
        Self { active: ArcSwap::from_pointee(active), ids: RequestIds::new() }
    }

    pub async fn handle(&self, mut req: ClientRequest, peer: SocketAddr) -> Response<ProxyBody> {
        let start = Instant::now();
        // One snapshot per request: a reload in the middle of it does not change its config.
        let active = self.active.load_full();
        // Routes match the path the app will get; a path refused here goes to no route.
        let normalized = normalize_target(&active.router, &mut req);
        let id = self.ids.for_request(req.headers());
        // Before anything reads them: the route's header matches, the limiter's key, the cache
        // key and the app.
        crate::forwarded::own(req.headers_mut(), peer, &active.trusted);
        let (index, bad_path) = match normalized {
            Ok(()) => (active.router.route(req.method(), req.uri().path(), req.headers()), None),
            Err(e) => (active.routes.len() - 1, Some(e)),
        };
        active.in_flight.inc();
        let mut finish = Accounting::request(active.clone(), req.method(), index, &id, start, || {
            req.uri().path_and_query().cloned()
        });
        let route = &active.routes[index];
        let class = active.class(index, req.headers());
        let protection = active.protection(index);
        let mut cx = Cx {
            active: &active,
            route,
            route_index: index,
            peer,
            id: &id,
            finish: &mut finish,
            bad_path,
            try_limit: None,
            class,
            protection,
        };
        let mut resp = stack().call(req, &mut cx).await;
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

/// A request head as the cache-hit fast path ([`crate::fast_path`]) parsed it: an HTTP/1.1 GET or HEAD in
/// origin form, without a body.
pub struct HitRequest<'a> {
    pub peer: SocketAddr,
    pub method: &'a Method,
    /// The request target: `path[?query]`.
    pub target: &'a str,
    pub headers: Raw<'a>,
}

/// What the fast path writes, and what it records once written: a hit (with the route's limit
/// headers), or the limit's refusal.
pub enum HitAnswer {
    Hit {
        hit: crate::cache::request::Hit,
        id: HeaderValue,
        // Boxed, as the refusal: a plain hit's answer stays small (it is moved a few times).
        limit: Option<Box<crate::ratelimit::applied::Applied>>,
        finish: Accounting,
    },
    Refused {
        response: Box<Response<ProxyBody>>,
        finish: Accounting,
    },
}

impl Proxy {
    /// Answers a plain hit for the fast path, doing what [`Proxy::handle`] does for it (request
    /// id, route, a limit kept in this pod, cache hit, metrics, SLOs and access log through
    /// [`Accounting`]); `None` when the request needs more than that (a miss, a `Global` limit, a
    /// conditional, a `Cache-Control` of the client's…): the fast path hands it to hyper and
    /// [`Proxy::handle`]. The limit is asked only once the hit is certain, so that a request
    /// handed over is never counted twice.
    pub fn fast_hit(&self, req: &HitRequest<'_>) -> Option<HitAnswer> {
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
        // A limit tightened by SLO protection is applied on the full path.
        if route.limiter.is_some() && active.protection(index).tighten_permille.is_some() {
            return None;
        }
        let asks = crate::cache::RequestCacheHeaders::of(&req.headers);
        if !asks.plain() {
            return None;
        }
        // As `request::host` reads it: a Host that is not visible ASCII counts as none.
        let host =
            req.headers.first(&header::HOST).filter(|h| crate::headers::is_text(h)).unwrap_or_default();
        let hit = crate::cache::request::fast_hit(&active, route, &req.headers, asks, (host, path, query))?;
        if route.limiter.is_some() && hit.head.limit_headers {
            return None;
        }
        // A limit kept elsewhere (Global) is never skipped: such a request goes to hyper.
        let decided = match &route.limiter {
            None => None,
            Some(l) => Some(l.check_local(&req.headers, req.peer, &active.trusted)?),
        };
        let id = self.ids.for_request(&req.headers);
        active.in_flight.inc();
        let mut finish = Accounting::request(active.clone(), req.method, index, &id, start, || {
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
                return Some(HitAnswer::Refused { response: Box::new(response), finish });
            }
        };
        route.cache_lookups.hit.inc();
        Some(HitAnswer::Hit { hit, id, limit, finish })
    }
}
