//! Rate limits and load shedding over real sockets.

use std::time::{Duration, Instant};

use apipolicy_sidecar::server::start;
use http::{HeaderMap, Request, StatusCode};

use crate::support::*;

async fn limited(
    upstream: &str,
    dir: &TempDir,
    routes: &str,
    replicas: u32,
) -> apipolicy_sidecar::server::Handle {
    let path = dir.file("policy.yaml", &policy(routes));
    let mut o = flags(path, upstream);
    o.replicas = replicas;
    start(o).await.unwrap()
}

fn route(name: &str, path: &str, rate_limit: &str) -> String {
    format!("  - name: {name}\n    match: {{path: {{prefix: {path}}}}}\n    rateLimit: {rate_limit}\n")
}

async fn hit(c: &HttpClient, url: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (status, h, body) = send(c, req.body(empty()).unwrap()).await;
    if status == StatusCode::TOO_MANY_REQUESTS {
        let p: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(p["type"], "https://apipolicy.dev/problems/rate-limited");
        assert_eq!(h["content-type"], "application/problem+json");
    }
    (status, h)
}

fn codes(results: &[(StatusCode, HeaderMap)]) -> Vec<u16> {
    results.iter().map(|(s, _)| s.as_u16()).collect()
}

#[tokio::test]
async fn a_burst_of_burst_plus_k_gets_exactly_k_429s_with_every_algorithm() {
    let up = Upstream::start().await;
    for algorithm in ["TokenBucket", "GCRA", "SlidingWindow"] {
        let dir = TempDir::new("burst");
        let rl = if algorithm == "SlidingWindow" {
            format!("{{algorithm: {algorithm}, requests: 5, per: 1m}}")
        } else {
            format!("{{algorithm: {algorithm}, requests: 1, per: 1m, burst: 5}}")
        };
        let sc = limited(&up.url(), &dir, &route("login", "/login", &rl), 1).await;
        let c = client();
        let url = format!("http://{}/login", sc.proxy_addr);
        let before = up.count();
        let mut results = Vec::new();
        for _ in 0..8 {
            results.push(hit(&c, &url, &[]).await);
        }
        assert_eq!(codes(&results), [200, 200, 200, 200, 200, 429, 429, 429], "{algorithm}");
        assert_eq!(up.count() - before, 5, "{algorithm}: refused requests never reach the app");
        let remaining: Vec<&str> =
            results.iter().map(|(_, h)| h["x-ratelimit-remaining"].to_str().unwrap()).collect();
        assert_eq!(remaining, ["4", "3", "2", "1", "0", "0", "0", "0"], "{algorithm}");
        let (_, first) = &results[0];
        // One quota in both families: q = X-RateLimit-Limit = the most a client may send at
        // once; w = the time the whole quota takes to come back (a bucket of 5 at one a minute:
        // 5 minutes).
        assert_eq!(first["x-ratelimit-limit"], "5");
        let w = if algorithm == "SlidingWindow" { 60 } else { 300 };
        assert_eq!(first["ratelimit-policy"], format!("\"login\";q=5;w={w}").as_str());
        assert!(
            first["ratelimit"].to_str().unwrap().starts_with("\"login\";r=4;t="),
            "{:?}",
            first["ratelimit"]
        );
        let reset: u64 = first["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(reset > now && reset <= now + 121, "X-RateLimit-Reset is an epoch time: {reset}");
        let (_, refused) = &results[5];
        let retry: u64 = refused["retry-after"].to_str().unwrap().parse().unwrap();
        // A sliding window may ask for up to two windows: the full one must slide out.
        assert!((1..=120).contains(&retry), "{algorithm}: Retry-After {retry}");
        if algorithm != "SlidingWindow" {
            assert_eq!(retry, 60, "one request a minute: the next comes a minute after the burst");
        }
        // Retry-After: when one more request is allowed; t: when the whole quota is back.
        let t: u64 = refused["ratelimit"].to_str().unwrap().rsplit(";t=").next().unwrap().parse().unwrap();
        let reset: u64 = refused["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(retry <= t && t <= 2 * w, "{algorithm}: Retry-After {retry}, t={t}, w={w}");
        assert!(reset.abs_diff(now + t) <= 1, "{algorithm}: X-RateLimit-Reset is now + t");
    }
}

#[tokio::test]
async fn the_bucket_refills() {
    let up = Upstream::start().await;
    let dir = TempDir::new("refill");
    let sc = limited(&up.url(), &dir, &route("r", "/r", "{requests: 20, per: 1s, burst: 1}"), 1).await;
    let c = client();
    let url = format!("http://{}/r", sc.proxy_addr);
    assert_eq!(hit(&c, &url, &[]).await.0, StatusCode::OK);
    let (status, h) = hit(&c, &url, &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(h["retry-after"], "1", "50 ms rounds up to one whole second");
    // The sidecar's clock moves on; nothing sleeps.
    sc.sidecar.process.clock.advance(Duration::from_millis(51));
    assert_eq!(hit(&c, &url, &[]).await.0, StatusCode::OK, "one token is back after 50 ms");
}

#[tokio::test]
async fn header_keys_missing_keys_and_overrides() {
    let up = Upstream::start().await;
    let dir = TempDir::new("header-keys");
    let routes = route(
        "keyed",
        "/keyed",
        "{requests: 1, per: 1m, burst: 2, key: {header: {name: X-Api-Key, onMissing: Reject, rejectStatus: 401}}, overrides: [{values: [gold-key], requests: 4, burst: 4}]}",
    ) + &route(
        "anon",
        "/anon",
        "{requests: 1, per: 1m, burst: 2, key: {header: {name: X-Api-Key}}}",
    );
    let sc = limited(&up.url(), &dir, &routes, 1).await;
    let c = client();
    let keyed = format!("http://{}/keyed", sc.proxy_addr);
    let (status, _, body) = get(&c, keyed.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let p: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(p["type"], "https://apipolicy.dev/problems/missing-rate-limit-key");
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut gold = Vec::new();
    for _ in 0..5 {
        a.push(hit(&c, &keyed, &[("x-api-key", "key-a")]).await);
        b.push(hit(&c, &keyed, &[("x-api-key", "key-b")]).await);
        gold.push(hit(&c, &keyed, &[("x-api-key", "gold-key")]).await);
    }
    assert_eq!(codes(&a), [200, 200, 429, 429, 429]);
    assert_eq!(codes(&b), [200, 200, 429, 429, 429], "each key has its own bucket");
    assert_eq!(codes(&gold), [200, 200, 200, 200, 429], "an override's own limit");
    assert_eq!(gold[0].1["x-ratelimit-limit"], "4");
    let anon = format!("http://{}/anon", sc.proxy_addr);
    let shared: Vec<_> =
        [hit(&c, &anon, &[]).await, hit(&c, &anon, &[]).await, hit(&c, &anon, &[]).await].into();
    assert_eq!(codes(&shared), [200, 200, 429], "requests without the header share one bucket");
    assert_eq!(hit(&c, &anon, &[("x-api-key", "k")]).await.0, StatusCode::OK);
}

#[tokio::test]
async fn client_addresses_behind_trusted_proxies() {
    let up = Upstream::start().await;
    let dir = TempDir::new("xff");
    let rl = "{requests: 1, per: 1m, burst: 1, key: {clientIp: {}}}";
    // The test client connects from 127.0.0.1, which this policy trusts as a proxy.
    let text = policy(&route("ip", "/ip", rl))
        .replace("  routes:\n", "  clientIp: {trustedProxies: [127.0.0.0/8]}\n  routes:\n");
    let path = dir.file("policy.yaml", &text);
    let sc = start(flags(path, &up.url())).await.unwrap();
    let c = client();
    let url = format!("http://{}/ip", sc.proxy_addr);
    assert_eq!(hit(&c, &url, &[("x-forwarded-for", "203.0.113.5")]).await.0, StatusCode::OK);
    assert_eq!(hit(&c, &url, &[("x-forwarded-for", "203.0.113.5")]).await.0, StatusCode::TOO_MANY_REQUESTS);
    // Forging a left-most address gains nothing: the client is still 203.0.113.5.
    assert_eq!(
        hit(&c, &url, &[("x-forwarded-for", "1.2.3.4, 203.0.113.5")]).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        hit(&c, &url, &[("x-forwarded-for", "203.0.113.6")]).await.0,
        StatusCode::OK,
        "another client"
    );

    // Without trust, X-Forwarded-For is ignored: every request is the peer's.
    let dir = TempDir::new("xff-untrusted");
    let sc = limited(&up.url(), &dir, &route("ip", "/ip", rl), 1).await;
    let url = format!("http://{}/ip", sc.proxy_addr);
    assert_eq!(hit(&c, &url, &[("x-forwarded-for", "203.0.113.7")]).await.0, StatusCode::OK);
    assert_eq!(hit(&c, &url, &[("x-forwarded-for", "203.0.113.8")]).await.0, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn shadow_mode_counts_and_never_rejects() {
    let up = Upstream::start().await;
    let dir = TempDir::new("shadow");
    let sc = limited(&up.url(), &dir, &route("s", "/s", "{requests: 1, per: 1m, burst: 1, mode: Shadow}"), 1)
        .await;
    let c = client();
    let url = format!("http://{}/s", sc.proxy_addr);
    for _ in 0..3 {
        let (status, h) = hit(&c, &url, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(h.get("ratelimit").is_none() && h.get("x-ratelimit-remaining").is_none());
    }
    let text =
        String::from_utf8(get(&c, format!("http://{}/metrics", sc.admin_addr)).await.2.to_vec()).unwrap();
    assert_eq!(
        metric(&text, r#"apipolicy_ratelimit_decisions_total{decision="allowed",route="s"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, r#"apipolicy_ratelimit_decisions_total{decision="shadow_limited",route="s"}"#),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, r#"apipolicy_ratelimit_decisions_total{decision="limited",route="s"}"#),
        Some(0.0)
    );
}

#[tokio::test]
async fn replicas_scope_divides_the_limit() {
    let up = Upstream::start().await;
    let dir = TempDir::new("replicas");
    let sc =
        limited(&up.url(), &dir, &route("r", "/r", "{requests: 4, per: 1m, burst: 4, scope: Replicas}"), 2)
            .await;
    let c = client();
    let url = format!("http://{}/r", sc.proxy_addr);
    let mut results = Vec::new();
    for _ in 0..3 {
        results.push(hit(&c, &url, &[]).await);
    }
    assert_eq!(codes(&results), [200, 200, 429], "4 over 2 replicas is 2 here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_max_in_flight_are_shed_at_once() {
    let up = Upstream::start().await;
    let dir = TempDir::new("shed");
    let routes =
        "  - name: slow\n    match: {path: {prefix: /slow}}\n    concurrencyLimit: {maxInFlight: 2}\n";
    let sc = limited(&up.url(), &dir, routes, 1).await;
    let c = client();
    let url = format!("http://{}/slow?ms=600", sc.proxy_addr);
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { get(&c, url).await.0 })
        })
        .collect();
    eventually("both slow requests at the app", Duration::from_secs(5), || async { up.count() >= 2 }).await;
    let t = Instant::now();
    let (status, h, body) = get(&c, url.clone()).await;
    assert!(t.elapsed() < Duration::from_millis(200), "shed at once, not queued");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h["retry-after"], "1");
    let p: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(p["type"], "https://apipolicy.dev/problems/overloaded");
    for b in busy {
        assert_eq!(b.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(get(&c, url).await.0, StatusCode::OK, "slots come back when responses end");
    let text =
        String::from_utf8(get(&c, format!("http://{}/metrics", sc.admin_addr)).await.2.to_vec()).unwrap();
    assert_eq!(metric(&text, r#"apipolicy_shed_total{priority="default",route="slow"}"#), Some(1.0));
    assert_eq!(metric(&text, r#"apipolicy_route_in_flight{route="slow"}"#), Some(0.0));
}
