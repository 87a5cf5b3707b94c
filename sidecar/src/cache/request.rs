//! The cached request path: lookup, conditional answers, stale-while-revalidate, coalesced
//! misses, stale-if-error, storing, and invalidation.

use std::{
    sync::{Arc, atomic::Ordering},
    time::SystemTime,
};

use apipolicy_api::{CacheConfig, CacheMode, Encoding};
use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header, request::Parts,
};
use hyper::body::Incoming;

use super::{
    CACHE_STATUS, CacheKey, Entry, Flight, Lookup, RequestCacheHeaders, conditional, effective_headers,
    entry, refreshed, refuse_to_store,
    shared::{FillLock, SharedTier},
};
use crate::{
    accounting::Accounting,
    body::{Buffered, ProxyBody, UpstreamBody, buffer},
    clock::Clock,
    compress,
    error::ProxyError,
    headers::{Raw, RequestHeaders},
    outbound::prepare,
    pipeline::{ClientRequest, Cx, ToApp},
    runtime::{PolicyRuntime, RouteRuntime},
};

/// Conditional headers the cache evaluates itself; a fill asks the app for the whole body.
static CONDITIONAL: [HeaderName; 5] = [
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
];

/// The URL a request names, as the cache keys it (with a trusted proxy's forwarding headers),
/// on a route that sorts the query or not.
pub fn target<B>(req: &Request<B>, sort_query: bool) -> CacheKey {
    let host = crate::forwarded::cache_host(host(req.headers(), req.uri()), req.headers());
    CacheKey::new(&host, req.uri().path(), req.uri().query(), sort_query)
}

fn sorts(route: &RouteRuntime) -> bool {
    route.cache.as_ref().is_some_and(|c| c.sort_query)
}

fn host<'a>(headers: &'a HeaderMap, uri: &'a http::Uri) -> &'a str {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or_default()
}

/// Whether the cache may answer a request: `None` for methods it never answers, `Some(false)`
/// for a GET or HEAD that must bypass it (`no-store`, and in Override mode
/// Authorization, since the policy would make a per-user answer public). A GET or HEAD with a
/// body bypasses it too: the body is not in the cache key, so the request goes to the app as
/// sent, body and all, and its answer is not stored.
pub fn eligible<B: http_body::Body>(
    config: &CacheConfig,
    req: &Request<B>,
    asks: RequestCacheHeaders,
) -> Option<bool> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return None;
    }
    let bypass = !req.body().is_end_stream()
        || (config.mode == CacheMode::Override && asks.authorization)
        || (asks.cache_control
            && super::directives(req.headers().get_all(header::CACHE_CONTROL))
                .any(|(n, _)| n.eq_ignore_ascii_case("no-store")));
    Some(!bypass)
}

fn cache_status(kind: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("ApiPolicy; {kind}")).unwrap_or(HeaderValue::from_static("ApiPolicy"))
}

/// Answers a cacheable request. The hit path comes first: a plain request for a fresh entry
/// is answered from the URL's hash and the entry's ready head, before anything is copied.
/// Everything else (misses, revalidation, the shared tier) takes the full path, boxed: its
/// future is several KiB, and a hit should not carry it, nor move it around.
#[allow(clippy::too_many_arguments)]
pub async fn serve<U: ToApp>(
    upstream: U,
    req: ClientRequest,
    asks: RequestCacheHeaders,
    cx: &mut Cx<'_>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (active, route) = (cx.active, cx.route);
    let head = req.method() == Method::HEAD;
    let now = active.clock.now();
    let (headers, uri) = (req.headers(), req.uri());
    let host = crate::forwarded::cache_host(host(headers, uri), headers);
    if let Some(e) = fresh(active, route, headers, asks, (host.as_bytes(), uri.path(), uri.query()), now) {
        route.cache_lookups.hit.inc();
        return Ok(respond(active, route, &e, now, None, headers, head).await);
    }
    Box::pin(serve_full(upstream, req, cx)).await
}

