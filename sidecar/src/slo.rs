//! SLO accounting on every request, without a lock on the request path: each request adds to
//! atomic counters, and a background task folds them into the bounded time buckets of
//! `apipolicy_api::slo::SloSeries` every second (so a request is attributed to the second it
//! was folded in, never more than a second late).
//!
//! What counts: with an `availability` indicator a request is bad when its response is a 5xx,
//! the sidecar's own 502/503/504 included. With a `latency` indicator it is good when the
//! whole response (to its last byte, as the sidecar sees it) took at most the threshold and
//! was not a 5xx. Requests the sidecar refused because the policy worked as meant (a 429 of a
//! rate limit, a 503 of load shedding, a 401 for a missing key) are left out of the SLI and
//! counted in `apipolicy_slo_excluded_requests_total`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, UNIX_EPOCH},
};

use apipolicy_api::{
    IndicatorConfig, SidecarConfig, SloConfig, SloStatus,
    report::{Bucket, SloCounters, SloReport},
    slo::{BURN_WINDOWS, Counts, SloSeries},
};
use arc_swap::ArcSwap;
use prometheus::{Gauge, IntCounter, IntGauge};
use serde_json::json;

use crate::{clock::Clock, health::rfc3339, metrics::Metrics};

/// One SLO: its config (replaced on reload) and its history (kept while the name stays).
pub struct Tracker {
    pub config: ArcSwap<SloConfig>,
    /// Requests since the last fold: the total in the high 32 bits, the good in the low 32,
    /// so one atomic add counts a request and one swap takes both exactly.
    pending: AtomicU64,
    series: Mutex<SloSeries>,
    good_metric: IntCounter,
    bad_metric: IntCounter,
    excluded_metric: IntCounter,
    budget: Gauge,
    burn: Vec<Gauge>,
    /// `protect`: on, since when, and since when the SLO has been calm again (0: not).
    protecting: std::sync::atomic::AtomicBool,
    protect_since_ms: AtomicU64,
    calm_since_ms: AtomicU64,
    protection_gauge: IntGauge,
}

/// How long an SLO must stay below its `protect.when` before protection lifts: no flapping.
pub const PROTECTION_CALM_MS: u64 = 60_000;

impl Tracker {
    /// Whether the SLO's protection is on now.
    pub fn protecting(&self) -> bool {
        self.protecting.load(Ordering::Relaxed)
    }

    /// Starts or lifts protection by the SLO's state now (with [`PROTECTION_CALM_MS`] of calm
    /// before it lifts).
    fn evaluate(&self, state: apipolicy_api::SloState, now: u64) {
        use apipolicy_api::SloState;
        let config = self.config.load();
        let Some(protect) = &config.protect else {
            if self.protecting.swap(false, Ordering::Relaxed) {
                self.protection_gauge.set(0);
            }
            return;
        };
        let burning =
            if protect.from_warning { state >= SloState::Warning } else { state == SloState::Critical };
        if burning {
            self.calm_since_ms.store(0, Ordering::Relaxed);
            if !self.protecting.swap(true, Ordering::Relaxed) {
                self.protect_since_ms.store(now, Ordering::Relaxed);
                self.protection_gauge.set(1);
                tracing::warn!(slo = %config.name, ?state, "SLO protection on");
            }
            return;
        }
        if !self.protecting() {
            return;
        }
        match self.calm_since_ms.load(Ordering::Relaxed) {
            0 => self.calm_since_ms.store(now, Ordering::Relaxed),
            calm if now.saturating_sub(calm) >= PROTECTION_CALM_MS => {
                self.protecting.store(false, Ordering::Relaxed);
                self.calm_since_ms.store(0, Ordering::Relaxed);
                self.protection_gauge.set(0);
                tracing::info!(slo = %config.name, "SLO protection lifted");
            }
            _ => {}
        }
    }

    /// `/slo`'s view of the protection.
    fn protection_json(&self) -> serde_json::Value {
        let config = self.config.load();
        let Some(p) = &config.protect else { return serde_json::Value::Null };
        let mut actions = Vec::new();
        if p.serve_stale {
            actions.push("ServeStale");
        }
        if p.shed_by_priority {
            actions.push("ShedByPriority");
        }
        if p.tighten_permille.is_some() {
            actions.push("TightenLimits");
        }
        let active = self.protecting();
        json!({
            "active": active,
            "since": active.then(|| rfc3339(UNIX_EPOCH + Duration::from_millis(self.protect_since_ms.load(Ordering::Relaxed)))),
            "when": if p.from_warning { "Warning" } else { "Critical" },
            "actions": actions,
        })
    }

    /// Counts one request that got `status` after `elapsed_ms`.
    pub fn record(&self, status: u16, elapsed_ms: f64, policy_answer: bool) {
        if policy_answer {
            self.excluded_metric.inc();
            return;
        }
        let good = status < 500
            && match self.config.load().indicator {
                IndicatorConfig::Availability => true,
                IndicatorConfig::Latency { threshold_ms } => elapsed_ms <= threshold_ms as f64,
            };
        self.pending.fetch_add((1 << 32) | u64::from(good), Ordering::Relaxed);
        if good {
            self.good_metric.inc();
        } else {
            self.bad_metric.inc();
        }
    }

