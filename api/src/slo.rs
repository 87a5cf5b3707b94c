//! SLO arithmetic shared by the sidecar (`/slo`, metrics) and the operator (status): bounded
//! time buckets of good/total counts, and from them the SLI, the error budget, burn rates and
//! the state by the SRE workbook's multi-window, multi-burn-rate rules. Pure: the clock is
//! always an argument (milliseconds since the Unix epoch).

use std::collections::BTreeMap;

use crate::{SloState, SloStatus, report::Bucket};

pub const MINUTE_MS: u64 = 60_000;
pub const HOUR_MS: u64 = 3_600_000;

/// The burn-rate windows reported, with their length in milliseconds.
pub const BURN_WINDOWS: [(&str, u64); 7] = [
    ("5m", 5 * MINUTE_MS),
    ("30m", 30 * MINUTE_MS),
    ("1h", HOUR_MS),
    ("2h", 2 * HOUR_MS),
    ("6h", 6 * HOUR_MS),
    ("1d", 24 * HOUR_MS),
    ("3d", 72 * HOUR_MS),
];

/// Minute buckets are kept for the longest burn-rate window (3d) plus slack; hour buckets for
/// the longest SLO window (90d). That bounds one SLO's memory to about 4,400 + 2,200 buckets,
/// whatever the traffic.
const MINUTES_KEPT: u64 = 72 * 60 + 60;
const HOURS_KEPT: u64 = 90 * 24 + 1;

/// An error budget spent more than twice over is shown as -100%, not as ever larger negatives.
pub const BUDGET_FLOOR: f64 = -100.0;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub good: u64,
    pub total: u64,
}

impl Counts {
    pub fn bad(&self) -> u64 {
        self.total.saturating_sub(self.good)
    }

    fn add(&mut self, other: Counts) {
        self.good += other.good;
        self.total += other.total;
    }
}

/// Good and total requests by minute (recent) and by hour (the whole window).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SloSeries {
    /// Minute index (ms / 60 000) → counts.
    minutes: BTreeMap<u64, Counts>,
    /// Hour index (ms / 3 600 000) → counts.
    hours: BTreeMap<u64, Counts>,
}

impl SloSeries {
    /// Counts one request that ended at `now_ms`.
    pub fn record(&mut self, now_ms: u64, good: bool) {
        self.add(now_ms, Counts { good: u64::from(good), total: 1 }, now_ms);
    }

    /// Adds counts for the minute holding `at_ms`, then forgets what is too old at `now_ms`.
    pub fn add(&mut self, at_ms: u64, counts: Counts, now_ms: u64) {
        self.minutes.entry(at_ms / MINUTE_MS).or_default().add(counts);
        self.hours.entry(at_ms / HOUR_MS).or_default().add(counts);
        self.prune(now_ms);
    }

    fn prune(&mut self, now_ms: u64) {
        let oldest_minute = (now_ms / MINUTE_MS).saturating_sub(MINUTES_KEPT);
        let oldest_hour = (now_ms / HOUR_MS).saturating_sub(HOURS_KEPT);
        // split_off keeps the newer half; both maps stay bounded.
        if self.minutes.first_key_value().is_some_and(|(k, _)| *k < oldest_minute) {
            self.minutes = self.minutes.split_off(&oldest_minute);
        }
        if self.hours.first_key_value().is_some_and(|(k, _)| *k < oldest_hour) {
            self.hours = self.hours.split_off(&oldest_hour);
        }
    }

    /// Buckets held now: a bound on memory.
    pub fn len(&self) -> usize {
        self.minutes.len() + self.hours.len()
    }

    pub fn is_empty(&self) -> bool {
        self.minutes.is_empty()
    }

    /// Counts over the `window_ms` that ends at `now_ms`, at minute precision for windows up
    /// to 3 days and at hour precision beyond (the current, partial bucket included).
    pub fn counts(&self, now_ms: u64, window_ms: u64) -> Counts {
        let mut sum = Counts::default();
        if window_ms <= MINUTES_KEPT * MINUTE_MS - HOUR_MS {
            let last = now_ms / MINUTE_MS;
            let first = (last + 1).saturating_sub(window_ms.div_ceil(MINUTE_MS));
            self.minutes.range(first..=last).for_each(|(_, c)| sum.add(*c));
        } else {
            let last = now_ms / HOUR_MS;
            let first = (last + 1).saturating_sub(window_ms.div_ceil(HOUR_MS));
            self.hours.range(first..=last).for_each(|(_, c)| sum.add(*c));
        }
        sum
    }

