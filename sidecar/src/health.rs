//! Active health checks of the app and its dependencies. They run on their own schedule,
//! never per request, and decide `/readyz` (not `/healthz`: a dead app must not get the
//! sidecar restarted).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use apipolicy_api::{CheckConfig, CheckTarget, HealthConfig};
use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use prometheus::{Histogram, IntGauge};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::{metrics::Metrics, upstream::Upstream};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// No result yet.
    Pending,
    Up,
    Down,
}

impl Status {
    /// As `/readyz` and the logs say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    pub name: String,
    pub status: Status,
    pub critical: bool,
    pub last_error: Option<String>,
    /// When the status last changed (RFC 3339).
    pub last_change: Option<String>,
    pub target: String,
}

struct State {
    status: Status,
    last_error: Option<String>,
    last_change: Option<SystemTime>,
    successes: u32,
    failures: u32,
}

impl State {
    /// Before the first result.
    fn pending() -> Self {
        Self { status: Status::Pending, last_error: None, last_change: None, successes: 0, failures: 0 }
    }
}

pub struct Check {
    config: CheckConfig,
    state: Mutex<State>,
    up: IntGauge,
    duration: Histogram,
}

impl Check {
    /// Applies one result with the thresholds: down after `unhealthy_threshold` failures in
    /// a row, up after `healthy_threshold` successes in a row; the first result decides.
    fn record(&self, result: Result<(), String>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = s.status;
        match result {
            Ok(()) => {
                s.successes += 1;
                s.failures = 0;
                if s.status == Status::Pending || s.successes >= self.config.healthy_threshold {
                    s.status = Status::Up;
                }
            }
            Err(e) => {
                s.failures += 1;
                s.successes = 0;
                s.last_error = Some(e);
                if s.status == Status::Pending || s.failures >= self.config.unhealthy_threshold {
                    s.status = Status::Down;
                }
            }
        }
        if s.status != before {
            s.last_change = Some(SystemTime::now());
            self.up.set(i64::from(s.status == Status::Up));
            tracing::info!(check = %self.config.name, status = s.status.as_str(), error = s.last_error.as_deref(), "health check changed");
        }
    }

    pub fn status(&self) -> Status {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).status
    }

    fn report(&self) -> CheckReport {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        CheckReport {
            name: self.config.name.clone(),
            status: s.status,
            critical: self.config.critical,
            last_error: s.last_error.clone(),
            last_change: s.last_change.map(rfc3339),
            target: match &self.config.target {
                CheckTarget::UpstreamPath(p) => format!("upstream GET {p}"),
                CheckTarget::Tcp(a) => format!("tcp {a}"),
                CheckTarget::Http { url, .. } => format!("GET {url}"),
            },
        }
    }
}

/// The checks of one config; their tasks stop when this is dropped.
pub struct Health {
    pub config: HealthConfig,
    pub upstream: Upstream,
    pub upstream_check: Option<Arc<Check>>,
    pub dependencies: Vec<Arc<Check>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Health {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

type ProbeClient = Client<HttpConnector, Empty<Bytes>>;

impl Health {
    pub fn start(config: &HealthConfig, upstream: &Upstream, metrics: &Metrics) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A probe opens its own connection each time: it must see what a new request would.
        let client: ProbeClient =
            Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector);
        let mut tasks = Vec::new();
        let mut spawn = |c: &CheckConfig| {
            let (up, duration) = metrics.health_check(&c.name);
            up.set(0);
            let check =
                Arc::new(Check { config: c.clone(), state: Mutex::new(State::pending()), up, duration });
            tasks.push(tokio::spawn(run(check.clone(), client.clone(), upstream.clone())));
            check
        };
        let upstream_check = config.upstream.as_ref().map(&mut spawn);
        let dependencies = config.dependencies.iter().map(&mut spawn).collect();
        Self { config: config.clone(), upstream: upstream.clone(), upstream_check, dependencies, tasks }
    }

    pub fn reports(&self) -> Vec<CheckReport> {
        self.upstream_check.iter().chain(&self.dependencies).map(|c| c.report()).collect()
    }

    /// Every critical dependency is up.
    pub fn dependencies_ready(&self) -> bool {
        self.dependencies.iter().filter(|c| c.config.critical).all(|c| c.status() == Status::Up)
    }
}

async fn run(check: Arc<Check>, client: ProbeClient, upstream: Upstream) {
    let interval = Duration::from_millis(check.config.interval_ms);
    let timeout = Duration::from_millis(check.config.timeout_ms);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = Instant::now();
        let result =
            match tokio::time::timeout(timeout, probe(&check.config.target, &client, &upstream)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
            };
        check.duration.observe(started.elapsed().as_secs_f64());
        check.record(result);
    }
}

async fn probe(target: &CheckTarget, client: &ProbeClient, upstream: &Upstream) -> Result<(), String> {
    match target {
        CheckTarget::Tcp(address) => tokio::net::TcpStream::connect(address)
            .await
            .map(drop)
            .map_err(|e| format!("connect {address}: {e}")),
        CheckTarget::UpstreamPath(path) => {
            let uri: Uri =
                format!("http://{}{path}", upstream.authority).parse().map_err(|e| format!("{path}: {e}"))?;
            let status = get(client, uri).await?;
            if status.is_success() || status.is_redirection() {
                Ok(())
            } else {
                Err(format!("GET {path} answered {status}"))
            }
        }
        CheckTarget::Http { url, expected_status } => {
            let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
            let status = get(client, uri).await?;
            let ok = match expected_status {
                Some(code) => status.as_u16() == *code,
                None => status.is_success(),
            };
            if ok { Ok(()) } else { Err(format!("GET {url} answered {status}")) }
        }
    }
}

async fn get(client: &ProbeClient, uri: Uri) -> Result<StatusCode, String> {
    let req = Request::get(uri.clone())
        .header("user-agent", "apipolicy-sidecar/health")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    client.request(req).await.map(|r| r.status()).map_err(|e| format!("GET {uri}: {e}"))
}

/// RFC 3339 in UTC, without a date-time crate.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3_600, rest % 3_600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_650_000)), "2026-11-25T23:40:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
    }

    fn check(unhealthy: u32, healthy: u32) -> Check {
        Check {
            config: CheckConfig {
                name: "db".into(),
                target: CheckTarget::Tcp("db:5432".into()),
                critical: true,
                interval_ms: 1000,
                timeout_ms: 100,
                unhealthy_threshold: unhealthy,
                healthy_threshold: healthy,
            },
            state: Mutex::new(State::pending()),
            up: IntGauge::new("t", "t").unwrap(),
            duration: Histogram::with_opts(prometheus::HistogramOpts::new("d", "d")).unwrap(),
        }
    }

    #[test]
    fn thresholds_decide_the_transitions() {
        let c = check(3, 2);
        c.record(Ok(()));
        assert_eq!(c.status(), Status::Up, "the first result decides");
        c.record(Err("refused".into()));
        c.record(Err("refused".into()));
        assert_eq!(c.status(), Status::Up, "two failures are under the threshold of 3");
        c.record(Err("refused".into()));
        assert_eq!(c.status(), Status::Down);
        assert_eq!(c.up.get(), 0);
        c.record(Ok(()));
        assert_eq!(c.status(), Status::Down, "one success is under the threshold of 2");
        c.record(Ok(()));
        assert_eq!(c.status(), Status::Up);
        assert_eq!(c.up.get(), 1);
        assert_eq!(c.report().last_error.as_deref(), Some("refused"));
    }
}
