//! The sidecar over real sockets: a real upstream, the real sidecar, real clients.

mod agent;
mod attacks;
mod caching;
mod fast_path;
mod global;
mod limits;
mod resilience;
mod rfc9111;
mod slos;
mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn proxies_with_request_id_and_forwarded_headers() {
    let up = Upstream::start().await;
    let dir = TempDir::new("headers");
    let sc = sidecar(&dir, &up.url()).await;
    let c = client();
    let req = Request::get(format!("http://{}/headers?x=1", sc.proxy_addr))
        .header("connection", "keep-alive, x-client-hop")
        .header("x-client-hop", "drop me")
        .header("x-forwarded-for", "203.0.113.7")
        .body(empty())
        .unwrap();
    let (status, headers, body) = send(&c, req).await;
    assert_eq!(status, StatusCode::OK);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let h = &seen["headers"];
    let id = headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32, "a request id is made");
    assert_eq!(h["x-request-id"], id, "and sent to the app");
    // The peer is no trusted proxy: its own X-Forwarded-For is dropped, the sidecar's set.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["host"], sc.proxy_addr.to_string(), "the client's Host is kept");
    assert!(h.get("x-client-hop").is_none() && h.get("connection").is_none(), "hop-by-hop headers stop: {h}");
    assert_eq!(seen["uri"], "/headers?x=1");
    assert!(headers.get("x-hop").is_none(), "the app's hop-by-hop headers stop too");

    let req = Request::get(format!("http://{}/headers", sc.proxy_addr))
        .header("x-request-id", "client-chosen-42")
        .body(empty())
        .unwrap();
    let (_, headers, body) = send(&c, req).await;
    assert_eq!(headers["x-request-id"], "client-chosen-42");
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["headers"]["x-request-id"], "client-chosen-42");
}

#[tokio::test]
async fn chunked_bodies_stream_both_ways() {
    let up = Upstream::start().await;
    let dir = TempDir::new("chunked");
    let sc = sidecar(&dir, &up.url()).await;
    let c = client();
    let req = Request::put(format!("http://{}/echo", sc.proxy_addr)).body(generated(300_000)).unwrap();
    let (status, _, body) = send(&c, req).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 300_000));
    let (status, headers, body) = get(&c, format!("http://{}/bytes?n=250000", sc.proxy_addr)).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 250_000));
    assert_eq!(headers["transfer-encoding"], "chunked");
}

#[tokio::test]
async fn http2_clients_reach_an_http1_app() {
    let up = Upstream::start().await;
    let dir = TempDir::new("h2");
    let sc = sidecar(&dir, &up.url()).await;
    let (status, _, body) = get(&h2_client(), format!("http://{}/headers", sc.proxy_addr)).await;
    assert_eq!(status, StatusCode::OK);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["headers"]["host"], sc.proxy_addr.to_string(), ":authority becomes Host");
    let req = Request::post(format!("http://{}/echo", sc.proxy_addr)).body(generated(1_000_000)).unwrap();
    let (status, _, body) = send(&h2_client(), req).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 1_000_000));
}

#[tokio::test]
async fn upgrades_pass_through() {
    let up = Upstream::start().await;
    let dir = TempDir::new("upgrade");
    let sc = sidecar(&dir, &up.url()).await;
    let mut s = tokio::net::TcpStream::connect(sc.proxy_addr).await.unwrap();
    s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "the connection closed early: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    s.write_all(b"hello through the tunnel").await.unwrap();
    let mut buf = [0u8; 24];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"hello through the tunnel");
}