async fn serve_full<U: ToApp>(
    upstream: U,
    req: ClientRequest,
    cx: &mut Cx<'_>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (active, route) = (cx.active, cx.route);
    let config = route.cache.as_ref().expect("serve is called for cached routes");
    let store = &active.store;
    let head = req.method() == Method::HEAD;
    let key = target(&req, config.sort_query);
    let (mut parts, _get_body_has_no_meaning) = (*req).into_parts();
    for name in crate::forwarded::rewriting() {
        parts.headers.remove(name);
    }
    let mut client_headers = parts.headers.clone();
    super::judge::request(&mut client_headers);
    let mut stale: Option<Arc<Entry>> = None;
    let mut miss_kind = "fwd=uri-miss";
    // A few rounds at most: a waiter whose leader failed may lead the next round itself.
    for _ in 0..3 {
        let now = active.clock.now();
        match store.lookup(&key, &client_headers, now, cx.protection.serve_stale) {
            Lookup::Fresh(e) => {
                route.cache_lookups.hit.inc();
                return Ok(respond(active, route, &e, now, None, &client_headers, head).await);
            }
            Lookup::StaleWhileRevalidate(e) => {
                route.cache_lookups.stale.inc();
                if !e.revalidating.swap(true, Ordering::AcqRel) {
                    spawn_revalidation(upstream, cx, key.clone(), clone_parts(&parts), e.clone());
                }
                let kind = format!("hit; ttl=-{}", e.staleness(now).as_secs());
                return Ok(respond(active, route, &e, now, Some(&kind), &client_headers, head).await);
            }
            // SLO protection: any stored answer rather than the failing app.
            Lookup::Stale(e) if cx.protection.serve_stale => {
                route.cache_lookups.stale.inc();
                let kind = format!("hit; ttl=-{}; detail=protection", e.staleness(now).as_secs());
                return Ok(respond(active, route, &e, now, Some(&kind), &client_headers, head).await);
            }
            Lookup::Stale(e) => {
                // RFC 9211: a fresh entry the request's own directives refused is `request`.
                miss_kind = if e.ttl(now).is_zero() { "fwd=stale" } else { "fwd=request" };
                stale = Some(e);
            }
            Lookup::VaryMiss => miss_kind = "fwd=vary-miss",
            Lookup::UriMiss => {}
        }
        match store.join(key.hash) {
            Ok(mut waiting) => {
                // Someone fetches this URL already: wait for it, bounded by the route timeout.
                let waited =
                    tokio::time::timeout(route.timeout, waiting.wait_for(|f| *f != Flight::Pending)).await;
                match waited.ok().and_then(|r| r.ok()).map(|f| *f) {
                    Some(Flight::Stored) | Some(Flight::Failed) => continue,
                    _ => break,
                }
            }
            Err(guard) => {
                // Another pod may have it, or be fetching it.
                let mut lock = None;
                if let Some(shared) = &active.shared_cache {
                    let found = match from_shared(shared, config, &key, &client_headers, &active.clock).await
                    {
                        Some(e) => Some((e, "detail=shared")),
                        None => match shared.lock(key.hash, route.timeout).await {
                            FillLock::Acquired(token) => {
                                lock = Some(token);
                                None
                            }
                            FillLock::Held => {
                                wait_for_shared(shared, config, route, &key, &client_headers, &active.clock)
                                    .await
                                    .map(|e| (e, "detail=shared-fill"))
                            }
                            FillLock::Unavailable => None,
                        },
                    };
                    if let Some((e, detail)) = found {
                        let now = active.clock.now();
                        store.insert(&key, e.clone(), &client_headers, now);
                        guard.finish(Flight::Stored);
                        route.cache_lookups.hit.inc();
                        let kind = format!("hit; ttl={}; {detail}", e.ttl(now).as_secs());
                        return Ok(respond(active, route, &e, now, Some(&kind), &client_headers, head).await);
                    }
                }
                let (resp, outcome) =
                    fill(&upstream, config, &key, parts, stale, &client_headers, head, cx, miss_kind).await;
                guard.finish(outcome);
                if let (Some(shared), Some(token)) = (&active.shared_cache, lock) {
                    shared.unlock(key.hash, &token).await;
                }
                return resp;
            }
        }
    }
    // The app's answer cannot be shared (or the leader took too long): ask it directly.
    route.cache_lookups.bypass.inc();
    let (resp, _) = fetch(&upstream, parts, None, cx).await?;
    Ok(pass_through(config, resp, "fwd=bypass"))
}

