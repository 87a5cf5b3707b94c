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
        protect: None,
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
    assert!(matches!(h.merge(&wide, NAMES, at(1)), Err(Error::InvalidReport(m)) if m.contains("one minute")));
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

fn configs(n: usize, window_days: u64) -> Vec<SloConfig> {
    (0..n)
        .map(|i| SloConfig { name: format!("slo-{i:02}"), window_ms: window_days * 24 * HOUR_MS, ..slo() })
        .collect()
}

/// The exact counts every figure of `slos` is made of at `now`: each burn-rate window's and
/// the SLO's window's (statuses round them).
fn counts_read(h: &SloHistory, slos: &[SloConfig], now: u64) -> Vec<Counts> {
    let empty = SloSeries::default();
    slos.iter()
        .flat_map(|s| {
            let series = h.series.get(&s.name).unwrap_or(&empty);
            BURN_WINDOWS.iter().map(|(_, w)| *w).chain([s.window_ms]).map(move |w| series.counts(now, w))
        })
        .collect()
}

fn kib(bytes: usize) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

const MAX: usize = crate::render::HISTORY_MAX_BYTES;

/// 10 SLOs of 100,000 requests a minute and 2,500 pods: over a ConfigMap whole. Saved
/// without what no figure reads and without the remembered counts of the processes heard
/// from least recently, it fits, and gives every figure it gave, now and later.
#[test]
fn a_pathological_history_fits_its_config_map_with_the_same_figures() {
    let slos = configs(10, 30);
    let h = pathological(&slos, 100_000, 50, 2_500, T0);
    let full = h.snapshot().unwrap().0.len();
    let snap = h.snapshot_within(&slos, T0, MAX).unwrap();
    let t = snap.trimmed.clone().expect("trimmed");
    println!("10 SLOs, 2,500 pods: {} whole, {} saved: {t:?}", kib(full), kib(snap.bytes.len()));
    assert!(full > 1024 * 1024, "pathological: {} whole", kib(full));
    assert_eq!(t.full_bytes, full);
    assert!(snap.bytes.len() <= MAX, "{} saved", kib(snap.bytes.len()));
    assert_eq!(t.reasons(), ["expired", "seen"], "{t:?}");
    assert!(!t.changes_figures());
    // In every SLO, the hours before its 30-day window (which ends with the current hour) and
    // the minutes before the 3-day burn-rate window.
    assert_eq!(t.expired_buckets, 10 * ((90 * 24 + 2 - 30 * 24) + 61), "{t:?}");

    let back = SloHistory::restore(&snap.bytes).unwrap();
    for later in [0, MINUTE_MS, HOUR_MS, 24 * HOUR_MS, 29 * 24 * HOUR_MS] {
        assert_eq!(back.statuses(&slos, T0 + later), h.statuses(&slos, T0 + later), "{later} ms later");
        let same = counts_read(&back, &slos, T0 + later) == counts_read(&h, &slos, T0 + later);
        assert!(same, "the counts {later} ms later differ");
    }
    // Every process stays, with its acknowledgement; the remembered counts left out are those
    // of the processes heard from least recently.
    assert_eq!(back.processes(), 2_500);
    let mut by_last_report: Vec<&Instance> = back.instances.values().collect();
    by_last_report.sort_by_key(|i| i.last_report_ms);
    let forgotten = by_last_report.iter().take_while(|i| i.seen.is_empty()).count();
    assert_eq!(forgotten, t.seen_processes);
    assert!(by_last_report[forgotten..].iter().all(|i| i.seen.len() == 10 * 11 && i.acked_ms == T0));
    assert!(t.seen_processes < 2_500, "only as many as needed: {t:?}");
    // The same history gives the same bytes.
    assert_eq!(h.snapshot_within(&slos, T0, MAX).unwrap().bytes, snap.bytes);
}

/// 32 SLOs (the most a policy may have) with 90-day windows and 100,000 requests a minute do
/// not fit a ConfigMap even without a single process: the oldest hours go, in every SLO at
/// once, and only they: burn rates and states stay, the 90-day budgets cover less.
#[test]
fn series_too_long_to_fit_lose_their_oldest_hours_and_say_so() {
    let slos = configs(32, 90);
    let h = pathological(&slos, 100_000, 50, 0, T0);
    let snap = h.snapshot_within(&slos, T0, MAX).unwrap();
    let t = snap.trimmed.clone().expect("trimmed");
    println!("32 SLOs, 90 days: {} whole, {} saved: {t:?}", kib(t.full_bytes), kib(snap.bytes.len()));
    assert!(snap.bytes.len() <= MAX, "{} saved", kib(snap.bytes.len()));
    assert_eq!(t.reasons(), ["expired", "hours"], "{t:?}");
    assert!(t.changes_figures());

    let back = SloHistory::restore(&snap.bytes).unwrap();
    let first_hours: Vec<u64> =
        back.series.values().map(|s| row_indices(&StoredSeries::from(s).hours).next().unwrap()).collect();
    let first_in_window = T0 / HOUR_MS + 1 - 90 * 24;
    assert!(first_hours.iter().all(|i| *i == first_in_window + t.hours as u64), "{first_hours:?}");
    let (restored, whole) = (back.statuses(&slos, T0), h.statuses(&slos, T0));
    for (r, w) in restored.iter().zip(&whole) {
        assert_eq!((&r.burn_rates, r.state), (&w.burn_rates, w.state));
        assert!(r.total_requests < w.total_requests);
    }
    // What is left is whole: a week's counts are all there, and every burn-rate window's.
    assert!(counts_read(&back, &configs(32, 7), T0) == counts_read(&h, &configs(32, 7), T0));
}

