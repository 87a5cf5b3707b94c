//! The command line. Every flag can also come from an `APIPOLICY_*` environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use apipolicy_api::contract::env;
use clap::{Args, Parser, Subcommand};

use crate::{
    agent::AgentFlags,
    demo::DemoArgs,
    sidecar::{Tuning, duration},
};

#[derive(Parser, Debug)]
#[command(
    name = "apipolicy-sidecar",
    version,
    about = "Enforces an ApiPolicy in front of one app: a reverse proxy with the policy's timeouts, limits and metrics",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  apipolicy-sidecar demo\n  apipolicy-sidecar --policy examples/quickstart.yaml --upstream http://127.0.0.1:8080\n  APIPOLICY_POLICY=/etc/apipolicy/config.json apipolicy-sidecar   # as injected into a pod"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
    /// Worker threads (default: the CPUs this process may use).
    #[arg(long, env = env::THREADS, global = true)]
    pub threads: Option<usize>,
    /// Log filter, such as `info`, `warn` or `info,access=off`.
    #[arg(long, env = "APIPOLICY_LOG", default_value = "info", global = true)]
    pub log: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a built-in demo products API with the sidecar in front of it.
    Demo(DemoArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// An ApiPolicy manifest, or a SidecarConfig compiled by the operator. Watched: valid
    /// changes apply without dropping connections; invalid ones are refused and logged.
    #[arg(long, env = env::POLICY, required = true)]
    pub policy: Option<PathBuf>,
    /// The app, as `http://host:port` (default: the policy's `upstream.port` on 127.0.0.1).
    #[arg(long, env = env::UPSTREAM)]
    pub upstream: Option<String>,
    /// Where clients connect.
    #[arg(long, env = env::LISTEN, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Where `/healthz`, `/readyz`, `/metrics` and `/slo` are served to anyone, and `/config`
    /// and `POST /purge` to loopback peers or holders of `--admin-token`.
    #[arg(long, env = env::ADMIN, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// Redis for `scope: Global` limits (over `spec.redis.url`, e.g. from a Secret); several
    /// comma-separated URLs are the seed nodes of a Redis Cluster.
    #[arg(long, env = env::REDIS)]
    pub redis: Option<String>,
    /// The operator's agent API (`https://…`), for instant config updates and SLO reports.
    #[arg(long, env = env::OPERATOR)]
    pub operator: Option<http::Uri>,
    /// The projected service-account token sent to the operator.
    #[arg(long, env = env::TOKEN_FILE)]
    pub token_file: Option<PathBuf>,
    /// The CA that signs the operator's certificate.
    #[arg(long, env = env::CA_FILE)]
    pub ca_file: Option<PathBuf>,
    /// This pod's name, for SLO reports (the injector sets it from the downward API).
    #[arg(long, env = env::POD_NAME, default_value = "local")]
    pub pod_name: String,
    /// How often SLO counters are reported to the operator.
    #[arg(long, env = "APIPOLICY_REPORT_INTERVAL", default_value = "10s", value_parser = duration)]
    pub report_interval: Duration,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// An error and its causes as one line: a cause whose text the message above already holds is
/// not said again (`cannot read …: No such file or directory` stays one line).
pub fn one_message(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// Builds the runtime and runs the command.
pub fn main(cli: Cli) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .map_err(|e| anyhow::anyhow!("--log {:?} is not a log filter: {e}", cli.log))?;
    // Logs go through a background writer so no request waits on stdout.
    let (writer, _guard) = tracing_appender::non_blocking(std::io::stdout());
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .init();
    // One thread: a current_thread runtime does the same work without the work-stealing
    // machinery, and runs woken tasks in FIFO order, so writes to the upstream are batched.
    let mut runtime = match cli.threads {
        Some(n) if n <= 1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all();
    if let Some(n) = cli.threads
        && n > 1
    {
        runtime.worker_threads(n);
    }
    let runtime = runtime.build()?;
    runtime.block_on(async move {
        match cli.command {
            Some(Command::Demo(args)) => crate::demo::run(args).await,
            None => {
                let run = cli.run;
                let policy = run.policy.expect("clap requires --policy");
                let mut flags = run.tuning.flags(policy, run.upstream, run.listen, run.admin);
                flags.redis = run.redis;
                flags.operator = run.operator.map(|url| AgentFlags {
                    url,
                    token_file: run.token_file,
                    ca_file: run.ca_file,
                    pod: run.pod_name,
                    report_interval: run.report_interval,
                });
                let handle = crate::server::start(flags).await?;
                crate::signal::stop_on_signal(&handle).await;
                handle.wait().await;
                Ok(())
            }
        }
    })
}