/// Asks the app (conditionally when a stale entry can be revalidated).
#[allow(clippy::too_many_arguments)]
async fn fetch<U: ToApp>(
    upstream: &U,
    mut parts: Parts,
    stale: Option<&Entry>,
    cx: &mut Cx<'_>,
) -> Result<(Response<Incoming>, bool), ProxyError> {
    // HEAD is filled with GET, so the entry serves both.
    parts.method = Method::GET;
    for name in &CONDITIONAL {
        parts.headers.remove(name);
    }
    // The whole response is stored; a range is served from it.
    parts.headers.remove(header::RANGE);
    let revalidating = stale.is_some_and(|e| {
        let mut asked = false;
        if let Some(etag) = e.headers.get(header::ETAG).filter(|_| !e.own_etag) {
            parts.headers.insert(header::IF_NONE_MATCH, etag.clone());
            asked = true;
        }
        if let Some(lm) = e.headers.get(header::LAST_MODIFIED) {
            parts.headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
            asked = true;
        }
        asked
    });
    prepare(&mut parts, cx.peer, cx.id, false)?;
    let resp = upstream.call(Box::new(Request::from_parts(parts, UpstreamBody::Empty)), cx).await?;
    Ok((resp, revalidating))
}

/// The leader's work on a miss: fetch, store when allowed, answer.
#[allow(clippy::too_many_arguments)]
async fn fill<U: ToApp>(
    upstream: &U,
    config: &CacheConfig,
    key: &CacheKey,
    parts: Parts,
    stale: Option<Arc<Entry>>,
    client_headers: &HeaderMap,
    head: bool,
    cx: &mut Cx<'_>,
    miss_kind: &str,
) -> (Result<Response<ProxyBody>, ProxyError>, Flight) {
    let (active, route) = (cx.active, cx.route);
    let store = &active.store;
    let fetched = fetch(upstream, parts, stale.as_deref(), cx).await;
    let now = active.clock.now();
    let serve_stale = |e: &Arc<Entry>| e.staleness(now) <= e.stale_if_error;
    let resp = match fetched {
        Err(e) if e.is_policy() => return (Err(e), Flight::Failed),
        Err(e) => {
            tracing::debug!(error = %e, path = %key.path, "cache fill failed");
            return match stale.as_ref().filter(|s| serve_stale(s)) {
                Some(s) => {
                    (Ok(stale_if_error(active, route, s, client_headers, head, now).await), Flight::Failed)
                }
                None => (Err(e), Flight::Failed),
            };
        }
        Ok((resp, _)) => resp,
    };
    let status = resp.status();
    if status == StatusCode::NOT_MODIFIED
        && let Some(old) = &stale
    {
        route.cache_lookups.revalidated.inc();
        let fresh = Arc::new(refreshed(config, old, key, client_headers, resp.headers(), now));
        store.insert(key, fresh.clone(), client_headers, now);
        if let Some(shared) = &active.shared_cache {
            shared.put(key, &fresh, client_headers, now).await;
        }
        let kind = format!("{miss_kind}; fwd-status=304; stored");
        let r = respond(active, route, &fresh, now, Some(&kind), client_headers, head).await;
        return (Ok(r), Flight::Stored);
    }
    if status.is_server_error()
        && let Some(s) = stale.as_ref().filter(|s| serve_stale(s))
    {
        return (Ok(stale_if_error(active, route, s, client_headers, head, now).await), Flight::Failed);
    }
    route.cache_lookups.miss.inc();
    let (mut parts, body) = resp.into_parts();
    effective_headers(config, status, &mut parts.headers);
    if let Some(why) = refuse_to_store(config, key, client_headers, status, &parts.headers, now) {
        tracing::debug!(reason = why, path = %key.path, "response not stored");
        let flight = if status.is_server_error() { Flight::Failed } else { Flight::Uncacheable };
        let kind = format!("{miss_kind}; fwd-status={}", status.as_u16());
        return (Ok(pass_through(config, Response::from_parts(parts, body), &kind)), flight);
    }
    match buffer(body, config.max_entry_size).await {
        Err(e) => (Err(ProxyError::BadGateway(format!("the app's body broke off: {e}"))), Flight::Failed),
        Ok(Buffered::TooLarge(prefix, rest)) => {
            for name in &config.targeted {
                parts.headers.remove(name.as_str());
            }
            let mut resp = Response::from_parts(parts, ProxyBody::prefixed(prefix, rest));
            resp.headers_mut()
                .insert(CACHE_STATUS.clone(), cache_status(&format!("{miss_kind}; detail=too-large")));
            if head {
                *resp.body_mut() = ProxyBody::empty();
            }
            (Ok(resp), Flight::Uncacheable)
        }
        Ok(Buffered::Complete(bytes, hash)) => {
            let own_etag =
                config.etag && !parts.headers.contains_key(header::ETAG) && status == StatusCode::OK;
            if own_etag {
                parts.headers.insert(header::ETAG, conditional::etag_of_hash(hash));
            }
            let mut e = entry(config, key, client_headers, status, parts.headers, bytes, now);
            e.own_etag = own_etag;
            let e = Arc::new(e);
            store.insert(key, e.clone(), client_headers, now);
            if let Some(shared) = &active.shared_cache {
                shared.put(key, &e, client_headers, now).await;
            }
            let kind = format!("{miss_kind}; stored; ttl={}", e.ttl(now).as_secs());
            (Ok(respond(active, route, &e, now, Some(&kind), client_headers, head).await), Flight::Stored)
        }
    }
}