fn assert_problem(status: StatusCode, headers: &http::HeaderMap, body: &[u8], want: StatusCode, slug: &str) {
    assert_eq!(status, want, "{}", String::from_utf8_lossy(body));
    assert_eq!(headers["content-type"], "application/problem+json");
    let p: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(p["type"], format!("https://apipolicy.dev/problems/{slug}"));
    assert_eq!(p["status"], want.as_u16());
    assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(p["detail"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(p["requestId"], headers["x-request-id"].to_str().unwrap());
}

#[tokio::test]
async fn a_slow_upstream_gets_504_at_the_route_timeout() {
    let up = Upstream::start().await;
    let dir = TempDir::new("timeout");
    let sc = sidecar(&dir, &up.url()).await;
    let t = Instant::now();
    let (status, headers, body) = get(&client(), format!("http://{}/slow?ms=3000", sc.proxy_addr)).await;
    let took = t.elapsed();
    assert_problem(status, &headers, &body, StatusCode::GATEWAY_TIMEOUT, "upstream-timeout");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(1500), "{took:?}");
}

#[tokio::test]
async fn a_dead_upstream_gets_503_quickly_and_readyz_fails() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let dir = TempDir::new("dead");
    let sc = sidecar(&dir, &format!("http://{addr}")).await;
    let t = Instant::now();
    let (status, headers, body) = get(&client(), format!("http://{}/anything", sc.proxy_addr)).await;
    assert_problem(status, &headers, &body, StatusCode::SERVICE_UNAVAILABLE, "upstream-unavailable");
    assert!(t.elapsed() < Duration::from_secs(1));
    let (status, _, body) = get(&client(), format!("http://{}/readyz", sc.admin_addr)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let r: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(r["ready"], false);
    assert_eq!(r["checks"][0]["status"], "down");
    assert!(r["checks"][0]["lastError"].as_str().unwrap().contains(&addr.to_string()));
    let (status, _, _) = get(&client(), format!("http://{}/healthz", sc.admin_addr)).await;
    assert_eq!(status, StatusCode::OK, "a dead upstream must not get the sidecar restarted");
}

#[tokio::test]
async fn bodies_over_the_route_limit_get_413() {
    let up = Upstream::start().await;
    let dir = TempDir::new("limit");
    let sc = sidecar(&dir, &up.url()).await;
    let c = client();
    let url = format!("http://{}/count", sc.proxy_addr);
    let before = up.count();
    let (status, headers, body) = send(&c, Request::post(&url).body(full(vec![b'a'; 2048])).unwrap()).await;
    assert_problem(status, &headers, &body, StatusCode::PAYLOAD_TOO_LARGE, "body-too-large");
    assert_eq!(up.count(), before, "a declared oversize body never reaches the app");
    let (status, headers, body) = send(&c, Request::post(&url).body(generated(200_000)).unwrap()).await;
    assert_problem(status, &headers, &body, StatusCode::PAYLOAD_TOO_LARGE, "body-too-large");
    let (status, _, body) = send(&c, Request::post(&url).body(full(vec![b'a'; 1024])).unwrap()).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"1024"[..]));
    let (status, _, body) = send(&c, Request::get(&url).body(full(vec![b'a'; 4096])).unwrap()).await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::OK, &b"4096"[..]),
        "the limit is the route's: GET is another route"
    );
}

async fn config_revision(admin: std::net::SocketAddr) -> String {
    let (_, _, body) = get(&client(), format!("http://{admin}/config")).await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["revision"].as_str().unwrap().to_owned()
}

