//! The cache-hit fast path (`--hit-lane`) over raw sockets: hits answered from the request bytes, everything else
//! handed to hyper, in order, on the same connection.

use std::time::Duration;

use apipolicy_sidecar::server::{Handle, start};
use tokio::io::AsyncWriteExt;

use crate::support::*;

const ROUTES: &str = "  - name: cached
    match: {path: {prefix: /app/cached}, methods: [GET, HEAD]}
    cache: {maxAge: 60s, store: {maxEntrySize: 12Mi}}
    compression: {minSize: 100}
  - name: limited
    match: {path: {prefix: /app/limited}}
    cache: {maxAge: 60s}
    rateLimit: {requests: 1000, per: 1s, scope: Pod}
  - name: tight
    match: {path: {prefix: /app/tight}}
    cache: {maxAge: 60s}
    compression: {}
    rateLimit: {requests: 3, per: 1m, scope: Pod}
  - name: uploads
    match: {path: {prefix: /count}}
    maxRequestBody: 1Ki
";

async fn lane_sidecar(up: &Upstream, dir: &TempDir) -> Handle {
    let path = dir.file("policy.yaml", &policy(ROUTES));
    start(flags(path, &up.url())).await.unwrap()
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: lane.test\r\n\r\n")
}

const CACHED: &str = "/app/cached/a?cc=public%2Cmax-age%3D60";

#[tokio::test]
async fn hits_misses_and_uploads_share_one_connection_in_order() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-order");
    let sc = lane_sidecar(&up, &dir).await;
    let mut c = Conn::open(sc.proxy_addr).await;

    c.send(get(CACHED).as_bytes()).await;
    let miss = c.response(false).await;
    assert_eq!(miss.status, 200);
    assert!(miss.header("cache-status").unwrap().contains("fwd=uri-miss"), "{miss:?}");

    // Pipelined: a hit, an upload with a body (handed to hyper), a hit, a miss elsewhere.
    let upload = "POST /count HTTP/1.1\r\nHost: lane.test\r\nContent-Length: 5\r\n\r\nhello";
    c.send(format!("{}{upload}{}{}", get(CACHED), get(CACHED), get("/app/cached/b")).as_bytes()).await;
    let hit = c.response(false).await;
    let uploaded = c.response(false).await;
    let hit2 = c.response(false).await;
    let other = c.response(false).await;

    assert_eq!(hit.status, 200);
    assert!(hit.header("cache-status").unwrap().contains("hit"), "{hit:?}");
    assert_eq!(hit.body, miss.body, "a hit serves the stored body");
    assert_eq!(uploaded.status, 200);
    assert_eq!(uploaded.body, b"5", "the app got the whole upload body, and nothing of the next request");
    assert!(hit2.header("cache-status").unwrap().contains("hit"), "{hit2:?}");
    assert_eq!(other.json()["path"], "/app/cached/b");
    assert!(other.header("cache-status").unwrap().contains("miss"));
    assert_eq!(up.hits("/app/cached/a"), 1, "one upstream request for the cached URL");
    for r in [&miss, &hit, &uploaded, &hit2, &other] {
        assert_eq!(r.header("x-request-id").map(str::len), Some(32), "{r:?}");
    }
    let ids: std::collections::HashSet<_> =
        [&miss, &hit, &uploaded, &hit2].iter().map(|r| r.header("x-request-id")).collect();
    assert_eq!(ids.len(), 4, "every response has its own request id");
    sc.shutdown();
}