/// The stale entry instead of the app's failure (stale-if-error).
async fn stale_if_error(
    active: &PolicyRuntime,
    route: &RouteRuntime,
    stale: &Arc<Entry>,
    client_headers: &HeaderMap,
    head: bool,
    now: SystemTime,
) -> Response<ProxyBody> {
    route.cache_lookups.stale.inc();
    let kind = format!("hit; ttl=-{}; detail=stale-if-error", stale.staleness(now).as_secs());
    respond(active, route, stale, now, Some(&kind), client_headers, head).await
}

/// A response that is not stored, passed on with the cache's headers.
fn pass_through(config: &CacheConfig, resp: Response<Incoming>, kind: &str) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    if config.mode == CacheMode::Override {
        effective_headers(config, parts.status, &mut parts.headers);
    }
    for name in &config.targeted {
        parts.headers.remove(name.as_str());
    }
    parts.headers.insert(CACHE_STATUS.clone(), cache_status(kind));
    Response::from_parts(parts, ProxyBody::upstream(body))
}

/// Answers from an entry: a 304 when the client's copy is current, else the body in the
/// best encoding the client accepts (compressed once per entry and kept). The head comes from
/// the entry's ready one for this Age and TTL; `kind` replaces its `Cache-Status` (a plain
/// fresh hit has `None`).
#[allow(clippy::too_many_arguments)]
async fn respond(
    active: &PolicyRuntime,
    route: &RouteRuntime,
    e: &Arc<Entry>,
    now: SystemTime,
    kind: Option<&str>,
    request: &HeaderMap,
    head: bool,
) -> Response<ProxyBody> {
    // A range is of the identity body (the stored bytes): compression is skipped for it.
    let range = request
        .get(header::RANGE)
        .filter(|_| e.status == StatusCode::OK && super::range::if_range_allows(request, &e.headers));
    let accept = request.get(header::ACCEPT_ENCODING).map(HeaderValue::as_bytes);
    let answer = match hit(active, route, e, now, accept) {
        Ok(answer) if range.is_none() => answer,
        Ok(answer) => {
            let compressible = answer.head.compressible;
            hit_in(e, compressible, None, e.body.clone(), now)
        }
        Err(_) if range.is_some() => hit_in(e, true, None, e.body.clone(), now),
        // Once per entry and encoding; boxed, so that the hit path's future stays small.
        Err(enc) => match Box::pin(encode(enc, &e.body)).await {
            Some(packed) => {
                e.keep_encoded(enc, packed.clone());
                route.compression_bytes.0.inc_by(e.body.len() as u64);
                route.compression_bytes.1.inc_by(packed.len() as u64);
                active.store.reweigh(e.hash);
                hit_in(e, true, Some(enc), packed, now)
            }
            None => hit_in(e, true, None, e.body.clone(), now),
        },
    };
    let mut headers = answer.head.headers.clone();
    if let Some(kind) = kind {
        headers.insert(CACHE_STATUS.clone(), cache_status(kind));
    }
    if conditional::not_modified(request, headers.get(header::ETAG), headers.get(header::LAST_MODIFIED)) {
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        *resp.headers_mut() = conditional::not_modified_headers(&headers);
        if let Some(status) = headers.get(&CACHE_STATUS) {
            resp.headers_mut().insert(CACHE_STATUS.clone(), status.clone());
        }
        return resp;
    }
    let mut status = e.status;
    let mut body = answer.body;
    if let Some(range) = range {
        let len = body.len() as u64;
        match super::range::wanted(range.as_bytes(), len) {
            super::range::Wanted::Whole => {}
            super::range::Wanted::Part(part) => {
                status = StatusCode::PARTIAL_CONTENT;
                headers.insert(header::CONTENT_RANGE, super::range::content_range(Some(&part), len));
                body = body.slice(*part.start() as usize..=*part.end() as usize);
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            }
            super::range::Wanted::Unsatisfiable => {
                status = StatusCode::RANGE_NOT_SATISFIABLE;
                headers.insert(header::CONTENT_RANGE, super::range::content_range(None, len));
                headers.remove(header::CONTENT_TYPE);
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
                body = Bytes::new();
            }
        }
    }
    let mut resp = Response::new(if head { ProxyBody::empty() } else { ProxyBody::full(body) });
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// Whether the route compresses entry `e` (its config), and the encoding a client accepting
/// `accept` gets (when the body is big enough for the route and the client takes one).
fn compression_for<'r>(
    active: &PolicyRuntime,
    route: &'r RouteRuntime,
    e: &Entry,
    accept: Option<&[u8]>,
) -> (Option<&'r apipolicy_api::CompressionConfig>, Option<Encoding>) {
    let compressible = route.compression.as_ref().filter(|config| {
        e.compressible_on(active.generation, route.index, || {
            compress::compressible(e.status, &e.headers, config)
        })
    });
    let wanted = compressible
        .filter(|config| e.body.len() as u64 >= config.min_size)
        .and_then(|config| compress::negotiate_bytes(accept, &config.algorithms));
    (compressible, wanted)
}

