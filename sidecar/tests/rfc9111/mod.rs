//! The cache against RFC 9111 (with RFC 9110's dates and ranges, 9211's Cache-Status and
//! 9213's targeted fields), over real sockets, with the app of `support` saying per request
//! what it answers. Time moves by the sidecar's clock, not by sleeping.

use std::time::{Duration, SystemTime};

use apipolicy_sidecar::server::{Handle, start};
use http::{HeaderMap, Request, StatusCode};

use crate::support::*;

const ROUTES: &str = "  - name: origin
    match: {path: {prefix: /app/o}, methods: [GET, HEAD]}
    cache: {mode: Origin}
  - name: surrogate
    match: {path: {prefix: /app/s}, methods: [GET, HEAD]}
    cache: {mode: Origin, targeted: [Surrogate-Control]}
  - name: statuses
    match: {path: {prefix: /app/only200}, methods: [GET, HEAD]}
    cache: {mode: Override, maxAge: 60s, statuses: [200]}
  - name: cookies
    match: {path: {prefix: /app/cookies}, methods: [GET, HEAD]}
    cache: {mode: Origin, store: {storeSetCookie: true}}
";

async fn cache_sidecar(up: &Upstream, dir: &TempDir) -> Handle {
    let path = dir.file("policy.yaml", &policy(ROUTES));
    start(flags(path, &up.url())).await.unwrap()
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
}

impl Got {
    fn cache_status(&self) -> &str {
        self.headers.get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// The app's request count when it made this body.
    fn n(&self) -> u64 {
        serde_json::from_slice::<serde_json::Value>(&self.body).unwrap()["n"].as_u64().unwrap()
    }
}

async fn ask(c: &HttpClient, sc: &Handle, method: &str, target: &str, headers: &[(&str, &str)]) -> Got {
    let mut b = Request::builder().method(method).uri(format!("http://{}{target}", sc.proxy_addr));
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    let (status, headers, body) = send(c, b.body(empty()).unwrap()).await;
    Got { status, headers, body }
}

async fn get_(c: &HttpClient, sc: &Handle, target: &str) -> Got {
    ask(c, sc, "GET", target, &[]).await
}

/// A query value as the app's `param` reads it (spaces and commas escaped).
fn q(v: &str) -> String {
    v.replace(' ', "%20").replace(',', "%2C")
}

fn advance(sc: &Handle, secs: u64) {
    sc.sidecar.process.clock.advance(Duration::from_secs(secs));
}

/// RFC 9111 §4.3.1, §4.3.3: a stale entry with an ETag is revalidated with If-None-Match, and
/// the 304 serves the stored body, labelled fwd=stale with fwd-status=304 (RFC 9211).
#[tokio::test]
async fn a_stale_entry_is_revalidated_with_its_etag() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-etag");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let t = "/app/o/etag?cc=max-age=1&etag=v1";
    let first = get_(&c, &sc, t).await;
    assert_eq!((first.status, first.n()), (StatusCode::OK, 1));
    advance(&sc, 30);
    let again = get_(&c, &sc, t).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body, first.body, "the stored body, not a new one");
    assert!(
        again.cache_status().contains("fwd=stale") && again.cache_status().contains("fwd-status=304"),
        "{}",
        again.cache_status()
    );
    assert_eq!(up.hits("/app/o/etag"), 2);
    // Refreshed by the 304 (max-age=1 again): a hit now.
    let hit = get_(&c, &sc, t).await;
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(up.hits("/app/o/etag"), 2);
}

/// RFC 9111 §4.3.1: with only Last-Modified, the revalidation asks If-Modified-Since.
#[tokio::test]
async fn a_stale_entry_is_revalidated_with_its_last_modified() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-lm");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let t = format!("/app/o/lm?cc=max-age=1&lm={}", q("Sun, 06 Nov 1994 08:49:37 GMT"));
    let first = get_(&c, &sc, &t).await;
    advance(&sc, 30);
    let again = get_(&c, &sc, &t).await;
    assert_eq!((again.status, again.body.clone()), (StatusCode::OK, first.body));
    assert!(again.cache_status().contains("fwd-status=304"), "{}", again.cache_status());
    assert_eq!(up.hits("/app/o/lm"), 2);
}

/// RFC 9111 §3.2, §4.3.4: a 304 updates the stored header fields it carries, but not the
/// stored body's Content-Length.
#[tokio::test]
async fn a_304_updates_the_stored_headers_but_not_the_length() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-update");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let t = "/app/o/upd?cc=max-age=1&etag=u&extra=x";
    let first = get_(&c, &sc, t).await;
    assert_eq!(first.headers["x-extra"], "x-1");
    advance(&sc, 30);
    let again = get_(&c, &sc, t).await;
    assert_eq!(again.headers["x-extra"], "x-2", "the 304's field replaced the stored one");
    assert_eq!(again.headers["content-length"], first.body.len().to_string());
    assert_eq!(again.body, first.body);
    let hit = get_(&c, &sc, t).await;
    assert_eq!(hit.headers["x-extra"], "x-2", "and it is stored");
}

