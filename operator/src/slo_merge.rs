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
//! - The saved form must fit a ConfigMap: [`SloHistory::snapshot_within`] leaves out what
//!   matters least when the whole history does not fit its budget, and says what it left out.

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Write},
};

use apipolicy_api::{
    SloConfig, SloStatus,
    report::{ReportAck, SloReport},
    slo::{BURN_WINDOWS, Counts, HOUR_MS, MINUTE_MS, SloSeries},
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
/// Minute buckets that figures still read: those of the longest burn-rate window (3d, which is
/// also the longest window counted by the minute). `SloSeries` keeps an hour more.
const MINUTES_READ: u64 = BURN_WINDOWS[BURN_WINDOWS.len() - 1].1 / MINUTE_MS;

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

/// A saved form of the history within a budget.
#[derive(Debug)]
pub struct Snapshot {
    /// Gzipped JSON.
    pub bytes: Vec<u8>,
    /// The acknowledgements it makes true once saved.
    pub marks: Watermarks,
    /// What was left out to fit the budget; `None` when the whole history fit.
    pub trimmed: Option<Trimmed>,
}

/// What a snapshot left out to fit its budget, in the order it is left out: each kind only when
/// everything of the kinds before was not enough, and then about as few as make the snapshot fit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// The size of the whole history, gzipped.
    pub full_bytes: usize,
    /// Buckets no figure reads any more: minutes before the longest burn-rate window (3d) and
    /// hours before the SLO's window (or 3d, when longer). Changes no figure.
    pub expired_buckets: usize,
    /// Processes whose remembered counts were left out, those heard from least recently first.
    /// Changes no figure now; after a restart of the operator, a resend of theirs may count the
    /// requests of the minute or so before the save twice.
    pub seen_processes: usize,
    /// The oldest hours left out of every SLO: after a restart of the operator, windows longer
    /// than 3d cover less.
    pub hours: usize,
    /// The oldest minutes left out of every SLO (once no hour is left): after a restart of the
    /// operator, burn rates and windows of up to 3d cover less.
    pub minutes: usize,
    /// Processes left out altogether, those heard from least recently first: after a restart of
    /// the operator, each is told it has no acknowledgement, so it resends all it holds (up to
    /// 3 days), which counts again.
    pub processes: usize,
}

impl Trimmed {
    /// What was left out, as the `reason` labels of the metric.
    pub fn reasons(&self) -> Vec<&'static str> {
        [
            ("expired", self.expired_buckets),
            ("seen", self.seen_processes),
            ("hours", self.hours),
            ("minutes", self.minutes),
            ("processes", self.processes),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(reason, _)| reason)
        .collect()
    }

    /// Whether the figures of the saved history, once restored, differ from those in memory.
    pub fn changes_figures(&self) -> bool {
        self.hours + self.minutes + self.processes > 0
    }
}

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

    /// The saved form (gzipped JSON) of the whole history and the acknowledgements it makes true
    /// once saved.
    pub fn snapshot(&self) -> Result<(Vec<u8>, Watermarks)> {
        Ok((encode(&self.stored())?, self.watermarks()))
    }

    /// The saved form within `budget` bytes. A history that fits is saved whole, byte for byte
    /// as [`Self::snapshot`] saves it. Else what matters least is left out first (see
    /// [`Trimmed`]): buckets no figure of `slos` reads at `now_ms` or later, then the remembered
    /// counts of the processes heard from least recently, and only then, changing the figures a
    /// restored history gives, the oldest hours, the oldest minutes, and processes. Only the
    /// saved form is trimmed: the history in memory keeps everything. Deterministic: the same
    /// history, SLOs, clock and budget give the same bytes.
    pub fn snapshot_within(&self, slos: &[SloConfig], now_ms: u64, budget: usize) -> Result<Snapshot> {
        let marks = self.watermarks();
        let mut stored = self.stored();
        let mut bytes = encode(&stored)?;
        if bytes.len() <= budget {
            return Ok(Snapshot { bytes, marks, trimmed: None });
        }
        let mut trimmed = Trimmed { full_bytes: bytes.len(), ..Trimmed::default() };
        trimmed.expired_buckets = stored.drop_expired(slos, now_ms);
        bytes = encode(&stored)?;
        if bytes.len() > budget {
            let remembering: Vec<usize> = stored
                .least_recently_heard()
                .into_iter()
                .filter(|&i| !stored.processes[i].seen.is_empty())
                .collect();
            (trimmed.seen_processes, bytes) = shed(&mut stored, budget, bytes, remembering.len(), |s, k| {
                remembering[..k].iter().for_each(|&i| s.processes[i].seen.clear())
            })?;
        }
        for (hours, count) in [(true, &mut trimmed.hours), (false, &mut trimmed.minutes)] {
            if bytes.len() > budget {
                let indices = stored.bucket_indices(hours);
                (*count, bytes) = shed(&mut stored, budget, bytes, indices.len(), |s, k| {
                    s.drop_buckets_before(hours, indices.get(k).copied().unwrap_or(u64::MAX))
                })?;
            }
        }
        if bytes.len() > budget {
            let order = stored.least_recently_heard();
            (trimmed.processes, bytes) = shed(&mut stored, budget, bytes, order.len(), |s, k| {
                let mut gone = vec![false; s.processes.len()];
                order[..k].iter().for_each(|&i| gone[i] = true);
                let mut i = 0;
                s.processes.retain(|_| {
                    i += 1;
                    !gone[i - 1]
                });
            })?;
        }
        if bytes.len() > budget {
            return Err(Error::HistoryTooLarge { bytes: bytes.len(), budget });
        }
        Ok(Snapshot { bytes, marks, trimmed: Some(trimmed) })
    }

    fn watermarks(&self) -> Watermarks {
        Watermarks(self.instances.iter().map(|(p, i)| (p.clone(), i.merged_ms)).collect())
    }

    fn stored(&self) -> Stored {
        Stored {
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
        }
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

fn encode(stored: &Stored) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(stored).expect("the history always serializes");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&json).map_err(Error::EncodeHistory)?;
    gz.finish().map_err(Error::EncodeHistory)
}

