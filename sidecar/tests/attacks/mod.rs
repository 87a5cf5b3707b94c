//! Attacks over real sockets (issue 14): upstream desync by a GET or HEAD with a body, routes
//! dodged by encoded slashes and other spellings of a path, cache poisoning through forwarding
//! headers, malformed client bodies blamed on the app, reordered repeated query parameters, an
//! open admin that leaks secrets, and an ambiguous rate-limit key.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use apipolicy_sidecar::server::{Handle, start};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::support::*;

/// How long any one answer may take: these tests must never wait for a route timeout.
const PROMPT: Duration = Duration::from_secs(2);

/// `policy(routes)` with `spec` fields (YAML at two spaces) put before `routes`.
fn policy_with(spec: &str, routes: &str) -> String {
    policy(routes).replace("  routes:\n", &format!("{spec}  routes:\n"))
}

fn problem_type(body: &[u8]) -> String {
    let p: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    p["type"].as_str().unwrap_or_default().to_owned()
}

fn assert_problem(status: StatusCode, headers: &HeaderMap, body: &[u8], want: StatusCode, slug: &str) {
    assert_eq!(status, want, "{}", String::from_utf8_lossy(body));
    assert_eq!(headers.get("content-type").map(|v| v.to_str().unwrap()), Some("application/problem+json"));
    let ty = problem_type(body);
    assert!(ty.ends_with(&format!("/{slug}")), "problem type {ty:?}, want …/{slug}");
}