#[tokio::test]
async fn a_lane_hit_is_the_hit_hyper_serves() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-parity");
    let sc = lane_sidecar(&up, &dir).await;
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(get(CACHED).as_bytes()).await;
    c.response(false).await;

    c.send(get(CACHED).as_bytes()).await;
    let lane = c.response(false).await;
    // The same request as HTTP/1.0 leaves the lane: hyper and the proxy answer it.
    let mut h = Conn::open(sc.proxy_addr).await;
    h.send(format!("GET {CACHED} HTTP/1.0\r\nHost: lane.test\r\n\r\n").as_bytes()).await;
    let hyper = h.response(false).await;

    let names = |r: &Raw| {
        let mut v: Vec<String> = r
            .headers
            .iter()
            .map(|(n, _)| n.to_ascii_lowercase())
            .filter(|n| n != "connection" && n != "keep-alive")
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&lane), names(&hyper), "lane {lane:?}\nhyper {hyper:?}");
    for name in ["content-type", "content-length", "cache-control", "etag", "date"] {
        assert_eq!(lane.header(name), hyper.header(name), "{name}");
    }
    assert_eq!(lane.body, hyper.body);
    assert!(lane.header("cache-status").unwrap().starts_with("ApiPolicy; hit; ttl="));
    assert_eq!(up.hits("/app/cached/a"), 1);

    // A client's request id is kept, and HEAD gets the head alone: the next answer is whole.
    c.send(format!("HEAD {CACHED} HTTP/1.1\r\nHost: lane.test\r\nX-Request-Id: abc-123\r\n\r\n").as_bytes())
        .await;
    let head = c.response(true).await;
    assert_eq!(head.header("x-request-id"), Some("abc-123"));
    assert_eq!(head.header("content-length"), lane.header("content-length"));
    c.send(get(CACHED).as_bytes()).await;
    assert_eq!(c.response(false).await.body, lane.body);
    sc.shutdown();
}

#[tokio::test]
async fn compressed_conditional_and_client_cache_control_hits() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-forms");
    let sc = lane_sidecar(&up, &dir).await;
    let mut c = Conn::open(sc.proxy_addr).await;
    let path = "/app/cached/big?size=2000&etag=v1";
    c.send(get(path).as_bytes()).await;
    assert_eq!(c.response(false).await.status, 200);

    // The first gzip'd hit compresses (hyper's path); the next comes from the lane, the same.
    let gz = format!("GET {path} HTTP/1.1\r\nHost: lane.test\r\nAccept-Encoding: gzip\r\n\r\n");
    c.send(gz.as_bytes()).await;
    let first = c.response(false).await;
    c.send(gz.as_bytes()).await;
    let second = c.response(false).await;
    assert_eq!(first.header("content-encoding"), Some("gzip"));
    assert_eq!(second.header("content-encoding"), Some("gzip"));
    assert_eq!(first.body, second.body);
    assert_eq!(second.header("vary"), Some("accept-encoding"));

    // Conditional and Cache-Control requests take the full path, on the same connection.
    let etag = second.header("etag").unwrap().to_owned();
    c.send(
        format!(
            "GET {path} HTTP/1.1\r\nHost: lane.test\r\nAccept-Encoding: gzip\r\nIf-None-Match: {etag}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.response(false).await.status, 304);
    c.send(format!("GET {path} HTTP/1.1\r\nHost: lane.test\r\nCache-Control: no-cache\r\n\r\n").as_bytes())
        .await;
    let revalidated = c.response(false).await;
    assert_eq!(revalidated.status, 200);
    assert_eq!(up.hits("/app/cached/big"), 2, "no-cache went to the app; the rest were hits");
    sc.shutdown();
}

#[tokio::test]
async fn what_the_lane_cannot_frame_goes_to_hyper_for_good() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-leave");
    let sc = lane_sidecar(&up, &dir).await;

    // A chunked upload: hyper frames it, and answers the hit behind it too.
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(get(CACHED).as_bytes()).await;
    c.response(false).await;
    c.send(
        format!(
            "POST /count HTTP/1.1\r\nHost: lane.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n{}",
            get(CACHED)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.response(false).await.body, b"7");
    let hit = c.response(false).await;
    assert!(hit.header("cache-status").unwrap().contains("hit"));

    // Smuggling shapes are hyper's to judge, as without the lane: two lengths are refused;
    // a length with Transfer-Encoding is framed by the chunks, and the connection closes after
    // (RFC 9112 §6.3).
    let before = up.count();
    for bad in [
        "POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "GET /app/cached/a HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    ] {
        let mut c = Conn::open(sc.proxy_addr).await;
        c.send(bad.as_bytes()).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 400, "{bad:?}: {r:?}");
    }
    assert_eq!(up.count(), before);
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(format!("POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{}", get(CACHED)).as_bytes())
        .await;
    let r = c.response(false).await;
    assert_eq!((r.status, &r.body[..], r.header("connection")), (200, &b"0"[..], Some("close")));
    assert!(c.closed().await, "the request behind it is not read");

    // A head split over several writes is still read whole.
    let mut c = Conn::open(sc.proxy_addr).await;
    let req = get(CACHED);
    for part in [&req[..5], &req[5..20], &req[20..]] {
        c.send(part.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c.response(false).await.header("cache-status").unwrap().contains("hit"));

    // HTTP/2 with prior knowledge still works on a port with a cache.
    // (Its authority is another host than the requests above: a key of its own.)
    let h2 = h2_client();
    for expected in ["miss", "hit"] {
        let (status, headers, _) =
            super::support::get(&h2, format!("http://{}{CACHED}", sc.proxy_addr)).await;
        assert_eq!(status, 200);
        assert!(headers["cache-status"].to_str().unwrap().contains(expected), "{headers:?}");
    }
    sc.shutdown();
}

#[tokio::test]
async fn an_upload_answered_unread_ends_the_connection_cleanly() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-unread");
    let sc = lane_sidecar(&up, &dir).await;
    let mut c = Conn::open(sc.proxy_addr).await;
    // Over maxRequestBody: the sidecar answers 413 from the Content-Length, without reading.
    let body = vec![b'x'; 4096];
    let mut req = b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n".to_vec();
    req.extend_from_slice(&body);
    c.send(&req).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 413);
    // The body's bytes must never be read as a request: either the connection is closed, or
    // it carries on after the body.
    let _ = c.stream.write_all(get(CACHED).as_bytes()).await;
    let next = c.try_response(false).await;
    if let Some(next) = &next {
        assert_eq!(next.status, 200, "{next:?}");
        assert_eq!(next.json()["path"], "/app/cached/a");
    }
    assert_eq!(up.count(), u64::from(next.is_some()), "nothing of the body reached the app as a request");
    sc.shutdown();
}

