//! The response cache: a shared (RFC 9111) cache in memory, bounded by bytes.
//!
//! Freshness comes from `http-cache-semantics` in both modes. With `mode: Override` the
//! policy's own `Cache-Control` replaces the app's before the response is judged (and is what
//! clients get); with `mode: Origin` the app's headers decide. Entries are keyed by host,
//! path and the query with its parameters sorted; the variants of one key are told apart by
//! the request headers their `Vary` names (`Accept-Encoding` aside: one identity body per
//! variant, and each compressed form made once and kept beside it).

pub mod conditional;
pub mod flow;
pub mod shared;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use apipolicy_api::{CacheConfig, CacheMode, Encoding};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy, RequestLike, ResponseLike};
use prometheus::{IntCounter, IntGauge};
use tokio::sync::watch;

/// What a request's URL is, for the cache: host, path, sorted query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheKey {
    pub hash: u64,
    pub host: String,
    pub path: String,
    /// `path?sorted-query`, the URI the policy judges by.
    pub uri: Uri,
}

impl CacheKey {
    pub fn new(host: &str, path: &str, query: Option<&str>) -> Self {
        let host = host.to_ascii_lowercase();
        let query = query.filter(|q| !q.is_empty()).map(|q| {
            let mut params: Vec<&str> = q.split('&').filter(|p| !p.is_empty()).collect();
            params.sort_unstable();
            params.join("&")
        });
        let target = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        let hash = xxhash_rust::xxh3::xxh3_64(format!("{host}\n{target}").as_bytes());
        let uri = target.parse().unwrap_or_else(|_| Uri::from_static("/"));
        Self { hash, host, path: path.to_owned(), uri }
    }
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
    /// The response headers as stored (with the policy's Cache-Control in Override mode).
    pub headers: HeaderMap,
    pub body: Bytes,
    /// How long past freshness the entry may be served while revalidating / on errors.
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub surrogate_keys: Vec<String>,
    pub path: String,
    /// When the entry stops being fresh.
    pub fresh_until: SystemTime,
    /// Compressed forms, made on first use.
    encoded: Mutex<Vec<(Encoding, Bytes)>>,
    /// A background revalidation is running.
    pub revalidating: AtomicBool,
}

impl Entry {
    pub fn encoded(&self, encoding: Encoding) -> Option<Bytes> {
        let e = self.encoded.lock().unwrap_or_else(|p| p.into_inner());
        e.iter().find(|(enc, _)| *enc == encoding).map(|(_, b)| b.clone())
    }

    pub fn keep_encoded(&self, encoding: Encoding, body: Bytes) {
        let mut e = self.encoded.lock().unwrap_or_else(|p| p.into_inner());
        if !e.iter().any(|(enc, _)| *enc == encoding) {
            e.push((encoding, body));
        }
    }

    fn weight(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 32).sum();
        let encoded: usize =
            self.encoded.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(_, b)| b.len()).sum();
        (self.body.len() + encoded + headers + 512) as u64
    }

    /// How far past freshness the entry is at `now` (zero when fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        now.duration_since(self.fresh_until).unwrap_or_default()
    }

    /// Past every window: useless even as a stale fallback.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.staleness(now) > self.stale_while_revalidate.max(self.stale_if_error)
    }
}

/// The result of a lookup.
pub enum Lookup {
    /// No entry for the URL at all.
    UriMiss,
    /// Entries for the URL, none for this request's `Vary` values.
    VaryMiss,
    Fresh(Arc<Entry>, HeaderMap),
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
    entries: moka::sync::Cache<u64, Arc<Variants>>,
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
            .build();
        Self { entries, index, flights: Mutex::new(HashMap::new()), metrics }
    }

    pub fn lookup(&self, key: &CacheKey, headers: &HeaderMap, now: SystemTime) -> Lookup {
        let Some(variants) = self.entries.get(&key.hash) else { return Lookup::UriMiss };
        let req = CacheRequest { uri: &key.uri, headers };
        for entry in variants.iter() {
            if entry.expired(now) {
                continue;
            }
            match entry.policy.before_request(&req, now) {
                BeforeRequest::Fresh(parts) => return Lookup::Fresh(entry.clone(), parts.headers),
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
    pub fn reweigh(&self, key: &CacheKey) {
        if let Some(v) = self.entries.get(&key.hash) {
            self.entries.insert(key.hash, v);
        }
    }

    pub fn invalidate(&self, key: u64) -> bool {
        let existed = self.entries.contains_key(&key);
        self.entries.invalidate(&key);
        existed
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

/// The response headers the cache judges and stores: in Override mode, the policy's
/// Cache-Control (and Vary) in place of the app's.
pub fn effective_headers(config: &CacheConfig, status: StatusCode, headers: &mut HeaderMap) {
    for v in &config.vary {
        crate::compress::add_vary(headers, v);
    }
    if config.mode != CacheMode::Override || !heuristically_cacheable(status) {
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
    if headers.contains_key(header::SET_COOKIE) && !config.store_set_cookie {
        return Some("sets a cookie");
    }
    if headers.get_all(header::VARY).iter().any(|v| v.as_bytes().contains(&b'*')) {
        return Some("Vary: *");
    }
    let policy = policy_for(key, request_headers, status, headers, now);
    if !policy.is_storable() {
        return Some("not storable by a shared cache");
    }
    None
}

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
    headers: HeaderMap,
    body: Bytes,
    now: SystemTime,
) -> Entry {
    let policy = policy_for(key, request_headers, status, &headers, now);
    let mut surrogate_keys = config.surrogate_keys.clone();
    for v in headers.get_all(&SURROGATE_KEY).iter().filter_map(|v| v.to_str().ok()) {
        surrogate_keys.extend(v.split_whitespace().map(str::to_owned));
    }
    Entry {
        fresh_until: now + policy.time_to_live(now),
        stale_while_revalidate: directive_secs(&headers, "stale-while-revalidate").unwrap_or_default(),
        stale_if_error: directive_secs(&headers, "stale-if-error").unwrap_or_default(),
        policy,
        status,
        headers,
        body,
        surrogate_keys,
        path: key.path.clone(),
        encoded: Mutex::new(Vec::new()),
        revalidating: AtomicBool::new(false),
    }
}

/// The same entry with the headers of a 304 revalidation merged in.
pub fn refreshed(
    old: &Entry,
    key: &CacheKey,
    request_headers: &HeaderMap,
    not_modified: &HeaderMap,
    now: SystemTime,
) -> Entry {
    let mut headers = old.headers.clone();
    for (name, value) in not_modified {
        if !matches!(*name, header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONTENT_ENCODING) {
            headers.insert(name.clone(), value.clone());
        }
    }
    let policy = policy_for(key, request_headers, old.status, &headers, now);
    let fresh = Entry {
        fresh_until: now + policy.time_to_live(now),
        policy,
        status: old.status,
        headers,
        body: old.body.clone(),
        stale_while_revalidate: old.stale_while_revalidate,
        stale_if_error: old.stale_if_error,
        surrogate_keys: old.surrogate_keys.clone(),
        path: old.path.clone(),
        encoded: Mutex::new(old.encoded.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        revalidating: AtomicBool::new(false),
    };
    old.revalidating.store(false, Ordering::Release);
    fresh
}

pub static SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