/// RFC 9111 §5.2.2.2, §5.2.2.4: must-revalidate (at max-age=0) and no-cache responses are
/// stored and revalidated on every use.
#[tokio::test]
async fn must_revalidate_and_no_cache_revalidate_every_time() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-mustreval");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    for (path, cc) in [("/app/o/must", "max-age=0, must-revalidate"), ("/app/o/nocache", "no-cache")] {
        let t = format!("{path}?cc={}&etag=m", q(cc));
        let first = get_(&c, &sc, &t).await;
        for round in 2..=4 {
            let again = get_(&c, &sc, &t).await;
            assert_eq!((again.status, again.n()), (StatusCode::OK, first.n()), "{cc}");
            assert!(again.cache_status().contains("fwd-status=304"), "{cc}: {}", again.cache_status());
            assert_eq!(up.hits(path), round, "{cc}: every use asks the app");
        }
    }
}

/// RFC 9111 §5.2.1.4 and RFC 9211: a client's own no-cache on a fresh entry goes to the app
/// (conditionally) and says fwd=request.
#[tokio::test]
async fn a_clients_no_cache_is_fwd_request() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-request");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let t = "/app/o/req?cc=max-age=100&etag=r";
    let first = get_(&c, &sc, t).await;
    let forced = ask(&c, &sc, "GET", t, &[("cache-control", "no-cache")]).await;
    assert!(forced.cache_status().contains("fwd=request"), "{}", forced.cache_status());
    assert_eq!((forced.status, forced.body), (StatusCode::OK, first.body));
    assert_eq!(up.hits("/app/o/req"), 2);
}

/// RFC 9111 §4.3.5 (and §4.3.1 for HEAD): a HEAD for a stale entry is revalidated too, and
/// gets the head only.
#[tokio::test]
async fn a_head_for_a_stale_entry_is_revalidated() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-head");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let t = "/app/o/head?cc=max-age=1&etag=h";
    get_(&c, &sc, t).await;
    advance(&sc, 30);
    let head = ask(&c, &sc, "HEAD", t, &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert!(head.cache_status().contains("fwd-status=304"), "{}", head.cache_status());
    assert_eq!(up.hits("/app/o/head"), 2);
}

/// RFC 9111 §5.2: directive names are case-insensitive.
#[tokio::test]
async fn directives_in_any_case() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-case");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    for (path, cc, stored) in [
        ("/app/o/c1", "No-Store", false),
        ("/app/o/c2", "MAX-AGE=100", true),
        ("/app/o/c3", "max-age=100, PRIVATE", false),
        ("/app/o/c4", "No-CaChE, max-age=100", false),
    ] {
        let t = format!("{path}?cc={}", q(cc));
        get_(&c, &sc, &t).await;
        let again = get_(&c, &sc, &t).await;
        assert_eq!(again.cache_status().contains("hit"), stored, "{cc}: {}", again.cache_status());
    }
}

/// RFC 9110 §5.6.7: Expires in each of the three date formats; an invalid date means expired
/// (RFC 9111 §5.3).
#[tokio::test]
async fn expires_in_each_date_format() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-dates");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let imf = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(100));
    // "Sun, 06 Nov 1994 08:49:37 GMT" → "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"
    let (wkday, rest) = imf.split_once(", ").unwrap();
    let p: Vec<&str> = rest.split(' ').collect();
    let long = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
        .into_iter()
        .find(|w| w.starts_with(wkday))
        .unwrap();
    let rfc850 = format!("{long}, {}-{}-{} {} GMT", p[0], p[1], &p[2][2..], p[3]);
    let day: u32 = p[0].parse().unwrap();
    let asctime = format!("{wkday} {} {day:>2} {} {}", p[1], p[3], p[2]);
    let doubled = imf.replacen(' ', "  ", 1);
    for (i, (date, fresh)) in
        [(&imf, true), (&rfc850, true), (&asctime, true), (&doubled, false), (&"soon".to_owned(), false)]
            .into_iter()
            .enumerate()
    {
        let t = format!("/app/o/d{i}?exp={}", q(date));
        get_(&c, &sc, &t).await;
        let again = get_(&c, &sc, &t).await;
        assert_eq!(again.cache_status().contains("hit"), fresh, "{date:?}: {}", again.cache_status());
    }
}

