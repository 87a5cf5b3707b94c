//! What a sidecar reports to the operator about its SLOs.
//!
//! Each bucket's counts are cumulative for that bucket since the sidecar started
//! (`startedAtMs`): a later report of the same (pod, startedAtMs, bucket) supersedes an earlier
//! one, so the receiver adds only the difference, counts a repeated report once, and tells a
//! restarted sidecar (a new `startedAtMs`) from a counter that went backwards. A report holds
//! every minute bucket that changed since the last acknowledged report, at most three days.

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

/// The operator's answer to a report: every bucket that started before `ackMs` is merged, so
/// the sidecar need not send those again.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReportAck {
    pub ack_ms: u64,
}

/// The body of `GET /v1/policies/{ns}/{name}/config`: the compiled config and the number of
/// ready replicas of the policy's pods, which `scope: Replicas` limits divide by.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfig {
    pub config: crate::SidecarConfig,
    pub ready_replicas: u32,
}
