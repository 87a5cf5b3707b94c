//! The merged SLO history of one policy: the reports of all its pods folded into one
//! [`SloSeries`] per SLO, following the semantics at the top of `apipolicy_api::report`. Pure:
//! the clock is an argument.
//!
//! - A bucket's counts are cumulative for that bucket in one sidecar process (pod,
//!   `startedAtMs`), so the history remembers the counts it has seen per bucket and adds only
//!   what grew. A report seen twice, or an older report arriving late, adds nothing.
//! - A restarted sidecar has a new `startedAtMs`: a new process whose counts start again from
//!   zero and are added in full; what the old process reported stays.
//! - A pod that vanishes keeps what it reported; its bookkeeping is dropped once it is gone.
//! - A sidecar whose clock is off by minutes has its buckets moved by the skew (estimated from
//!   `sentAtMs`, in whole minutes), so its requests land in the windows they happened in.
//! - The acknowledgement is the newest report whose merge has been saved: a sidecar resends
//!   what came after it, so a crash of the operator between two saves loses nothing, and the
//!   remembered counts make the resend count once.

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Write},
};

use apipolicy_api::{
    SloConfig, SloStatus,
    report::{ReportAck, SloReport},
    slo::{Counts, HOUR_MS, MINUTE_MS, SloSeries},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Remembered counts below the acknowledgement, in memory: a resend after a lost
/// acknowledgement still counts once unless acknowledgements were lost for this long.
const SEEN_KEPT_MS: u64 = HOUR_MS;
/// Remembered counts below the acknowledgement that are saved. A resend after a restart of the
/// operator starts at most one save interval (seconds) below the saved acknowledgement.
const SEEN_SAVED_MS: u64 = 10 * MINUTE_MS;
/// A report holds at most three days of buckets.
const REPORT_SPAN_MS: u64 = 72 * HOUR_MS;
/// A sidecar process not heard from for this long is forgotten when its pod is gone or the pod
/// runs a newer process.
const INSTANCE_IDLE_MS: u64 = 10 * MINUTE_MS;
/// Clocks closer than this are taken as agreeing: the difference is mostly transit time.
const SKEW_TOLERANCE_MS: u64 = 2 * MINUTE_MS;
const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Process {
    pod: String,
    started_at_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Instance {
    /// (SLO, bucket start on the sidecar's clock) → the largest counts reported for it.
    seen: BTreeMap<(String, u64), Counts>,
    /// `sentAtMs` of the newest report merged.
    merged_ms: u64,
    /// `sentAtMs` of the newest report whose merge was saved: the acknowledgement.
    acked_ms: u64,
    /// When the last report arrived, on the operator's clock.
    last_report_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SloHistory {
    series: BTreeMap<String, SloSeries>,
    instances: BTreeMap<Process, Instance>,
}

/// What a merge did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merged {
    pub ack: ReportAck,
    /// Requests counted for the first time.
    pub counted: u64,
    /// SLOs of the report that the policy does not have (renamed or removed): ignored.
    pub unknown_slos: Vec<String>,
}

/// The acknowledgements a snapshot would make true once it is saved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watermarks(Vec<(Process, u64)>);

/// The sidecar's clock minus the operator's, in whole minutes; zero within the tolerance.
fn skew_ms(sent_at_ms: u64, now_ms: u64) -> i64 {
    let d = sent_at_ms as i64 - now_ms as i64;
    if d.unsigned_abs() < SKEW_TOLERANCE_MS {
        0
    } else {
        (d as f64 / MINUTE_MS as f64).round() as i64 * MINUTE_MS as i64
    }
}

impl SloHistory {
    /// Folds one report in. `slos` are the policy's SLO names; a report with a malformed bucket
    /// changes nothing.
    pub fn merge(&mut self, report: &SloReport, slos: &[&str], now_ms: u64) -> Result<Merged> {
        for c in &report.slos {
            for b in &c.buckets {
                if b.width_ms != MINUTE_MS {
                    return Err(Error::InvalidReport(format!(
                        "SLO {}: the bucket at {} is {} ms wide; buckets are one minute (60000 ms)",
                        c.name, b.start_ms, b.width_ms
                    )));
                }
                if b.good > b.total {
                    return Err(Error::InvalidReport(format!(
                        "SLO {}: the bucket at {} has more good requests ({}) than requests ({})",
                        c.name, b.start_ms, b.good, b.total
                    )));
                }
            }
        }
        let skew = skew_ms(report.sent_at_ms, now_ms);
        let process = Process { pod: report.pod.clone(), started_at_ms: report.started_at_ms };
        let instance = self.instances.entry(process).or_default();
        let mut counted = 0;
        let mut unknown_slos = Vec::new();
        for c in &report.slos {
            if !slos.contains(&c.name.as_str()) {
                unknown_slos.push(c.name.clone());
                continue;
            }
            for b in &c.buckets {
                let seen = instance.seen.entry((c.name.clone(), b.start_ms)).or_default();
                let total = b.total.saturating_sub(seen.total);
                let good = b.good.saturating_sub(seen.good).min(total);
                seen.total = seen.total.max(b.total);
                seen.good = seen.good.max(b.good);
                if total == 0 {
                    continue;
                }
                // On the operator's clock; what still lies ahead of it is counted now.
                let at_ms = (b.start_ms as i64 - skew).clamp(0, now_ms as i64) as u64;
                self.series.entry(c.name.clone()).or_default().add(at_ms, Counts { good, total }, now_ms);
                counted += total;
            }
        }
        instance.merged_ms = instance.merged_ms.max(report.sent_at_ms);
        instance.last_report_ms = now_ms;
        let floor = instance
            .acked_ms
            .saturating_sub(SEEN_KEPT_MS)
            .max(instance.merged_ms.saturating_sub(REPORT_SPAN_MS))
            .saturating_sub(MINUTE_MS);
        instance.seen.retain(|(_, start), _| *start >= floor);
        Ok(Merged { ack: ReportAck { ack_ms: instance.acked_ms }, counted, unknown_slos })
    }

    /// Every SLO's figures at `now_ms`; an SLO without reports is at 100%.
    pub fn statuses(&self, slos: &[SloConfig], now_ms: u64) -> Vec<SloStatus> {
        let empty = SloSeries::default();
        slos.iter()
            .map(|s| {
                self.series.get(&s.name).unwrap_or(&empty).status(&s.name, s.objective, s.window_ms, now_ms)
            })
            .collect()
    }

    /// Drops the bookkeeping of sidecar processes that will not report again: idle ones whose
    /// pod is gone or runs a newer process, and any silent for longer than a report may span.
    /// Their counts stay in the history.
    pub fn forget_processes(&mut self, pod_is_live: &dyn Fn(&str) -> bool, now_ms: u64) {
        let mut newest: HashMap<String, u64> = HashMap::new();
        for p in self.instances.keys() {
            let n = newest.entry(p.pod.clone()).or_default();
            *n = (*n).max(p.started_at_ms);
        }
        self.instances.retain(|p, i| {
            let idle = now_ms.saturating_sub(i.last_report_ms);
            let replaced = newest.get(&p.pod).is_some_and(|n| *n > p.started_at_ms);
            idle <= REPORT_SPAN_MS && (idle <= INSTANCE_IDLE_MS || (pod_is_live(&p.pod) && !replaced))
        });
    }

    /// Keeps only the series of these SLOs.
    pub fn retain_slos(&mut self, slos: &[&str]) {
        self.series.retain(|name, _| slos.contains(&name.as_str()));
    }

    pub fn processes(&self) -> usize {
        self.instances.len()
    }

    /// The saved form (gzipped JSON) and the acknowledgements it makes true once saved.
    pub fn snapshot(&self) -> Result<(Vec<u8>, Watermarks)> {
        let stored = Stored {
            version: FORMAT_VERSION,
            slos: self.series.iter().map(|(name, s)| (name.clone(), StoredSeries::from(s))).collect(),
            processes: self
                .instances
                .iter()
                .map(|(p, i)| StoredProcess {
                    pod: p.pod.clone(),
                    started_at_ms: p.started_at_ms,
                    // What the sidecar may be told once this snapshot is saved.
                    acked_ms: i.merged_ms,
                    last_report_ms: i.last_report_ms,
                    seen: i
                        .seen
                        .iter()
                        .filter(|((_, start), _)| *start + SEEN_SAVED_MS >= i.merged_ms)
                        .map(|((slo, start), c)| (slo.clone(), *start, c.good, c.total))
                        .collect(),
                })
                .collect(),
        };
        let json = serde_json::to_vec(&stored).expect("the history always serializes");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&json).map_err(Error::EncodeHistory)?;
        let bytes = gz.finish().map_err(Error::EncodeHistory)?;
        let marks = self.instances.iter().map(|(p, i)| (p.clone(), i.merged_ms)).collect();
        Ok((bytes, Watermarks(marks)))
    }

    /// Records that a snapshot was saved: its acknowledgements now hold.
    pub fn saved(&mut self, marks: Watermarks) {
        for (p, mark) in marks.0 {
            if let Some(i) = self.instances.get_mut(&p) {
                i.acked_ms = i.acked_ms.max(mark);
            }
        }
    }

    /// Reads a saved snapshot back.
    pub fn restore(bytes: &[u8]) -> Result<Self> {
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut json)
            .map_err(|e| Error::DecodeHistory(format!("not gzip: {e}")))?;
        let stored: Stored =
            serde_json::from_slice(&json).map_err(|e| Error::DecodeHistory(e.to_string()))?;
        if stored.version != FORMAT_VERSION {
            return Err(Error::DecodeHistory(format!("unknown format version {}", stored.version)));
        }
        let mut series = BTreeMap::new();
        for (name, s) in stored.slos {
            series.insert(name, s.into_series()?);
        }
        let instances = stored
            .processes
            .into_iter()
            .map(|p| {
                let instance = Instance {
                    seen: p
                        .seen
                        .into_iter()
                        .map(|(slo, start, good, total)| ((slo, start), Counts { good, total }))
                        .collect(),
                    merged_ms: p.acked_ms,
                    acked_ms: p.acked_ms,
                    last_report_ms: p.last_report_ms,
                };
                (Process { pod: p.pod, started_at_ms: p.started_at_ms }, instance)
            })
            .collect();
        Ok(Self { series, instances })
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    slos: BTreeMap<String, StoredSeries>,
    processes: Vec<StoredProcess>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredProcess {
    pod: String,
    started_at_ms: u64,
    acked_ms: u64,
    last_report_ms: u64,
    /// (SLO, bucket start, good, total).
    seen: Vec<(String, u64, u64, u64)>,
}

/// A series as rows of `[index step, good, total]`, the index (minute or hour since the epoch)
/// written as the step from the previous row: consecutive buckets cost a `1`.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct StoredSeries {
    minutes: Vec<[u64; 3]>,
    hours: Vec<[u64; 3]>,
}

impl From<&SloSeries> for StoredSeries {
    fn from(s: &SloSeries) -> Self {
        // SloSeries keeps its maps private; its serde form is `{minutes: {index: {good, total}}, hours: …}`.
        let v = serde_json::to_value(s).expect("a series always serializes");
        let rows = |field: &str| {
            let mut rows: Vec<(u64, u64, u64)> = v[field]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, c)| Some((k.parse().ok()?, c["good"].as_u64()?, c["total"].as_u64()?)))
                .collect();
            rows.sort_unstable();
            let mut previous = 0;
            rows.into_iter()
                .map(|(index, good, total)| {
                    let step = index - previous;
                    previous = index;
                    [step, good, total]
                })
                .collect()
        };
        Self { minutes: rows("minutes"), hours: rows("hours") }
    }
}

