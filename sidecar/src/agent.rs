//! The sidecar's side of the operator's agent API (`--operator URL`): a long-poll that brings
//! each new config the moment the operator has it, and a report of SLO counters every 10 s.
//! Neither ever blocks a request; when the operator is away the sidecar runs on (its mounted
//! policy file still reloads) and retries with backoff.
//!
//! Calls carry the pod's projected service-account token (`--token-file`, audience
//! `apipolicy.dev`), read anew each time since the kubelet rotates it; HTTPS is verified
//! against `--ca-file`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use apipolicy_api::{
    contract,
    report::{AgentConfig, ReportAck},
};
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;

pub use crate::sidecar::AgentFlags;
use crate::sidecar::Sidecar;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the operator at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS with the operator failed: {0}")]
    Tls(std::io::Error),
    #[error("HTTP with the operator failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("cannot read {0}: {1}")]
    File(PathBuf, std::io::Error),
    #[error("the operator answered {0}: {1}")]
    Status(StatusCode, String),
    #[error("the operator's answer is not valid: {0}")]
    Body(String),
    #[error("{0}")]
    Config(String),
}

pub struct Agent {
    flags: AgentFlags,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Agent {
    pub fn new(flags: AgentFlags) -> Result<Self, AgentError> {
        let tls = match flags.url.scheme_str() {
            Some("https") => {
                let mut roots = rustls::RootCertStore::empty();
                if let Some(ca) = &flags.ca_file {
                    let pem = std::fs::read(ca).map_err(|e| AgentError::File(ca.clone(), e))?;
                    for cert in CertificateDer::pem_slice_iter(&pem) {
                        let cert = cert.map_err(|e| AgentError::Config(format!("{}: {e}", ca.display())))?;
                        roots.add(cert).map_err(|e| AgentError::Config(format!("{}: {e}", ca.display())))?;
                    }
                }
                if roots.is_empty() {
                    return Err(AgentError::Config("an https:// operator URL needs --ca-file".into()));
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| AgentError::Config(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
            }
            Some("http") => None,
            _ => {
                return Err(AgentError::Config(format!(
                    "--operator {} must be an https:// or http:// URL",
                    flags.url
                )));
            }
        };
        Ok(Self { flags, tls })
    }

    /// Runs the config long-poll and the report loop until the task is aborted.
    pub async fn run(self: Arc<Self>, sidecar: Arc<Sidecar>) {
        let poll = tokio::spawn(self.clone().poll_config(sidecar.clone()));
        let report = tokio::spawn(self.report_loop(sidecar));
        let _ = tokio::join!(poll, report);
    }

    /// (namespace, name) of the policy this sidecar runs.
    fn policy(sidecar: &Sidecar) -> (String, String) {
        let active = sidecar.proxy.active.load();
        let p = &active.config.policy;
        (p.namespace.clone().unwrap_or_else(|| "default".into()), p.name.clone())
    }

    async fn poll_config(self: Arc<Self>, sidecar: Arc<Sidecar>) {
        let mut backoff = Duration::from_millis(500);
        let mut retried_at_once = false;
        loop {
            let (revision, replicas) = {
                let a = sidecar.proxy.active.load();
                (a.config.revision.clone(), a.replicas)
            };
            let (namespace, name) = Self::policy(&sidecar);
            let path = format!("{}?revision={revision}", contract::config_path(&namespace, &name));
            // The operator holds the request up to 30 s.
            match self.call(Method::GET, &path, None, Duration::from_secs(40)).await {
                Ok(body) => match serde_json::from_slice::<AgentConfig>(&body) {
                    Ok(agent) => {
                        backoff = Duration::from_millis(500);
                        retried_at_once = false;
                        if agent.config.revision != revision || agent.ready_replicas.max(1) != replicas {
                            crate::sidecar::apply_config(
                                &sidecar,
                                agent.config,
                                agent.ready_replicas.max(1),
                                "operator",
                            );
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the operator sent a config that is not valid");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                },
                // The connection broke after it was made (the operator restarted, or closed it as
                // it answered): the next try most likely works, so it goes at once, once.
                Err(e @ AgentError::Http(_)) if !retried_at_once => {
                    retried_at_once = true;
                    tracing::info!(error = %e, "config long-poll interrupted; polling again at once");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "config long-poll failed; the mounted policy file stays in use");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn report_loop(self: Arc<Self>, sidecar: Arc<Sidecar>) {
        let mut acked_ms = 0u64;
        let mut tick = tokio::time::interval(self.flags.report_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let active = sidecar.proxy.active.load_full();
            if active.slos.is_empty() {
                continue;
            }
            let report =
                sidecar.process.slos.report(&self.flags.pod, &active.config.revision, &active.slos, acked_ms);
            let body = serde_json::to_vec(&report).unwrap_or_default();
            let (namespace, name) = Self::policy(&sidecar);
            let path = contract::reports_path(&namespace, &name);
            match self.call(Method::POST, &path, Some(body), Duration::from_secs(10)).await {
                Ok(answer) => match serde_json::from_slice::<ReportAck>(&answer) {
                    // Keep re-sending the current minute: it is still growing.
                    Ok(ack) => acked_ms = ack.ack_ms.min(report.sent_at_ms - report.sent_at_ms % 60_000),
                    Err(e) => tracing::warn!(error = %e, "the operator's report answer is not valid"),
                },
                // The next report carries everything since the last ack.
                Err(e) => tracing::warn!(error = %e, "SLO report failed; it will be sent again"),
            }
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Bytes, AgentError> {
        match tokio::time::timeout(timeout, self.exchange(method, path, body)).await {
            Ok(r) => r,
            Err(_) => {
                Err(AgentError::Status(StatusCode::GATEWAY_TIMEOUT, format!("no answer within {timeout:?}")))
            }
        }
    }

    async fn exchange(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Bytes, AgentError> {
        let authority = self.flags.url.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        let host = self.flags.url.host().unwrap_or("localhost").to_owned();
        let port = self.flags.url.port_u16().unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &authority)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, concat!("apipolicy-sidecar/", env!("CARGO_PKG_VERSION")));
        if let Some(file) = &self.flags.token_file {
            let token = std::fs::read_to_string(file).map_err(|e| AgentError::File(file.clone(), e))?;
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", token.trim()));
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| AgentError::Connect(authority.clone(), e))?;
        let _ = tcp.set_nodelay(true);
        let resp = match &self.tls {
            Some(tls) => {
                let name =
                    ServerName::try_from(host.clone()).map_err(|e| AgentError::Config(e.to_string()))?;
                let stream = tls.connect(name, tcp).await.map_err(AgentError::Tls)?;
                send(TokioIo::new(stream), req).await?
            }
            None => send(TokioIo::new(tcp), req).await?,
        };
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), 16 << 20)
            .collect()
            .await
            .map_err(|e| AgentError::Body(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(AgentError::Status(
                status,
                String::from_utf8_lossy(&bytes).chars().take(300).collect(),
            ));
        }
        Ok(bytes)
    }
}

async fn send<I>(
    io: I,
    req: Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, AgentError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(req).await?)
}