#[tokio::test]
async fn lane_hits_are_counted_like_any_other() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-metrics");
    let sc = lane_sidecar(&up, &dir).await;
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(get(CACHED).as_bytes()).await;
    c.response(false).await;
    for _ in 0..5 {
        c.send(get(CACHED).as_bytes()).await;
        assert_eq!(c.response(false).await.status, 200);
    }
    // A rate-limited cached route is answered by the proxy (the limit applies), hits included.
    let limited = "/app/limited/x?cc=public%2Cmax-age%3D60";
    for _ in 0..3 {
        c.send(get(limited).as_bytes()).await;
        let r = c.response(false).await;
        assert!(r.header("ratelimit-policy").is_some() || r.header("ratelimit").is_some(), "{r:?}");
    }
    let metrics = reqwest_metrics(&sc).await;
    assert_eq!(
        metric(&metrics, r#"apipolicy_cache_lookups_total{result="hit",route="cached"}"#),
        Some(5.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, r#"apipolicy_requests_total{code="200",method="GET",route="cached"}"#),
        Some(6.0),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, r#"apipolicy_cache_lookups_total{result="hit",route="limited"}"#), Some(2.0));
    assert_eq!(up.hits("/app/cached/a"), 1);
    assert_eq!(up.hits("/app/limited/x"), 1);
    sc.shutdown();
}

async fn reqwest_metrics(sc: &Handle) -> String {
    let (_, _, body) = super::support::get(&client(), format!("http://{}/metrics", sc.admin_addr)).await;
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn idle_lane_connections_close_at_shutdown() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-shutdown");
    let sc = lane_sidecar(&up, &dir).await;
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(get(CACHED).as_bytes()).await;
    c.response(false).await;
    let started = std::time::Instant::now();
    sc.shutdown();
    assert!(c.closed().await, "the idle connection was closed");
    tokio::time::timeout(Duration::from_secs(5), sc.wait()).await.expect("the sidecar stopped");
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn a_big_answer_read_slowly_is_whole_before_the_next() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-slow-reader");
    let sc = lane_sidecar(&up, &dir).await;
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(get(CACHED).as_bytes()).await;
    let first = c.response(false).await;
    // 4 MB handed to hyper (more than the socket buffers hold), a hit pipelined behind it,
    // and a client that reads nothing for a while: hyper's answer must be out whole before
    // the lane writes the hit.
    c.send(format!("{}{}", get("/bytes?n=4000000"), get(CACHED)).as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let big = c.response(false).await;
    assert_eq!(big.status, 200);
    assert_eq!(big.body.len(), 4_000_000);
    let hit = c.response(false).await;
    assert!(hit.header("cache-status").unwrap().contains("hit"), "{hit:?}");
    assert_eq!(hit.body, first.body);
    sc.shutdown();
}

#[tokio::test]
async fn a_client_that_leaves_gives_its_slot_back() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-leaving");
    let routes = format!(
        "{ROUTES}  - name: gate\n    match: {{path: {{prefix: /slow}}}}\n    concurrencyLimit: {{maxInFlight: 1}}\n"
    );
    let sc = start(flags(dir.file("policy.yaml", &policy(&routes)), &up.url())).await.unwrap();
    // Make the lane's connection (a cache in the config), then a slow request handed over.
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(get(CACHED).as_bytes()).await;
    c.response(false).await;
    let reached = up.count() + 1;
    c.send(get("/slow?ms=5000").as_bytes()).await;
    eventually("the slow request at the app", Duration::from_secs(5), || async { up.count() >= reached })
        .await;
    drop(c);
    // The slot is free again long before the app would have answered.
    let started = std::time::Instant::now();
    loop {
        let mut d = Conn::open(sc.proxy_addr).await;
        d.send(get("/slow?ms=1").as_bytes()).await;
        let r = d.response(false).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the abandoned request still holds the only slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = reqwest_metrics(&sc).await;
    assert_eq!(metric(&metrics, "apipolicy_requests_in_flight"), Some(0.0), "{metrics}");
    assert_eq!(
        metric(&metrics, r#"apipolicy_requests_total{code="499",method="GET",route="gate"}"#),
        Some(1.0),
        "{metrics}"
    );
    sc.shutdown();
}

#[tokio::test]
async fn shutting_down_answers_what_was_asked_and_says_close() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-busy-shutdown");
    let sc = lane_sidecar(&up, &dir).await;
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(get(CACHED).as_bytes()).await;
    c.response(false).await;
    let reached = up.count() + 1;
    c.send(get("/slow?ms=400").as_bytes()).await;
    eventually("the slow request at the app", Duration::from_secs(5), || async { up.count() >= reached })
        .await;
    sc.shutdown();
    let r = c.response(false).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"slow done"[..]));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed().await);
}

