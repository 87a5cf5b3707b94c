//! The response cache: a shared (RFC 9111) cache in memory, bounded by bytes.
//!
//! Freshness comes from `http-cache-semantics` in both modes. With `mode: Override` the
//! policy's own `Cache-Control` replaces the app's before the response is judged (and is what
//! clients get); with `mode: Origin` the app's headers decide. Entries are keyed by host,
//! path and the query as sent (its parameters put in order of their names only on routes that
//! ask for it, `sortQuery`); the variants of one key are told apart by
//! the request headers their `Vary` names (`Accept-Encoding` aside: one identity body per
//! variant, and each compressed form made once and kept beside it).

pub mod conditional;
pub mod judge;
pub mod range;
pub mod request;
pub mod shared;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use crate::headers::RequestHeaders;
use apipolicy_api::{CacheConfig, CacheMode, Encoding};
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy, RequestLike, ResponseLike};
use prometheus::{IntCounter, IntGauge};
use tokio::sync::watch;

/// What a request's URL is, for the cache: host, path, query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheKey {
    pub hash: u64,
    pub host: String,
    pub path: String,
    /// `path?query` (the query in the key's order), the URI the policy judges by.
    pub uri: Uri,
    /// Whether the query's parameters were put in order of their names (`sortQuery`).
    pub sort_query: bool,
}

impl CacheKey {
    pub fn new(host: &str, path: &str, query: Option<&str>, sort_query: bool) -> Self {
        let hash = url_hash(host.as_bytes(), path, query, sort_query);
        let host = host.to_ascii_lowercase();
        let query = query.filter(|q| !q.is_empty()).map(|q| {
            if !sort_query {
                return q.to_owned();
            }
            let mut params: Vec<&str> = q.split('&').filter(|p| !p.is_empty()).collect();
            params.sort_by(|a, b| param_name(a).cmp(param_name(b)));
            params.join("&")
        });
        let target = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        let uri = target.parse().unwrap_or_else(|_| Uri::from_static("/"));
        Self { hash, host, path: path.to_owned(), uri, sort_query }
    }
}

/// A query parameter's name: what stands before its `=`.
fn param_name(param: &str) -> &str {
    param.split_once('=').map_or(param, |(name, _)| name)
}

/// The hash of a URL for the cache, [`CacheKey::hash`]: the host lower-cased, the path, and
/// the query as sent; or, with `sort_query`, its non-empty parameters in order of their
/// names (a stable sort: parameters of one name keep their order, since `?a=2&a=1` is not
/// `?a=1&a=2` to most apps), hashed as they go, with no allocation for up to 16 parameters
/// (the hit path computes it on every request).
pub fn url_hash(host: &[u8], path: &str, query: Option<&str>, sort_query: bool) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut lower = [0u8; 64];
    for chunk in host.chunks(lower.len()) {
        let b = &mut lower[..chunk.len()];
        b.copy_from_slice(chunk);
        b.make_ascii_lowercase();
        h.update(b);
    }
    h.update(b"\n");
    h.update(path.as_bytes());
    match query.filter(|q| !q.is_empty()) {
        None => {}
        Some(q) if !sort_query => {
            h.update(b"?");
            h.update(q.as_bytes());
        }
        Some(q) => {
            h.update(b"?");
            let feed = |h: &mut xxhash_rust::xxh3::Xxh3, params: &mut [&str]| {
                params.sort_by(|a, b| param_name(a).cmp(param_name(b)));
                for (i, p) in params.iter().enumerate() {
                    if i > 0 {
                        h.update(b"&");
                    }
                    h.update(p.as_bytes());
                }
            };
            let mut params = q.split('&').filter(|p| !p.is_empty());
            let mut few = [""; 16];
            let mut n = 0;
            for p in params.by_ref().take(few.len()) {
                few[n] = p;
                n += 1;
            }
            if params.next().is_none() {
                feed(&mut h, &mut few[..n]);
            } else {
                let mut many: Vec<&str> = q.split('&').filter(|p| !p.is_empty()).collect();
                feed(&mut h, &mut many);
            }
        }
    }
    h.digest()
}

/// A request as the cache policy sees it: GET for HEAD (HEAD is served from GET entries), and
/// the normalized URI.
pub struct CacheRequest<'a> {
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

