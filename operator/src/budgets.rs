//! Every policy's merged SLO history in memory: reports go in from the agent API, figures come
//! out for the status at most every 15 s, and snapshots go to `apipolicy-<name>-slo`.

use std::{collections::HashMap, sync::Mutex};

use apipolicy_api::{SloConfig, SloStatus, report::SloReport, slo::HOUR_MS};
use k8s_openapi::jiff::Timestamp;

use crate::{
    error::Result,
    hub::PolicyKey,
    slo_merge::{Merged, SloHistory, Snapshot, Watermarks},
};

/// The status figures of a policy are recomputed (and its history saved) at most this often.
pub const INTERVAL_MS: u64 = 15_000;

#[derive(Default)]
struct Entry {
    history: SloHistory,
    /// When the figures were computed, for which SLOs, and the figures.
    computed: Option<(u64, Vec<SloConfig>, Vec<SloStatus>)>,
    /// Merged reports not yet saved.
    dirty: bool,
    saved_at_ms: u64,
    /// When a trimmed save was last logged as a warning.
    trim_warned_at_ms: Option<u64>,
}

/// A policy whose history stays too large is trimmed at every save (every few seconds): its
/// warning is logged at most this often, the others at debug level (the metric counts all).
const TRIM_WARNING_EVERY_MS: u64 = HOUR_MS;

#[derive(Default)]
pub struct Budgets {
    entries: Mutex<HashMap<PolicyKey, Entry>>,
}

impl Budgets {
    fn with<T>(
        &self,
        key: &PolicyKey,
        load: impl FnOnce() -> SloHistory,
        f: impl FnOnce(&mut Entry) -> T,
    ) -> T {
        let mut map = self.entries.lock().expect("budgets lock");
        let entry = map.entry(key.clone()).or_insert_with(|| Entry { history: load(), ..Entry::default() });
        f(entry)
    }

    /// Merges a report into the policy's history, loading the saved history first if needed.
    pub fn merge(
        &self,
        key: &PolicyKey,
        slos: &[&str],
        report: &SloReport,
        now_ms: u64,
        load: impl FnOnce() -> SloHistory,
    ) -> Result<Merged> {
        self.with(key, load, |e| {
            let merged = e.history.merge(report, slos, now_ms)?;
            e.dirty |= merged.counted > 0 || !merged.unknown_slos.is_empty() || merged.ack.ack_ms == 0;
            Ok(merged)
        })
    }

    /// The figures of each SLO, recomputed when older than the interval or when the SLOs
    /// changed; `lastUpdated` is when they were computed.
    pub fn statuses(
        &self,
        key: &PolicyKey,
        slos: &[SloConfig],
        now_ms: u64,
        load: impl FnOnce() -> SloHistory,
    ) -> Vec<SloStatus> {
        if slos.is_empty() {
            return Vec::new();
        }
        self.with(key, load, |e| {
            if let Some((at, for_slos, figures)) = &e.computed
                && now_ms.saturating_sub(*at) < INTERVAL_MS
                && for_slos == slos
            {
                return figures.clone();
            }
            let stamp = Timestamp::from_millisecond(now_ms as i64).map(|t| t.to_string()).ok();
            let figures: Vec<SloStatus> = e
                .history
                .statuses(slos, now_ms)
                .into_iter()
                .map(|s| SloStatus { last_updated: stamp.clone(), ..s })
                .collect();
            e.computed = Some((now_ms, slos.to_vec(), figures.clone()));
            figures
        })
    }

