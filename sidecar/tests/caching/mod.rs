//! The response cache and compression against an app that counts its requests.

use std::{
    io::Read,
    time::{Duration, Instant},
};

use apipolicy_sidecar::server::{Handle, start};
use http::{HeaderMap, Request, StatusCode};

use crate::support::*;

const ROUTES: &str = "  - name: cached
    match: {path: {prefix: /app/cached}, methods: [GET, HEAD]}
    cache: {maxAge: 60s, staleWhileRevalidate: 30s, staleIfError: 1h, vary: [Accept-Language], surrogateKeys: [catalog], store: {maxEntrySize: 1Ki}, sortQuery: true}
    compression: {minSize: 100}
  - name: short
    match: {path: {prefix: /app/short}, methods: [GET, HEAD]}
    cache: {maxAge: 1s, staleWhileRevalidate: 30s, staleIfError: 1h}
  - name: brief
    match: {path: {prefix: /app/brief}, methods: [GET, HEAD]}
    cache: {maxAge: 1s, staleIfError: 1h}
  - name: origin
    match: {path: {prefix: /app/origin}, methods: [GET, HEAD]}
    cache: {mode: Origin}
  - name: plain
    match: {path: {prefix: /app/plain}}
    compression: {minSize: 1Ki}
";

async fn cache_sidecar(up: &Upstream, dir: &TempDir) -> Handle {
    let path = dir.file("policy.yaml", &policy(ROUTES));
    start(flags(path, &up.url())).await.unwrap()
}

async fn fetch(
    c: &HttpClient,
    url: String,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, serde_json::Value) {
    fetch_method(c, "GET", url, headers).await
}

async fn fetch_method(
    c: &HttpClient,
    method: &str,
    url: String,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, serde_json::Value) {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (status, h, body) = send(c, req.body(empty()).unwrap()).await;
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, h, json)
}