impl RequestLike for CacheRequest<'_> {
    fn uri(&self) -> Uri {
        self.uri.clone()
    }
    fn is_same_uri(&self, other: &Uri) -> bool {
        self.uri == other
    }
    fn method(&self) -> &Method {
        &Method::GET
    }
    fn headers(&self) -> &HeaderMap {
        self.headers
    }
}

struct ResponseView<'a> {
    status: StatusCode,
    headers: &'a HeaderMap,
}

impl ResponseLike for ResponseView<'_> {
    fn status(&self) -> StatusCode {
        self.status
    }
    fn headers(&self) -> &HeaderMap {
        self.headers
    }
}

/// One stored response.
pub struct Entry {
    pub policy: CachePolicy,
    pub status: StatusCode,
    /// The response headers as stored (with the policy's Cache-Control in Override mode),
    /// without the targeted fields the route obeys: those are in `targeted`.
    pub headers: HeaderMap,
    /// The route's targeted cache-control fields (RFC 9213) the response had: judged, kept
    /// for a later revalidation or the shared tier, never sent on.
    pub targeted: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// How long past freshness the entry may be served while revalidating / on errors.
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub surrogate_keys: Vec<String>,
    pub path: String,
    /// The URL's [`CacheKey::hash`].
    pub hash: u64,
    /// When the entry stops being fresh.
    pub fresh_until: SystemTime,
    /// Compressed forms (br, zstd, gzip), each made once, on first use; read without a lock.
    encoded: [OnceLock<Bytes>; 3],
    /// A background revalidation is running.
    pub revalidating: AtomicBool,
    /// The `ETag` is the sidecar's own (`cache.etag`, for an app that sent none): it answers
    /// the client's conditionals, but the app never issued it, so it is never sent to the app
    /// (an `If-None-Match` the app cannot match would make it ignore `If-Modified-Since`, RFC
    /// 9110 §13.1.3, and the entry would never be revalidated).
    pub own_etag: bool,
    /// The request's values of the headers `Vary` names (Accept-Encoding aside), for hits
    /// judged without `http-cache-semantics`; `None` when such a judgement is not possible.
    vary: Option<Vec<(HeaderName, Option<HeaderValue>)>>,
    /// The entry's age when stored (RFC 9111 §4.2.3), and when that was.
    initial_age: Duration,
    stored_at: SystemTime,
    /// The response head of a hit, per encoding (identity, br, zstd, gzip), made again only
    /// when its Age or TTL second changes: a hit clones it and allocates nothing else.
    heads: [ArcSwapOption<HitHead>; 4],
    /// Whether the route compresses this entry, remembered for one config generation and route:
    /// `generation << 16 | route << 2 | 2 | answer`, 0 before the first answer.
    compressible: AtomicU64,
}

/// A ready response head for hits on one entry in one encoding.
pub struct HitHead {
    pub age: u64,
    pub ttl: u64,
    /// Whether the route compresses this entry's type (it adds `Vary: Accept-Encoding`).
    pub compressible: bool,
    pub headers: HeaderMap,
    /// The same head as HTTP/1.1 bytes, for the cache-hit fast path ([`crate::fast_path`]): the status
    /// line and every header but `X-Request-Id`, each line ending in CRLF.
    pub wire: Bytes,
    /// Whether the head has a `Date` (without one, the fast path adds one, as hyper does).
    pub dated: bool,
    /// Whether the head has one of the headers a rate limit writes (the app's own): the full
    /// path replaces them on a limited route, the fast path leaves such hits to it.
    pub limit_headers: bool,
}

impl HitHead {
    fn new(status: StatusCode, age: u64, ttl: u64, compressible: bool, headers: HeaderMap) -> Self {
        let mut wire = Vec::with_capacity(
            32 + headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>(),
        );
        crate::headers::status_line(&mut wire, status);
        let mut limit_headers = false;
        for (name, value) in &headers {
            if name == crate::headers::X_REQUEST_ID {
                continue;
            }
            limit_headers |= crate::ratelimit::applied::HEADER_NAMES.contains(&name.as_str());
            crate::headers::header_line(&mut wire, name.as_str().as_bytes(), value.as_bytes());
        }
        let dated = headers.contains_key(header::DATE);
        Self { age, ttl, compressible, headers, wire: wire.into(), dated, limit_headers }
    }
}