    /// Every figure of one SLO at `now_ms`.
    pub fn status(&self, name: &str, objective_percent: f64, window_ms: u64, now_ms: u64) -> SloStatus {
        let allowed_bad = 1.0 - objective_percent / 100.0;
        let burn = |window: u64| {
            let c = self.counts(now_ms, window);
            if c.total == 0 { 0.0 } else { (c.bad() as f64 / c.total as f64) / allowed_bad }
        };
        let burn_rates: BTreeMap<String, f64> =
            BURN_WINDOWS.iter().map(|(label, ms)| ((*label).to_owned(), round(burn(*ms)))).collect();
        let whole = self.counts(now_ms, window_ms);
        let (sli, spent) = if whole.total == 0 {
            (100.0, 0.0)
        } else {
            let bad_ratio = whole.bad() as f64 / whole.total as f64;
            (100.0 * (1.0 - bad_ratio), bad_ratio / allowed_bad)
        };
        let remaining = (100.0 * (1.0 - spent)).max(BUDGET_FLOOR);
        let rate = |label: &str| burn_rates.get(label).copied().unwrap_or_default();
        SloStatus {
            name: name.to_owned(),
            sli: round(sli),
            error_budget_remaining: round(remaining),
            state: state(&rate, remaining),
            protection: None,
            burn_rates,
            good_requests: whole.good,
            total_requests: whole.total,
            last_updated: None,
        }
    }

    /// Buckets of minutes at or after `since_ms`, oldest first, as a report carries them.
    pub fn minute_buckets_since(&self, since_ms: u64) -> Vec<Bucket> {
        self.minutes
            .range(since_ms / MINUTE_MS..)
            .map(|(m, c)| Bucket {
                start_ms: m * MINUTE_MS,
                width_ms: MINUTE_MS,
                good: c.good,
                total: c.total,
            })
            .collect()
    }
}

/// The SRE workbook's alerting rules: page (Critical) when the 1h and 5m burn rates both
/// exceed 14.4, or the 6h and 30m both exceed 6; ticket (Warning) when the 1d and 2h both
/// exceed 3, or the 3d and 6h both exceed 1; Exhausted when no budget is left; else Healthy.
pub fn state(rate: &dyn Fn(&str) -> f64, budget_remaining: f64) -> SloState {
    let both = |a: &str, b: &str, over: f64| rate(a) > over && rate(b) > over;
    if both("1h", "5m", 14.4) || both("6h", "30m", 6.0) {
        SloState::Critical
    } else if both("1d", "2h", 3.0) || both("3d", "6h", 1.0) {
        SloState::Warning
    } else if budget_remaining <= 0.0 {
        SloState::Exhausted
    } else {
        SloState::Healthy
    }
}