    /// A snapshot to save, of at most `max_bytes`, when there is something new and the last
    /// save is older than the interval. Drops the bookkeeping of processes that will not report
    /// again first. The snapshot is made outside the lock and off the async threads: encoding
    /// takes milliseconds, trimming a large history to fit a few encodings, and reports keep
    /// being merged and other policies reconciled meanwhile.
    pub async fn snapshot_if_due(
        &self,
        key: &PolicyKey,
        slos: &[SloConfig],
        now_ms: u64,
        pod_is_live: &(dyn Fn(&str) -> bool + Sync),
        max_bytes: usize,
    ) -> Result<Option<Snapshot>> {
        let history = {
            let mut map = self.entries.lock().expect("budgets lock");
            let Some(e) = map.get_mut(key) else { return Ok(None) };
            if !e.dirty || now_ms.saturating_sub(e.saved_at_ms) < INTERVAL_MS {
                return Ok(None);
            }
            e.history.forget_processes(pod_is_live, now_ms);
            let names: Vec<&str> = slos.iter().map(|s| s.name.as_str()).collect();
            e.history.retain_slos(&names);
            e.dirty = false;
            e.history.clone()
        };
        let slos = slos.to_vec();
        let snapshot = tokio::task::spawn_blocking(move || history.snapshot_within(&slos, now_ms, max_bytes))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        if snapshot.is_err() {
            self.save_failed(key);
        }
        snapshot.map(Some)
    }

    /// The snapshot was saved: its acknowledgements hold from now on.
    pub fn saved(&self, key: &PolicyKey, marks: Watermarks, now_ms: u64) {
        if let Some(e) = self.entries.lock().expect("budgets lock").get_mut(key) {
            e.history.saved(marks);
            e.saved_at_ms = now_ms;
        }
    }

    /// Whether a trimmed save of `key` at `now_ms` is to be logged as a warning: the first one,
    /// and then one an hour.
    pub fn warn_of_trim(&self, key: &PolicyKey, now_ms: u64) -> bool {
        let mut map = self.entries.lock().expect("budgets lock");
        let Some(e) = map.get_mut(key) else { return true };
        if e.trim_warned_at_ms.is_some_and(|at| now_ms.saturating_sub(at) < TRIM_WARNING_EVERY_MS) {
            return false;
        }
        e.trim_warned_at_ms = Some(now_ms);
        true
    }

    /// Saving failed: try again at the next chance.
    pub fn save_failed(&self, key: &PolicyKey) {
        if let Some(e) = self.entries.lock().expect("budgets lock").get_mut(key) {
            e.dirty = true;
        }
    }

    /// Policies with merged reports not yet saved.
    pub fn unsaved(&self) -> Vec<PolicyKey> {
        let map = self.entries.lock().expect("budgets lock");
        map.iter().filter(|(_, e)| e.dirty).map(|(k, _)| k.clone()).collect()
    }

    /// Forces the next save of a policy regardless of the interval (used at shutdown).
    pub fn make_due(&self, key: &PolicyKey) {
        if let Some(e) = self.entries.lock().expect("budgets lock").get_mut(key) {
            e.saved_at_ms = 0;
        }
    }

    pub fn forget(&self, key: &PolicyKey) {
        self.entries.lock().expect("budgets lock").remove(key);
    }

    /// Drops everything held in memory, so that the next use reloads the saved histories (when
    /// this replica becomes the leader, another one wrote them meanwhile).
    pub fn clear(&self) {
        self.entries.lock().expect("budgets lock").clear();
    }
}

#[cfg(test)]
mod tests {
    use apipolicy_api::{
        IndicatorConfig,
        report::{Bucket, SloCounters},
        slo::MINUTE_MS,
    };

    use super::*;

    const T0: u64 = 1_800_000_000_000;
    const MAX: usize = crate::render::HISTORY_MAX_BYTES;

    fn slos() -> Vec<SloConfig> {
        vec![SloConfig {
            name: "availability".into(),
            objective: 99.9,
            window_ms: 30 * 86_400_000,
            indicator: IndicatorConfig::Availability,
            routes: vec![],
            protect: None,
        }]
    }

    fn report(sent: u64, good: u64, total: u64) -> SloReport {
        SloReport {
            pod: "p".into(),
            started_at_ms: T0,
            sent_at_ms: sent,
            revision: "sha256:r".into(),
            slos: vec![SloCounters {
                name: "availability".into(),
                buckets: vec![Bucket { start_ms: T0, width_ms: MINUTE_MS, good, total }],
            }],
        }
    }