/// The slot of an encoding in [`Entry::heads`].
pub fn encoding_slot(encoding: Option<Encoding>) -> usize {
    match encoding {
        None => 0,
        Some(Encoding::Br) => 1,
        Some(Encoding::Zstd) => 2,
        Some(Encoding::Gzip) => 3,
    }
}

impl Entry {
    pub fn encoded(&self, encoding: Encoding) -> Option<Bytes> {
        self.encoded[encoding_slot(Some(encoding)) - 1].get().cloned()
    }

    /// Keeps a compressed form; the first one made wins when two requests raced to make it.
    pub fn keep_encoded(&self, encoding: Encoding, body: Bytes) {
        let _ = self.encoded[encoding_slot(Some(encoding)) - 1].set(body);
    }

    fn weight(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 32).sum();
        let forms = self.encoded.iter().filter_map(OnceLock::get);
        let (count, bodies) = forms.fold((0, 0), |(n, sum), b| (n + 1, sum + b.len()));
        // The stored headers, and a ready hit head per form served (identity and each encoding).
        let heads = headers * (2 + count);
        (self.body.len() + bodies + heads + 512) as u64
    }

    /// How far past freshness the entry is at `now` (zero when fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        now.duration_since(self.fresh_until).unwrap_or_default()
    }

    /// Past every window and without a validator: useless even as a stale fallback. An
    /// entry with an `ETag` or `Last-Modified` stays, to be revalidated (RFC 9111 §4.3).
    pub fn expired(&self, now: SystemTime) -> bool {
        self.staleness(now) > self.stale_while_revalidate.max(self.stale_if_error) && !self.has_validator()
    }

    /// Whether the app can tell whether the stored response is still current.
    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(header::ETAG) || self.headers.contains_key(header::LAST_MODIFIED)
    }

    /// The headers as the app sent them (targeted fields included), for the shared tier.
    pub fn stored_headers(&self) -> HeaderMap {
        let mut h = self.headers.clone();
        for (n, v) in &self.targeted {
            h.append(n.clone(), v.clone());
        }
        h
    }

    /// The entry's current age: as stored, plus the time since (what `CachePolicy::age` says).
    pub fn age(&self, now: SystemTime) -> Duration {
        self.initial_age + now.duration_since(self.stored_at).unwrap_or_default()
    }

    /// How long the entry stays fresh from `now` (zero when stale).
    pub fn ttl(&self, now: SystemTime) -> Duration {
        self.fresh_until.duration_since(now).unwrap_or_default()
    }

    /// Whether a request with these headers is one this entry's `Vary` matches (`false` when
    /// the entry cannot tell without the full judgement).
    fn varies_as(&self, request: &impl RequestHeaders) -> bool {
        self.vary.as_ref().is_some_and(|vary| {
            vary.iter().all(|(n, v)| request.first(n) == v.as_ref().map(|v| v.as_bytes()))
        })
    }

    /// Whether route `route` of config `generation` compresses this entry: `judge` answers
    /// the first time, and again only after a reload or on another route.
    pub fn compressible_on(&self, generation: u64, route: usize, judge: impl FnOnce() -> bool) -> bool {
        let key = generation << 16 | ((route as u64) & 0x3fff) << 2 | 2;
        let memo = self.compressible.load(Ordering::Relaxed);
        if memo & !1 == key {
            return memo & 1 == 1;
        }
        let answer = judge();
        self.compressible.store(key | answer as u64, Ordering::Relaxed);
        answer
    }

    /// The hit head for `slot` at this Age and TTL, made by `make` when there is none yet.
    pub fn head(
        &self,
        slot: usize,
        age: u64,
        ttl: u64,
        compressible: bool,
        make: impl FnOnce() -> HeaderMap,
    ) -> Arc<HitHead> {
        let cell = &self.heads[slot];
        if let Some(h) = &*cell.load()
            && h.age == age
            && h.ttl == ttl
            && h.compressible == compressible
        {
            return h.clone();
        }
        let head = Arc::new(HitHead::new(self.status, age, ttl, compressible, make()));
        cell.store(Some(head.clone()));
        head
    }
}