#[tokio::test]
async fn a_head_sent_byte_by_byte_is_read() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-trickle");
    let sc = lane_sidecar(&up, &dir).await;
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(get(CACHED).as_bytes()).await;
    c.response(false).await;
    for b in get(CACHED).bytes() {
        c.send(&[b]).await;
        tokio::task::yield_now().await;
    }
    assert!(c.response(false).await.header("cache-status").unwrap().contains("hit"));
    // A bare-LF head (httparse and hyper accept it) ends where the lane looks for an end too.
    for b in b"GET /app/cached/a?cc=public%2Cmax-age%3D60 HTTP/1.1\nHost: lane.test\n\n" {
        c.send(&[*b]).await;
    }
    assert!(c.response(false).await.header("cache-status").unwrap().contains("hit"));
    sc.shutdown();
}

#[tokio::test]
async fn an_answer_that_leaves_the_upload_unread_is_flushed_whole_first() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-unflushed");
    let sc = lane_sidecar(&up, &dir).await;
    let big = "/app/cached/big?size=6000000&cc=public%2Cmax-age%3D60";
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(get(big).as_bytes()).await;
    let stored = c.response(false).await;
    assert_eq!(stored.status, 200);
    // A client with a small receive window that reads nothing for a while: a GET with a body
    // is handed to hyper and forwarded to the app, body and all (a GET body bypasses the
    // cache), and its 6 MB answer (more than loopback's socket buffers take) waits on the socket. The hit pipelined behind must come after
    // all of it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut c = Conn::over(socket.connect(sc.proxy_addr).await.unwrap());
    let mut req =
        format!("GET {big} HTTP/1.1\r\nHost: lane.test\r\nContent-Length: 12000\r\n\r\n").into_bytes();
    req.extend_from_slice(&[b'x'; 12000]);
    c.send(&req).await;
    c.send(get(CACHED).as_bytes()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let whole = c.response(false).await;
    assert_eq!(whole.status, 200);
    // The app's second answer: as long as the first, its count one more.
    assert_eq!(whole.body.len(), stored.body.len());
    let next = c.response(false).await;
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(next.json()["path"], "/app/cached/a");
    sc.shutdown();
}