    #[tokio::test]
    async fn figures_refresh_at_most_every_interval_and_saves_follow_new_reports() {
        let b = Budgets::default();
        let key: PolicyKey = ("shop".into(), "products".into());
        let live = |_: &str| true;
        let first = b.statuses(&key, &slos(), T0, SloHistory::default);
        assert_eq!(
            (first[0].total_requests, first[0].last_updated.as_deref()),
            (0, Some("2027-01-15T08:00:00Z"))
        );
        b.merge(&key, &["availability"], &report(T0 + 1_000, 9, 10), T0 + 1_000, || unreachable!("loaded"))
            .unwrap();
        // Within the interval: the cached figures.
        assert_eq!(b.statuses(&key, &slos(), T0 + 14_999, || unreachable!())[0].total_requests, 0);
        let later = b.statuses(&key, &slos(), T0 + 15_000, || unreachable!());
        assert_eq!(later[0].total_requests, 10);
        // Changed SLOs are recomputed at once.
        let mut changed = slos();
        changed[0].objective = 80.0;
        // 1 bad of 10 on a 20% allowance: half the budget spent.
        assert_eq!(
            b.statuses(&key, &changed, T0 + 15_001, || unreachable!())[0].error_budget_remaining,
            50.0
        );

        let Snapshot { marks, trimmed, .. } =
            b.snapshot_if_due(&key, &slos(), T0 + 15_000, &live, MAX).await.unwrap().expect("due");
        assert_eq!(trimmed, None, "a small history is saved whole");
        assert!(
            b.snapshot_if_due(&key, &slos(), T0 + 15_000, &live, MAX).await.unwrap().is_none(),
            "nothing new"
        );
        b.saved(&key, marks, T0 + 15_000);
        let acked = b
            .merge(&key, &["availability"], &report(T0 + 16_000, 10, 11), T0 + 16_000, || unreachable!())
            .unwrap();
        assert_eq!(acked.ack.ack_ms, T0 + 1_000);
        assert!(
            b.snapshot_if_due(&key, &slos(), T0 + 20_000, &live, MAX).await.unwrap().is_none(),
            "too soon"
        );
        assert_eq!(b.unsaved(), vec![key.clone()]);
        b.make_due(&key);
        assert!(b.snapshot_if_due(&key, &slos(), T0 + 20_000, &live, MAX).await.unwrap().is_some());
        b.save_failed(&key);
        assert_eq!(b.unsaved(), vec![key.clone()]);
        b.clear();
        let mut loaded = false;
        b.statuses(&key, &slos(), T0, || {
            loaded = true;
            SloHistory::default()
        });
        assert!(loaded, "cleared entries reload the saved history");
    }

    #[test]
    fn a_trimmed_save_is_warned_of_once_an_hour() {
        let b = Budgets::default();
        let key: PolicyKey = ("shop".into(), "products".into());
        b.merge(&key, &["availability"], &report(T0 + 1_000, 9, 10), T0 + 1_000, SloHistory::default)
            .unwrap();
        assert!(b.warn_of_trim(&key, T0));
        assert!(!b.warn_of_trim(&key, T0 + 15_000));
        assert!(!b.warn_of_trim(&key, T0 + HOUR_MS - 1));
        assert!(b.warn_of_trim(&key, T0 + HOUR_MS));
        assert!(!b.warn_of_trim(&key, T0 + HOUR_MS + 15_000));
    }

    #[tokio::test]
    async fn a_history_that_cannot_fit_is_not_saved_and_stays_due() {
        let b = Budgets::default();
        let key: PolicyKey = ("shop".into(), "products".into());
        let live = |_: &str| true;
        b.merge(&key, &["availability"], &report(T0 + 1_000, 9, 10), T0 + 1_000, SloHistory::default)
            .unwrap();
        let tiny = b.snapshot_if_due(&key, &slos(), T0 + 15_000, &live, 10).await;
        assert!(matches!(tiny, Err(crate::error::Error::HistoryTooLarge { budget: 10, .. })), "{tiny:?}");
        assert_eq!(b.unsaved(), vec![key.clone()], "tried again at the next chance");
        assert!(b.snapshot_if_due(&key, &slos(), T0 + 15_000, &live, MAX).await.unwrap().is_some());
    }
}