/// The request headers the cache looks at, found in one pass over the names (a request has a
/// handful; several hash lookups for headers that are usually absent cost more).
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestCacheHeaders {
    pub cache_control: bool,
    pub pragma: bool,
    pub authorization: bool,
    pub range: bool,
    /// `If-None-Match`, `If-Modified-Since`, `If-Match`, `If-Unmodified-Since` or `If-Range`.
    pub conditional: bool,
}

impl RequestCacheHeaders {
    /// From hyper's map or a request head's parsed bytes alike (names in any case).
    pub fn of(headers: &impl RequestHeaders) -> Self {
        let mut a = Self::default();
        for name in headers.names() {
            if name.eq_ignore_ascii_case(b"cache-control") {
                a.cache_control = true;
            } else if name.eq_ignore_ascii_case(b"pragma") {
                a.pragma = true;
            } else if name.eq_ignore_ascii_case(b"authorization") {
                a.authorization = true;
            } else if name.eq_ignore_ascii_case(b"range") {
                a.range = true;
            } else if is_conditional(name) {
                a.conditional = true;
            }
        }
        a
    }

    /// A request the fast hit path may judge: no `Cache-Control` or `Pragma` of the client's
    /// (`max-age`, `no-cache`, `min-fresh` … need the full judgement) and no `Authorization`.
    pub fn plain(&self) -> bool {
        !(self.cache_control || self.pragma || self.authorization)
    }
}

/// Whether a header name (any case) is one of the conditional request headers.
fn is_conditional(name: &[u8]) -> bool {
    name.len() >= 7
        && name[..3].eq_ignore_ascii_case(b"if-")
        && [&b"none-match"[..], b"modified-since", b"match", b"unmodified-since", b"range"]
            .iter()
            .any(|n| name[3..].eq_ignore_ascii_case(n))
}

/// The result of a lookup.
pub enum Lookup {
    /// No entry for the URL at all.
    UriMiss,
    /// Entries for the URL, none for this request's `Vary` values.
    VaryMiss,
    Fresh(Arc<Entry>),
    /// Stale, within stale-while-revalidate: serve it and revalidate in the background.
    StaleWhileRevalidate(Arc<Entry>),
    /// Stale: revalidate first (it may still serve if the app fails, within stale-if-error).
    Stale(Arc<Entry>),
}

/// What a coalesced miss's leader ended with, for those waiting on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flight {
    Pending,
    /// The response is in the cache now.
    Stored,
    /// The response cannot be cached: everyone goes to the app.
    Uncacheable,
    /// The leader failed: one waiter tries again.
    Failed,
}

pub struct CacheMetrics {
    pub bytes: IntGauge,
    pub entries: IntGauge,
    pub evictions: IntCounter,
    pub coalesced: IntCounter,
}

type Variants = Vec<Arc<Entry>>;

/// At most this many variants of one URL (different `Vary` values) are kept.
const MAX_VARIANTS: usize = 8;

pub struct Store {
    /// Keyed by [`CacheKey::hash`], already a good hash: foldhash spreads it at a fraction of
    /// the cost of the default SipHash.
    entries: moka::sync::Cache<u64, Arc<Variants>, foldhash::fast::RandomState>,
    index: Arc<Mutex<Index>>,
    flights: Mutex<HashMap<u64, watch::Receiver<Flight>>>,
    metrics: CacheMetrics,
}

#[derive(Default)]
struct Index {
    by_surrogate: HashMap<String, HashSet<u64>>,
    by_path: HashMap<String, HashSet<u64>>,
}

impl Index {
    fn add(&mut self, key: u64, entry: &Entry) {
        for k in &entry.surrogate_keys {
            self.by_surrogate.entry(k.clone()).or_default().insert(key);
        }
        self.by_path.entry(entry.path.clone()).or_default().insert(key);
    }

    fn remove(&mut self, key: u64, variants: &Variants) {
        for entry in variants {
            for k in &entry.surrogate_keys {
                if let Some(set) = self.by_surrogate.get_mut(k) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.by_surrogate.remove(k);
                    }
                }
            }
            if let Some(set) = self.by_path.get_mut(&entry.path) {
                set.remove(&key);
                if set.is_empty() {
                    self.by_path.remove(&entry.path);
                }
            }
        }
    }
}

