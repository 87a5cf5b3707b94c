//! What the sidecar's system tests share: a real upstream that the tests drive, a real
//! sidecar (in process, or the binary), and real clients, all on loopback.

#![allow(dead_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use apipolicy_sidecar::server::{Flags, Handle, start};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body of `total` bytes sent in 64 KiB chunks as they are read, never held whole.
pub fn generated(total: u64) -> Body {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures::stream::unfold(total, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(chunk.len() as u64);
            Some((Ok(hyper::body::Frame::data(chunk.slice(..n as usize))), left - n))
        }
    });
    StreamBody::new(stream).boxed()
}

/// The upstream the tests talk to through the sidecar.
pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    /// `/app` answers 503 while this is set.
    pub failing: Arc<std::sync::atomic::AtomicBool>,
    /// Requests per `/app` path.
    pub per_path: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let per_path = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let counter = requests.clone();
        let app_state = (failing.clone(), per_path.clone());
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let counter = counter.clone();
                let app_state = app_state.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let app_state = app_state.clone();
                    async move {
                        if req.uri().path().starts_with("/app") {
                            return Ok::<_, Infallible>(app(req, &app_state.0, &app_state.1).await);
                        }
                        Ok::<_, Infallible>(upstream(req).await)
                    }
                });
                tokio::spawn(
                    builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned(),
                );
            }
        });
        Self { addr, requests, failing, per_path }
    }

    /// Requests `/app…` paths got.
    pub fn hits(&self, path: &str) -> u64 {
        self.per_path.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

fn param(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let v = kv.strip_prefix(key)?.strip_prefix('=')?;
        Some(v.replace("%20", " ").replace("%2C", ","))
    })
}