fn cache_status(h: &HeaderMap) -> String {
    h.get("cache-status").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

async fn get_with(
    c: &HttpClient,
    url: String,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, bytes::Bytes) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    tokio::time::timeout(PROMPT, send(c, req.body(empty()).unwrap())).await.expect("answered promptly")
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

// ---------------------------------------------------------------------------------------------
// A recording app: every request it got (method, target, headers, body), read whole before
// it answers; it answers with JSON telling what it saw.

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
    body: Result<Vec<u8>, String>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let log = log.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body =
                            body.collect().await.map(|b| b.to_bytes().to_vec()).map_err(|e| e.to_string());
                        let headers: Vec<(String, String)> = parts
                            .headers
                            .iter()
                            .map(|(k, v)| {
                                (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned())
                            })
                            .collect();
                        let mut map = serde_json::Map::new();
                        for (k, v) in &headers {
                            match map.get_mut(k) {
                                Some(serde_json::Value::String(prior)) => *prior = format!("{prior}, {v}"),
                                _ => {
                                    map.insert(k.clone(), v.clone().into());
                                }
                            }
                        }
                        let seen = Seen {
                            method: parts.method.to_string(),
                            uri: parts.uri.to_string(),
                            headers,
                            body: body.clone(),
                        };
                        let n = {
                            let mut log = log.lock().unwrap();
                            log.push(seen);
                            log.iter().filter(|s| s.uri.split('?').next() == Some(parts.uri.path())).count()
                        };
                        let out = serde_json::json!({
                            "n": n,
                            "method": parts.method.as_str(),
                            "uri": parts.uri.to_string(),
                            "path": parts.uri.path(),
                            "query": parts.uri.query(),
                            "headers": map,
                            "body": body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default(),
                        });
                        let mut resp = Response::new(full(out.to_string()));
                        resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
                        if body.is_err() {
                            *resp.status_mut() = StatusCode::BAD_REQUEST;
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

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn sidecar_for(dir: &TempDir, policy_text: &str, upstream: &str) -> Handle {
    let path = dir.file("policy.yaml", policy_text);
    start(flags(path, upstream)).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// A lenient app as Go's and Node's servers are: it answers as soon as it has a request head,
// before it reads the body, then reads and discards the declared Content-Length and parses the
// next head from what follows, on the same connection.

#[derive(Clone, Debug)]
struct Head {
    line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Whether the declared body has been read (and what follows it can be a request).
    complete: bool,
    connection: usize,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

struct Lenient {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<Head>>>,
}

impl Lenient {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let log = heads.clone();
        tokio::spawn(async move {
            for connection in 0.. {
                let Ok((stream, _)) = listener.accept().await else { return };
                tokio::spawn(Self::serve(stream, log.clone(), connection));
            }
        });
        Self { addr, heads }
    }

    async fn serve(mut s: TcpStream, log: Arc<Mutex<Vec<Head>>>, connection: usize) {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i;
                }
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let mut lines = head.split("\r\n");
            let line = lines.next().unwrap_or_default().to_owned();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let len: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let index = {
                let mut log = log.lock().unwrap();
                log.push(Head {
                    line: line.clone(),
                    headers,
                    body: Vec::new(),
                    complete: len == 0,
                    connection,
                });
                log.len() - 1
            };
            // At once, before the body.
            let answer: &[u8] = if line.starts_with("HEAD ") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: max-age=60\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: max-age=60\r\n\r\nok"
            };
            if s.write_all(answer).await.is_err() {
                return;
            }
            // Then the declared body, discarded, whatever bytes it is made of.
            while buf.len() < len {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body: Vec<u8> = buf.drain(..len).collect();
            let mut log = log.lock().unwrap();
            log[index].body = body;
            log[index].complete = true;
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<Head> {
        self.heads.lock().unwrap().clone()
    }

    /// The heads once there are at least `n`, all with their bodies read (or, past the
    /// deadline, as they are).
    async fn settled(&self, n: usize) -> Vec<Head> {
        let deadline = Instant::now() + PROMPT;
        loop {
            let heads = self.heads();
            if (heads.len() >= n && heads.iter().all(|h| h.complete)) || Instant::now() > deadline {
                return heads;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn lines(&self) -> Vec<String> {
        self.heads().into_iter().map(|h| h.line).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// 1. A GET or HEAD with a body on a cached route.

const CACHED: &str = "  - name: cached
    match: {path: {prefix: /cached}}
    cache: {mode: Override, maxAge: 60s}
";

#[tokio::test]
async fn get_and_head_with_a_body_on_a_cached_route_are_forwarded_framed_and_never_desync_the_upstream() {
    let up = Lenient::start().await;
    let dir = TempDir::new("attack-desync");
    let sc = sidecar_for(&dir, &policy(CACHED), &up.url()).await;
    let mut c = Conn::open(sc.proxy_addr).await.within(PROMPT);
    let started = Instant::now();

    c.send(b"GET /cached HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789").await;
    let first = c.response(false).await;
    c.send(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let second = c.response(false).await;
    assert_eq!((first.status, first.body.as_slice()), (200, &b"ok"[..]), "{first:?}");
    assert_eq!((second.status, second.body.as_slice()), (200, &b"ok"[..]), "{second:?}");
    assert!(!cache_status_raw(&first).contains("hit"), "{first:?}");

    c.send(b"HEAD /cached HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabcdefghij").await;
    let head = c.response(true).await;
    c.send(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let after_head = c.response(false).await;
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!((after_head.status, after_head.body.as_slice()), (200, &b"ok"[..]), "{after_head:?}");
    assert!(started.elapsed() < PROMPT, "answered promptly: {:?}", started.elapsed());

    let heads = up.settled(4).await;
    let lines: Vec<&str> = heads.iter().map(|h| h.line.as_str()).collect();
    assert_eq!(
        lines,
        ["GET /cached HTTP/1.1", "GET /other HTTP/1.1", "HEAD /cached HTTP/1.1", "GET /other HTTP/1.1"],
        "the app got exactly the requests sent, none garbled (on upstream connections {:?})",
        heads.iter().map(|h| h.connection).collect::<Vec<_>>()
    );
    for (h, body) in [(&heads[0], &b"0123456789"[..]), (&heads[2], &b"abcdefghij"[..])] {
        assert_eq!(h.header("content-length"), Some("10"), "{h:?}");
        assert_eq!(h.header("transfer-encoding"), None, "{h:?}");
        assert!(h.complete, "the declared body was sent: {h:?}");
        assert_eq!(h.body, body, "{h:?}");
    }
    for h in [&heads[1], &heads[3]] {
        assert!(h.header("content-length").is_none_or(|v| v == "0"), "{h:?}");
    }

    // Nothing was stored from the requests with a body: a plain GET goes to the app.
    c.send(b"GET /cached HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let plain = c.response(false).await;
    assert_eq!(plain.status, 200);
    assert!(!cache_status_raw(&plain).contains("hit"), "{plain:?}");
    assert_eq!(up.settled(5).await.len(), 5);
    assert_eq!(up.lines()[4], "GET /cached HTTP/1.1");
    sc.shutdown();
}

fn cache_status_raw(r: &Raw) -> String {
    r.header("cache-status").unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_request_hidden_in_a_get_body_never_reaches_the_app_as_a_request() {
    let up = Lenient::start().await;
    let dir = TempDir::new("attack-smuggle");
    let sc = sidecar_for(&dir, &policy(CACHED), &up.url()).await;
    let mut c = Conn::open(sc.proxy_addr).await.within(PROMPT);
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let started = Instant::now();
    c.send(
        format!("GET /cached/s HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len())
            .as_bytes(),
    )
    .await;
    let first = c.response(false).await;
    c.send(b"GET /other HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n")
        .await;
    let second = c.response(false).await;
    c.send(b"GET /other2 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let third = c.response(false).await;
    assert!(started.elapsed() < PROMPT, "answered promptly: {:?}", started.elapsed());
    for r in [&first, &second, &third] {
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]), "{r:?}");
    }
    assert_eq!(c.buf, b"", "no extra response came back");

    let heads = up.settled(3).await;
    let lines: Vec<&str> = heads.iter().map(|h| h.line.as_str()).collect();
    assert_eq!(
        lines,
        ["GET /cached/s HTTP/1.1", "GET /other HTTP/1.1", "GET /other2 HTTP/1.1"],
        "on upstream connections {:?}",
        heads.iter().map(|h| h.connection).collect::<Vec<_>>()
    );
    assert!(!lines.iter().any(|l| l.contains("smuggled")), "{lines:?}");
    assert_eq!(heads[0].header("content-length"), Some(smuggled.len().to_string().as_str()));
    assert_eq!(heads[0].body, smuggled.as_bytes(), "the body went to the app as a body");
    // Nothing more came, even later.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(up.heads().len(), 3, "{:?}", up.lines());
    sc.shutdown();
}

#[tokio::test]
async fn a_get_with_a_body_reaches_an_app_that_reads_it_without_a_hang() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-get-body");
    let sc = sidecar_for(&dir, &policy(CACHED), &up.url()).await;
    let mut c = Conn::open(sc.proxy_addr).await.within(PROMPT);
    for round in 0..2 {
        c.send(b"GET /cached/r HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789").await;
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(!cache_status_raw(&r).contains("hit"), "{r:?}");
        let seen = json(&r.body);
        assert_eq!(seen["body"], "0123456789");
        assert_eq!(seen["n"], round + 1, "each went to the app");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].header("content-length"), Some("10"));
    assert_eq!(seen[0].body.as_deref(), Ok(&b"0123456789"[..]));
    sc.shutdown();
}

// ---------------------------------------------------------------------------------------------
// 2. Paths: escaped slashes, dot segments, repeated slashes, NUL, case and trailing slash.

const LOGIN: &str = "  - name: login
    match: {path: {exact: /api/login}}
    rateLimit: {requests: 1, per: 1m, burst: 1}
  - name: v2-login
    match: {path: {exact: /v2/login, ignoreCase: true, ignoreTrailingSlash: true}}
    rateLimit: {requests: 1, per: 1m, burst: 1}
";

async fn status_of(c: &HttpClient, sc: &Handle, path: &str) -> (StatusCode, HeaderMap, bytes::Bytes) {
    get_with(c, format!("http://{}{path}", sc.proxy_addr), &[]).await
}

#[tokio::test]
async fn escaped_slashes_and_nul_are_refused_by_default_and_never_reach_the_app() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-slash-reject");
    let sc = sidecar_for(&dir, &policy(LOGIN), &up.url()).await;
    let c = client();
    for path in
        ["/api%2Flogin", "/api%2flogin", "/%2Fapi%2Flogin", "/api%5Clogin", "/api%5clogin", "/api/login%00"]
    {
        let (status, h, body) = status_of(&c, &sc, path).await;
        assert_problem(status, &h, &body, StatusCode::BAD_REQUEST, "invalid-path");
    }
    assert_eq!(up.count(), 0, "none reached the app: {:?}", up.seen());
    // They did not use the route's one request either.
    assert_eq!(status_of(&c, &sc, "/api/login").await.0, StatusCode::OK);
    assert_eq!(status_of(&c, &sc, "/api/login").await.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(up.count(), 1);
    sc.shutdown();
}

#[tokio::test]
async fn decoded_escaped_slashes_are_forwarded_decoded_and_counted_on_their_route() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-slash-decode");
    let text = policy_with("  pathNormalization: {escapedSlashes: DecodeAndForward}\n", LOGIN);
    let sc = sidecar_for(&dir, &text, &up.url()).await;
    let c = client();
    let (status, _, body) = status_of(&c, &sc, "/api%2Flogin").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["uri"], "/api/login", "the app gets the path the route matched");
    for path in ["/api%2flogin", "/%2Fapi%2Flogin", "/api%5Clogin", "/api/login"] {
        let (status, h, body) = status_of(&c, &sc, path).await;
        assert_problem(status, &h, &body, StatusCode::TOO_MANY_REQUESTS, "rate-limited");
    }
    let (status, h, body) = status_of(&c, &sc, "/api/login%00").await;
    assert_problem(status, &h, &body, StatusCode::BAD_REQUEST, "invalid-path");
    assert_eq!(up.count(), 1);
    sc.shutdown();
}

#[tokio::test]
async fn kept_escaped_slashes_are_forwarded_as_sent_and_match_no_route_for_the_decoded_path() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-slash-keep");
    let text = policy_with("  pathNormalization: {escapedSlashes: Keep}\n", LOGIN);
    let sc = sidecar_for(&dir, &text, &up.url()).await;
    let c = client();
    for _ in 0..2 {
        let (status, _, body) = status_of(&c, &sc, "/api%2Flogin").await;
        assert_eq!(status, StatusCode::OK, "not the login route");
        assert_eq!(json(&body)["uri"], "/api%2Flogin", "forwarded unchanged");
    }
    assert_eq!(status_of(&c, &sc, "/api/login").await.0, StatusCode::OK);
    assert_eq!(status_of(&c, &sc, "/api/login").await.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(up.count(), 3);
    sc.shutdown();
}

#[tokio::test]
async fn dot_segments_and_repeated_slashes_are_forwarded_as_the_path_the_route_matched() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-dots");
    let sc = sidecar_for(&dir, &policy(LOGIN), &up.url()).await;
    let c = client();
    let (status, _, body) = status_of(&c, &sc, "/api//login").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["uri"], "/api/login");
    for path in ["/api/./login", "/api/x/../login", "//api/login", "/api/%6Cogin"] {
        let (status, h, body) = status_of(&c, &sc, path).await;
        assert_problem(status, &h, &body, StatusCode::TOO_MANY_REQUESTS, "rate-limited");
    }
    assert_eq!(up.count(), 1);
    sc.shutdown();
}

#[tokio::test]
async fn case_and_trailing_slash_match_an_exact_route_only_when_it_says_so() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-case");
    let sc = sidecar_for(&dir, &policy(LOGIN), &up.url()).await;
    let c = client();
    // v2-login ignores case and one trailing slash.
    let (status, _, body) = status_of(&c, &sc, "/V2/LOGIN/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["uri"], "/V2/LOGIN/", "matched, and forwarded as sent");
    for path in ["/v2/login", "/v2/Login", "/v2/login/"] {
        assert_eq!(status_of(&c, &sc, path).await.0, StatusCode::TOO_MANY_REQUESTS, "{path} is v2-login");
    }
    // login does not: once its one request is used, other spellings go to the default route.
    assert_eq!(status_of(&c, &sc, "/api/login").await.0, StatusCode::OK);
    assert_eq!(status_of(&c, &sc, "/api/login").await.0, StatusCode::TOO_MANY_REQUESTS);
    for path in ["/API/LOGIN", "/Api/Login", "/api/login/"] {
        let (status, _, body) = status_of(&c, &sc, path).await;
        assert_eq!(status, StatusCode::OK, "{path} is not the exact route");
        assert_eq!(json(&body)["uri"], path);
    }
    sc.shutdown();
}

// ---------------------------------------------------------------------------------------------
// 3. Forwarding headers and the cache.

const FORWARDED_CACHED: &str = "  - name: page
    match: {path: {prefix: /page}}
    cache: {mode: Override, maxAge: 60s}
";

const EVIL: [(&str, &str); 9] = [
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-scheme", "nothttps"),
    ("x-forwarded-port", "1337"),
    ("x-forwarded-prefix", "/evil"),
    ("forwarded", "for=6.6.6.6;host=evil.example;proto=https"),
    ("x-original-url", "/admin"),
    ("x-http-method-override", "DELETE"),
    ("x-forwarded-for", "6.6.6.6"),
];

#[tokio::test]
async fn an_untrusted_clients_forwarding_headers_never_reach_the_app_or_the_cache() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-poison");
    let sc = sidecar_for(&dir, &policy(FORWARDED_CACHED), &up.url()).await;
    let c = client();
    let url = format!("http://{}/page/home", sc.proxy_addr);
    let (status, h, body) = get_with(&c, url.clone(), &EVIL).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!cache_status(&h).contains("hit"), "{}", cache_status(&h));
    let seen = json(&body);
    let app = &seen["headers"];
    assert_eq!(app["x-forwarded-proto"], "http", "set by the sidecar: {app}");
    assert_eq!(app["x-forwarded-for"], "127.0.0.1", "the peer, only: {app}");
    for (name, _) in &EVIL[..8] {
        if *name != "x-forwarded-proto" {
            assert!(app.get(*name).is_none(), "{name} reached the app: {app}");
        }
    }
    assert_eq!((seen["method"].as_str(), seen["uri"].as_str()), (Some("GET"), Some("/page/home")));
    assert!(!String::from_utf8_lossy(&body).contains("evil"), "{seen}");

    // A clean request gets the stored response, which holds nothing of the attacker's.
    let (status, h, clean) = get_with(&c, url.clone(), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(cache_status(&h).contains("hit"), "{}", cache_status(&h));
    assert_eq!(clean, body);
    // And so does the attacker on repeat: the headers are not keyed, they are gone.
    let (_, h, again) = get_with(&c, url, &EVIL).await;
    assert!(cache_status(&h).contains("hit"), "{}", cache_status(&h));
    assert_eq!(again, body);
    assert_eq!(up.count(), 1);
    sc.shutdown();
}

#[tokio::test]
async fn a_trusted_proxys_forwarding_headers_reach_the_app_and_key_the_cache() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-trusted");
    let text = policy_with("  clientIp: {trustedProxies: [127.0.0.1/32]}\n", FORWARDED_CACHED);
    let sc = sidecar_for(&dir, &text, &up.url()).await;
    let c = client();
    let url = format!("http://{}/page/home", sc.proxy_addr);
    let from = |host: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![
            ("x-forwarded-host", host),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "8443"),
            ("x-forwarded-prefix", "/shop"),
            ("forwarded", "for=6.6.6.6;proto=https"),
            ("x-forwarded-for", "6.6.6.6"),
        ]
    };
    let a = from("a.example");
    let b = from("b.example");

    let (status, h, body_a) = get_with(&c, url.clone(), &a).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!cache_status(&h).contains("hit"));
    let app = json(&body_a)["headers"].clone();
    assert_eq!(app["x-forwarded-host"], "a.example", "{app}");
    assert_eq!(app["x-forwarded-proto"], "https", "{app}");
    assert_eq!(app["x-forwarded-port"], "8443", "{app}");
    assert_eq!(app["x-forwarded-prefix"], "/shop", "{app}");
    assert_eq!(app["forwarded"], "for=6.6.6.6;proto=https", "{app}");
    assert_eq!(app["x-forwarded-for"], "6.6.6.6, 127.0.0.1", "{app}");

    let (_, h, body_b) = get_with(&c, url.clone(), &b).await;
    assert!(!cache_status(&h).contains("hit"), "another forwarded host is another entry");
    assert_eq!(json(&body_b)["headers"]["x-forwarded-host"], "b.example");
    assert_eq!(up.count(), 2);

    for (headers, body) in [(&a, &body_a), (&b, &body_b)] {
        let (_, h, again) = get_with(&c, url.clone(), headers).await;
        assert!(cache_status(&h).contains("hit"), "{}", cache_status(&h));
        assert_eq!(&again, body);
    }
    assert_eq!(up.count(), 2);

    // Any other forwarding value is another entry too, never a's.
    let mut other_prefix = a.clone();
    other_prefix[3] = ("x-forwarded-prefix", "/evil");
    let (_, h, body) = get_with(&c, url.clone(), &other_prefix).await;
    assert!(!cache_status(&h).contains("hit"), "{}", cache_status(&h));
    assert_eq!(json(&body)["headers"]["x-forwarded-prefix"], "/evil");
    // And a request with none is not served a forwarded host's response.
    let (_, _, plain) = get_with(&c, url.clone(), &[]).await;
    assert!(json(&plain)["headers"].get("x-forwarded-host").is_none(), "{}", String::from_utf8_lossy(&plain));
    assert_eq!(up.count(), 4);

    // Headers that rewrite the URL or method never reach the app on a cached route.
    let mut rewriting = from("c.example");
    rewriting.push(("x-original-url", "/admin"));
    rewriting.push(("x-http-method-override", "DELETE"));
    let (_, _, body) = get_with(&c, url, &rewriting).await;
    let app = json(&body)["headers"].clone();
    assert!(app.get("x-original-url").is_none() && app.get("x-http-method-override").is_none(), "{app}");
    sc.shutdown();
}