    /// Moves the counters into the series.
    fn fold(&self, now: u64) {
        let pending = self.pending.swap(0, Ordering::Relaxed);
        if pending != 0 {
            let counts = Counts { good: pending & 0xffff_ffff, total: pending >> 32 };
            self.series.lock().unwrap_or_else(|p| p.into_inner()).add(now, counts, now);
        }
    }

    pub fn status(&self, now: u64) -> SloStatus {
        let config = self.config.load();
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = series.status(&config.name, config.objective, config.window_ms, now);
        s.last_updated = Some(rfc3339(UNIX_EPOCH + Duration::from_millis(now)));
        s
    }

    fn update_gauges(&self, now: u64) {
        let s = self.status(now);
        self.evaluate(s.state, now);
        self.budget.set(s.error_budget_remaining);
        for ((window, _), gauge) in BURN_WINDOWS.iter().zip(&self.burn) {
            gauge.set(s.burn_rates.get(*window).copied().unwrap_or_default());
        }
    }

    fn minute_buckets_since(&self, since_ms: u64) -> Vec<Bucket> {
        self.series.lock().unwrap_or_else(|p| p.into_inner()).minute_buckets_since(since_ms)
    }
}

/// Every SLO of the sidecar, by name, across config reloads.
pub struct Slos {
    trackers: Mutex<HashMap<String, Arc<Tracker>>>,
    metrics: Metrics,
    pub started_ms: u64,
    clock: Clock,
}

impl Slos {
    pub fn new(metrics: Metrics, clock: Clock) -> Self {
        Self { trackers: Mutex::new(HashMap::new()), metrics, started_ms: clock.now_ms(), clock }
    }

    /// The trackers of `config`, in its order: an SLO that keeps its name keeps its history;
    /// the history of SLOs that went away is dropped with their metrics.
    pub fn apply(&self, config: &SidecarConfig) -> Vec<Arc<Tracker>> {
        let mut trackers = self.trackers.lock().unwrap_or_else(|p| p.into_inner());
        let names: Vec<&str> = config.spec.slos.iter().map(|s| s.name.as_str()).collect();
        trackers.retain(|name, _| {
            let keep = names.contains(&name.as_str());
            if !keep {
                self.metrics.forget_slo(name);
            }
            keep
        });
        config
            .spec
            .slos
            .iter()
            .map(|slo| {
                let tracker = trackers.entry(slo.name.clone()).or_insert_with(|| {
                    let m = self.metrics.slo(&slo.name);
                    Arc::new(Tracker {
                        config: ArcSwap::from_pointee(slo.clone()),
                        pending: AtomicU64::new(0),
                        series: Mutex::new(SloSeries::default()),
                        good_metric: m.good,
                        bad_metric: m.bad,
                        excluded_metric: m.excluded,
                        budget: m.budget,
                        burn: m.burn,
                        protecting: Default::default(),
                        protect_since_ms: AtomicU64::new(0),
                        calm_since_ms: AtomicU64::new(0),
                        protection_gauge: m.protection,
                    })
                });
                tracker.config.store(Arc::new(slo.clone()));
                tracker.clone()
            })
            .collect()
    }

    fn all(&self) -> Vec<Arc<Tracker>> {
        self.trackers.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Folds counters every second and refreshes the budget and burn-rate gauges.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = self.clock.now_ms();
            for t in self.all() {
                t.fold(now);
                t.update_gauges(now);
            }
        }
    }

    /// The body of `/slo`.
    pub fn document(&self, order: &[Arc<Tracker>]) -> serde_json::Value {
        let now = self.clock.now_ms();
        let slos: Vec<serde_json::Value> = order
            .iter()
            .map(|t| {
                t.fold(now);
                let config = t.config.load();
                let status = t.status(now);
                t.evaluate(status.state, now);
                let mut v = serde_json::to_value(status).unwrap_or_default();
                v["protection"] = t.protection_json();
                v["objective"] = json!(config.objective);
                v["windowMs"] = json!(config.window_ms);
                v["indicator"] = serde_json::to_value(&config.indicator).unwrap_or_default();
                v["routes"] = json!(config.routes);
                // What the figures cover: since the sidecar started, at most the window.
                v["since"] = json!(rfc3339(
                    UNIX_EPOCH
                        + Duration::from_millis(self.started_ms.max(now.saturating_sub(config.window_ms)))
                ));
                v
            })
            .collect();
        json!({ "slos": slos })
    }

    /// The report for the operator: minute buckets since `since_ms`, cumulative per bucket.
    pub fn report(&self, pod: &str, revision: &str, order: &[Arc<Tracker>], since_ms: u64) -> SloReport {
        let now = self.clock.now_ms();
        SloReport {
            pod: pod.to_owned(),
            started_at_ms: self.started_ms,
            sent_at_ms: now,
            revision: revision.to_owned(),
            slos: order
                .iter()
                .map(|t| {
                    t.fold(now);
                    SloCounters {
                        name: t.config.load().name.clone(),
                        buckets: t.minute_buckets_since(since_ms),
                    }
                })
                .collect(),
        }
    }
}