/// The head of a plain hit on `e`, in `encoding`, at this Age and TTL.
fn hit_headers(
    e: &Entry,
    compressible: bool,
    encoding: Option<Encoding>,
    length: usize,
    age: u64,
    ttl: u64,
) -> HeaderMap {
    let mut h = e.headers.clone();
    if compressible {
        compress::add_vary(&mut h, "accept-encoding");
    }
    if let Some(enc) = encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(enc.as_str()));
        h.remove(header::ACCEPT_RANGES);
        if let Some(tag) = h.get(header::ETAG).and_then(|t| conditional::encoded_etag(t, enc.as_str())) {
            h.insert(header::ETAG, tag);
        }
    }
    h.remove(header::TRANSFER_ENCODING);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(header::AGE, HeaderValue::from(age));
    h.insert(CACHE_STATUS.clone(), cache_status(&format!("hit; ttl={ttl}")));
    // The proxy sets the request id on every response: a slot for it now means that
    // insert replaces a value instead of growing a copy of this map on every hit. HeaderMap
    // grows on any insert into a full table, even one that replaces: leave room (a clone
    // keeps it).
    h.insert(crate::headers::X_REQUEST_ID.clone(), HeaderValue::from_static("-"));
    h.reserve(2);
    h
}

/// A hit's answer: the entry's ready head for this Age, TTL and encoding, and the body in
/// that encoding.
pub struct Hit {
    pub status: StatusCode,
    pub head: Arc<super::HitHead>,
    pub body: Bytes,
}

