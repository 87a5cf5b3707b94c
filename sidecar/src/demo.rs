//! `apipolicy-sidecar demo`: a small products API with the sidecar in front of it.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use clap::Args;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

use crate::sidecar::Tuning;

const QUICKSTART: &str = include_str!("../../examples/quickstart.yaml");

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The policy (default: a working copy of the built-in examples/quickstart.yaml).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Where clients connect to the sidecar.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// The admin listener: /healthz, /readyz, /metrics, /slo, /config and POST /purge.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    #[command(flatten)]
    pub tuning: Tuning,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let app = TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app.local_addr()?;
    tokio::spawn(serve_app(app));

    // The user edits a working copy, never the tracked example (an edit there would change
    // what the tests check); the copy goes when the demo stops.
    let (policy, copy) = match args.policy {
        Some(p) => (p, None),
        None => {
            let dir = std::env::temp_dir().join(format!("apipolicy-demo-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let p = dir.join("policy.yaml");
            std::fs::write(&p, QUICKSTART)?;
            (p, Some(dir))
        }
    };
    let flags =
        args.tuning.flags(policy.clone(), Some(format!("http://{app_addr}")), args.listen, args.admin);
    let handle = crate::server::start(flags).await?;
    let (p, a) = (handle.proxy_addr, handle.admin_addr);
    let origin = if copy.is_some() {
        " (a copy of examples/quickstart.yaml, removed when the demo stops)"
    } else {
        ""
    };
    eprintln!(
        "\nApiPolicy demo: the sidecar on http://{p} runs {policy}{origin}\n\
         in front of a demo products API on http://{app_addr}. Edit the policy file and it reloads. Try:\n\n\
         \x20 curl -s -o /dev/null -D - http://{p}/api/products     # cached: Cache-Status, ETag, Cache-Control (run it twice)\n\
         \x20 curl -s -o /dev/null -D - -H 'Accept-Encoding: br' http://{p}/api/products   # compressed once, kept in the cache\n\
         \x20 etag=$(curl -s -o /dev/null -w '%header{{etag}}' http://{p}/api/products); curl -s -o /dev/null -w '%{{http_code}}\\n' -H \"If-None-Match: $etag\" http://{p}/api/products   # 304\n\
         \x20 curl -s http://{p}/api/slow; echo                 # the app takes 1.5s, the route allows 1s: 504 problem+json\n\
         \x20 for i in $(seq 7); do curl -s -o /dev/null -w '%{{http_code}} ' -X POST http://{p}/api/auth/login; done; echo   # 5 then 429\n\
         \x20 for i in $(seq 20); do curl -s -o /dev/null http://{p}/api/flaky; done; curl -s http://{a}/slo; echo   # the error budget\n\
         \x20 curl -s -X POST http://{a}/purge -d '{{\"keys\": [\"products\"]}}'; echo\n\
         \x20 curl -s http://{a}/metrics | grep '^apipolicy_requests_total'\n\
         \x20 curl -s http://{a}/readyz; echo\n\n\
         Ctrl-C stops it.\n",
        policy = policy.display()
    );
    crate::signal::stop_on_signal(&handle).await;
    handle.wait().await;
    if let Some(dir) = copy {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// The demo app. Public so that tests and benchmarks can use the same upstream.
pub async fn serve_app(listener: TcpListener) {
    let app = Arc::new(App::new());
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.handle(req).await) }
        });
        tokio::spawn(builder.serve_connection(TokioIo::new(stream), service).into_owned());
    }
}

struct App {
    list: Bytes,
    requests: AtomicU64,
}

impl App {
    fn new() -> Self {
        let items: Vec<serde_json::Value> = (1..=100)
            .map(|id| {
                serde_json::json!({
                    "id": id,
                    "name": format!("Product {id}"),
                    "description": "A fine product, described at some length so that the list is worth compressing.",
                    "priceCents": 199 * id,
                    "tags": ["demo", if id % 2 == 0 { "even" } else { "odd" }],
                })
            })
            .collect();
        let list = serde_json::to_vec(&serde_json::json!({"items": items, "total": 100})).unwrap_or_default();
        Self { list: Bytes::from(list), requests: AtomicU64::new(0) }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let path = req.uri().path().to_owned();
        match (req.method(), path.as_str()) {
            (&Method::GET | &Method::HEAD, "/healthz") => {
                json(StatusCode::OK, Bytes::from_static(b"{\"ok\":true}"))
            }
            (&Method::GET | &Method::HEAD, "/api/products") => json(StatusCode::OK, self.list.clone()),
            (&Method::GET | &Method::HEAD, "/api/slow") => {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                json(StatusCode::OK, Bytes::from_static(b"{\"report\":\"done\"}"))
            }
            (&Method::GET | &Method::HEAD, "/api/flaky") if n.is_multiple_of(5) => {
                json(StatusCode::INTERNAL_SERVER_ERROR, Bytes::from_static(b"{\"error\":\"flaked\"}"))
            }
            (&Method::GET | &Method::HEAD, "/api/flaky") => {
                json(StatusCode::OK, Bytes::from_static(b"{\"ok\":true}"))
            }
            (&Method::POST, "/api/auth/login") => {
                let _ = req.into_body().collect().await;
                json(StatusCode::OK, Bytes::from_static(b"{\"token\":\"demo-token\"}"))
            }
            (&Method::GET | &Method::HEAD, p) if p.starts_with("/api/products/") => {
                match p["/api/products/".len()..].parse::<u32>() {
                    Ok(id @ 1..=100) => json(
                        StatusCode::OK,
                        Bytes::from(format!(
                            "{{\"id\":{id},\"name\":\"Product {id}\",\"priceCents\":{}}}",
                            199 * id
                        )),
                    ),
                    _ => json(StatusCode::NOT_FOUND, Bytes::from_static(b"{\"error\":\"no such product\"}")),
                }
            }
            _ => json(StatusCode::NOT_FOUND, Bytes::from_static(b"{\"error\":\"not found\"}")),
        }
    }
}

fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