impl Store {
    pub fn new(max_bytes: u64, metrics: CacheMetrics) -> Self {
        let index = Arc::new(Mutex::new(Index::default()));
        let listener_index = index.clone();
        let evictions = metrics.evictions.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_, v: &Arc<Variants>| {
                v.iter().map(|e| e.weight()).sum::<u64>().min(u32::MAX as u64) as u32
            })
            .eviction_listener(move |key: Arc<u64>, variants: Arc<Variants>, cause| {
                use moka::notification::RemovalCause;
                // A replaced value's key stays in use: its new value is indexed already.
                if cause != RemovalCause::Replaced {
                    listener_index.lock().unwrap_or_else(|p| p.into_inner()).remove(*key, &variants);
                }
                if cause == RemovalCause::Size {
                    evictions.inc();
                }
            })
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self { entries, index, flights: Mutex::new(HashMap::new()), metrics }
    }

    /// The fresh entry for a plain request (see [`RequestCacheHeaders::plain`]), judged by the entry's freshness
    /// and `Vary` values alone: the hit path, with no header parsing and no allocation.
    /// `None` sends the request the full way ([`Store::lookup`]), which judges every case;
    /// for a plain request both agree, since freshness and `Vary` are all it checks then.
    pub fn fresh(
        &self,
        hash: u64,
        headers: &impl RequestHeaders,
        asks: RequestCacheHeaders,
        now: SystemTime,
    ) -> Option<Arc<Entry>> {
        if !asks.plain() {
            return None;
        }
        let variants = self.entries.get(&hash)?;
        variants.iter().find(|e| now < e.fresh_until && e.varies_as(headers)).cloned()
    }

    /// The entry for a request. `any_age`: an entry past every stale window counts too (SLO
    /// protection's ServeStale), as [`Lookup::Stale`].
    pub fn lookup(&self, key: &CacheKey, headers: &HeaderMap, now: SystemTime, any_age: bool) -> Lookup {
        let Some(variants) = self.entries.get(&key.hash) else { return Lookup::UriMiss };
        let req = CacheRequest { uri: &key.uri, headers };
        for entry in variants.iter() {
            if !any_age && entry.expired(now) {
                continue;
            }
            match entry.policy.before_request(&req, now) {
                BeforeRequest::Fresh(_) => return Lookup::Fresh(entry.clone()),
                BeforeRequest::Stale { matches: true, .. } => {
                    let client_wants_fresh = no_cache(headers);
                    return if !client_wants_fresh && entry.staleness(now) <= entry.stale_while_revalidate {
                        Lookup::StaleWhileRevalidate(entry.clone())
                    } else {
                        Lookup::Stale(entry.clone())
                    };
                }
                BeforeRequest::Stale { matches: false, .. } => {}
            }
        }
        Lookup::VaryMiss
    }

    /// Stores `entry` for `key`, replacing the variant with the same `Vary` values.
    pub fn insert(&self, key: &CacheKey, entry: Arc<Entry>, request_headers: &HeaderMap, now: SystemTime) {
        let req = CacheRequest { uri: &key.uri, headers: request_headers };
        let mut variants: Variants = self
            .entries
            .get(&key.hash)
            .map(|v| {
                v.iter()
                    .filter(|e| {
                        !e.expired(now)
                            && !matches!(
                                e.policy.before_request(&req, now),
                                BeforeRequest::Fresh(_) | BeforeRequest::Stale { matches: true, .. }
                            )
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        variants.truncate(MAX_VARIANTS - 1);
        self.index.lock().unwrap_or_else(|p| p.into_inner()).add(key.hash, &entry);
        variants.insert(0, entry);
        self.entries.insert(key.hash, Arc::new(variants));
    }

    /// Re-weighs a key after a compressed form was added to one of its entries.
    pub fn reweigh(&self, hash: u64) {
        if let Some(v) = self.entries.get(&hash) {
            self.entries.insert(hash, v);
        }
    }

    pub fn invalidate(&self, key: u64) -> bool {
        let existed = self.entries.contains_key(&key);
        self.entries.invalidate(&key);
        existed
    }

    /// Removes every entry (when purges may have been missed); returns how many URLs went.
    pub fn clear(&self) -> u64 {
        self.entries.run_pending_tasks();
        let count = self.entries.entry_count();
        self.entries.invalidate_all();
        count
    }

    /// Removes every entry tagged with one of `keys`; returns how many URLs went.
    pub fn purge_keys(&self, keys: &[String]) -> usize {
        let targets: HashSet<u64> = {
            let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
            keys.iter().filter_map(|k| index.by_surrogate.get(k)).flatten().copied().collect()
        };
        targets.into_iter().filter(|k| self.invalidate(*k)).count()
    }

    /// Removes every entry of these paths (any host, any query).
    pub fn purge_paths(&self, paths: &[String]) -> usize {
        let targets: HashSet<u64> = {
            let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
            paths.iter().filter_map(|p| index.by_path.get(p)).flatten().copied().collect()
        };
        targets.into_iter().filter(|k| self.invalidate(*k)).count()
    }

    pub fn update_gauges(&self) {
        self.entries.run_pending_tasks();
        self.metrics.bytes.set(self.entries.weighted_size() as i64);
        self.metrics.entries.set(self.entries.entry_count() as i64);
    }

    /// Joins the miss in flight for `key`, or becomes its leader.
    pub fn join(&self, key: u64) -> Result<watch::Receiver<Flight>, FlightGuard<'_>> {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = flights.get(&key)
            && *rx.borrow() == Flight::Pending
        {
            self.metrics.coalesced.inc();
            return Ok(rx.clone());
        }
        let (tx, rx) = watch::channel(Flight::Pending);
        flights.insert(key, rx);
        Err(FlightGuard { store: self, key, tx, done: false })
    }
}

/// The leader's duty: tell the waiters how it went (a dropped guard says `Failed`).
pub struct FlightGuard<'a> {
    store: &'a Store,
    key: u64,
    tx: watch::Sender<Flight>,
    done: bool,
}

impl FlightGuard<'_> {
    pub fn finish(mut self, outcome: Flight) {
        self.done = true;
        self.end(outcome);
    }

    fn end(&mut self, outcome: Flight) {
        let mut flights = self.store.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights.get(&self.key).is_some_and(|rx| rx.same_channel(&self.tx.subscribe())) {
            flights.remove(&self.key);
        }
        drop(flights);
        self.tx.send_replace(outcome);
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.end(Flight::Failed);
        }
    }
}