/// The fresh entry a plain request (see [`RequestCacheHeaders::plain`]) for this URL (host, path, query) gets,
/// judged the same for hyper's requests and for the fast path's parsed heads.
fn fresh(
    active: &PolicyRuntime,
    route: &RouteRuntime,
    headers: &impl RequestHeaders,
    asks: RequestCacheHeaders,
    url: (&[u8], &str, Option<&str>),
    now: SystemTime,
) -> Option<Arc<Entry>> {
    let hash = super::url_hash(url.0, url.1, url.2, sorts(route));
    active.store.fresh(hash, headers, asks, now)
}

/// The answer from entry `e` for a client that accepts `accept`; `Err` with the encoding the
/// client should get when the entry has no such form yet (making it is the caller's choice).
fn hit(
    active: &PolicyRuntime,
    route: &RouteRuntime,
    e: &Entry,
    now: SystemTime,
    accept: Option<&[u8]>,
) -> Result<Hit, Encoding> {
    let (compressible, wanted) = compression_for(active, route, e, accept);
    let (body, encoding) = match wanted {
        Some(enc) => (e.encoded(enc).ok_or(enc)?, Some(enc)),
        None => (e.body.clone(), None),
    };
    Ok(hit_in(e, compressible.is_some(), encoding, body, now))
}

/// The answer from entry `e` with this body, in `encoding`.
fn hit_in(e: &Entry, compressible: bool, encoding: Option<Encoding>, body: Bytes, now: SystemTime) -> Hit {
    let (age, ttl) = (e.age(now).as_secs(), e.ttl(now).as_secs());
    let head = e.head(super::encoding_slot(encoding), age, ttl, compressible, || {
        hit_headers(e, compressible, encoding, body.len(), age, ttl)
    });
    Hit { status: e.status, head, body }
}

/// The fast path's hit (the caller counts it): a plain GET or HEAD (no `Cache-Control`,
/// `Pragma`, `Authorization`, `Range` or conditional header of the client's) for a fresh
/// entry, the same answer the full path gives such a request ([`serve`] then [`respond`],
/// through the same [`fresh`] and [`hit`]). `None` for anything else, and for a compressed
/// form not made yet: the full path answers those.
pub fn fast_hit(
    active: &PolicyRuntime,
    route: &RouteRuntime,
    headers: &Raw<'_>,
    asks: RequestCacheHeaders,
    url: (&[u8], &str, Option<&str>),
) -> Option<Hit> {
    if asks.range || asks.conditional {
        return None;
    }
    let now = active.clock.now();
    let e = fresh(active, route, headers, asks, url, now)?;
    // Statuses whose framing hyper rewrites (no body, no Content-Length) take the full path.
    if e.status == StatusCode::NO_CONTENT || e.status == StatusCode::NOT_MODIFIED {
        return None;
    }
    hit(active, route, &e, now, headers.first(&header::ACCEPT_ENCODING)).ok()
}