/// Leaves `k` units of one kind out of `stored` (`drop(stored, k)` leaves out the first `k`, the
/// least valuable), for the smallest `k` found that brings the snapshot within `budget`, or all
/// `n` when even that is not enough. `bytes` is the snapshot with none left out, over the
/// budget. Returns `k` and the snapshot.
///
/// Each try encodes the whole history, so `k` is found by interpolating between the largest `k`
/// known to be over the budget and the smallest known to fit, aiming a little under the budget
/// so that the first guess mostly fits; a guess that does not fit halves the range at least.
fn shed(
    stored: &mut Stored,
    budget: usize,
    bytes: Vec<u8>,
    n: usize,
    drop: impl Fn(&mut Stored, usize),
) -> Result<(usize, Vec<u8>)> {
    let without = |stored: &Stored, k: usize| -> Result<(Stored, Vec<u8>)> {
        let mut s = stored.clone();
        drop(&mut s, k);
        let bytes = encode(&s)?;
        Ok((s, bytes))
    };
    if n == 0 {
        return Ok((0, bytes));
    }
    let (mut fit, mut fit_bytes) = without(stored, n)?;
    let (mut over, mut over_size, mut hi) = (0, bytes.len(), n);
    if fit_bytes.len() <= budget {
        let target = budget - budget / 64;
        let mut missed = false;
        loop {
            let span = hi - over;
            let fall = (over_size - fit_bytes.len()) as u128;
            let guess = over + (span as u128 * (over_size - target) as u128).div_ceil(fall) as usize;
            let guess = if missed { guess.max(over + span.div_ceil(2)) } else { guess };
            let k = guess.clamp(over + 1, hi);
            if k == hi {
                break;
            }
            let (s, b) = without(stored, k)?;
            if b.len() <= budget {
                (fit, fit_bytes, hi) = (s, b, k);
                break;
            }
            (over, over_size, missed) = (k, b.len(), true);
        }
    }
    *stored = fit;
    Ok((hi, fit_bytes))
}

/// Leaves out the rows (`[index step, good, total]`) before index `first`; returns how many.
fn drop_rows_before(rows: &mut Vec<[u64; 3]>, first: u64) -> usize {
    let mut index = 0;
    let cut = rows
        .iter()
        .take_while(|[step, ..]| {
            let at = index + step;
            let before = at < first;
            if before {
                index = at;
            }
            before
        })
        .count();
    rows.drain(..cut);
    if let Some(row) = rows.first_mut() {
        row[0] += index;
    }
    cut
}

/// The indices of the rows.
fn row_indices(rows: &[[u64; 3]]) -> impl Iterator<Item = u64> + '_ {
    rows.iter().scan(0, |index, [step, ..]| {
        *index += step;
        Some(*index)
    })
}

#[derive(Serialize, Deserialize, Clone)]
struct Stored {
    version: u32,
    slos: BTreeMap<String, StoredSeries>,
    processes: Vec<StoredProcess>,
}

