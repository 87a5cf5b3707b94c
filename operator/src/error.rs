//! The operator's one error type: a variant per failing operation, naming what it concerns.

use std::{net::SocketAddr, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to the Kubernetes API: {0}")]
    Connect(#[source] kube::Error),

    #[error("ApiPolicy {0} has no namespace")]
    MissingNamespace(String),

    #[error("applying ConfigMap {namespace}/{name}: {source}")]
    ApplyConfigMap {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },

    #[error("applying PrometheusRule {namespace}/{name}: {source}")]
    ApplyPrometheusRule {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },

    #[error("patching the status of ApiPolicy {namespace}/{name}: {source}")]
    PatchStatus {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },

    #[error("looking up the PrometheusRule API: {0}")]
    Discovery(#[source] kube::Error),

    #[error("reviewing an agent's token: {0}")]
    TokenReview(#[source] kube::Error),

    #[error("reading pod {namespace}/{name}: {source}")]
    GetPod {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },

    #[error("reading {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("TLS material in {what}: {reason}")]
    Tls { what: String, reason: String },

    #[error("generating a certificate: {0}")]
    Certificate(#[from] rcgen::Error),

    #[error("reading or writing the certificate Secret {namespace}/{name}: {source}")]
    CertificateSecret {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },

    #[error("applying MutatingWebhookConfiguration {name}: {source}")]
    ApplyWebhook {
        name: String,
        #[source]
        source: kube::Error,
    },

    #[error("{0}")]
    Configuration(String),

    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),

    #[error("encoding the SLO history: {0}")]
    EncodeHistory(#[source] std::io::Error),

    #[error("the SLO history is unreadable: {0}")]
    DecodeHistory(String),

    #[error(
        "the SLO history takes {bytes} bytes gzipped with everything left out that may be; at most {budget} fit"
    )]
    HistoryTooLarge { bytes: usize, budget: usize },

    #[error("the report is invalid: {0}")]
    InvalidReport(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A bounded label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::MissingNamespace(_) => "missing_namespace",
            Self::ApplyConfigMap { .. } => "apply_configmap",
            Self::ApplyPrometheusRule { .. } => "apply_prometheusrule",
            Self::PatchStatus { .. } => "patch_status",
            Self::Discovery(_) => "discovery",
            Self::TokenReview(_) => "token_review",
            Self::GetPod { .. } => "get_pod",
            Self::ReadFile { .. } => "read_file",
            Self::Tls { .. } => "tls",
            Self::Certificate(_) => "certificate",
            Self::CertificateSecret { .. } => "certificate_secret",
            Self::ApplyWebhook { .. } => "apply_webhook",
            Self::Configuration(_) => "configuration",
            Self::Bind { .. } => "bind",
            Self::Metrics(_) => "metrics",
            Self::EncodeHistory(_) => "encode_history",
            Self::DecodeHistory(_) => "decode_history",
            Self::HistoryTooLarge { .. } => "history_too_large",
            Self::InvalidReport(_) => "invalid_report",
        }
    }

    /// Whether the API server refused a write because the object changed meanwhile (409): worth
    /// a quick retry rather than the usual back-off.
    pub fn is_conflict(&self) -> bool {
        let source = match self {
            Self::ApplyConfigMap { source, .. }
            | Self::ApplyPrometheusRule { source, .. }
            | Self::PatchStatus { source, .. } => source,
            _ => return false,
        };
        matches!(source, kube::Error::Api(status) if status.code == 409)
    }
}