impl StoredSeries {
    fn into_series(self) -> Result<SloSeries> {
        let map = |rows: Vec<[u64; 3]>| {
            let mut index = 0u64;
            let mut m = serde_json::Map::new();
            for [step, good, total] in rows {
                index += step;
                m.insert(index.to_string(), json!({"good": good, "total": total}));
            }
            Value::Object(m)
        };
        serde_json::from_value(json!({"minutes": map(self.minutes), "hours": map(self.hours)}))
            .map_err(|e| Error::DecodeHistory(format!("a series: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use apipolicy_api::{
        IndicatorConfig, SloState,
        report::{Bucket, SloCounters},
    };

    use super::*;

    const T0: u64 = 1_800_000_000_000; // on a minute boundary
    const NAMES: &[&str] = &["availability"];

    fn at(minute: u64) -> u64 {
        T0 + minute * MINUTE_MS
    }

    fn report(pod: &str, started: u64, sent: u64, buckets: &[(u64, u64, u64)]) -> SloReport {
        SloReport {
            pod: pod.into(),
            started_at_ms: started,
            sent_at_ms: sent,
            revision: "sha256:r".into(),
            slos: vec![SloCounters {
                name: "availability".into(),
                buckets: buckets
                    .iter()
                    .map(|&(start_ms, good, total)| Bucket { start_ms, width_ms: MINUTE_MS, good, total })
                    .collect(),
            }],
        }
    }

    fn slo() -> SloConfig {
        SloConfig {
            name: "availability".into(),
            objective: 99.0,
            window_ms: 30 * 24 * HOUR_MS,
            indicator: IndicatorConfig::Availability,
            routes: vec![],
        }
    }

    fn totals(h: &SloHistory, now: u64) -> (u64, u64) {
        let s = &h.statuses(&[slo()], now)[0];
        (s.good_requests, s.total_requests)
    }

    /// Each step merges reports into one history; the expected totals are what really happened.
    #[test]
    fn merge_table() {
        struct Case {
            name: &'static str,
            reports: Vec<SloReport>,
            expected: (u64, u64),
        }
        let cases = vec![
            Case {
                name: "one pod, growing cumulative bucket",
                reports: vec![
                    report("a", T0, at(0) + 10_000, &[(at(0), 9, 10)]),
                    report("a", T0, at(0) + 50_000, &[(at(0), 18, 20)]),
                ],
                expected: (18, 20),
            },
            Case {
                name: "the same report twice counts once",
                reports: vec![
                    report("a", T0, at(1), &[(at(0), 9, 10)]),
                    report("a", T0, at(1), &[(at(0), 9, 10)]),
                ],
                expected: (9, 10),
            },
            Case {
                name: "an older report arriving late adds nothing",
                reports: vec![
                    report("a", T0, at(2), &[(at(0), 18, 20), (at(1), 5, 5)]),
                    report("a", T0, at(1), &[(at(0), 9, 10)]),
                ],
                expected: (23, 25),
            },
            Case {
                name: "a resend after a lost acknowledgement counts once",
                reports: vec![
                    report("a", T0, at(1), &[(at(0), 9, 10)]),
                    report("a", T0, at(2), &[(at(0), 10, 12), (at(1), 4, 4)]),
                ],
                expected: (14, 16),
            },
            Case {
                name: "a counter reset: the restarted sidecar starts again from zero",
                reports: vec![
                    report("a", T0, at(1), &[(at(0), 90, 100)]),
                    // The process restarted in minute 0: its first report counts 5 new requests
                    // in the same minute, which add to what the old process counted.
                    report("a", at(0) + 30_000, at(1), &[(at(0), 5, 5)]),
                ],
                expected: (95, 105),
            },
            Case {
                name: "two pods add up",
                reports: vec![
                    report("a", T0, at(1), &[(at(0), 9, 10)]),
                    report("b", T0, at(1), &[(at(0), 10, 10)]),
                ],
                expected: (19, 20),
            },
            Case {
                name: "SLOs the policy does not have are ignored",
                reports: vec![SloReport {
                    slos: vec![SloCounters {
                        name: "gone".into(),
                        buckets: vec![Bucket { start_ms: at(0), width_ms: MINUTE_MS, good: 1, total: 1 }],
                    }],
                    ..report("a", T0, at(1), &[])
                }],
                expected: (0, 0),
            },
        ];
        for case in cases {
            let mut h = SloHistory::default();
            for r in &case.reports {
                h.merge(r, NAMES, at(2)).unwrap();
            }
            assert_eq!(totals(&h, at(2)), case.expected, "{}", case.name);
        }
    }

    #[test]
    fn malformed_reports_change_nothing() {
        let mut h = SloHistory::default();
        let mut wide = report("a", T0, at(1), &[(at(0), 1, 1)]);
        wide.slos[0].buckets.push(Bucket { start_ms: at(0), width_ms: 5 * MINUTE_MS, good: 1, total: 1 });
        assert!(
            matches!(h.merge(&wide, NAMES, at(1)), Err(Error::InvalidReport(m)) if m.contains("one minute"))
        );
        let more_good = report("a", T0, at(1), &[(at(0), 3, 2)]);
        assert!(matches!(h.merge(&more_good, NAMES, at(1)), Err(Error::InvalidReport(_))));
        assert_eq!(h, SloHistory::default());
    }

    #[test]
    fn clock_skew_moves_buckets_onto_the_operators_clock() {
        // The pod's clock runs 10 minutes ahead. Its outage (all bad) at its minute 70 happened
        // at the operator's minute 60, which is what the 5m burn rate must see at minute 62.
        let mut skewed = SloHistory::default();
        let mut straight = SloHistory::default();
        let ahead = 10 * MINUTE_MS;
        let now = at(62);
        skewed.merge(&report("a", T0, now + ahead, &[(at(70), 0, 100)]), NAMES, now).unwrap();
        straight.merge(&report("b", T0, now, &[(at(60), 0, 100)]), NAMES, now).unwrap();
        assert_eq!(skewed.statuses(&[slo()], now), straight.statuses(&[slo()], now));
        assert_eq!(skewed.statuses(&[slo()], now)[0].state, SloState::Critical);

        // Small differences are transit time, not skew: nothing moves.
        let mut near = SloHistory::default();
        near.merge(&report("a", T0, now + 30_000, &[(at(61), 0, 10)]), NAMES, now).unwrap();
        assert_eq!(near.statuses(&[slo()], now)[0].burn_rates["5m"], 100.0);

        // A bucket still ahead of the operator after the correction is counted now, not lost.
        let mut future = SloHistory::default();
        future.merge(&report("a", T0, now, &[(at(64), 1, 1)]), NAMES, now).unwrap();
        assert_eq!(totals(&future, now), (1, 1));
        assert_eq!(skew_ms(at(0), at(0) + 90 * MINUTE_MS + 20_000), -90 * MINUTE_MS as i64);
    }

    #[test]
    fn acknowledgement_is_the_last_saved_report() {
        let mut h = SloHistory::default();
        let first = h.merge(&report("a", T0, at(1), &[(at(0), 9, 10)]), NAMES, at(1)).unwrap();
        assert_eq!((first.ack.ack_ms, first.counted), (0, 10), "nothing saved yet");
        let (_, marks) = h.snapshot().unwrap();
        // A report merged after the snapshot was taken is not covered by it.
        h.merge(&report("a", T0, at(2), &[(at(1), 1, 1)]), NAMES, at(2)).unwrap();
        h.saved(marks);
        let next = h.merge(&report("a", T0, at(3), &[(at(1), 1, 1)]), NAMES, at(3)).unwrap();
        assert_eq!((next.ack.ack_ms, next.counted), (at(1), 0));
    }

    /// The operator crashes after a save; its successor restores the snapshot and the sidecar
    /// resends everything after the acknowledgement it had: every request counts exactly once.
    #[test]
    fn a_restart_of_the_operator_loses_nothing_and_counts_nothing_twice() {
        let mut before = SloHistory::default();
        before
            .merge(&report("a", T0, at(1) + 1_000, &[(at(0), 50, 60), (at(1), 1, 1)]), NAMES, at(1) + 1_000)
            .unwrap();
        let (bytes, marks) = before.snapshot().unwrap();
        before.saved(marks);
        // Merged after the save, then lost with the crash.
        before.merge(&report("a", T0, at(1) + 20_000, &[(at(1), 5, 6)]), NAMES, at(1) + 20_000).unwrap();
        assert_eq!(totals(&before, at(2)), (55, 66));

        let mut after = SloHistory::restore(&bytes).unwrap();
        assert_eq!(totals(&after, at(2)), (51, 61));
        // The sidecar was acknowledged up to at(1)+1000, so it resends minute 1 (grown since).
        let resent = after.merge(&report("a", T0, at(2), &[(at(1), 7, 8)]), NAMES, at(2)).unwrap();
        assert_eq!(resent.ack.ack_ms, at(1) + 1_000);
        assert_eq!(totals(&after, at(2)), (57, 68));
        assert_eq!(after.statuses(&[slo()], at(2)), {
            let mut truth = SloHistory::default();
            truth.merge(&report("x", T0, at(2), &[(at(0), 50, 60), (at(1), 7, 8)]), NAMES, at(2)).unwrap();
            truth.statuses(&[slo()], at(2))
        });
    }

    #[test]
    fn snapshots_round_trip_and_stay_small() {
        let mut h = SloHistory::default();
        // Thirty days of traffic in every minute from two pods.
        let days = 30 * 24 * 60;
        for m in (0..days).step_by(60) {
            let buckets: Vec<(u64, u64, u64)> =
                (m..m + 60).map(|i| (at(i), 1000 + i % 7, 1001 + i % 7)).collect();
            for pod in ["a", "b"] {
                h.merge(&report(pod, T0, at(m + 60), &buckets), NAMES, at(m + 60)).unwrap();
            }
        }
        let (bytes, _) = h.snapshot().unwrap();
        let back = SloHistory::restore(&bytes).unwrap();
        let now = at(days);
        assert_eq!(back.statuses(&[slo()], now), h.statuses(&[slo()], now));
        assert_eq!(back.series, h.series);
        // Far below the 1 MiB a ConfigMap may hold, for thirty days of minute buckets.
        assert!(bytes.len() < 64 * 1024, "{} bytes", bytes.len());
        assert!(matches!(SloHistory::restore(b"not gzip"), Err(Error::DecodeHistory(_))));
    }

    #[test]
    fn processes_of_vanished_pods_are_forgotten_but_their_counts_stay() {
        let mut h = SloHistory::default();
        h.merge(&report("gone", T0, at(0), &[(at(0), 1, 1)]), NAMES, at(0)).unwrap();
        h.merge(&report("alive", T0, at(0), &[(at(0), 1, 1)]), NAMES, at(0)).unwrap();
        h.merge(&report("alive", at(1), at(1), &[(at(1), 1, 1)]), NAMES, at(1)).unwrap();
        h.merge(&report("quiet", T0, at(0), &[(at(0), 1, 1)]), NAMES, at(0)).unwrap();
        let live = |pod: &str| pod != "gone";
        h.forget_processes(&live, at(5));
        assert_eq!(h.processes(), 4, "recent processes are kept: a last report may be in flight");
        h.forget_processes(&live, at(20));
        // "gone" vanished, alive@T0 was replaced by a newer process; "quiet" is alive and current.
        let kept: Vec<(&str, u64)> = h.instances.keys().map(|p| (p.pod.as_str(), p.started_at_ms)).collect();
        assert_eq!(kept, [("alive", at(1)), ("quiet", T0)]);
        assert_eq!(totals(&h, at(20)), (4, 4));
        h.forget_processes(&live, at(20) + REPORT_SPAN_MS + MINUTE_MS);
        assert_eq!(h.processes(), 0);
    }

    #[test]
    fn remembered_counts_stay_bounded() {
        let mut h = SloHistory::default();
        for m in 0..(6 * 60) {
            h.merge(&report("a", T0, at(m + 1), &[(at(m), 1, 1)]), NAMES, at(m + 1)).unwrap();
            let (_, marks) = h.snapshot().unwrap();
            h.saved(marks);
        }
        let seen = h.instances.values().map(|i| i.seen.len()).sum::<usize>();
        assert!(seen <= 62, "{seen} buckets remembered");
    }
}