#[tokio::test]
async fn oversized_and_crowded_heads_get_hypers_answers() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-big-heads");
    let sc = lane_sidecar(&up, &dir).await;
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(get(CACHED).as_bytes()).await;
    let stored = c.response(false).await;

    // 80 headers: more than the lane's 64 slots, fewer than hyper's 100: hyper answers it (a
    // hit, on the connection hyper now has for good).
    let mut crowded = format!("GET {CACHED} HTTP/1.1\r\nHost: lane.test\r\n");
    for i in 0..80 {
        crowded.push_str(&format!("X-Filler-{i}: {i}\r\n"));
    }
    crowded.push_str("\r\n");
    c.send(crowded.as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!((r.status, &r.body), (200, &stored.body));
    assert!(r.header("cache-status").unwrap().contains("hit"));

    // A head past the lane's 64 KiB, but within hyper's limits, is hyper's to read too.
    let mut c = Conn::open(sc.proxy_addr).await;
    let big = format!("GET {CACHED} HTTP/1.1\r\nHost: lane.test\r\nX-Big: {}\r\n\r\n", "b".repeat(70 * 1024));
    c.send(big.as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!((r.status, &r.body), (200, &stored.body));

    // One past hyper's limits is refused, and nothing reaches the app.
    let before = up.count();
    let mut c = Conn::open(sc.proxy_addr).await;
    let huge =
        format!("GET {CACHED} HTTP/1.1\r\nHost: lane.test\r\nX-Huge: {}\r\n\r\n", "h".repeat(1024 * 1024));
    let _ = c.stream.write_all(huge.as_bytes()).await;
    if let Some(r) = c.try_response(false).await {
        assert_eq!(r.status, 431, "{r:?}");
    }
    assert_eq!(up.count(), before);
    sc.shutdown();
}

#[tokio::test]
async fn with_the_lane_off_hyper_answers_the_same() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-off");
    let mut opts = flags(dir.file("policy.yaml", &policy(ROUTES)), &up.url());
    opts.hit_lane = false;
    let sc = start(opts).await.unwrap();
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(format!("{}{}", get(CACHED), get(CACHED)).as_bytes()).await;
    let miss = c.response(false).await;
    let hit = c.response(false).await;
    assert!(miss.header("cache-status").unwrap().contains("miss"));
    assert!(hit.header("cache-status").unwrap().starts_with("ApiPolicy; hit; ttl="));
    assert_eq!(hit.body, miss.body);
    assert_eq!(up.hits("/app/cached/a"), 1);
    sc.shutdown();
}