/// Compresses a stored body; big ones on the blocking pool, off the request threads.
async fn encode(enc: Encoding, body: &Bytes) -> Option<Bytes> {
    let packed = if body.len() > 64 * 1024 {
        let body = body.clone();
        tokio::task::spawn_blocking(move || futures::executor::block_on(compress::compress_bytes(enc, &body)))
            .await
            .ok()?
    } else {
        compress::compress_bytes(enc, body).await
    };
    packed.ok().map(Bytes::from)
}

/// Revalidates a stale entry in the background (stale-while-revalidate).
fn spawn_revalidation<U: ToApp>(upstream: U, cx: &Cx<'_>, key: CacheKey, parts: Parts, stale: Arc<Entry>) {
    let (active, route_index, peer, id) = (cx.active.clone(), cx.route_index, cx.peer, cx.id.clone());
    tokio::spawn(async move {
        let route = &active.routes[route_index];
        let Some(config) = &route.cache else { return };
        let Err(guard) = active.store.join(key.hash) else {
            stale.revalidating.store(false, Ordering::Release);
            return;
        };
        let client_headers = parts.headers.clone();
        let mut finish = Accounting::background(active.clone(), route_index);
        let mut cx = Cx {
            active: &active,
            route,
            route_index,
            peer,
            id: &id,
            finish: &mut finish,
            bad_path: None,
            try_limit: None,
            class: Default::default(),
            protection: Default::default(),
        };
        let (_, outcome) = fill(
            &upstream,
            config,
            &key,
            parts,
            Some(stale.clone()),
            &client_headers,
            true,
            &mut cx,
            "fwd=stale",
        )
        .await;
        stale.revalidating.store(false, Ordering::Release);
        guard.finish(outcome);
        finish.release();
    });
}

/// After a successful unsafe request: forget the URL, and its `Location` and
/// `Content-Location` when they are on the same host.
pub fn invalidate(active: &PolicyRuntime, target: &CacheKey, response: &HeaderMap) {
    let store = &active.store;
    let mut hashes = vec![target.hash];
    store.invalidate(target.hash);
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(v) = response.get(&name).and_then(|v| v.to_str().ok()) else { continue };
        let Ok(uri) = v.parse::<http::Uri>() else { continue };
        if uri.host().is_some_and(|h| !target.host.split(':').next().unwrap_or("").eq_ignore_ascii_case(h)) {
            continue;
        }
        let other = CacheKey::new(&target.host, uri.path(), uri.query(), target.sort_query);
        store.invalidate(other.hash);
        hashes.push(other.hash);
    }
    if let Some(shared) = active.shared_cache.clone() {
        // Other pods and Redis forget it too, off the request's path.
        tokio::spawn(async move {
            for h in hashes {
                shared.invalidate(h).await;
            }
        });
    }
}

/// A shared entry this request may be served from now.
async fn from_shared(
    shared: &SharedTier,
    config: &CacheConfig,
    key: &CacheKey,
    request: &HeaderMap,
    clock: &Clock,
) -> Option<Arc<Entry>> {
    let e = shared.get(config, key).await?;
    let req = super::CacheRequest { uri: &key.uri, headers: request };
    matches!(
        http_cache_semantics::CachePolicy::before_request(&e.policy, &req, clock.now()),
        http_cache_semantics::BeforeRequest::Fresh(_)
    )
    .then(|| Arc::new(e))
}

/// While another pod fills the URL: look for its entry until the route's timeout.
async fn wait_for_shared(
    shared: &SharedTier,
    config: &CacheConfig,
    route: &RouteRuntime,
    key: &CacheKey,
    request: &HeaderMap,
    clock: &Clock,
) -> Option<Arc<Entry>> {
    let deadline = tokio::time::Instant::now() + route.timeout;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if let Some(e) = from_shared(shared, config, key, request, clock).await {
            return Some(e);
        }
    }
    None
}

/// A copy of a request head (extensions aside, which a background request does not need).
fn clone_parts(parts: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}
