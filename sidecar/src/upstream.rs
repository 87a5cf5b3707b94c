//! The keep-alive connections to the one upstream: a LIFO stack of idle HTTP/1.1 senders.
//! What the hyper-util legacy `Client` does per request and this does not: hash and compare
//! the `(scheme, authority)` pool key (SipHash, byte by byte), box the request future, clone
//! the URI, insert `HttpInfo` into every response's extensions.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{
    Request, Response,
    uri::{Authority, Scheme},
};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::UpstreamBody;

/// Where requests go: `--upstream`, or the policy's port on the pod's loopback address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl Upstream {
    pub fn from_url(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("--upstream {url:?} is not a URL: {e}"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(format!(
                "--upstream {url:?} must be an http:// URL (the app is on the pod's network)"
            ));
        }
        if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
            return Err(format!("--upstream {url:?} must be scheme://host:port only, without a path"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| format!("--upstream {url:?} has no host"))?;
        // What follows the host, when anything does, must be `:` and a port from 1 to 65535.
        let after_host = authority.as_str().strip_prefix(authority.host()).unwrap_or_default();
        if !after_host.is_empty()
            && after_host.strip_prefix(':').and_then(|p| p.parse::<u16>().ok()).is_none_or(|p| p == 0)
        {
            return Err(format!("--upstream {url:?} has no valid port: use a number from 1 to 65535"));
        }
        if authority.host().is_empty() {
            return Err(format!("--upstream {url:?} has no host"));
        }
        Ok(Self { scheme: Scheme::HTTP, authority })
    }

    pub fn loopback(port: u16) -> Self {
        Self {
            scheme: Scheme::HTTP,
            authority: format!("127.0.0.1:{port}").parse().expect("a loopback authority is valid"),
        }
    }

    /// `host:port` for TCP health probes.
    pub fn address(&self) -> String {
        let port = self.authority.port_u16().unwrap_or(80);
        format!("{}:{port}", self.authority.host())
    }
}

/// Idle connections kept at most, as `pool_max_idle_per_host` was.
const MAX_IDLE: usize = 1024;

pub struct UpstreamPool {
    /// `host:port`.
    addr: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Vec<(http1::SendRequest<UpstreamBody>, Instant)>>,
}

#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing was sent.
    Connect(String),
    Http(hyper::Error),
}

impl UpstreamPool {
    pub fn new(addr: String, connect_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self { addr, connect_timeout, idle_timeout, idle: Mutex::new(Vec::new()) })
    }

    /// The most recently used idle connection that is still open and not past the idle timeout.
    fn checkout(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((tx, since)) = idle.pop() {
            if tx.is_ready() && since.elapsed() < self.idle_timeout {
                return Some(tx);
            }
        }
        None
    }

    fn checkin(&self, tx: http1::SendRequest<UpstreamBody>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((tx, Instant::now()));
        }
    }

    /// Drops idle connections past the idle timeout (call it now and then).
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|(tx, since)| !tx.is_closed() && since.elapsed() < self.idle_timeout);
    }

    async fn connect(&self) -> Result<http1::SendRequest<UpstreamBody>, SendError> {
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr)).await {
            Err(_) => return Err(SendError::Connect(format!("connecting to {} timed out", self.addr))),
            Ok(Err(e)) => return Err(SendError::Connect(format!("cannot connect to {}: {e}", self.addr))),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(tx)
    }

    /// Sends `req` (origin-form URI) on an idle connection, or a new one. A request that a
    /// reused connection closed under before sending it is retried, as the legacy client did.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Box<Request<UpstreamBody>>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let reused = if attempt <= 2 { self.checkout() } else { None };
            let (mut tx, is_reused) = match reused {
                Some(tx) => (tx, true),
                // Boxed: a new connection is rare, and its future (connect, handshake) would
                // otherwise make every request's future, and each copy of it, larger.
                None => (Box::pin(self.connect()).await?, false),
            };
            match tx.try_send_request(*req).await {
                Ok(resp) => {
                    // Back to the pool once the connection can take the next request: now when
                    // the whole response is read already, else when it has been.
                    if tx.is_ready() {
                        self.checkin(tx);
                    } else if !tx.is_closed() {
                        let pool = self.clone();
                        tokio::spawn(async move {
                            if tx.ready().await.is_ok() {
                                pool.checkin(tx);
                            }
                        });
                    }
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if is_reused => *req = unsent,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }
}