/// The client asked not to be served from a cache without revalidation.
pub fn no_cache(headers: &HeaderMap) -> bool {
    directives(headers.get_all(header::CACHE_CONTROL)).any(|(n, _)| n.eq_ignore_ascii_case("no-cache"))
        || headers.get(header::PRAGMA).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"))
}

/// `Cache-Control` directives as (name, value), leniently: malformed parts are skipped.
pub fn directives<'a>(
    values: http::header::GetAll<'a, HeaderValue>,
) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
    values.into_iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).filter_map(|d| {
        let d = d.trim();
        if d.is_empty() {
            return None;
        }
        Some(match d.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (d, None),
        })
    })
}

fn directive_secs(headers: &HeaderMap, name: &str) -> Option<Duration> {
    directives(headers.get_all(header::CACHE_CONTROL))
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v?.parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Statuses a shared cache may store by default (RFC 9110 §15.1).
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501)
}

/// Whether the route stores `status` at all: its `statuses` when it lists them; else, in
/// Override mode the heuristically cacheable ones, in Origin mode any final status (the
/// judgement then asks for the app's explicit consent outside the heuristic set).
fn route_stores(config: &CacheConfig, status: StatusCode) -> bool {
    match &config.statuses {
        Some(list) => list.contains(&status.as_u16()),
        None if config.mode == CacheMode::Override => heuristically_cacheable(status),
        None => judge::storable_status(status),
    }
}