/// RFC 9111 §5.1: Age is one integer; `7200, 0` is not 0, so a max-age=3600 response is not
/// fresh.
#[tokio::test]
async fn a_list_valued_age_is_not_fresh() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-age");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    for (i, age, fresh) in [(0, "7200, 0", false), (1, "0, 0", true), (2, "7200", false), (3, "10", true)] {
        let t = format!("/app/o/age{i}?cc=max-age=3600&age={}", q(age));
        get_(&c, &sc, &t).await;
        let again = get_(&c, &sc, &t).await;
        assert_eq!(again.cache_status().contains("hit"), fresh, "Age: {age}: {}", again.cache_status());
    }
}

/// RFC 9111 §3: a status outside the heuristic set is stored when the app makes it explicitly
/// cacheable; `cache.statuses` narrows what a route stores.
#[tokio::test]
async fn statuses_explicitly_cacheable_are_stored() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-status");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    for (t, stored) in [
        ("/app/o/s299?status=299&cc=max-age=100", true),
        ("/app/o/s302?status=302&cc=max-age=100&location=/x", true),
        ("/app/o/s299b?status=299", false),
        ("/app/only200/nf?status=404", false),
        ("/app/only200/ok", true),
    ] {
        get_(&c, &sc, t).await;
        let again = get_(&c, &sc, t).await;
        assert_eq!(again.cache_status().contains("hit"), stored, "{t}: {}", again.cache_status());
    }
}

/// RFC 9213: CDN-Cache-Control (the default targeted field) stands in for Cache-Control for
/// this cache and never reaches the client; a route may obey Surrogate-Control instead.
#[tokio::test]
async fn targeted_fields_take_precedence_and_are_removed() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-targeted");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    for (t, stored) in [
        (format!("/app/o/t1?cc=no-store&cdn={}", q("max-age=100")), true),
        (format!("/app/o/t2?cc={}&cdn=no-store", q("max-age=100")), false),
        (format!("/app/s/t3?cc=no-store&sc={}", q("max-age=100")), true),
        // Not the route's field: ignored, and left on the response.
        (format!("/app/o/t4?cc=no-store&sc={}", q("max-age=100")), false),
    ] {
        let first = get_(&c, &sc, &t).await;
        assert!(!first.headers.contains_key("cdn-cache-control"), "{t}");
        let again = get_(&c, &sc, &t).await;
        assert_eq!(again.cache_status().contains("hit"), stored, "{t}: {}", again.cache_status());
        assert!(!again.headers.contains_key("cdn-cache-control"), "{t}");
        assert_eq!(again.headers.contains_key("surrogate-control"), t.contains("/t4"), "{t}");
    }
}

/// RFC 9110 §14: a single range of a stored 200 is served from the cache (206), an
/// unsatisfiable one gets 416; the app is asked once, for the whole response.
#[tokio::test]
async fn ranges_are_served_from_a_stored_entry() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-range");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let t = "/app/o/range?cc=max-age=100&etag=rg";
    let part = ask(&c, &sc, "GET", t, &[("range", "bytes=0-4")]).await;
    let whole = get_(&c, &sc, t).await;
    let len = whole.body.len();
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.headers["content-range"], format!("bytes 0-4/{len}"));
    assert_eq!(part.body, whole.body.slice(0..5));
    let tail = ask(&c, &sc, "GET", t, &[("range", "bytes=-3")]).await;
    assert_eq!((tail.status, tail.body), (StatusCode::PARTIAL_CONTENT, whole.body.slice(len - 3..)));
    let none = ask(&c, &sc, "GET", t, &[("range", "bytes=9999-")]).await;
    assert_eq!(none.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(none.headers["content-range"], format!("bytes */{len}"));
    // If-Range with another validator: the whole response.
    let changed = ask(&c, &sc, "GET", t, &[("range", "bytes=0-4"), ("if-range", "\"other\"")]).await;
    assert_eq!((changed.status, changed.body), (StatusCode::OK, whole.body));
    assert_eq!(up.hits("/app/o/range"), 1, "one request to the app, for all of it");
}

/// With `store.storeSetCookie: true` a response that sets a cookie keeps the lifetime its
/// Cache-Control gives (it was 0 before); without it, it is not stored.
#[tokio::test]
async fn store_set_cookie_keeps_the_lifetime() {
    let up = Upstream::start().await;
    let dir = TempDir::new("rfc-cookie");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    for (t, stored) in [
        ("/app/cookies/a?cc=max-age=100&cookie=a%3Db", true),
        ("/app/o/cookie?cc=max-age=100&cookie=a%3Db", false),
    ] {
        get_(&c, &sc, t).await;
        let again = get_(&c, &sc, t).await;
        assert_eq!(again.cache_status().contains("hit"), stored, "{t}: {}", again.cache_status());
    }
}
