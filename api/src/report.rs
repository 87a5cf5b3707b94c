//! What a sidecar reports to the operator about its SLOs.
//!
//! Counters are cumulative since the sidecar started (`startedAt`), per time bucket, so the
//! receiver can merge the reports of many pods, count a repeated report once, and tell a
//! restarted sidecar (new `startedAt`) from a counter that went backwards.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SloReport {
    /// The reporting pod's name.
    pub pod: String,
    /// When this sidecar process started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// When the report was made, in milliseconds since the Unix epoch (the sidecar's clock).
    pub sent_at_ms: u64,
    /// The config revision the sidecar runs.
    pub revision: String,
    pub slos: Vec<SloCounters>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SloCounters {
    pub name: String,
    /// Buckets in time order.
    pub buckets: Vec<Bucket>,
}

/// Requests that ended in `[start_ms, start_ms + width_ms)`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Bucket {
    pub start_ms: u64,
    pub width_ms: u64,
    pub good: u64,
    pub total: u64,
}