/// The response headers the cache judges and stores: in Override mode, the policy's
/// Cache-Control (and Vary) in place of the app's.
pub fn effective_headers(config: &CacheConfig, status: StatusCode, headers: &mut HeaderMap) {
    for v in &config.vary {
        crate::compress::add_vary(headers, v);
    }
    if config.mode != CacheMode::Override || !route_stores(config, status) {
        return;
    }
    if headers.contains_key(header::SET_COOKIE) && !config.store_set_cookie {
        // A response that sets a cookie is for one client: the app's own headers stand.
        return;
    }
    let mut cc = String::from(if config.private { "private" } else { "public" });
    if let Some(ms) = config.max_age_ms {
        cc.push_str(&format!(", max-age={}", ms / 1000));
    }
    if config.stale_while_revalidate_ms > 0 {
        cc.push_str(&format!(", stale-while-revalidate={}", config.stale_while_revalidate_ms / 1000));
    }
    if config.stale_if_error_ms > 0 {
        cc.push_str(&format!(", stale-if-error={}", config.stale_if_error_ms / 1000));
    }
    if let Ok(v) = HeaderValue::from_str(&cc) {
        headers.insert(header::CACHE_CONTROL, v);
    }
    headers.remove(header::EXPIRES);
    headers.remove(header::PRAGMA);
}

/// Why a response is not stored, or `None` when it may be.
pub fn refuse_to_store(
    config: &CacheConfig,
    key: &CacheKey,
    request_headers: &HeaderMap,
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
) -> Option<&'static str> {
    if !config.store {
        return Some("store disabled");
    }
    if !route_stores(config, status) {
        return Some("status not stored on this route");
    }
    if headers.contains_key(header::SET_COOKIE) && !config.store_set_cookie {
        return Some("sets a cookie");
    }
    if headers.get_all(header::VARY).iter().any(|v| v.as_bytes().contains(&b'*')) {
        return Some("Vary: *");
    }
    let targeted = judge::targeted(config, headers);
    let (status, judged) = judge::response(config, status, headers, &targeted);
    let policy = policy_for(key, request_headers, status, &judged, now);
    if !policy.is_storable() {
        return Some("not storable by a shared cache");
    }
    None
}

/// The policy of a response as [`judge::response`] made it ready for judging.
fn policy_for(
    key: &CacheKey,
    req: &HeaderMap,
    status: StatusCode,
    res: &HeaderMap,
    now: SystemTime,
) -> CachePolicy {
    // Accept-Encoding is handled apart (one identity body, compressed forms beside it), so the
    // policy must not split variants on it.
    let vary_without_ae: Option<HeaderValue> = {
        let names: Vec<&str> = res
            .get_all(header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case("accept-encoding"))
            .collect();
        (!names.is_empty()).then(|| HeaderValue::from_str(&names.join(", ")).ok()).flatten()
    };
    let mut judged = res.clone();
    judged.remove(header::VARY);
    if let Some(v) = vary_without_ae {
        judged.insert(header::VARY, v);
    }
    CachePolicy::new_options(
        &CacheRequest { uri: &key.uri, headers: req },
        &ResponseView { status, headers: &judged },
        now,
        CacheOptions::default(),
    )
}

/// Makes an entry of a complete response (its headers already `effective_headers`).
pub fn entry(
    config: &CacheConfig,
    key: &CacheKey,
    request_headers: &HeaderMap,
    status: StatusCode,
    mut headers: HeaderMap,
    body: Bytes,
    now: SystemTime,
) -> Entry {
    let mut surrogate_keys = config.surrogate_keys.clone();
    for v in headers.get_all(&SURROGATE_KEY).iter().filter_map(|v| v.to_str().ok()) {
        surrogate_keys.extend(v.split_whitespace().map(str::to_owned));
    }
    let targeted = judge::targeted(config, &headers);
    for (name, _) in &targeted {
        headers.remove(name);
    }
    let parts = Parts { status, headers, targeted, body, surrogate_keys, encoded: Default::default() };
    assemble(config, key, request_headers, parts, now)
}