/// However small the budget, a snapshot fits it while anything is left to leave out: the
/// newest minutes and the processes heard from most recently stay longest.
#[test]
fn the_last_resorts_keep_a_snapshot_within_any_budget() {
    let slos = configs(2, 30);
    let h = pathological(&slos, 1_000, 5, 30, T0);
    let snap = h.snapshot_within(&slos, T0, 600).unwrap();
    let t = snap.trimmed.clone().expect("trimmed");
    assert!(snap.bytes.len() <= 600, "{} bytes", snap.bytes.len());
    assert_eq!(t.reasons(), ["expired", "seen", "hours", "minutes", "processes"], "{t:?}");
    let back = SloHistory::restore(&snap.bytes).unwrap();
    assert!(back.series.values().all(|s| s.is_empty()), "every minute went before any process");
    let mut kept: Vec<&Process> = back.instances.keys().collect();
    let mut newest: Vec<(&Process, &Instance)> = h.instances.iter().collect();
    newest.sort_by_key(|(p, i)| std::cmp::Reverse((i.last_report_ms, p.started_at_ms, p.pod.clone())));
    let mut expected: Vec<&Process> = newest.iter().take(30 - t.processes).map(|(p, _)| *p).collect();
    kept.sort();
    expected.sort();
    assert_eq!(kept, expected);

    // Minutes go oldest first: with room for some, the newest stay and the 5m figures with them.
    let snap = h.snapshot_within(&slos, T0, 20 * 1024).unwrap();
    let t = snap.trimmed.clone().expect("trimmed");
    assert_eq!(t.reasons(), ["expired", "seen", "hours", "minutes"], "{t:?}");
    let back = SloHistory::restore(&snap.bytes).unwrap();
    let (restored, whole) = (back.statuses(&slos, T0), h.statuses(&slos, T0));
    for (r, w) in restored.iter().zip(&whole) {
        assert_eq!(r.burn_rates["5m"], w.burn_rates["5m"]);
        assert!(r.total_requests < w.total_requests);
    }

    assert!(matches!(
        h.snapshot_within(&slos, T0, 10),
        Err(Error::HistoryTooLarge { budget: 10, bytes }) if bytes > 10
    ));
}

#[test]
fn a_history_that_fits_is_saved_byte_for_byte() {
    let mut h = SloHistory::default();
    for m in (0..3 * 24 * 60).step_by(60) {
        let buckets: Vec<(u64, u64, u64)> =
            (m..m + 60).map(|i| (at(i), 1000 + i % 7, 1001 + i % 7)).collect();
        for pod in ["a", "b"] {
            h.merge(&report(pod, T0, at(m + 60), &buckets), NAMES, at(m + 60)).unwrap();
        }
    }
    let now = at(3 * 24 * 60 + 30);
    let (whole, marks) = h.snapshot().unwrap();
    let snap = h.snapshot_within(&[slo()], now, MAX).unwrap();
    assert_eq!((&snap.bytes, &snap.marks, &snap.trimmed), (&whole, &marks, &None));
    assert!(h.snapshot_within(&[slo()], now, whole.len()).unwrap().trimmed.is_none());
    // A byte less, and what no figure reads goes first: the minutes over three days old.
    let snap = h.snapshot_within(&[slo()], now, whole.len() - 1).unwrap();
    let t = snap.trimmed.expect("trimmed");
    assert_eq!(t.expired_buckets, 31, "{t:?}");
    assert!(!t.changes_figures(), "{t:?}");
    let back = SloHistory::restore(&snap.bytes).unwrap();
    assert_eq!(back.statuses(&[slo()], now), h.statuses(&[slo()], now));
    assert!(counts_read(&back, &[slo()], now) == counts_read(&h, &[slo()], now));
}

#[test]
fn rows_are_left_out_oldest_first() {
    let mut rows = vec![[5, 1, 1], [1, 2, 2], [3, 3, 3]];
    assert_eq!(drop_rows_before(&mut rows, 5), 0);
    assert_eq!(drop_rows_before(&mut rows, 7), 2);
    assert_eq!(rows, [[9, 3, 3]]);
    assert_eq!(row_indices(&rows).collect::<Vec<_>>(), [9]);
    assert_eq!(drop_rows_before(&mut rows, u64::MAX), 1);
    assert!(rows.is_empty());
}