fn cache_status(h: &HeaderMap) -> String {
    h.get("cache-status").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

#[tokio::test]
async fn override_mode_stores_writes_headers_and_serves_hits() {
    let up = Upstream::start().await;
    let dir = TempDir::new("cache-override");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    // The app says "never cache": in Override mode the policy decides.
    let url = format!("http://{}/app/cached/list?b=2&a=1&cc=no-store", sc.proxy_addr);
    let (status, h, body) = fetch(&c, url.clone(), &[("accept-language", "en")]).await;
    assert_eq!((status, body["n"].as_u64()), (StatusCode::OK, Some(1)));
    assert!(cache_status(&h).contains("fwd=uri-miss; stored; ttl=60"), "{}", cache_status(&h));
    assert_eq!(h["cache-control"], "public, max-age=60, stale-while-revalidate=30, stale-if-error=3600");
    assert!(h["vary"].to_str().unwrap().to_ascii_lowercase().contains("accept-language"));
    let etag = h["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.len() == 34, "a strong ETag is added: {etag}");

    // The same URL, its query in another order: a hit (the route sorts the query), with Age.
    let reordered = format!("http://{}/app/cached/list?a=1&cc=no-store&b=2", sc.proxy_addr);
    let (status, h, body) = fetch(&c, reordered, &[("accept-language", "en")]).await;
    assert_eq!((status, body["n"].as_u64()), (StatusCode::OK, Some(1)));
    assert!(cache_status(&h).starts_with("ApiPolicy; hit; ttl="), "{}", cache_status(&h));
    assert!(h.contains_key("age"));
    assert_eq!(up.hits("/app/cached/list"), 1);

    // HEAD is served from the GET entry.
    let (status, h, _) = fetch_method(&c, "HEAD", url.clone(), &[("accept-language", "en")]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(cache_status(&h).contains("hit"));
    assert_eq!(up.hits("/app/cached/list"), 1);

    // Another Accept-Language is another variant.
    let (_, h, body) = fetch(&c, url.clone(), &[("accept-language", "fr")]).await;
    assert_eq!(body["n"].as_u64(), Some(2));
    assert!(cache_status(&h).contains("fwd=vary-miss"), "{}", cache_status(&h));
    let (_, _, body) = fetch(&c, url, &[("accept-language", "fr")]).await;
    assert_eq!(body["n"].as_u64(), Some(2));

    let text =
        String::from_utf8(get(&c, format!("http://{}/metrics", sc.admin_addr)).await.2.to_vec()).unwrap();
    assert_eq!(metric(&text, r#"apipolicy_cache_lookups_total{result="hit",route="cached"}"#), Some(3.0));
    assert_eq!(metric(&text, r#"apipolicy_cache_lookups_total{result="miss",route="cached"}"#), Some(2.0));
    assert_eq!(metric(&text, "apipolicy_cache_store_entries"), Some(1.0));
    assert!(metric(&text, "apipolicy_cache_store_bytes").unwrap() > 0.0);
}

#[tokio::test]
async fn conditional_requests_get_304() {
    let up = Upstream::start().await;
    let dir = TempDir::new("cache-304");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let url = format!("http://{}/app/cached/one?lm=Wed,%2021%20Oct%202015%2007:28:00%20GMT", sc.proxy_addr);
    let (_, h, _) = fetch(&c, url.clone(), &[]).await;
    let etag = h["etag"].to_str().unwrap().to_owned();
    // The app sent none: the sidecar's is the XXH3-128 of the body it stored.
    let (_, _, bytes) = get(&c, url.clone()).await;
    assert_eq!(etag, format!("\"{:032x}\"", xxhash_rust::xxh3::xxh3_128(&bytes)));
    for inm in [etag.clone(), format!("W/{etag}"), format!("\"other\", {etag}"), "*".to_owned()] {
        let (status, h, body) = fetch(&c, url.clone(), &[("if-none-match", &inm)]).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{inm}");
        assert_eq!(body, serde_json::Value::Null, "a 304 has no body");
        assert_eq!(h["etag"], etag.as_str());
        assert!(h.contains_key("cache-control") && h.contains_key("vary") && h.contains_key("last-modified"));
        assert!(!h.contains_key("content-type"));
    }
    let (status, _, _) = fetch(&c, url.clone(), &[("if-none-match", "\"nope\"")]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) =
        fetch(&c, url.clone(), &[("if-modified-since", "Thu, 22 Oct 2015 07:28:00 GMT")]).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    let (status, _, _) = fetch(&c, url, &[("if-modified-since", "Tue, 20 Oct 2015 07:28:00 GMT")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(up.hits("/app/cached/one"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_misses_make_one_upstream_request() {
    let up = Upstream::start().await;
    let dir = TempDir::new("cache-coalesce");
    let sc = cache_sidecar(&up, &dir).await;
    let url = format!("http://{}/app/cached/cold?ms=300", sc.proxy_addr);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { fetch(&client(), url, &[]).await })
        })
        .collect();
    for t in tasks {
        let (status, _, body) = t.await.unwrap();
        assert_eq!((status, body["n"].as_u64()), (StatusCode::OK, Some(1)));
    }
    assert_eq!(up.hits("/app/cached/cold"), 1, "one upstream request for 200 concurrent misses");
    let text =
        String::from_utf8(get(&client(), format!("http://{}/metrics", sc.admin_addr)).await.2.to_vec())
            .unwrap();
    // Every other request was answered from the entry, whether it waited for the fill or
    // came after it.
    assert_eq!(metric(&text, r#"apipolicy_cache_lookups_total{result="hit",route="cached"}"#), Some(199.0));
    assert!(metric(&text, "apipolicy_cache_coalesced_total").unwrap() >= 1.0, "requests waited on the fill");

    // When the app's answer cannot be shared, the waiters go to the app themselves.
    let url = format!("http://{}/app/cached/private?ms=200&cookie=session%3D1", sc.proxy_addr);
    let tasks: Vec<_> = (0..5).map(|_| tokio::spawn(fetch_owned(url.clone()))).collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(up.hits("/app/cached/private"), 5, "a response with Set-Cookie is not shared");
}

async fn fetch_owned(url: String) -> StatusCode {
    fetch(&client(), url, &[]).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_at_once_and_revalidates_once() {
    let up = Upstream::start().await;
    let dir = TempDir::new("cache-swr");
    let sc = cache_sidecar(&up, &dir).await;
    // The app takes 300 ms, so every stale request arrives while the revalidation runs.
    let url = format!("http://{}/app/short/x?etag=v1&ms=300", sc.proxy_addr);
    let (_, _, body) = fetch(&client(), url.clone(), &[]).await;
    assert_eq!(body["n"].as_u64(), Some(1));
    sc.sidecar.process.clock.advance(Duration::from_millis(1_100));
    let t = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { fetch(&client(), url, &[]).await })
        })
        .collect();
    for task in tasks {
        let (status, h, body) = task.await.unwrap();
        assert_eq!((status, body["n"].as_u64()), (StatusCode::OK, Some(1)), "stale, at once");
        assert!(cache_status(&h).contains("ttl=-"), "{}", cache_status(&h));
    }
    assert!(t.elapsed() < Duration::from_millis(800));
    // One background revalidation, answered 304 by the app: the entry is fresh again.
    let revalidated = r#"apipolicy_cache_lookups_total{result="revalidated",route="short"}"#;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let text =
            String::from_utf8(get(&client(), format!("http://{}/metrics", sc.admin_addr)).await.2.to_vec())
                .unwrap();
        if metric(&text, revalidated) == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no revalidation: {}",
            text.lines().filter(|l| l.contains("short")).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.hits("/app/short/x"), 2, "exactly one revalidation for 20 stale hits");
    let (_, h, body) = fetch(&client(), url, &[]).await;
    assert!(!cache_status(&h).contains("ttl=-"), "fresh again: {}", cache_status(&h));
    assert!(cache_status(&h).starts_with("ApiPolicy; hit; ttl="), "{}", cache_status(&h));
    assert_eq!(body["n"].as_u64(), Some(1), "the 304 kept the stored body");
}

#[tokio::test]
async fn stale_if_error_hides_a_failing_app() {
    let up = Upstream::start().await;
    let dir = TempDir::new("cache-sie");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let url = format!("http://{}/app/brief/y", sc.proxy_addr);
    assert_eq!(fetch(&c, url.clone(), &[]).await.2["n"].as_u64(), Some(1));
    sc.sidecar.process.clock.advance(Duration::from_millis(1_100));
    up.failing.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, h, body) = fetch(&c, url.clone(), &[]).await;
    assert_eq!((status, body["n"].as_u64()), (StatusCode::OK, Some(1)), "the stale copy instead of the 503");
    assert!(cache_status(&h).contains("stale-if-error"), "{}", cache_status(&h));
    up.failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let (status, _, body) = fetch(&c, url, &[]).await;
    assert_eq!((status, body["n"].as_u64()), (StatusCode::OK, Some(3)), "refreshed once the app is back");
}

#[tokio::test]
async fn unsafe_requests_invalidate_and_purges_remove() {
    let up = Upstream::start().await;
    let dir = TempDir::new("cache-invalidate");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let items = format!("http://{}/app/cached/items", sc.proxy_addr);
    assert_eq!(fetch(&c, items.clone(), &[]).await.2["n"].as_u64(), Some(1));
    assert_eq!(fetch(&c, items.clone(), &[]).await.2["n"].as_u64(), Some(1));
    // A successful POST to the URL invalidates it.
    assert_eq!(fetch_method(&c, "POST", items.clone(), &[]).await.0, StatusCode::OK);
    assert_eq!(fetch(&c, items.clone(), &[]).await.2["n"].as_u64(), Some(3));
    // So does one whose Location names it.
    let create = format!("http://{}/app/create?location=/app/cached/items", sc.proxy_addr);
    assert_eq!(fetch_method(&c, "POST", create, &[]).await.0, StatusCode::OK);
    assert_eq!(fetch(&c, items.clone(), &[]).await.2["n"].as_u64(), Some(4));
    // A failed one does not.
    let failed = format!("http://{}/app/cached/items?status=500", sc.proxy_addr);
    fetch_method(&c, "DELETE", failed, &[]).await;
    assert_eq!(fetch(&c, items.clone(), &[]).await.2["n"].as_u64(), Some(4));

    // Purge by surrogate key: the route's own, and one the app sent.
    let tagged = format!("http://{}/app/cached/tagged?skey=item-7%20item-8", sc.proxy_addr);
    assert_eq!(fetch(&c, tagged.clone(), &[]).await.2["n"].as_u64(), Some(1));
    let purge = |body: &str| {
        let (c, url, body) = (c.clone(), format!("http://{}/purge", sc.admin_addr), body.to_owned());
        async move {
            let (status, _, out) = send(&c, Request::post(url).body(full(body)).unwrap()).await;
            (status, serde_json::from_slice::<serde_json::Value>(&out).unwrap())
        }
    };
    assert_eq!(
        purge(r#"{"keys": ["item-8"]}"#).await,
        (StatusCode::OK, serde_json::json!({"purged": 1, "shared": false}))
    );
    assert_eq!(fetch(&c, tagged.clone(), &[]).await.2["n"].as_u64(), Some(2));
    let (status, out) = purge(r#"{"keys": ["catalog"]}"#).await;
    assert_eq!((status, out["purged"].as_u64()), (StatusCode::OK, Some(2)), "both URLs of the route");
    // (The failed DELETE reached the app: it is the 5th request of the path.)
    assert_eq!(fetch(&c, items.clone(), &[]).await.2["n"].as_u64(), Some(6));
    assert_eq!(purge(r#"{"paths": ["/app/cached/items"]}"#).await.1["purged"], 1);
    assert_eq!(fetch(&c, items, &[]).await.2["n"].as_u64(), Some(7));
    let (status, out) = purge(r#"{"everything": true}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(out["type"], "https://apipolicy.dev/problems/bad-purge");
}

#[tokio::test]
async fn unkeyed_headers_cannot_poison_the_cache() {
    let up = Upstream::start().await;
    let dir = TempDir::new("cache-poison");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let url = format!("http://{}/app/cached/page", sc.proxy_addr);
    let (_, _, body) =
        fetch(&c, url.clone(), &[("x-forwarded-host", "evil.example"), ("x-original-url", "/admin")]).await;
    assert_eq!(body["xfh"], serde_json::Value::Null, "the app never sees them");
    assert_eq!(body["xou"], serde_json::Value::Null);
    let (_, _, body) = fetch(&c, url, &[]).await;
    assert_eq!((body["n"].as_u64(), &body["xfh"]), (Some(1), &serde_json::Value::Null));
}

#[tokio::test]
async fn origin_mode_follows_the_app() {
    let up = Upstream::start().await;
    let dir = TempDir::new("cache-origin");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let base = format!("http://{}/app/origin", sc.proxy_addr);
    for (path, cc, stored) in [
        ("/a", "max-age=60", true),
        ("/b", "public,%20s-maxage=60,%20max-age=0", true),
        ("/c", "no-store", false),
        ("/d", "private,%20max-age=60", false),
        ("/e", "max-age=abc,%20public,,%20=5", false),
        ("/f", "no-cache", false),
    ] {
        let url = format!("{base}{path}?cc={cc}");
        fetch(&c, url.clone(), &[]).await;
        let (status, h, body) = fetch(&c, url, &[]).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(body["n"].as_u64() == Some(1), stored, "{path}: {}", cache_status(&h));
        assert!(
            h["cache-control"].to_str().unwrap().contains(&cc.replace("%20", " ")),
            "the app's header stands"
        );
    }
    // A request with Authorization is not served a shared copy unless the app allowed it.
    let url = format!("{base}/g?cc=max-age=60");
    fetch(&c, url.clone(), &[("authorization", "Bearer a")]).await;
    let (_, _, body) = fetch(&c, url, &[("authorization", "Bearer b")]).await;
    assert_eq!(body["n"].as_u64(), Some(2));
}

fn decode(encoding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            flate2::read::GzDecoder::new(body).read_to_end(&mut out).unwrap();
        }
        "br" => {
            brotli::Decompressor::new(body, 4096).read_to_end(&mut out).unwrap();
        }
        "zstd" => out = zstd::decode_all(body).unwrap(),
        _ => out = body.to_vec(),
    }
    out
}

#[tokio::test]
async fn compression_is_negotiated_and_made_once_per_entry() {
    let up = Upstream::start().await;
    let dir = TempDir::new("cache-compress");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let url = format!("http://{}/app/cached/big?size=900", sc.proxy_addr);
    let (_, plain_h, plain) = send(&c, Request::get(&url).body(empty()).unwrap()).await;
    assert!(plain_h.get("content-encoding").is_none(), "no Accept-Encoding: identity");
    for (accept, want) in
        [("gzip, br", "br"), ("gzip", "gzip"), ("br;q=0, zstd", "zstd"), ("gzip;q=0, br;q=0, zstd;q=0", "")]
    {
        for _ in 0..2 {
            let req = Request::get(&url).header("accept-encoding", accept).body(empty()).unwrap();
            let (status, h, body) = send(&c, req).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                h.get("content-encoding").map(|v| v.to_str().unwrap()).unwrap_or(""),
                want,
                "{accept}"
            );
            assert!(
                h.get_all("vary").iter().any(|v| v
                    .to_str()
                    .unwrap()
                    .to_ascii_lowercase()
                    .contains("accept-encoding")),
                "{accept}: {h:?}"
            );
            assert_eq!(h["content-length"], body.len().to_string().as_str());
            assert_eq!(decode(want, &body), plain.to_vec(), "{accept}");
            if !want.is_empty() {
                assert!(
                    h["etag"].to_str().unwrap().ends_with(&format!("-{want}\"")),
                    "one ETag per encoding"
                );
            }
        }
    }
    assert_eq!(up.hits("/app/cached/big"), 1);
    // Hits carry an HTTP date, and purging still finds an entry whose compressed forms were
    // added after it was stored.
    let (_, h, _) = fetch(&c, url.clone(), &[]).await;
    assert!(httpdate::parse_http_date(h["date"].to_str().unwrap()).is_ok(), "{:?}", h["date"]);
    let purge = Request::post(format!("http://{}/purge", sc.admin_addr))
        .body(full(r#"{"keys": ["catalog"]}"#))
        .unwrap();
    let (_, _, out) = send(&c, purge).await;
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out).unwrap()["purged"], 1);
    let text =
        String::from_utf8(get(&c, format!("http://{}/metrics", sc.admin_addr)).await.2.to_vec()).unwrap();
    // Three encodings made once each, though each was served twice.
    let into = metric(&text, r#"apipolicy_compression_bytes_total{direction="in",route="cached"}"#).unwrap();
    assert_eq!(into, 3.0 * plain.len() as f64);

    // Responses that pass through are compressed as they stream, within the rules.
    let stream = format!("http://{}/app/plain/json?size=20000", sc.proxy_addr);
    let (_, h, body) =
        send(&c, Request::get(&stream).header("accept-encoding", "gzip").body(empty()).unwrap()).await;
    assert_eq!(h["content-encoding"], "gzip");
    assert!(h.get("content-length").is_none());
    assert!(body.len() < 2_000);
    assert!(String::from_utf8(decode("gzip", &body)).unwrap().contains(&"x".repeat(20_000)));
    for (query, why) in [
        ("size=10", "under minSize"),
        ("size=5000&ct=image/png", "not a listed type"),
        ("size=5000&cc=no-transform", "no-transform"),
    ] {
        let url = format!("http://{}/app/plain/j?{query}", sc.proxy_addr);
        let (_, h, _) =
            send(&c, Request::get(url).header("accept-encoding", "gzip").body(empty()).unwrap()).await;
        assert!(h.get("content-encoding").is_none(), "{why}");
    }
}

#[tokio::test]
async fn entries_over_max_entry_size_stream_through_uncached() {
    let up = Upstream::start().await;
    let dir = TempDir::new("cache-big");
    let sc = cache_sidecar(&up, &dir).await;
    let c = client();
    let url = format!("http://{}/app/cached/huge?size=5000", sc.proxy_addr);
    for n in 1..=2 {
        let (status, h, body) = fetch(&c, url.clone(), &[]).await;
        assert_eq!((status, body["n"].as_u64()), (StatusCode::OK, Some(n)));
        assert_eq!(body["pad"].as_str().unwrap().len(), 5000);
        assert!(cache_status(&h).contains("too-large"), "{}", cache_status(&h));
    }
}