// ---------------------------------------------------------------------------------------------
// 4. A malformed client body is the client's fault.

const SLO: &str = "  - name: echo
    match: {path: {prefix: /echo}}
  slos:
  - name: availability
    objective: 99.9
    indicator: {availability: {}}
";

async fn metrics_text(c: &HttpClient, sc: &Handle) -> String {
    String::from_utf8(get_with(c, format!("http://{}/metrics", sc.admin_addr), &[]).await.2.to_vec()).unwrap()
}

#[tokio::test]
async fn a_malformed_chunked_body_is_a_400_and_spares_the_slo() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-chunks");
    let sc = sidecar_for(&dir, &policy(SLO), &up.url()).await;
    let c = client();
    let head = "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    for body in ["zz\r\nhello\r\n0\r\n\r\n", "5\r\nabcdefgh\r\n0\r\n\r\n", "-5\r\nhello\r\n0\r\n\r\n"] {
        let mut conn = Conn::open(sc.proxy_addr).await.within(PROMPT);
        conn.send(format!("{head}{body}").as_bytes()).await;
        let r = conn.response(false).await;
        assert_ne!(r.status, 502, "the client's framing is not the app's fault: {r:?} for {body:?}");
        assert_eq!(r.status, 400, "{r:?} for {body:?}");
        if r.header("content-type") == Some("application/problem+json") {
            let ty = problem_type(&r.body);
            assert!(ty.ends_with("/bad-request-body"), "{ty} for {body:?}");
        }
    }
    // One good request after them, so that the SLO has counted everything before it.
    let (status, _, _) = get_with(&c, format!("http://{}/echo", sc.proxy_addr), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let good = r#"apipolicy_slo_requests_total{result="good",slo="availability"}"#;
    let bad = r#"apipolicy_slo_requests_total{result="bad",slo="availability"}"#;
    let deadline = Instant::now() + PROMPT;
    let text = loop {
        let text = metrics_text(&c, &sc).await;
        if metric(&text, good).unwrap_or(0.0) >= 1.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(metric(&text, good), Some(1.0), "{text}");
    assert_eq!(metric(&text, bad).unwrap_or(0.0), 0.0, "no bad SLO event: {text}");
    sc.shutdown();
}

// ---------------------------------------------------------------------------------------------
// 5. Repeated query parameters keep their order in the cache key.

const QUERY: &str = "  - name: q
    match: {path: {prefix: /q}}
    cache: {mode: Override, maxAge: 60s}
  - name: sorted
    match: {path: {prefix: /s}}
    cache: {mode: Override, maxAge: 60s, sortQuery: true}
";

#[tokio::test]
async fn repeated_query_parameters_in_another_order_are_another_entry() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-query");
    let sc = sidecar_for(&dir, &policy(QUERY), &up.url()).await;
    let c = client();
    let base = format!("http://{}", sc.proxy_addr);
    let (_, _, first) = get_with(&c, format!("{base}/q?a=1&a=2"), &[]).await;
    assert_eq!(json(&first)["query"], "a=1&a=2");
    let (_, h, second) = get_with(&c, format!("{base}/q?a=2&a=1"), &[]).await;
    assert!(!cache_status(&h).contains("hit"), "{}", cache_status(&h));
    assert_eq!(json(&second)["query"], "a=2&a=1", "not served the other order's body");
    assert_eq!(up.count(), 2);
    // Without sortQuery, other names in another order are another entry too.
    get_with(&c, format!("{base}/q?b=2&a=1"), &[]).await;
    get_with(&c, format!("{base}/q?a=1&b=2"), &[]).await;
    assert_eq!(up.count(), 4);
    // Each is a hit on repeat.
    let (_, h, again) = get_with(&c, format!("{base}/q?a=1&a=2"), &[]).await;
    assert!(cache_status(&h).contains("hit"), "{}", cache_status(&h));
    assert_eq!(again, first);
    assert_eq!(up.count(), 4);

    // sortQuery: names are put in order, repeated names keep theirs.
    let (_, _, ba) = get_with(&c, format!("{base}/s?b=2&a=1"), &[]).await;
    let (_, h, ab) = get_with(&c, format!("{base}/s?a=1&b=2"), &[]).await;
    assert!(cache_status(&h).contains("hit"), "{}", cache_status(&h));
    assert_eq!(ab, ba);
    assert_eq!(up.count(), 5);
    let (_, _, a12) = get_with(&c, format!("{base}/s?a=1&a=2"), &[]).await;
    let (_, h, a21) = get_with(&c, format!("{base}/s?a=2&a=1"), &[]).await;
    assert!(!cache_status(&h).contains("hit"), "{}", cache_status(&h));
    assert_eq!(json(&a12)["query"], "a=1&a=2");
    assert_eq!(json(&a21)["query"], "a=2&a=1");
    assert_eq!(up.count(), 7);
    sc.shutdown();
}