/// A controllable app for the cache tests. Query parameters say what to answer with: `cc`
/// (Cache-Control), `etag` (answering 304 to a matching If-None-Match), `lm`
/// (Last-Modified, answering 304 to an equal If-Modified-Since when there is no etag),
/// `status`, `ms` (a delay), `cookie`, `skey` (Surrogate-Key), `vary`, `ct` (Content-Type),
/// `size` (padding), `location`, `exp` (Expires), `age`, `cdn` (CDN-Cache-Control), `sc`
/// (Surrogate-Control), `extra` (`X-Extra: <extra>-<n>`, on 304s too). The body tells how many requests
/// the path has had and what the app saw of a few headers.
async fn app(
    req: Request<Incoming>,
    failing: &std::sync::atomic::AtomicBool,
    per_path: &std::sync::Mutex<std::collections::HashMap<String, u64>>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let n = {
        let mut m = per_path.lock().unwrap();
        let c = m.entry(path.clone()).or_insert(0);
        *c += 1;
        *c
    };
    if let Some(ms) = param(&req, "ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if failing.load(Ordering::SeqCst) {
        let mut r = Response::new(full("failing"));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return r;
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let etag_matches = param(&req, "etag")
        .is_some_and(|etag| header("if-none-match").is_some_and(|inm| inm.contains(&etag)));
    // RFC 9110 §13.1.3: If-Modified-Since is ignored when the request has If-None-Match.
    let date_matches = param(&req, "etag").is_none()
        && header("if-none-match").is_none()
        && param(&req, "lm").is_some_and(|lm| header("if-modified-since").is_some_and(|ims| ims == lm));
    if etag_matches || date_matches {
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        if let Some(etag) = param(&req, "etag") {
            r.headers_mut().insert("etag", format!("\"{etag}\"").parse().unwrap());
        }
        if let Some(cc) = param(&req, "cc") {
            r.headers_mut().insert("cache-control", cc.parse().unwrap());
        }
        if let Some(extra) = param(&req, "extra") {
            r.headers_mut().insert("x-extra", format!("{extra}-{n}").parse().unwrap());
        }
        // A 304's length is not the stored body's: it must not replace it.
        r.headers_mut().insert("content-length", "0".parse().unwrap());
        return r;
    }
    let pad = "x".repeat(param(&req, "size").and_then(|v| v.parse().ok()).unwrap_or(0));
    let body = serde_json::json!({
        "n": n,
        "path": path,
        "method": req.method().as_str(),
        "xfh": header("x-forwarded-host"),
        "xou": header("x-original-url"),
        "inm": header("if-none-match"),
        "lang": header("accept-language"),
        "pad": pad,
    });
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() =
        StatusCode::from_u16(param(&req, "status").and_then(|v| v.parse().ok()).unwrap_or(200)).unwrap();
    let h = r.headers_mut();
    h.insert("content-type", param(&req, "ct").unwrap_or("application/json".into()).parse().unwrap());
    for (p, name) in [
        ("cc", "cache-control"),
        ("lm", "last-modified"),
        ("cookie", "set-cookie"),
        ("skey", "surrogate-key"),
        ("vary", "vary"),
        ("location", "location"),
        ("exp", "expires"),
        ("age", "age"),
        ("cdn", "cdn-cache-control"),
        ("sc", "surrogate-control"),
    ] {
        if let Some(v) = param(&req, p) {
            h.insert(name, v.parse().unwrap());
        }
    }
    if let Some(etag) = param(&req, "etag") {
        h.insert("etag", format!("\"{etag}\"").parse().unwrap());
    }
    if let Some(extra) = param(&req, "extra") {
        h.insert("x-extra", format!("{extra}-{n}").parse().unwrap());
    }
    r
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn upstream(req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        // The request body, streamed straight back.
        "/echo" => Response::new(req.into_body().map_err(std::io::Error::other).boxed()),
        // How many bytes the request body had.
        "/count" => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                n += frame.map(|f| f.into_data().map_or(0, |d| d.len() as u64)).unwrap_or(0);
            }
            Response::new(full(n.to_string()))
        }
        // n generated bytes, chunked.
        "/bytes" => Response::new(generated(query(&req, "n").unwrap_or(0))),
        // "first", then nothing for `ms`, then "rest".
        "/stall" => {
            let ms = query(&req, "ms").unwrap_or(500);
            let stream = futures::stream::unfold(0u8, move |step| async move {
                match step {
                    0 => Some((Ok(hyper::body::Frame::data(Bytes::from_static(b"first"))), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Some((Ok(hyper::body::Frame::data(Bytes::from_static(b"rest"))), 2))
                    }
                    _ => None,
                }
            });
            Response::new(StreamBody::new(stream).boxed())
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(500))).await;
            Response::new(full("slow done"))
        }
        "/status" => {
            let mut resp = Response::new(full("as asked"));
            *resp.status_mut() = StatusCode::from_u16(query(&req, "code").unwrap_or(200) as u16).unwrap();
            resp
        }
        // The request head as the app saw it.
        "/headers" => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").into()))
                .collect();
            let body = serde_json::json!({"headers": headers, "uri": req.uri().to_string(), "version": format!("{:?}", req.version())});
            let mut resp = Response::new(full(body.to_string()));
            resp.headers_mut().insert("connection", "keep-alive, x-hop".parse().unwrap());
            resp.headers_mut().insert("x-hop", "secret".parse().unwrap());
            resp
        }
        // A raw-bytes echo after 101 Switching Protocols.
        "/upgrade" => {
            let mut req = req;
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut().insert("connection", "upgrade".parse().unwrap());
            resp.headers_mut().insert("upgrade", "echo".parse().unwrap());
            resp
        }
        _ => Response::new(full("ok")),
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "apipolicy-{name}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        write_atomic(&path, text);
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces a file the way Kubernetes and editors do: write aside, then rename over.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("tmp{}", fastrand::u32(..)));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A policy for the tests: `extra_routes` is YAML for routes before the catch-all.
pub fn policy(routes: &str) -> String {
    format!(
        "apiVersion: apipolicy.dev/v1alpha1
kind: ApiPolicy
metadata: {{name: test, namespace: default}}
spec:
  selector: {{matchLabels: {{app: test}}}}
  upstream: {{port: 8080, timeout: 30s, connectTimeout: 500ms}}
  routes:
{routes}"
    )
}