/// The same entry with the headers of a 304 revalidation merged in (RFC 9111 §3.2, §4.3.4):
/// every field the 304 has replaces the stored one, except the framing and coding of the
/// stored body and the hop-by-hop fields, which describe another message.
pub fn refreshed(
    config: &CacheConfig,
    old: &Entry,
    key: &CacheKey,
    request_headers: &HeaderMap,
    not_modified: &HeaderMap,
    now: SystemTime,
) -> Entry {
    let mut headers = old.stored_headers();
    let mut replaced: HashSet<&HeaderName> = HashSet::new();
    for (name, value) in not_modified {
        if KEPT_ON_UPDATE.contains(name) || crate::forwarded::is_forwarding(name.as_str()) {
            continue;
        }
        // A field the 304 sends replaces all its stored values; its own several values stay.
        if replaced.insert(name) {
            headers.insert(name.clone(), value.clone());
        } else {
            headers.append(name.clone(), value.clone());
        }
    }
    effective_headers(config, old.status, &mut headers);
    let targeted = judge::targeted(config, &headers);
    for (name, _) in &targeted {
        headers.remove(name);
    }
    let parts = Parts {
        status: old.status,
        headers,
        targeted,
        body: old.body.clone(),
        surrogate_keys: old.surrogate_keys.clone(),
        encoded: old.encoded.clone(),
    };
    let mut fresh = assemble(config, key, request_headers, parts, now);
    // A 304 with an ETag of the app's replaces the sidecar's.
    fresh.own_etag = old.own_etag && !not_modified.contains_key(header::ETAG);
    old.revalidating.store(false, Ordering::Release);
    fresh
}

/// Fields a 304 does not update: the stored body's framing and coding, and what belongs to
/// one connection only.
static KEPT_ON_UPDATE: [HeaderName; 10] = [
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::TRANSFER_ENCODING,
    header::CONTENT_RANGE,
    header::CONNECTION,
    header::TE,
    header::UPGRADE,
    header::TRAILER,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
];

/// What an entry is made of besides its judgement.
struct Parts {
    status: StatusCode,
    headers: HeaderMap,
    targeted: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    surrogate_keys: Vec<String>,
    encoded: [OnceLock<Bytes>; 3],
}

fn assemble(
    config: &CacheConfig,
    key: &CacheKey,
    request_headers: &HeaderMap,
    p: Parts,
    now: SystemTime,
) -> Entry {
    // Judged once, for the policy and the stale windows alike.
    let (judged_status, judged) = judge::response(config, p.status, &p.headers, &p.targeted);
    let policy = policy_for(key, request_headers, judged_status, &judged, now);
    let (stale_while_revalidate, stale_if_error) = stale_windows(&judged);
    Entry {
        fresh_until: now + policy.time_to_live(now),
        initial_age: policy.age(now),
        stored_at: now,
        vary: vary_values(&p.headers, request_headers),
        policy,
        status: p.status,
        headers: p.headers,
        targeted: p.targeted,
        body: p.body,
        stale_while_revalidate,
        stale_if_error,
        surrogate_keys: p.surrogate_keys,
        path: key.path.clone(),
        hash: key.hash,
        encoded: p.encoded,
        revalidating: AtomicBool::new(false),
        own_etag: false,
        heads: Default::default(),
        compressible: AtomicU64::new(0),
    }
}

/// How long past freshness the entry may be served while revalidating, and when the app
/// fails (RFC 5861): not at all when the response must be revalidated first
/// (`must-revalidate`, `proxy-revalidate`, `no-cache`; RFC 9111 §4.2.4, §5.2.2).
fn stale_windows(judged: &HeaderMap) -> (Duration, Duration) {
    let strict = directives(judged.get_all(header::CACHE_CONTROL))
        .any(|(n, _)| matches!(n, "must-revalidate" | "proxy-revalidate" | "no-cache"));
    if strict {
        return Default::default();
    }
    (
        directive_secs(judged, "stale-while-revalidate").unwrap_or_default(),
        directive_secs(judged, "stale-if-error").unwrap_or_default(),
    )
}

/// The request's values of the headers the response's `Vary` names, Accept-Encoding aside;
/// `None` for `Vary: *`, a name that is not a header name, or one the cache strips from
/// requests (the full judgement sees those as absent).
fn vary_values(response: &HeaderMap, request: &HeaderMap) -> Option<Vec<(HeaderName, Option<HeaderValue>)>> {
    let mut values = Vec::new();
    for v in response.get_all(header::VARY) {
        for name in v.to_str().ok()?.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name.eq_ignore_ascii_case("accept-encoding") {
                continue;
            }
            if name == "*" {
                return None;
            }
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            if crate::forwarded::is_forwarding(name.as_str()) {
                return None;
            }
            values.push((name.clone(), request.get(&name).cloned()));
        }
    }
    Some(values)
}

pub static SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

#[cfg(test)]
mod tests;