async fn metrics(admin: std::net::SocketAddr) -> String {
    let (status, _, body) = get(&client(), format!("http://{admin}/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_fails_no_request() {
    let up = Upstream::start().await;
    let dir = TempDir::new("reload");
    let sc = sidecar(&dir, &up.url()).await;
    let first = config_revision(sc.admin_addr).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (stop, url, c) = (stop.clone(), format!("http://{}/echo", sc.proxy_addr), client());
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let resp = c.request(Request::post(&url).body(full("ping")).unwrap()).await;
                match resp {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let body = r.into_body().collect().await.unwrap().to_bytes();
                        assert_eq!(&body[..], b"ping");
                        ok += 1;
                    }
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    let path = dir.0.join("policy.yaml");
    for i in 0..10 {
        let routes = format!(
            "{ROUTES}  - name: extra-{i}\n    match: {{path: {{prefix: /extra}}}}\n    timeout: {}s\n",
            i + 1
        );
        write_atomic(&path, &policy(&routes));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for task in load {
        let (ok, failed) = task.await.unwrap();
        assert!(failed.is_empty(), "requests failed during reloads: {failed:?}");
        total += ok;
    }
    assert!(total > 200, "too little load to prove anything: {total}");
    let last = config_revision(sc.admin_addr).await;
    assert_ne!(first, last);
    let text = metrics(sc.admin_addr).await;
    assert_eq!(metric(&text, &format!("apipolicy_config_revision_info{{revision=\"{last}\"}}")), Some(1.0));
    assert_eq!(metric(&text, &format!("apipolicy_config_revision_info{{revision=\"{first}\"}}")), None);
    assert_eq!(metric(&text, "apipolicy_config_reload_errors_total"), Some(0.0));
}

#[tokio::test]
async fn a_bad_config_file_is_kept_out() {
    let up = Upstream::start().await;
    let dir = TempDir::new("badconfig");
    let sc = sidecar(&dir, &up.url()).await;
    let good = config_revision(sc.admin_addr).await;
    let path = dir.0.join("policy.yaml");
    write_atomic(&path, &policy(ROUTES).replace("timeout: 300ms", "timeout: soon"));
    let deadline = Instant::now() + Duration::from_secs(3);
    while metric(&metrics(sc.admin_addr).await, "apipolicy_config_reload_errors_total") != Some(1.0) {
        assert!(Instant::now() < deadline, "the bad file was not noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(config_revision(sc.admin_addr).await, good, "the last good config stays");
    let (status, _, _) = get(&client(), format!("http://{}/slow?ms=1000", sc.proxy_addr)).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "and is enforced");
    write_atomic(&path, "not: [valid yaml");
    write_atomic(&path, &policy(ROUTES).replace("timeout: 300ms", "timeout: 2s"));
    let deadline = Instant::now() + Duration::from_secs(3);
    while config_revision(sc.admin_addr).await == good {
        assert!(Instant::now() < deadline, "the good file was not taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, _) = get(&client(), format!("http://{}/slow?ms=1000", sc.proxy_addr)).await;
    assert_eq!(status, StatusCode::OK, "the new timeout applies");
}

#[tokio::test]
async fn metrics_count_requests_per_route() {
    let up = Upstream::start().await;
    let dir = TempDir::new("metrics");
    let sc = sidecar(&dir, &up.url()).await;
    let c = client();
    for _ in 0..3 {
        get(&c, format!("http://{}/echo", sc.proxy_addr)).await;
    }
    get(&c, format!("http://{}/status?code=404", sc.proxy_addr)).await;
    get(&c, format!("http://{}/slow?ms=2000", sc.proxy_addr)).await;
    // The count lands when the response body ends, just after the client has read it.
    let last = r#"apipolicy_requests_total{code="504",method="GET",route="slow"}"#;
    eventually("the last request counted", Duration::from_secs(5), || async {
        metric(&metrics(sc.admin_addr).await, last).is_some()
    })
    .await;
    let text = metrics(sc.admin_addr).await;
    for (series, want) in [
        (r#"apipolicy_requests_total{code="200",method="GET",route="echo"}"#, 3.0),
        (r#"apipolicy_requests_total{code="404",method="GET",route="default"}"#, 1.0),
        (r#"apipolicy_requests_total{code="504",method="GET",route="slow"}"#, 1.0),
        (r#"apipolicy_request_duration_seconds_count{route="echo"}"#, 3.0),
        (r#"apipolicy_upstream_duration_seconds_count{route="echo"}"#, 3.0),
        (r#"apipolicy_upstream_duration_seconds_count{route="slow"}"#, 0.0),
    ] {
        assert_eq!(metric(&text, series).unwrap_or(0.0), want, "{series}\n{text}");
    }
    promtool_check(&text);
}

/// `promtool check metrics` on a live scrape. CI installs Prometheus; elsewhere the check is
/// skipped with a message when promtool is missing.
fn promtool_check(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(std::env::var_os("CI").is_none(), "promtool is missing in CI");
        eprintln!("SKIPPED promtool check metrics: promtool is not installed (apt-get install prometheus)");
        return;
    };
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}");
}

#[tokio::test]
async fn admin_endpoints() {
    let up = Upstream::start().await;
    let dir = TempDir::new("admin");
    let sc = sidecar(&dir, &up.url()).await;
    let c = client();
    let (status, _, body) = get(&c, format!("http://{}/readyz", sc.admin_addr)).await;
    assert_eq!(status, StatusCode::OK);
    let r: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((r["ready"].as_bool(), r["checks"][0]["status"].as_str()), (Some(true), Some("up")));
    let (_, _, body) = get(&c, format!("http://{}/config", sc.admin_addr)).await;
    let cfg: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(cfg["config"]["spec"]["routes"][0]["name"], "slow");
    assert_eq!(cfg["revision"], cfg["config"]["revision"]);
    let (status, _, _) = get(&c, format!("http://{}/nope", sc.admin_addr)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// The real binary, for what only a process shows: memory and signals.
struct Process {
    child: Child,
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Process {
    fn start(policy: &std::path::Path, upstream: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_apipolicy-sidecar"))
            .args(["--policy", policy.to_str().unwrap(), "--upstream", upstream])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--threads",
                "2",
                "--access-log",
                "false",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let listening = loop {
            let line = lines.next().expect("the sidecar exited before listening").unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["message"] == "listening" {
                break v;
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            proxy: listening["proxy"].as_str().unwrap().parse().unwrap(),
            admin: listening["admin"].as_str().unwrap().parse().unwrap(),
        }
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.trim().strip_suffix(" kB")?.trim().parse().ok())
            .unwrap()
    }

    fn signal(&self, name: &str) {
        assert!(
            Command::new("kill").args(["-s", name, &self.child.id().to_string()]).status().unwrap().success()
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_100_mib_both_ways_without_buffering() {
    const SIZE: u64 = 100 << 20;
    let up = Upstream::start().await;
    let dir = TempDir::new("stream");
    let policy = dir.file("policy.yaml", &policy(ROUTES));
    let p = Process::start(&policy, &up.url(), &[]);
    let req = Request::put(format!("http://{}/echo", p.proxy)).body(generated(SIZE)).unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        n += frame.unwrap().into_data().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(n, SIZE);
    let download = get(&client(), format!("http://{}/bytes?n={SIZE}", p.proxy)).await;
    assert_eq!(download.2.len() as u64, SIZE);
    let peak = p.status_kib("VmHWM:");
    assert!(
        peak < 48 * 1024,
        "the sidecar's peak RSS was {peak} KiB for 100 MiB each way: something buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight() {
    let up = Upstream::start().await;
    let dir = TempDir::new("drain");
    // No route for /slow here: it falls to the default route and its 30s timeout.
    let policy = dir.file("policy.yaml", &policy("  - name: echo\n    match: {path: {exact: /echo}}\n"));
    let mut p = Process::start(&policy, &up.url(), &["--drain-delay", "400ms"]);
    let c = client();
    let mut in_flight = Vec::new();
    for _ in 0..20 {
        let (c, url) = (c.clone(), format!("http://{}/slow?ms=900", p.proxy));
        in_flight.push(tokio::spawn(async move { get(&c, url).await }));
    }
    eventually("20 requests at the app", Duration::from_secs(5), || async { up.count() >= 20 }).await;
    let t = Instant::now();
    p.signal("TERM");
    eventually("readyz fails first", Duration::from_millis(300), || async {
        get(&client(), format!("http://{}/readyz", p.admin)).await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let (status, _, _) = get(&client(), format!("http://{}/echo", p.proxy)).await;
    assert_eq!(status, StatusCode::OK, "new requests are still served during the drain delay");
    for r in in_flight {
        let (status, _, body) = r.await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"slow done"[..]));
    }
    let exit = tokio::task::spawn_blocking(move || {
        let status = p.child.wait().unwrap();
        (status, p)
    })
    .await
    .unwrap();
    assert!(exit.0.success(), "exit status {:?}", exit.0);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(std::net::TcpStream::connect(exit.1.proxy).is_err(), "the listener is closed");
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once_and_counted() {
    let up = Upstream::start().await;
    let dir = TempDir::new("cap");
    let mut o = flags(dir.file("policy.yaml", &policy(ROUTES)), &up.url());
    o.max_connections = 2;
    let sc = apipolicy_sidecar::server::start(o).await.unwrap();
    let held: Vec<_> =
        futures::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(sc.proxy_addr)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let open = || async { metric(&metrics(sc.admin_addr).await, "apipolicy_connections_open") };
    eventually("both held connections taken", Duration::from_secs(5), || async { open().await == Some(2.0) })
        .await;
    let mut extra = tokio::net::TcpStream::connect(sc.proxy_addr).await.unwrap();
    let _ = extra.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let read =
        tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await.expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "the third connection is closed unanswered: {read:?}");
    assert_eq!(metric(&metrics(sc.admin_addr).await, "apipolicy_connections_refused_total"), Some(1.0));
    drop(held);
    eventually("the held connections closed", Duration::from_secs(5), || async { open().await == Some(0.0) })
        .await;
    let (status, _, _) = get(&client(), format!("http://{}/echo", sc.proxy_addr)).await;
    assert_eq!(status, StatusCode::OK, "room again once connections close");
}

#[tokio::test]
async fn bodies_that_stall_past_the_stream_idle_timeout_are_ended() {
    let up = Upstream::start().await;
    let dir = TempDir::new("stall");
    let routes = "  - name: stalls
    match: {path: {prefix: /stall}}
    streamIdleTimeout: 300ms
  - name: uploads
    match: {path: {prefix: /count}}
    streamIdleTimeout: 300ms
";
    let sc = apipolicy_sidecar::server::start(flags(dir.file("policy.yaml", &policy(routes)), &up.url()))
        .await
        .unwrap();
    let c = client();
    // A pause shorter than the timeout is fine.
    let (status, _, body) = get(&c, format!("http://{}/stall?ms=100", sc.proxy_addr)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"firstrest"[..]));
    // A longer one ends the body: the client gets the head and the first bytes, then an error.
    let started = Instant::now();
    let resp = c
        .request(Request::get(format!("http://{}/stall?ms=5000", sc.proxy_addr)).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.into_body().collect().await.is_err(), "the stalled body is cut");
    assert!(started.elapsed() < Duration::from_secs(3), "cut near the timeout: {:?}", started.elapsed());

    // An upload that stalls: 408, problem+json, before the app's route timeout.
    let mut s = tokio::net::TcpStream::connect(sc.proxy_addr).await.unwrap();
    s.write_all(b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request-body-timeout"), "{text}");
}

/// `requestHeaders`: removed, then set, on what the app gets; a route's own rules replace the
/// defaults' whole; a cache fill carries them too, and the cache key is the client's request.
#[tokio::test]
async fn request_header_rules_reach_the_app() {
    let up = Upstream::start().await;
    let dir = TempDir::new("header-rules");
    let text = "apiVersion: apipolicy.dev/v1alpha1
kind: ApiPolicy
metadata: {name: test, namespace: default}
spec:
  selector: {matchLabels: {app: test}}
  upstream: {port: 8080}
  defaults:
    requestHeaders: {set: {x-from-defaults: 'yes'}}
  routes:
  - name: ruled
    match: {path: {exact: /headers}, methods: [GET]}
    cache: {maxAge: 60s}
    requestHeaders:
      set: {X-Tenant: acme, x-api-version: '2'}
      remove: [X-Debug]
  - name: posts
    match: {path: {exact: /headers}, methods: [POST]}
";
    let sc = apipolicy_sidecar::server::start(flags(dir.file("policy.yaml", text), &up.url())).await.unwrap();
    let c = client();
    let get = || {
        Request::get(format!("http://{}/headers", sc.proxy_addr))
            .header("x-debug", "1")
            .header("x-tenant", "someone-else")
            .body(empty())
            .unwrap()
    };
    let (status, headers, body) = send(&c, get()).await;
    assert_eq!(status, StatusCode::OK);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let h = &seen["headers"];
    assert_eq!(h["x-tenant"], "acme", "set replaces the client's value: {h}");
    assert_eq!(h["x-api-version"], "2");
    assert!(h.get("x-debug").is_none(), "removed: {h}");
    assert!(h.get("x-from-defaults").is_none(), "the route's rules replace the defaults' whole: {h}");
    assert!(headers["cache-status"].to_str().unwrap().contains("stored"), "{headers:?}");
    // The fill carried the rules; the same client request is now a hit.
    let before = up.count();
    let (_, headers, again) = send(&c, get()).await;
    assert_eq!(up.count(), before, "served from the cache");
    assert_eq!(again, body);
    assert!(headers["cache-status"].to_str().unwrap().starts_with("ApiPolicy; hit"), "{headers:?}");

    let req = Request::post(format!("http://{}/headers", sc.proxy_addr))
        .header("x-debug", "1")
        .body(empty())
        .unwrap();
    let (_, _, body) = send(&c, req).await;
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["headers"]["x-from-defaults"], "yes", "a route without rules takes the defaults'");
    assert_eq!(seen["headers"]["x-debug"], "1");
}

/// A mistake at start is one clean line on stderr and a failing exit, whatever RUST_BACKTRACE
/// says: no repeated cause, no backtrace; a bad `--upstream` port is refused at start.
#[test]
fn startup_mistakes_are_one_clean_line() {
    let dir = TempDir::new("startup-errors");
    let policy = dir.file("policy.yaml", &policy(ROUTES));
    let missing = dir.0.join("missing.yaml");
    let cases: [(&[&str], &str); 4] = [
        (&["--policy", missing.to_str().unwrap()], "cannot read the policy file"),
        (&["--policy", policy.to_str().unwrap(), "--upstream", "http://127.0.0.1:abc"], "has no valid port"),
        (
            &["--policy", policy.to_str().unwrap(), "--upstream", "http://127.0.0.1:99999"],
            "has no valid port",
        ),
        (
            &["--policy", policy.to_str().unwrap(), "--upstream", "https://127.0.0.1:8443"],
            "must be an http:// URL",
        ),
    ];
    for (args, says) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_apipolicy-sidecar"))
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--log", "off"])
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line, got:\n{stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(says), "{args:?}: {stderr}");
        if args[1].ends_with("missing.yaml") {
            assert_eq!(stderr.matches("No such file or directory").count(), 1, "the cause once: {stderr}");
        }
    }
    // A policy's problem says where it is, as `check` does.
    let text = crate::support::policy(ROUTES).replace("timeout: 300ms", "timeout: soon");
    let line = text.lines().position(|l| l.contains("timeout: soon")).unwrap() + 1;
    let column = text.lines().nth(line - 1).unwrap().find("timeout").unwrap() + 1;
    let bad = dir.file("bad.yaml", &text);
    let out = Command::new(env!("CARGO_BIN_EXE_apipolicy-sidecar"))
        .args([
            "--policy",
            bad.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--log",
            "off",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("line {line}, column {column}: test: spec.routes[0].timeout:")),
        "{stderr}"
    );
}

/// `demo` runs a working copy of the quickstart (never the tracked example), its printed
/// conditional request answers 304, and the copy goes when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_a_copy_and_leaves_nothing_behind() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_apipolicy-sidecar"))
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--log", "off"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut banner = String::new();
    while !banner.contains("Ctrl-C stops it") {
        banner.push_str(&lines.next().expect("the demo exited before its banner").unwrap());
        banner.push('\n');
    }
    let policy = banner.split(" runs ").nth(1).unwrap().split(' ').next().unwrap().to_owned();
    assert!(
        !policy.contains("examples/quickstart.yaml"),
        "the tracked example is never the one edited: {banner}"
    );
    assert!(std::path::Path::new(&policy).exists(), "{policy}");
    let proxy = banner.split("http://").nth(1).unwrap().split(' ').next().unwrap().to_owned();
    // The banner's If-None-Match line, done by hand.
    let c = client();
    let (status, headers, _) = get(&c, format!("http://{proxy}/api/products")).await;
    assert_eq!(status, StatusCode::OK);
    let etag = headers["etag"].clone();
    let req = Request::get(format!("http://{proxy}/api/products"))
        .header("if-none-match", etag)
        .body(empty())
        .unwrap();
    assert_eq!(send(&c, req).await.0, StatusCode::NOT_MODIFIED);
    assert!(banner.contains("-w '%{http_code}\\n' -H \"If-None-Match: $etag\""), "{banner}");

    assert!(Command::new("kill").args(["-s", "TERM", &child.id().to_string()]).status().unwrap().success());
    assert!(child.wait().unwrap().success());
    assert!(!std::path::Path::new(&policy).exists(), "the working copy is removed: {policy}");
}

/// The sidecar's log lines: the schema the operator shares (message and fields at the top
/// level), with real JSON values: a check's status and error as text (no `None`), a purge's
/// keys as text (not a debug-printed array).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_logs_in_the_shared_schema() {
    let up = Upstream::start().await;
    let dir = TempDir::new("log-schema");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let text = format!(
        "{}  healthChecks:\n    dependencies:\n    - name: db\n      tcp: {{address: \"{closed}\"}}\n      interval: 2s\n",
        policy(ROUTES)
    );
    let file = dir.file("policy.yaml", &text);
    // Killed when the test ends, failing or not (a live child would hold the test's output open).
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_apipolicy-sidecar"))
            .args(["--policy", file.to_str().unwrap(), "--upstream", &up.url()])
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--access-log", "false"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap());
        }
    });
    let mut seen = Vec::new();
    let next = |seen: &mut Vec<String>, what: &str| -> serde_json::Value {
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no {what} line: {seen:#?}"));
            seen.push(line.clone());
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["message"] == what {
                return v;
            }
        }
    };
    let listening = next(&mut seen, "listening");
    let admin = listening["admin"].as_str().unwrap().to_owned();
    let check = next(&mut seen, "health check changed");
    assert_eq!(check["status"], "down", "{check}");
    assert!(check["error"].as_str().unwrap().contains(&closed.to_string()), "{check}");
    let req = Request::post(format!("http://{admin}/purge"))
        .body(full(r#"{"keys": ["products", "users"]}"#))
        .unwrap();
    assert_eq!(send(&client(), req).await.0, StatusCode::OK);
    let purged = next(&mut seen, "cache purged");
    assert_eq!(purged["keys"], "products, users", "{purged}");
    drop(child);
    for line in &seen {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let object = v.as_object().unwrap();
        for key in ["timestamp", "level", "message", "target"] {
            assert!(object.get(key).is_some_and(serde_json::Value::is_string), "no string {key}: {line}");
        }
        assert!(!object.contains_key("fields"), "fields are nested: {line}");
        for (key, value) in object {
            if let Some(text) = value.as_str() {
                assert!(
                    text != "None" && !text.starts_with("Some(") && !text.starts_with("[\""),
                    "{key}: {line}"
                );
            }
        }
    }
}