pub const ROUTES: &str = "  - name: slow
    match: {path: {prefix: /slow}}
    timeout: 300ms
  - name: small-uploads
    match: {path: {prefix: /count}, methods: [POST, PUT]}
    maxRequestBody: 1Ki
  - name: echo
    match: {path: {exact: /echo}}
";

pub fn flags(policy: PathBuf, upstream: &str) -> Flags {
    Flags {
        policy,
        upstream: Some(upstream.to_owned()),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        reload_interval: Duration::from_millis(50),
        drain_delay: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(5),
        access_log: false,
        replicas: 1,
        redis: None,
        operator: None,
        cache_bytes: 16 << 20,
        hit_lane: true,
        admin_token: None,
        max_connections: 4096,
        idle_timeout: Duration::from_secs(30),
        clock: apipolicy_sidecar::clock::Clock::default(),
    }
}

/// An in-process sidecar in front of `upstream`, with the test routes.
pub async fn sidecar(dir: &TempDir, upstream: &str) -> Handle {
    let policy = dir.file("policy.yaml", &policy(ROUTES));
    start(flags(policy, upstream)).await.unwrap()
}

pub type HttpClient = Client<HttpConnector, Body>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

pub async fn get(client: &HttpClient, url: String) -> (StatusCode, http::HeaderMap, Bytes) {
    send(client, Request::get(url).body(empty()).unwrap()).await
}

pub async fn send(client: &HttpClient, req: Request<Body>) -> (StatusCode, http::HeaderMap, Bytes) {
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

/// Waits until `check` holds, asking every 10 ms; fails the test with `what` after `within`.
/// For what the sidecar does on its own time (a count that lands when a body ends, a file
/// reload, a connection closed): no fixed sleep that is too short on a busy machine.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A value from the Prometheus text of `/metrics`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A response as read off the socket.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Raw {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A client that writes raw bytes and reads responses one by one (Content-Length framed, or
/// chunked), keeping what it read past a response for the next one.
pub struct Conn {
    pub stream: TcpStream,
    /// What was read past the last response.
    pub buf: Vec<u8>,
    /// How long a read may wait before the test fails.
    wait: Duration,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Self {
        Self::over(TcpStream::connect(addr).await.unwrap())
    }

    pub fn over(stream: TcpStream) -> Self {
        Self { stream, buf: Vec::new(), wait: Duration::from_secs(10) }
    }

    /// Fails the test when a read waits longer than `wait` (an answer that must be prompt).
    pub fn within(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    pub async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(self.wait, self.stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("the sidecar answered within {:?}", self.wait))
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next response; `head_only` for a response to HEAD.
    pub async fn response(&mut self, head_only: bool) -> Raw {
        self.try_response(head_only).await.expect("the connection closed before a response")
    }

    /// The next response, `None` if the connection closes first.
    pub async fn try_response(&mut self, head_only: bool) -> Option<Raw> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = resp.parse(&self.buf).unwrap() {
                let status = resp.code.unwrap();
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                let mut raw = Raw { status, headers, body: Vec::new() };
                self.buf.drain(..n);
                if !head_only && status != 304 && status != 204 {
                    if raw.header("transfer-encoding").is_some() {
                        raw.body = self.chunked().await;
                    } else {
                        let len: usize = raw.header("content-length").map_or(0, |v| v.parse().unwrap());
                        while self.buf.len() < len {
                            assert!(self.fill().await, "the connection closed inside a body");
                        }
                        raw.body = self.buf.drain(..len).collect();
                    }
                }
                return Some(raw);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    pub async fn chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                assert!(self.fill().await);
            };
            let size = usize::from_str_radix(std::str::from_utf8(&self.buf[..line_end]).unwrap().trim(), 16)
                .unwrap();
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                assert!(self.fill().await);
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
            if size == 0 {
                return body;
            }
        }
    }

    /// Whether the sidecar closed the connection (after what was read).
    pub async fn closed(&mut self) -> bool {
        !self.fill().await && self.buf.is_empty()
    }
}