/// Four decimals: enough for 99.9999% and stable in status patches.
fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000; // a fixed "now", on a minute boundary

    fn at(minutes: u64) -> u64 {
        T0 + minutes * MINUTE_MS
    }

    /// An hour of 100,000 requests with 0.2% errors, spread evenly (1,666 or 1,667 a
    /// minute, 3 or 4 of them bad), then a 5-minute outage in which every request fails.
    #[test]
    fn a_scripted_hour_then_an_outage() {
        let mut s = SloSeries::default();
        for m in 0..60u64 {
            let total = if m < 40 { 1667 } else { 1666 }; // 40×1667 + 20×1666 = 100,000
            let bad = if m < 20 { 4 } else { 3 }; // 20×4 + 40×3 = 200 = 0.2%
            s.add(at(m), Counts { good: total - bad, total }, at(m));
        }
        let now = at(59) + 59_999;
        let st = s.status("availability", 99.9, 30 * 24 * HOUR_MS, now);
        assert_eq!((st.good_requests, st.total_requests), (99_800, 100_000));
        // SLI = 99.8%; bad ratio 0.002 over an allowed 0.001: twice the budget spent.
        assert_eq!(st.sli, 99.8);
        assert_eq!(st.error_budget_remaining, -100.0, "1 - 2 = -100%, at the floor");
        // 1h burn = 0.002 / 0.001 = 2. 5m: the last 5 minutes had 5 × 1666 requests and
        // 15 bad: 15 / 8330 / 0.001 = 1.8007.
        assert_eq!(st.burn_rates["1h"], 2.0);
        assert_eq!(st.burn_rates["5m"], 1.8007);
        assert_eq!(st.burn_rates["3d"], 2.0);
        // 3d > 1 and 6h > 1: Warning (a ticket), not yet a page.
        assert_eq!(st.state, SloState::Warning);

        // The outage: 5 minutes, 1666 requests each, all bad.
        for m in 60..65u64 {
            s.add(at(m), Counts { good: 0, total: 1666 }, at(m));
            let st = s.status("availability", 99.9, 30 * 24 * HOUR_MS, at(m) + 59_999);
            // After the first bad minute the 5m burn is (1666+12)/(5×1666)/0.001 ≈ 201 and
            // the 1h burn ≈ (1666+191)/(60×1666.67)/0.001 ≈ 18.6: both over 14.4.
            assert_eq!(st.state, SloState::Critical, "minute {m}: {:?}", st.burn_rates);
        }
        let st = s.status("availability", 99.9, 30 * 24 * HOUR_MS, at(64) + 59_999);
        // 5m: 8330 requests, all bad → burn 1000.
        assert_eq!(st.burn_rates["5m"], 1000.0);
        // 1h (minutes 5..64): 55 min of normal traffic (165 bad of 91,640) + 8,330 bad.
        let total_1h = 100_000 - 5 * 1667 + 5 * 1666; // minutes 0-4 dropped out
        let bad_1h = 200 - 5 * 4 + 5 * 1666;
        assert_eq!(st.burn_rates["1h"], round(bad_1h as f64 / total_1h as f64 / 0.001));

        // Recovery: an hour and a half of clean traffic later, the 1h and 5m rates fall and
        // the page clears; the 6h and 3d rates keep the ticket open.
        for m in 65..160u64 {
            s.add(at(m), Counts { good: 1666, total: 1666 }, at(m));
        }
        let st = s.status("availability", 99.9, 30 * 24 * HOUR_MS, at(159) + 59_999);
        assert_eq!(st.burn_rates["5m"], 0.0);
        assert_eq!(st.burn_rates["1h"], 0.0);
        assert!(st.burn_rates["6h"] > 1.0);
        assert_eq!(st.state, SloState::Warning);
    }

    #[test]
    fn budget_and_exhaustion() {
        let mut s = SloSeries::default();
        // 10,000 requests, 5 bad, on a 99.9% objective: half the budget spent.
        s.add(at(0), Counts { good: 9_995, total: 10_000 }, at(0));
        let now = at(0) + 4 * 24 * HOUR_MS; // four days later: burn windows see nothing
        let st = s.status("a", 99.9, 30 * 24 * HOUR_MS, now);
        assert_eq!((st.sli, st.error_budget_remaining), (99.95, 50.0));
        assert_eq!(st.state, SloState::Healthy);
        // 10 more, all bad: 15 bad of 10,010 is a bad ratio of 0.0014985, 1.4985 budgets.
        s.add(at(1), Counts { good: 0, total: 10 }, at(1));
        let st = s.status("a", 99.9, 30 * 24 * HOUR_MS, now);
        assert_eq!(st.error_budget_remaining, -49.8501);
        assert_eq!(st.state, SloState::Exhausted);
        let empty = SloSeries::default().status("a", 99.9, 30 * 24 * HOUR_MS, now);
        assert_eq!((empty.sli, empty.error_budget_remaining, empty.state), (100.0, 100.0, SloState::Healthy));
    }

    #[test]
    fn memory_stays_bounded_over_thirty_days() {
        let mut s = SloSeries::default();
        let mut now = T0;
        for _ in 0..(30 * 24 * 60) {
            s.record(now, true);
            s.record(now + 1, false);
            now += MINUTE_MS;
        }
        assert!(s.len() <= (MINUTES_KEPT + 1 + 30 * 24 + 1) as usize, "{} buckets", s.len());
        let st = s.status("a", 99.0, 30 * 24 * HOUR_MS, now - 1);
        assert_eq!(st.total_requests, 2 * 30 * 24 * 60);
        for _ in 0..(70 * 24 * 60) {
            s.record(now, true);
            now += MINUTE_MS;
        }
        assert!(s.len() <= (MINUTES_KEPT + 1 + HOURS_KEPT + 1) as usize, "{} buckets", s.len());
    }
}