impl Stored {
    /// Leaves out the buckets that no figure reads at `now_ms` or later; returns how many.
    fn drop_expired(&mut self, slos: &[SloConfig], now_ms: u64) -> usize {
        let first_minute = (now_ms / MINUTE_MS + 1).saturating_sub(MINUTES_READ);
        let mut dropped = 0;
        for (name, series) in &mut self.slos {
            let window = slos.iter().find(|s| s.name == *name).map_or(0, |s| s.window_ms);
            let hours = window.max(MINUTES_READ * MINUTE_MS).div_ceil(HOUR_MS);
            let first_hour = (now_ms / HOUR_MS + 1).saturating_sub(hours);
            dropped += drop_rows_before(&mut series.minutes, first_minute);
            dropped += drop_rows_before(&mut series.hours, first_hour);
        }
        dropped
    }

    /// The positions of the processes, the one heard from least recently first.
    fn least_recently_heard(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.processes.len()).collect();
        order.sort_by_key(|&i| {
            let p = &self.processes[i];
            (p.last_report_ms, p.started_at_ms, &p.pod)
        });
        order
    }

    /// Every hour (or minute) index with a bucket in some SLO, oldest first.
    fn bucket_indices(&self, hours: bool) -> Vec<u64> {
        let indices: std::collections::BTreeSet<u64> =
            self.slos.values().flat_map(|s| row_indices(if hours { &s.hours } else { &s.minutes })).collect();
        indices.into_iter().collect()
    }

    fn drop_buckets_before(&mut self, hours: bool, first: u64) {
        for s in self.slos.values_mut() {
            drop_rows_before(if hours { &mut s.hours } else { &mut s.minutes }, first);
        }
    }
}

#[derive(Serialize, Deserialize, Clone)]
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
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
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

/// Deterministic noise, for traffic that does not compress away.
#[cfg(test)]
struct Noise(u64);

#[cfg(test)]
impl Noise {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    /// `mean` ± 10%.
    fn around(&mut self, mean: u64) -> u64 {
        mean - mean / 10 + self.next() % (mean / 5 + 1)
    }
}

/// For tests, a history at `now_ms` (on an hour boundary) after 90 days of traffic: for each of
/// `slos` a bucket for every minute and every hour a series keeps (73 hours of minutes, 90 days
/// of hours), with about `per_minute` requests a minute of which up to `bad` failed; and `pods`
/// sidecar processes heard from in the last 10 minutes, each remembering the last 11 minutes of
/// every SLO, as a snapshot saves them.
#[cfg(test)]
pub(crate) fn pathological(
    slos: &[SloConfig],
    per_minute: u64,
    bad: u64,
    pods: usize,
    now_ms: u64,
) -> SloHistory {
    let mut noise = Noise(42);
    let (now_minute, now_hour) = (now_ms / MINUTE_MS, now_ms / HOUR_MS);
    let mut h = SloHistory::default();
    for c in slos {
        let mut rows = |first: u64, last: u64, per_row: u64| -> Vec<[u64; 3]> {
            (first..=last)
                .map(|i| {
                    let total = noise.around(per_row);
                    let bad = noise.next() % (bad * per_row / per_minute + 1);
                    [if i == first { i } else { 1 }, total - bad, total]
                })
                .collect()
        };
        let minutes = rows(now_minute - (72 * 60 + 60), now_minute, per_minute);
        let hours = rows(now_hour - (90 * 24 + 1), now_hour, 60 * per_minute);
        h.series.insert(c.name.clone(), StoredSeries { minutes, hours }.into_series().unwrap());
    }
    for _ in 0..pods {
        let mut seen = BTreeMap::new();
        for c in slos {
            for m in 0..11 {
                let total = noise.around(per_minute / pods as u64 + 10);
                let good = total - noise.next() % 3;
                seen.insert((c.name.clone(), now_ms - m * MINUTE_MS), Counts { good, total });
            }
        }
        let pod = format!("products-7d9f8b6c5-{:05x}", noise.next() % 0x100000);
        let started_at_ms = now_ms - noise.next() % (72 * HOUR_MS);
        let last_report_ms = now_ms - noise.next() % (10 * MINUTE_MS);
        let instance = Instance { seen, merged_ms: now_ms, acked_ms: now_ms - 15_000, last_report_ms };
        h.instances.insert(Process { pod, started_at_ms }, instance);
    }
    h
}

#[cfg(test)]
mod tests;
