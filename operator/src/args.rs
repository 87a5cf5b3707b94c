//! The flags of `apipolicy-operator run`.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;

use crate::{
    inject::{self, Resources},
    webhook::{self, FailurePolicy},
};

/// Flags of `run`; each also reads the environment variable named beside it.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Where the injection webhook listens (HTTPS).
    #[arg(long, env = "APIPOLICY_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,
    /// Where the agent API listens (HTTPS unless --insecure-agent-api).
    #[arg(long, env = "APIPOLICY_AGENT_ADDR", default_value = "0.0.0.0:8443")]
    pub agent_addr: SocketAddr,
    /// Where /metrics, /healthz and /readyz are served (plain HTTP).
    #[arg(long, env = "APIPOLICY_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Outside the cluster: the URL the webhook configuration points at instead of the Service
    /// (`https://HOST:PORT/mutate`, HOST reachable from the API server). HOST is added to the
    /// generated certificate.
    #[arg(long, env = "APIPOLICY_WEBHOOK_URL")]
    pub webhook_url: Option<String>,
    /// The port of the operator's Service that leads to --webhook-addr.
    #[arg(long, env = "APIPOLICY_WEBHOOK_SERVICE_PORT", default_value_t = 443)]
    pub webhook_service_port: u16,
    /// What the API server does with a pod when the webhook cannot answer: `Ignore` (the pod
    /// starts without the sidecar) or `Fail` (the pod is refused until the operator answers).
    #[arg(long, env = "APIPOLICY_FAILURE_POLICY", value_enum, default_value_t = FailurePolicy::Ignore)]
    pub failure_policy: FailurePolicy,
    /// Create and update the MutatingWebhookConfiguration, CA included. `false` when the chart
    /// renders it and cert-manager injects the CA (then give --tls-cert, --tls-key, --tls-ca).
    #[arg(long, env = "APIPOLICY_MANAGE_WEBHOOK", default_value_t = true, action = clap::ArgAction::Set)]
    pub manage_webhook: bool,
    /// The MutatingWebhookConfiguration's name.
    #[arg(long, env = "APIPOLICY_WEBHOOK_CONFIGURATION", default_value = webhook::CONFIGURATION)]
    pub webhook_configuration: String,
    /// The operator's Service: the certificate's names, the webhook's and the sidecars' way here.
    #[arg(long, env = "APIPOLICY_SERVICE_NAME", default_value = "apipolicy-operator")]
    pub service_name: String,
    /// The agent API's URL as sidecars reach it. Default: the Service's DNS name with the port
    /// of --agent-addr.
    #[arg(long, env = "APIPOLICY_AGENT_URL")]
    pub agent_url: Option<String>,
    /// This replica's own agent API URL, written into the leader-election Lease while it leads:
    /// the other replicas forward the sidecars' SLO reports there. Default: the scheme of the
    /// agent API with POD_IP (set by the chart) and the port of --agent-addr, else --agent-addr
    /// itself when it is not a wildcard address; without one, followers answer reports 503.
    #[arg(long, env = "APIPOLICY_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Serve the agent API over plain HTTP without checking tokens. Local development only:
    /// anyone who reaches the port can read configs and write SLO reports.
    #[arg(long, env = "APIPOLICY_INSECURE_AGENT_API")]
    pub insecure_agent_api: bool,
    /// The certificate chain (PEM) the webhook and the agent API serve, reloaded when the file
    /// changes. Without it the operator makes a CA and a certificate, keeps them in the Secret
    /// apipolicy-operator-tls and renews the certificate itself.
    #[arg(long, env = "APIPOLICY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "APIPOLICY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With --tls-cert: the CA (PEM) that signed it, which sidecars and the webhook configuration
    /// trust. Default: `ca.crt` beside --tls-cert, when there is one (as in cert-manager's Secrets).
    #[arg(long, env = "APIPOLICY_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// The namespace of the leader-election Lease, the certificate Secret and the operator's
    /// Service. Default: POD_NAMESPACE, else the namespace of the in-cluster service account or
    /// of the kubeconfig context.
    #[arg(long, env = "APIPOLICY_NAMESPACE")]
    pub namespace: Option<String>,
    /// This replica's name in the Lease. Default: the host name and a random suffix.
    #[arg(long, env = "APIPOLICY_IDENTITY")]
    pub identity: Option<String>,
    /// The image of the injected sidecar.
    #[arg(long, env = "APIPOLICY_SIDECAR_IMAGE", default_value_t = inject::default_image())]
    pub sidecar_image: String,
    /// Inject the sidecar as a native sidecar (an init container with `restartPolicy: Always`),
    /// else as a plain container. Clusters before 1.32 do not route a Service's named port to a
    /// native sidecar, so there the operator falls back to a plain container by itself.
    #[arg(long, env = "APIPOLICY_NATIVE_SIDECAR", default_value_t = true, action = clap::ArgAction::Set)]
    pub native_sidecar: bool,
    /// The sidecar's CPU request; empty for none. Pods may override it with the annotation
    /// apipolicy.dev/sidecar-cpu-request (and likewise for the three below).
    #[arg(long, env = "APIPOLICY_SIDECAR_CPU_REQUEST", default_value = "50m", value_parser = quantity)]
    pub sidecar_cpu_request: String,
    /// The sidecar's memory request; empty for none.
    #[arg(long, env = "APIPOLICY_SIDECAR_MEMORY_REQUEST", default_value = "32Mi", value_parser = quantity)]
    pub sidecar_memory_request: String,
    /// The sidecar's CPU limit; empty for none. It also sets the sidecar's worker threads.
    #[arg(long, env = "APIPOLICY_SIDECAR_CPU_LIMIT", default_value = "", value_parser = quantity)]
    pub sidecar_cpu_limit: String,
    /// The sidecar's memory limit; empty for none.
    #[arg(long, env = "APIPOLICY_SIDECAR_MEMORY_LIMIT", default_value = "128Mi", value_parser = quantity)]
    pub sidecar_memory_limit: String,
}

/// A Kubernetes quantity, or empty.
fn quantity(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() || inject::quantity_value(s).is_some() {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a Kubernetes quantity (write it like 50m, 1, 32Mi or 1Gi)"))
    }
}

impl RunArgs {
    /// The sidecar's resources as the flags set them.
    pub fn sidecar_resources(&self) -> Resources {
        let set = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Resources {
            cpu_request: set(&self.sidecar_cpu_request),
            memory_request: set(&self.sidecar_memory_request),
            cpu_limit: set(&self.sidecar_cpu_limit),
            memory_limit: set(&self.sidecar_memory_limit),
        }
    }
}