#[tokio::test]
async fn a_pod_limit_counts_lane_hits_once_and_refuses_like_hyper() {
    let up = Upstream::start().await;
    let dir = TempDir::new("lane-limit");
    let sc = lane_sidecar(&up, &dir).await;
    let tight = "/app/tight/x?cc=public%2Cmax-age%3D60";
    let mut c = Conn::open(sc.proxy_addr).await;
    let mut answers = Vec::new();
    for _ in 0..4 {
        c.send(get(tight).as_bytes()).await;
        answers.push(c.response(false).await);
    }
    let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200, 429], "{answers:?}");
    assert!(answers[1].header("cache-status").unwrap().contains("hit"));
    let remaining: Vec<Option<&str>> = answers.iter().map(|r| r.header("x-ratelimit-remaining")).collect();
    assert_eq!(remaining, [Some("2"), Some("1"), Some("0"), Some("0")]);
    let refused = &answers[3];
    assert_eq!(refused.header("content-type"), Some("application/problem+json"));
    assert!(refused.header("retry-after").is_some());
    assert_eq!(refused.json()["status"], 429);
    assert_eq!(refused.json()["requestId"], refused.header("x-request-id").unwrap());
    // The connection goes on after a refusal.
    c.send(get(CACHED).as_bytes()).await;
    assert_eq!(c.response(false).await.status, 200);
    assert_eq!(up.hits("/app/tight/x"), 1);

    // hyper's path (HTTP/1.0 leaves the lane) refuses alike, and writes the same headers.
    let mut h = Conn::open(sc.proxy_addr).await;
    h.send(format!("GET {tight} HTTP/1.0\r\nHost: lane.test\r\n\r\n").as_bytes()).await;
    let hyper = h.response(false).await;
    assert_eq!(hyper.status, 429);
    let names = |r: &Raw| {
        let mut v: Vec<String> =
            r.headers.iter().map(|(n, _)| n.to_ascii_lowercase()).filter(|n| n != "connection").collect();
        v.sort();
        v
    };
    assert_eq!(names(refused), names(&hyper), "lane {refused:?}\nhyper {hyper:?}");
    assert_eq!(refused.json()["type"], hyper.json()["type"]);

    // Each request was decided once: 3 allowed, 2 limited (the lane's and hyper's).
    let metrics = reqwest_metrics(&sc).await;
    let decisions = |d: &str| {
        metric(&metrics, &format!(r#"apipolicy_ratelimit_decisions_total{{decision="{d}",route="tight"}}"#))
    };
    assert_eq!((decisions("allowed"), decisions("limited")), (Some(3.0), Some(2.0)), "{metrics}");
    assert_eq!(metric(&metrics, r#"apipolicy_cache_lookups_total{result="hit",route="tight"}"#), Some(2.0));
    assert_eq!(
        metric(&metrics, r#"apipolicy_requests_total{code="429",method="GET",route="tight"}"#),
        Some(2.0)
    );
    sc.shutdown();
}

/// What a client can tell of an answer, less what differs from one sidecar to another
/// (request ids, dates, ages, TTL seconds).
fn seen(r: &Raw) -> String {
    let cache_status = r.header("cache-status").unwrap_or_default();
    let cache_status: String = cache_status.split(';').filter(|p| !p.trim().starts_with("ttl=")).collect();
    let body = if r.header("content-type").is_some_and(|t| t.contains("problem+json")) {
        r.json()["type"].to_string()
    } else {
        String::from_utf8_lossy(&r.body).into_owned()
    };
    format!("{} [{cache_status}] {:?} {body}", r.status, r.header("content-encoding"))
}

/// Sends `bytes` (a request and a plain one behind it) on a new connection and reads the
/// answers: both, or those before the connection closed.
async fn exchange(sc: &Handle, bytes: &[u8], head_first: bool) -> Vec<String> {
    let mut c = Conn::open(sc.proxy_addr).await;
    c.send(bytes).await;
    let mut out = Vec::new();
    for head in [head_first, false] {
        match c.try_response(head).await {
            Some(r) => out.push(seen(&r)),
            None => break,
        }
    }
    out
}

/// The lane and hyper's path agree: the same request heads and paths (framing headers, escaped
/// and dot segments, encoded slashes, queries, conditional and forwarding headers), each
/// followed by a plain request on the same connection, get the same answers from a sidecar
/// with the lane and one without, over real sockets. The answers include the app's echo of
/// what it was sent (method, path and body), so the two agree on framing, on the route
/// (limits, compression) and on the cache key (hits and misses). Bounded: 192 cases.
#[test]
fn the_lane_and_hypers_path_agree_on_framing_route_and_cache_key() {
    use proptest::{
        prelude::*,
        test_runner::{Config, TestRunner},
    };

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (up_a, up_b, dir) =
        rt.block_on(async { (Upstream::start().await, Upstream::start().await, TempDir::new("agree")) });
    let (lane, plain) = rt.block_on(async {
        let path = dir.file("policy.yaml", &policy(ROUTES));
        let lane = start(flags(path.clone(), &up_a.url())).await.unwrap();
        let mut o = flags(path, &up_b.url());
        o.hit_lane = false;
        (lane, start(o).await.unwrap())
    });

    let method = prop::sample::select(vec!["GET", "GET", "GET", "HEAD", "POST", "DELETE"]);
    let base =
        prop::sample::select(vec!["/app/cached", "/app/limited", "/app/tight", "/app/other", "/count"]);
    let piece = prop::sample::select(vec![
        "/a", "/b", "//", "/.", "/..", "/%2e%2e", "%2F", "%2f", "%5C", "/%61", "%20", ";p=1", "/A",
    ]);
    let query =
        prop::sample::select(vec!["", "?a=1", "?a=1&a=2", "?a=2&a=1", "?b=2&a=1", "?a=1&b=2", "?a=1&&b"]);
    let header = prop::sample::select(vec![
        "Accept-Encoding: gzip",
        "Cache-Control: no-cache",
        "If-None-Match: \"x\"",
        "X-Forwarded-Host: evil.example",
        "X-Forwarded-For: 6.6.6.6",
        "Range: bytes=0-1",
        "Connection: keep-alive",
        "X-Request-Id: fixed",
    ]);
    let framing = prop::sample::select(vec![
        "",
        "Content-Length: 0",
        "Content-Length: 3",
        "Content-Length: 003",
        "Transfer-Encoding: chunked",
    ]);
    let case = (
        (method, base, prop::collection::vec(piece, 0..4), query.clone()),
        (prop::collection::vec(header, 0..3), framing, query),
    );

    let mut runner = TestRunner::new(Config { cases: 192, failure_persistence: None, ..Config::default() });
    runner
        .run(&case, |((method, base, pieces, query), (headers, framing, next))| {
            let target = format!("{base}{}{query}", pieces.concat());
            let mut req = format!("{method} {target} HTTP/1.1\r\nHost: lane.test\r\n");
            for h in headers.iter().chain([&framing]).filter(|h| !h.is_empty()) {
                req.push_str(h);
                req.push_str("\r\n");
            }
            req.push_str("\r\n");
            req.push_str(match framing {
                "Content-Length: 3" | "Content-Length: 003" => "abc",
                "Transfer-Encoding: chunked" => "3\r\nabc\r\n0\r\n\r\n",
                _ => "",
            });
            // A plain request behind it, on a few URLs, so that entries are hit again and again.
            req.push_str(&format!("GET /app/cached{next} HTTP/1.1\r\nHost: lane.test\r\n\r\n"));
            let head = method == "HEAD";
            let (a, b) = rt.block_on(async {
                (exchange(&lane, req.as_bytes(), head).await, exchange(&plain, req.as_bytes(), head).await)
            });
            prop_assert_eq!(a, b, "{}", req);
            Ok(())
        })
        .unwrap();
}
