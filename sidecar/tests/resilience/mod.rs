//! Retries, the retry budget and the circuit breaker, against a programmable app over real
//! sockets.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use apipolicy_sidecar::server::{Handle, start};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

use crate::support::*;

/// What the app answers its `n`th request (from 1): a status, a delay, and a `Retry-After`.
type Script = Arc<dyn Fn(u64) -> (u16, u64, Option<&'static str>) + Send + Sync>;

/// An app that answers by a script, counts its requests, and echoes the request body.
struct App {
    addr: std::net::SocketAddr,
    seen: Arc<AtomicU64>,
}

impl App {
    async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (count, script) = (count.clone(), script.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    let (status, delay_ms, retry_after) = script(n);
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                        let mut resp = Response::new(full(Bytes::from(format!(
                            "{n}:{}",
                            String::from_utf8_lossy(&body)
                        ))));
                        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                        if let Some(ra) = retry_after {
                            resp.headers_mut().insert("retry-after", ra.parse().unwrap());
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                tokio::spawn(
                    auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned(),
                );
            }
        });
        Self { addr, seen }
    }

    fn seen(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn sidecar_for(app_url: &str, dir: &TempDir, routes: &str) -> Handle {
    let path = dir.file("policy.yaml", &policy(routes));
    start(flags(path, app_url)).await.unwrap()
}

async fn metrics(c: &HttpClient, sc: &Handle) -> String {
    let (_, _, body) = get(c, format!("http://{}/metrics", sc.admin_addr)).await;
    String::from_utf8(body.to_vec()).unwrap()
}

/// A flaky app (every third request fails) gets every request answered through retries, and
/// the retries add about what failed, within the budget's ratio.
#[tokio::test]
async fn a_flaky_app_is_made_whole_by_retries_within_the_budget() {
    let app = App::start(Arc::new(|n| (if n % 3 == 0 { 503 } else { 200 }, 0, None))).await;
    let dir = TempDir::new("retry-flaky");
    let routes = "  - name: api
    match: {path: {prefix: /}}
    retry: {attempts: 3, backoff: {base: 1ms, max: 2ms}, budget: {ratio: 0.5, minPerSecond: 1, ttl: 10s}}
";
    let sc = sidecar_for(&app.url(), &dir, routes).await;
    let c = client();
    let sent = 300u64;
    let mut ok = 0;
    for i in 0..sent {
        let (status, _, _) = get(&c, format!("http://{}/items/{i}", sc.proxy_addr)).await;
        ok += u64::from(status == StatusCode::OK);
    }
    let extra = app.seen() - sent;
    println!(
        "flaky app: {ok}/{sent} answered 200; the app saw {} requests ({extra} retries, {:.1} % extra)",
        app.seen(),
        extra as f64 * 100.0 / sent as f64
    );
    assert!(ok * 100 >= sent * 99, "{ok} of {sent} succeeded");
    assert!(extra <= sent / 2 + 10, "{extra} retries for {sent} requests: past the budget");
    let m = metrics(&c, &sc).await;
    let retried = metric(&m, r#"apipolicy_retries_total{result="success",route="api"}"#).unwrap();
    assert_eq!(retried as u64, extra, "each retry made a request whole");
}

/// A dead app (always 503) sees at most the budget's share of retries on top of the
/// requests: no retry storm.
#[tokio::test]
async fn a_dead_app_sees_no_retry_storm() {
    let app = App::start(Arc::new(|_| (503, 0, None))).await;
    let dir = TempDir::new("retry-dead");
    let routes = "  - name: api
    match: {path: {prefix: /}}
    retry: {attempts: 5, backoff: {base: 1ms, max: 1ms}, budget: {ratio: 0.2, minPerSecond: 1, ttl: 10s}}
";
    let sc = sidecar_for(&app.url(), &dir, routes).await;
    let c = client();
    let sent = 200u64;
    for i in 0..sent {
        let (status, _, _) = get(&c, format!("http://{}/x/{i}", sc.proxy_addr)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let extra = app.seen() - sent;
    println!("dead app: {sent} requests, {extra} retries ({:.1} %)", extra as f64 * 100.0 / sent as f64);
    // 20 % of the requests plus 1/s over 10 s; without the budget it would be 4 × 200.
    assert!(extra <= sent / 5 + 10, "{extra} retries");
    assert!(extra >= sent / 5, "the budget was used: {extra}");
    let m = metrics(&c, &sc).await;
    assert!(metric(&m, r#"apipolicy_retry_budget_exhausted_total{route="api"}"#).unwrap() > 100.0);
}

/// Only requests that may be sent twice are: POST is not, unless it has an Idempotency-Key;
/// a PUT's body is sent again whole.
#[tokio::test]
async fn only_idempotent_requests_are_retried_and_bodies_are_replayed() {
    let app = App::start(Arc::new(|n| (if n % 2 == 1 { 502 } else { 200 }, 0, None))).await;
    let dir = TempDir::new("retry-idem");
    let routes = "  - name: api
    match: {path: {prefix: /}}
    retry: {attempts: 2, backoff: {base: 1ms, max: 1ms}}
";
    let sc = sidecar_for(&app.url(), &dir, routes).await;
    let c = client();
    let url = format!("http://{}/orders", sc.proxy_addr);
    let post = |key: Option<&str>| {
        let mut b = Request::post(url.clone());
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        b.body(full("order-1")).unwrap()
    };
    let (status, _, _) = send(&c, post(None)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "a POST is never sent twice");
    assert_eq!(app.seen(), 1);
    // n=2 succeeds: resync so the next request's first try fails again.
    let _ = send(&c, Request::get(url.clone()).body(empty()).unwrap()).await;
    assert_eq!(app.seen(), 2);
    let (status, _, body) = send(&c, post(Some("k-1"))).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"4:order-1"[..]), "retried with the same body");
    let (status, _, body) = send(&c, Request::put(url.clone()).body(full("v2")).unwrap()).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"6:v2"[..]));
}

/// A try that runs past perTryTimeout is tried again, and the route's timeout bounds all
/// tries together.
#[tokio::test]
async fn slow_tries_are_cut_and_the_route_timeout_bounds_them_all() {
    let app = App::start(Arc::new(|n| (200, if n == 1 { 2_000 } else { 0 }, None))).await;
    let dir = TempDir::new("retry-slow");
    let routes = "  - name: api
    match: {path: {prefix: /}}
    timeout: 1s
    retry: {attempts: 3, on: [timeout], perTryTimeout: 200ms, backoff: {base: 1ms, max: 1ms}}
";
    let sc = sidecar_for(&app.url(), &dir, routes).await;
    let c = client();
    let started = Instant::now();
    let (status, _, body) = get(&c, format!("http://{}/a", sc.proxy_addr)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"2:"[..]));
    assert!(started.elapsed() < Duration::from_millis(900), "{:?}", started.elapsed());
    // Every try slow: three tries of 200 ms, well within the second.
    let app = App::start(Arc::new(|_| (200, 2_000, None))).await;
    let dir = TempDir::new("retry-slow-all");
    let sc = sidecar_for(&app.url(), &dir, routes).await;
    let started = Instant::now();
    let (status, _, _) = get(&c, format!("http://{}/b", sc.proxy_addr)).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(app.seen(), 3);
    assert!(started.elapsed() < Duration::from_millis(1_000), "{:?}", started.elapsed());
}

/// The app's Retry-After is a floor for the wait; one past the route's timeout means no retry.
#[tokio::test]
async fn retry_after_is_a_floor() {
    let app = App::start(Arc::new(|n| (if n == 1 { 503 } else { 200 }, 0, Some("1")))).await;
    let dir = TempDir::new("retry-after");
    let routes = "  - name: api
    match: {path: {prefix: /patient}}
    timeout: 3s
    retry: {backoff: {base: 1ms, max: 1ms}}
  - name: hasty
    match: {path: {prefix: /hasty}}
    timeout: 500ms
    retry: {backoff: {base: 1ms, max: 1ms}}
";
    let sc = sidecar_for(&app.url(), &dir, routes).await;
    let c = client();
    let started = Instant::now();
    let (status, _, _) = get(&c, format!("http://{}/patient", sc.proxy_addr)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_secs(1), "waited {:?}", started.elapsed());
    let app = App::start(Arc::new(|_| (503, 0, Some("1")))).await;
    let dir = TempDir::new("retry-after-hasty");
    let sc = sidecar_for(&app.url(), &dir, routes).await;
    let (status, _, _) = get(&c, format!("http://{}/hasty", sc.proxy_addr)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.seen(), 1, "a wait past the route's timeout is no retry");
}

/// A dead app opens the circuit after consecutiveFailures: requests then fail at once
/// without reaching it; after openFor one probe goes through, and its success closes it.
#[tokio::test]
async fn a_dead_app_opens_the_circuit_and_a_probe_closes_it() {
    let up = Upstream::start().await;
    up.failing.store(true, Ordering::SeqCst);
    let dir = TempDir::new("breaker");
    let routes = "  - name: api
    match: {path: {prefix: /app}}
    circuitBreaker: {consecutiveFailures: 3, openFor: 5s, halfOpenRequests: 1}
";
    let sc = sidecar_for(&up.url(), &dir, routes).await;
    let c = client();
    let url = format!("http://{}/app/b", sc.proxy_addr);
    for _ in 0..3 {
        assert_eq!(get(&c, url.clone()).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(up.hits("/app/b"), 3);
    let (status, headers, body) = get(&c, url.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "https://apipolicy.dev/problems/circuit-open");
    assert_eq!(headers["retry-after"], "5");
    assert_eq!(up.hits("/app/b"), 3, "an open circuit keeps requests off the app");
    let m = metrics(&c, &sc).await;
    assert_eq!(metric(&m, r#"apipolicy_circuit_state{route="api"}"#), Some(2.0));
    // Healthy again; after openFor a probe goes through and closes the circuit.
    up.failing.store(false, Ordering::SeqCst);
    sc.sidecar.process.clock.advance(Duration::from_millis(5_100));
    assert_eq!(get(&c, url.clone()).await.0, StatusCode::OK);
    assert_eq!(get(&c, url.clone()).await.0, StatusCode::OK);
    assert_eq!(up.hits("/app/b"), 5);
    let m = metrics(&c, &sc).await;
    assert_eq!(metric(&m, r#"apipolicy_circuit_state{route="api"}"#), Some(0.0));
}

/// While the circuit is open a cached route answers with its stale entry (within
/// staleIfError) instead of the 503.
#[tokio::test]
async fn an_open_circuit_serves_stale_from_the_cache() {
    let up = Upstream::start().await;
    let dir = TempDir::new("breaker-stale");
    let routes = "  - name: api
    match: {path: {prefix: /app}}
    cache: {maxAge: 1s, staleIfError: 1h}
    circuitBreaker: {consecutiveFailures: 1, openFor: 30s}
";
    let sc = sidecar_for(&up.url(), &dir, routes).await;
    let c = client();
    let url = format!("http://{}/app/s", sc.proxy_addr);
    let (status, _, first) = get(&c, url.clone()).await;
    assert_eq!(status, StatusCode::OK);
    up.failing.store(true, Ordering::SeqCst);
    sc.sidecar.process.clock.advance(Duration::from_secs(2));
    // The fill fails (and opens the circuit): stale-if-error answers.
    let (status, headers, body) = get(&c, url.clone()).await;
    assert_eq!((status, body.clone()), (StatusCode::OK, first.clone()));
    assert!(headers["cache-status"].to_str().unwrap().contains("stale-if-error"));
    let hits = up.hits("/app/s");
    // Open now: the stale entry again, and the app is not asked.
    let (status, _, body) = get(&c, url.clone()).await;
    assert_eq!((status, body), (StatusCode::OK, first));
    assert_eq!(up.hits("/app/s"), hits);
}

/// An app that serves 4 requests at a time (20 ms each; the rest wait their turn), under 40
/// concurrent clients (10× what it can take): the adaptive limit keeps the latency of what it
/// admits near the app's ideal and sheds the rest at once. The app's latency is its queue:
/// what the limit lets in flight beyond 4 waits a turn, so "within 2× the ideal" is "at most 8
/// in flight at the app", which the app counts itself (client-side times also hold the test
/// machine's scheduling, which the whole suite running beside this test stretches).
#[tokio::test]
async fn an_adaptive_limit_keeps_admitted_latency_near_the_ideal() {
    let capacity = Arc::new(tokio::sync::Semaphore::new(4));
    let in_flight = Arc::new(AtomicU64::new(0));
    let seen_in_flight = Arc::new(std::sync::Mutex::new(Vec::<(Instant, u64)>::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (app_in_flight, app_seen) = (in_flight.clone(), seen_in_flight.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (capacity, in_flight, seen) = (capacity.clone(), app_in_flight.clone(), app_seen.clone());
            let service = service_fn(move |_req: Request<Incoming>| {
                let (capacity, in_flight, seen) = (capacity.clone(), in_flight.clone(), seen.clone());
                async move {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.lock().unwrap().push((Instant::now(), now));
                    let turn = capacity.acquire().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    drop(turn);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, Infallible>(Response::new(full("done")))
                }
            });
            tokio::spawn(
                auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned(),
            );
        }
    });
    let dir = TempDir::new("adaptive");
    let routes = "  - name: api
    match: {path: {prefix: /}}
    concurrencyLimit: {adaptive: {minLimit: 1, maxLimit: 100, sampleWindow: 100ms, latencyTolerance: 2}}
";
    let sc = sidecar_for(&format!("http://{addr}"), &dir, routes).await;
    let url = format!("http://{}/work", sc.proxy_addr);
    // The ideal: one request at a time.
    let c = client();
    let mut alone = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        assert_eq!(get(&c, url.clone()).await.0, StatusCode::OK);
        alone.push(t.elapsed());
    }
    alone.sort();
    let ideal = alone[5];
    // 40 clients for 2.5 s; the first second is the limit's to learn.
    let started = Instant::now();
    let workers: Vec<_> = (0..40)
        .map(|_| {
            let (c, url) = (client(), url.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while started.elapsed() < Duration::from_millis(2_500) {
                    let t = Instant::now();
                    let (status, _, _) = get(&c, url.clone()).await;
                    seen.push((t.duration_since(started), status, t.elapsed()));
                    // A shed client backs off a little, as Retry-After asks: 40 of them spinning on
                    // 503s would only load the machine the rest of the suite shares.
                    if status != StatusCode::OK {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                seen
            })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut shed = 0;
    for w in workers {
        for (at, status, took) in w.await.unwrap() {
            if at < Duration::from_secs(1) {
                continue;
            }
            match status {
                StatusCode::OK => admitted.push(took),
                StatusCode::SERVICE_UNAVAILABLE => shed += 1,
                other => panic!("unexpected {other}"),
            }
        }
    }
    admitted.sort();
    let p99 = admitted[admitted.len() * 99 / 100];
    let m = metrics(&c, &sc).await;
    let limit = metric(&m, r#"apipolicy_concurrency_limit{route="api"}"#).unwrap();
    println!(
        "adaptive: ideal {ideal:?}, {} admitted (p50 {:?}, p99 {p99:?}), {shed} shed, limit now {limit}",
        admitted.len(),
        admitted[admitted.len() / 2]
    );
    assert!(
        shed > admitted.len(),
        "most of 10× the capacity is shed: {shed} shed, {} admitted",
        admitted.len()
    );
    assert!(admitted.len() > 100, "the app is kept busy: {}", admitted.len());
    // At the app: requests in flight when each arrived, after the first second.
    let learnt = started + Duration::from_secs(1);
    let mut depths: Vec<u64> =
        seen_in_flight.lock().unwrap().iter().filter(|(at, _)| *at >= learnt).map(|(_, n)| *n).collect();
    depths.sort();
    let depth_p99 = depths[depths.len() * 99 / 100];
    println!("adaptive: in flight at the app p50 {}, p99 {depth_p99}", depths[depths.len() / 2]);
    assert!(depth_p99 <= 8, "at most 2× the app's 4 (latency ≤ 2× ideal): p99 {depth_p99} in flight");
    // And as clients see it, far from the 10× an unlimited queue would give (the slack is the
    // test machine's scheduling under the whole suite).
    assert!(p99 <= ideal.mul_f64(4.0), "p99 {p99:?} against ideal {ideal:?}");
}

/// SLO protection: an app failing half its requests drives an availability SLO Critical at
/// once (the 5m and 1h burn rates are both far over 14.4); while it is, the cached route
/// answers from its stale entry instead of the failing app and sheddable requests are shed
/// before they reach it; once the SLO has been calm for a minute, protection lifts.
#[tokio::test]
async fn slo_protection_serves_stale_sheds_sheddable_and_lifts() {
    let up = Upstream::start().await;
    let dir = TempDir::new("protect");
    let routes = "  - name: cached
    match: {path: {prefix: /app/cached}}
    cache: {maxAge: 1s}
  - name: work
    match: {path: {prefix: /app/work}}
  slos:
  - name: availability
    objective: 99
    indicator: {availability: {}}
    routes: [cached, work]
    protect: {when: Critical, actions: [ServeStale, ShedByPriority]}
  priorities:
  - {class: Sheddable, header: {name: X-Priority, values: [low]}}
";
    let sc = sidecar_for(&up.url(), &dir, routes).await;
    let c = client();
    let base = format!("http://{}", sc.proxy_addr);
    let slo = |c: HttpClient| {
        let admin = sc.admin_addr;
        async move {
            let (_, _, body) = get(&c, format!("http://{admin}/slo")).await;
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["slos"][0].clone()
        }
    };
    let (status, _, stored) = get(&c, format!("{base}/app/cached/item")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(slo(c.clone()).await["protection"]["active"], false);
    // Half the requests fail.
    sc.sidecar.process.clock.advance(Duration::from_secs(2));
    for i in 0..20 {
        up.failing.store(i % 2 == 0, Ordering::SeqCst);
        get(&c, format!("{base}/app/work/{i}")).await;
    }
    let now = slo(c.clone()).await;
    assert_eq!(now["state"], "Critical", "{now}");
    assert_eq!(now["protection"]["active"], true, "{now}");
    assert_eq!(
        metric(&metrics(&c, &sc).await, r#"apipolicy_protection_active{slo="availability"}"#),
        Some(1.0)
    );
    up.failing.store(true, Ordering::SeqCst);
    // ServeStale: the stored answer, though past its maxAge and any window, without the app.
    let asked = up.hits("/app/cached/item");
    let (status, headers, body) = get(&c, format!("{base}/app/cached/item")).await;
    assert_eq!((status, body), (StatusCode::OK, stored));
    assert!(headers["cache-status"].to_str().unwrap().contains("detail=protection"));
    assert_eq!(up.hits("/app/cached/item"), asked);
    // ShedByPriority: sheddable requests stop at the sidecar; the others still reach the app.
    let asked = up.hits("/app/work/x");
    let shed = send(
        &c,
        Request::get(format!("{base}/app/work/x")).header("x-priority", "low").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(shed.0, StatusCode::SERVICE_UNAVAILABLE);
    let problem: serde_json::Value = serde_json::from_slice(&shed.2).unwrap();
    assert_eq!(problem["type"], "https://apipolicy.dev/problems/shed-by-priority");
    assert_eq!(up.hits("/app/work/x"), asked);
    get(&c, format!("{base}/app/work/x")).await;
    assert_eq!(up.hits("/app/work/x"), asked + 1);
    let m = metrics(&c, &sc).await;
    assert_eq!(metric(&m, r#"apipolicy_shed_total{priority="sheddable",route="work"}"#), Some(1.0));
    // Healthy again. Past the 30-minute window the SLO is calm; protection holds a minute more.
    up.failing.store(false, Ordering::SeqCst);
    slo(c.clone()).await;
    sc.sidecar.process.clock.advance(Duration::from_secs(31 * 60));
    get(&c, format!("{base}/app/work/ok")).await;
    assert_eq!(slo(c.clone()).await["protection"]["active"], true, "no flapping: a minute of calm first");
    sc.sidecar.process.clock.advance(Duration::from_secs(61));
    let now = slo(c.clone()).await;
    assert_eq!(now["protection"]["active"], false, "{now}");
    let lifted = send(
        &c,
        Request::get(format!("{base}/app/work/y")).header("x-priority", "low").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(lifted.0, StatusCode::OK);
}

/// SLO protection's TightenLimits: while the SLO is Critical, a route's rate limit allows
/// `tightenTo` of its rate (here half of a burst of 10).
#[tokio::test]
async fn slo_protection_tightens_rate_limits() {
    let up = Upstream::start().await;
    let dir = TempDir::new("protect-tighten");
    let routes = "  - name: limited
    match: {path: {prefix: /app/limited}}
    rateLimit: {requests: 10, per: 1m, burst: 10}
  - name: work
    match: {path: {prefix: /app/work}}
  slos:
  - name: availability
    objective: 99
    indicator: {availability: {}}
    routes: [limited, work]
    protect: {actions: [TightenLimits], tightenTo: 0.5}
";
    let sc = sidecar_for(&up.url(), &dir, routes).await;
    let c = client();
    let base = format!("http://{}", sc.proxy_addr);
    up.failing.store(true, Ordering::SeqCst);
    for i in 0..10 {
        get(&c, format!("{base}/app/work/{i}")).await;
    }
    let (_, _, body) = get(&c, format!("http://{}/slo", sc.admin_addr)).await;
    let slo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(slo["slos"][0]["protection"]["active"], true, "{slo}");
    up.failing.store(false, Ordering::SeqCst);
    let mut allowed = 0;
    for _ in 0..10 {
        allowed += u32::from(get(&c, format!("{base}/app/limited/x")).await.0 == StatusCode::OK);
    }
    assert_eq!(allowed, 5, "half the burst while protecting");
}