// ---------------------------------------------------------------------------------------------
// 6. The admin: /config and /purge need the token; probes and metrics do not; no secrets.

const TOKEN: &str = "t0ken-for-tests";

async fn admin(
    c: &HttpClient,
    sc: &Handle,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> (StatusCode, HeaderMap, bytes::Bytes) {
    let mut req = Request::builder().method(method).uri(format!("http://{}{path}", sc.admin_addr));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    tokio::time::timeout(PROMPT, send(c, req.body(full(body.to_owned())).unwrap()))
        .await
        .expect("answered promptly")
}

#[tokio::test]
async fn the_admins_config_and_purge_need_the_token_and_probes_do_not() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-admin");
    let mut o = flags(dir.file("policy.yaml", &policy(FORWARDED_CACHED)), &up.url());
    o.admin_token = Some(TOKEN.to_owned());
    let sc = start(o).await.unwrap();
    let c = client();
    let page = format!("http://{}/page/a", sc.proxy_addr);
    get_with(&c, page.clone(), &[]).await;
    assert!(cache_status(&get_with(&c, page.clone(), &[]).await.1).contains("hit"));

    let bearer = format!("Bearer {TOKEN}");
    let purge = r#"{"paths": ["/page/a"]}"#;
    for auth in [None, Some("Bearer wrong"), Some(TOKEN), Some("Basic dDBrZW4tZm9yLXRlc3Rz"), Some("Bearer ")]
    {
        let (status, h, body) = admin(&c, &sc, "GET", "/config", auth, "").await;
        assert_problem(status, &h, &body, StatusCode::UNAUTHORIZED, "admin-unauthorized");
        let (status, h, body) = admin(&c, &sc, "POST", "/purge", auth, purge).await;
        assert_problem(status, &h, &body, StatusCode::UNAUTHORIZED, "admin-unauthorized");
    }
    // The refused purge purged nothing.
    assert!(cache_status(&get_with(&c, page.clone(), &[]).await.1).contains("hit"));
    assert_eq!(up.count(), 1);

    for path in ["/healthz", "/readyz", "/metrics", "/slo"] {
        assert_eq!(admin(&c, &sc, "GET", path, None, "").await.0, StatusCode::OK, "{path}");
    }
    let (status, _, body) = admin(&c, &sc, "GET", "/config", Some(&bearer), "").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert!(json(&body)["config"].is_object());
    let (status, _, body) = admin(&c, &sc, "POST", "/purge", Some(&bearer), purge).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["purged"], 1);
    assert!(!cache_status(&get_with(&c, page, &[]).await.1).contains("hit"), "purged");
    assert_eq!(up.count(), 2);
    sc.shutdown();
}

#[tokio::test]
async fn the_admins_config_never_shows_the_redis_password() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-redact");
    let text = policy_with("  redis: {url: \"redis://:s3cret@127.0.0.1:1\"}\n", FORWARDED_CACHED);
    let mut o = flags(dir.file("policy.yaml", &text), &up.url());
    o.admin_token = Some(TOKEN.to_owned());
    let sc = start(o).await.unwrap();
    let c = client();
    let (status, _, body) = admin(&c, &sc, "GET", "/config", Some(&format!("Bearer {TOKEN}")), "").await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("127.0.0.1:1"), "the Redis URL is shown, its password hidden: {text}");
    assert!(!text.contains("s3cret"), "{text}");
    for path in ["/metrics", "/slo", "/readyz"] {
        let (_, _, body) = admin(&c, &sc, "GET", path, None, "").await;
        assert!(!String::from_utf8_lossy(&body).contains("s3cret"), "{path}");
    }
    sc.shutdown();
}

// ---------------------------------------------------------------------------------------------
// 7. A limit key header sent twice.

const KEYED: &str = "  - name: keyed
    match: {path: {prefix: /keyed}}
    rateLimit: {requests: 5, per: 1m, key: {header: {name: X-Api-Key}}}
";

#[tokio::test]
async fn a_limit_key_header_sent_twice_is_refused_before_the_app() {
    let up = Recorder::start().await;
    let dir = TempDir::new("attack-dup-key");
    let sc = sidecar_for(&dir, &policy(KEYED), &up.url()).await;
    let c = client();
    let url = format!("http://{}/keyed", sc.proxy_addr);
    for pair in [["k1", "k2"], ["k1", "k1"]] {
        let (status, h, body) =
            get_with(&c, url.clone(), &[("x-api-key", pair[0]), ("x-api-key", pair[1])]).await;
        assert_problem(status, &h, &body, StatusCode::BAD_REQUEST, "ambiguous-rate-limit-key");
    }
    // Over a raw socket too (the header spelt in two cases).
    let mut conn = Conn::open(sc.proxy_addr).await.within(PROMPT);
    conn.send(b"GET /keyed HTTP/1.1\r\nHost: x\r\nX-Api-Key: k1\r\nx-api-key: k2\r\n\r\n").await;
    let r = conn.response(false).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(problem_type(&r.body).ends_with("/ambiguous-rate-limit-key"), "{r:?}");
    assert_eq!(up.count(), 0, "none reached the app");
    assert_eq!(get_with(&c, url, &[("x-api-key", "k1")]).await.0, StatusCode::OK);
    assert_eq!(up.count(), 1);
    sc.shutdown();
}
