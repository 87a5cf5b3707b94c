//! The status an ApiPolicy should have, from what the controller observed. Pure: the reconcile
//! loop compares the result with the current status and patches only a difference.

use apipolicy_api::contract::{INJECTED_REVISION_ANNOTATION, POLICY_ANNOTATION};
use std::sync::Arc;

use apipolicy_api::{ApiPolicy, ApiPolicyStatus, PodCounts, SloStatus, ValidationError};
use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::ResourceExt;

use crate::{
    conflict::{is_live, selects},
    inject::{self, Problem},
};

pub const ACCEPTED: &str = "Accepted";
pub const PROGRAMMED: &str = "Programmed";
/// Present while some of the policy's pods declare the upstream port in a way the injector
/// cannot take over: it says what to change.
pub const PORT_UNNAMED: &str = "PortUnnamed";
/// True while an SLO's `protect` is on (its burn rate reached `protect.when`).
pub const PROTECTING: &str = "Protecting";

/// Kubernetes caps a condition message at 32 KiB.
const MAX_MESSAGE: usize = 32 * 1024;

/// The controller's judgement of a policy's spec.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Accepted,
    Invalid(Vec<ValidationError>),
    /// An older policy governs pods this one selects.
    Conflicted {
        winner: String,
    },
}

impl Verdict {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Accepted => "Accepted",
            Self::Invalid(_) => "InvalidSpec",
            Self::Conflicted { .. } => "Conflicted",
        }
    }

    pub fn message(&self, revision: Option<&str>) -> String {
        match self {
            Self::Accepted => {
                format!("the spec is valid and compiled to revision {}", revision.unwrap_or("(none)"))
            }
            Self::Invalid(problems) => {
                let listed: Vec<String> = problems.iter().map(ToString::to_string).collect();
                let mut m = format!("{} problem(s): {}", problems.len(), listed.join("; "));
                truncate(&mut m, MAX_MESSAGE);
                m
            }
            Self::Conflicted { winner } => format!(
                "ApiPolicy {winner} is older and selects the same pods, so it governs them and this policy \
                 does not apply; change the selector of one of the two"
            ),
        }
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
}

/// The pods of a policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Live pods of the namespace that the selector matches.
    pub matched: u32,
    /// Of those, pods that the injector gave this policy's sidecar.
    pub injected: u32,
    /// Of those, pods on the revision.
    pub current: u32,
    /// Of those injected, pods that are Ready: what `scope: Replicas` limits divide by.
    pub ready: u32,
}

/// Counts the policy's pods. A pod's revision is what its sidecar last told the agent API
/// (`reported`), else the revision it was injected with.
pub fn census(
    policy: &ApiPolicy,
    pods: &[Arc<Pod>],
    revision: Option<&str>,
    reported: &dyn Fn(&Pod) -> Option<String>,
) -> Census {
    let namespace = policy.namespace();
    let name = policy.name_any();
    let mut c = Census::default();
    for pod in pods.iter().filter(|p| is_live(p) && p.namespace() == namespace) {
        if !selects(&policy.spec.selector, pod.labels()) {
            continue;
        }
        c.matched += 1;
        if pod.annotations().get(POLICY_ANNOTATION) != Some(&name) {
            continue;
        }
        c.injected += 1;
        let running = reported(pod).or_else(|| pod.annotations().get(INJECTED_REVISION_ANNOTATION).cloned());
        if revision.is_some() && running.as_deref() == revision {
            c.current += 1;
        }
        if is_ready(pod) {
            c.ready += 1;
        }
    }
    c
}

/// The live pods of the policy, without a sidecar and not opted out, whose upstream port the
/// injector cannot take over (unnamed or undeclared), by name. Pods whose spec the cache does not
/// hold are not judged.
pub fn port_problems(policy: &ApiPolicy, pods: &[Arc<Pod>]) -> Vec<(String, Problem)> {
    let namespace = policy.namespace();
    pods.iter()
        .filter(|p| is_live(p) && p.namespace() == namespace && p.spec.is_some())
        .filter(|p| selects(&policy.spec.selector, p.labels()))
        .filter(|p| !p.annotations().contains_key(POLICY_ANNOTATION))
        .filter(|p| !inject::opted_out(p))
        .filter(|p| p.spec.as_ref().and_then(|s| s.host_network) != Some(true))
        .filter_map(|p| match inject::upstream_port(p, policy.spec.upstream.port) {
            Err(e @ (Problem::PortUnnamed { .. } | Problem::PortNotDeclared { .. })) => {
                Some((p.name_any(), e))
            }
            _ => None,
        })
        .collect()
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `sha256:` and the first 12 hex digits: enough to tell revisions apart in a message.
pub fn short_revision(revision: &str) -> &str {
    let end = "sha256:".len() + 12;
    if revision.len() > end && revision.is_char_boundary(end) { &revision[..end] } else { revision }
}

/// What the status is computed from.
pub struct Observed<'a> {
    pub policy: &'a ApiPolicy,
    pub verdict: &'a Verdict,
    /// The revision in the policy's ConfigMap: the new one when accepted, else the last valid.
    pub revision: Option<String>,
    pub census: Census,
    /// Each SLO's figures, `lastUpdated` set to when they were computed.
    pub slos: Vec<SloStatus>,
    /// Pods the policy cannot take over because of their ports (see [`port_problems`]).
    pub port_problems: Vec<(String, Problem)>,
    pub now: Timestamp,
}

pub fn desired(o: Observed<'_>) -> ApiPolicyStatus {
    let previous = o.policy.status.as_ref();
    let generation = o.policy.metadata.generation;
    let revision = o.revision.as_deref();
    let accepted = matches!(o.verdict, Verdict::Accepted);
    let accepted_cond = condition(
        ACCEPTED,
        accepted,
        o.verdict.reason(),
        o.verdict.message(revision),
        generation,
        previous,
        o.now,
    );
    let c = o.census;
    let (programmed, reason, message) = match (o.verdict, revision) {
        (Verdict::Conflicted { winner }, _) => {
            (false, "Conflicted", format!("the pods are governed by ApiPolicy {winner}"))
        }
        (v, None) => (false, v.reason(), "no valid config has been written yet".to_owned()),
        (v, Some(rev)) => {
            let mut m = format!("{} of {} pods on revision {}", c.current, c.matched, short_revision(rev));
            if c.injected < c.matched {
                m.push_str(&format!(
                    "; {} matched pod(s) have no sidecar: label the namespace apipolicy.dev/injection=enabled \
                     and restart them",
                    c.matched - c.injected
                ));
            }
            if matches!(v, Verdict::Invalid(_)) {
                m.push_str("; the spec is invalid, so pods keep the last valid revision");
            }
            let done = c.current == c.matched;
            (done, if done { "Programmed" } else { "Pending" }, m)
        }
    };
    let programmed_cond = condition(PROGRAMMED, programmed, reason, message, generation, previous, o.now);
    let mut conditions = vec![accepted_cond, programmed_cond];
    if let Some((pod, problem)) = o.port_problems.first() {
        let count = o.port_problems.len();
        let message = format!(
            "{count} pod(s) without a sidecar, such as {pod}: {}",
            problem.message(&o.policy.name_any())
        );
        conditions.push(condition(
            PORT_UNNAMED,
            true,
            problem.reason(),
            message,
            generation,
            previous,
            o.now,
        ));
    }

    let mut slos = settle_slos(o.slos, previous.map(|p| p.slos.as_slice()).unwrap_or_default());
    let protecting = protection(&mut slos, &o.policy.spec.slos, previous, o.now);
    if let Some((on, message)) = protecting {
        let reason = if on { "SloBurning" } else { "SlosWithinBudget" };
        conditions.push(condition(PROTECTING, on, reason, message, generation, previous, o.now));
    }
    let lowest = slos.iter().map(|s| s.error_budget_remaining).reduce(f64::min);
    let worst = slos.iter().map(|s| s.state).max();
    ApiPolicyStatus {
        observed_generation: generation,
        config_revision: o.revision,
        conditions,
        pods: Some(PodCounts {
            matched: c.matched,
            injected: c.injected,
            current: c.current,
            summary: Some(format!("{}/{}", c.current, c.matched)),
        }),
        slos,
        lowest_error_budget_remaining: lowest,
        slo_state: worst,
    }
}

/// A condition whose `lastTransitionTime` moves only when its status does.
fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: Option<&ApiPolicyStatus>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let before = previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == type_));
    let last_transition_time = match before {
        Some(b) if b.status == status => b.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Keeps an SLO's previous `lastUpdated` when none of its figures changed, so that unchanged
/// figures never cause a status write.
/// Writes each protected SLO's `protection` (`Active since …, actions …`, the time kept from the
/// previous status while it stays on) and says whether any is on, with a message, for the
/// `Protecting` condition; `None` when no SLO has `protect`. The operator judges by the SLO's
/// state over all pods; each sidecar judges by its own counts and lifts after a minute of calm.
fn protection(
    slos: &mut [SloStatus],
    spec: &[apipolicy_api::Slo],
    previous: Option<&ApiPolicyStatus>,
    now: Timestamp,
) -> Option<(bool, String)> {
    use apipolicy_api::{ProtectAction, ProtectWhen, SloState};
    let mut any = false;
    let mut active = Vec::new();
    for s in slos.iter_mut() {
        let Some(protect) = spec.iter().find(|c| c.name == s.name).and_then(|c| c.protect.as_ref()) else {
            continue;
        };
        any = true;
        let on = match protect.when.unwrap_or(ProtectWhen::Critical) {
            ProtectWhen::Critical => s.state == SloState::Critical,
            ProtectWhen::Warning => s.state >= SloState::Warning,
        };
        if !on {
            s.protection = None;
            continue;
        }
        let since = previous
            .and_then(|p| p.slos.iter().find(|p| p.name == s.name))
            .and_then(|p| p.protection.as_deref())
            .and_then(|text| text.strip_prefix("Active since "))
            .and_then(|rest| rest.split(',').next())
            .map_or_else(|| now.to_string(), str::to_owned);
        let actions = if protect.actions.is_empty() {
            vec![ProtectAction::ServeStale, ProtectAction::ShedByPriority]
        } else {
            protect.actions.clone()
        };
        let actions: Vec<String> = actions.iter().map(|a| format!("{a:?}")).collect();
        let text = format!("Active since {since}, actions {}", actions.join(", "));
        active.push(format!("{}: {text}", s.name));
        s.protection = Some(text);
    }
    if !any {
        return None;
    }
    Some(match active.is_empty() {
        true => (false, "no SLO is burning its budget fast enough to protect its routes".to_owned()),
        false => (true, active.join("; ")),
    })
}

fn settle_slos(new: Vec<SloStatus>, previous: &[SloStatus]) -> Vec<SloStatus> {
    new.into_iter()
        .map(|mut s| {
            let stamped = s.last_updated.take();
            let same = previous.iter().find(|p| p.name == s.name).filter(|p| {
                let mut p = (*p).clone();
                p.last_updated = None;
                p == s
            });
            s.last_updated = match same {
                Some(p) => p.last_updated.clone(),
                None => stamped,
            };
            s
        })
        .collect()
}

/// What deserves an event when the status goes from `before` to `after`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

pub fn notices(before: Option<&ApiPolicyStatus>, after: &ApiPolicyStatus, config_map: &str) -> Vec<Notice> {
    let accepted = |s: Option<&ApiPolicyStatus>| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED))
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let mut out = Vec::new();
    let now = accepted(Some(after));
    if now != accepted(before)
        && let Some((status, reason, message)) = now
        && status == "False"
    {
        out.push(Notice { warning: true, reason, note: message });
    }
    let revision_changed = after.config_revision != before.and_then(|b| b.config_revision.clone());
    let is_accepted = after.conditions.iter().any(|c| c.type_ == ACCEPTED && c.status == "True");
    if let (true, true, Some(rev)) = (revision_changed, is_accepted, after.config_revision.as_deref()) {
        out.push(Notice {
            warning: false,
            reason: "ConfigUpdated".to_owned(),
            note: format!("compiled revision {} into ConfigMap {config_map}", short_revision(rev)),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use apipolicy_api::SloState;

    use super::*;
    use crate::fixtures::{pod, policy_at};

    const REV: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const OLD: &str = "sha256:ffffffffffffaaaa0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn slo(name: &str, budget: f64, state: SloState, updated: &str) -> SloStatus {
        SloStatus {
            name: name.into(),
            sli: 99.95,
            error_budget_remaining: budget,
            burn_rates: BTreeMap::from([("5m".into(), 0.5)]),
            state,
            protection: None,
            good_requests: 9995,
            total_requests: 10000,
            last_updated: Some(updated.into()),
        }
    }

    #[test]
    fn protection_is_written_while_the_slo_burns_and_keeps_its_start() {
        let spec: Vec<apipolicy_api::Slo> = serde_json::from_value(serde_json::json!([
            {"name": "availability", "objective": 99.9, "indicator": {"availability": {}},
             "protect": {"when": "Critical", "actions": ["ServeStale"]}},
            {"name": "latency", "objective": 99.0, "indicator": {"latency": {"threshold": "200ms"}}},
        ]))
        .unwrap();
        let mut now = vec![
            slo("availability", -5.0, SloState::Critical, "t1"),
            slo("latency", 50.0, SloState::Critical, "t1"),
        ];
        let (on, message) = protection(&mut now, &spec, None, ts(100)).unwrap();
        assert!(on);
        let text = now[0].protection.clone().unwrap();
        assert_eq!(text, format!("Active since {}, actions ServeStale", ts(100)));
        assert_eq!(message, format!("availability: {text}"));
        assert_eq!(now[1].protection, None, "latency has no protect");
        // Still burning a minute later: the same start.
        let previous = ApiPolicyStatus { slos: now.clone(), ..Default::default() };
        let mut later = vec![slo("availability", -6.0, SloState::Critical, "t2")];
        protection(&mut later, &spec, Some(&previous), ts(160)).unwrap();
        assert_eq!(later[0].protection.as_deref(), Some(text.as_str()));
        // Below Critical: off.
        let mut calm = vec![slo("availability", -6.0, SloState::Warning, "t3")];
        let (on, _) = protection(&mut calm, &spec, Some(&previous), ts(220)).unwrap();
        assert!(!on);
        assert_eq!(calm[0].protection, None);
        // No SLO with protect: no condition at all.
        assert_eq!(protection(&mut calm, &spec[1..], None, ts(1)), None);
    }

    #[test]
    fn census_counts_matched_injected_current_ready() {
        let p = policy_at("web", "app", "web", 1);
        let ready = |mut p: Pod| {
            p.status = Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some("Running".into()),
                conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            });
            p
        };
        let pods: Vec<Arc<Pod>> = vec![
            // Injected with the current revision, ready.
            Arc::new(ready(pod("a", &[("app", "web")], Some("web"), Some(REV)))),
            // Injected with an old revision, but its sidecar reported the current one.
            Arc::new(pod("b", &[("app", "web")], Some("web"), Some(OLD))),
            // Injected with an old revision, still on it.
            Arc::new(ready(pod("c", &[("app", "web")], Some("web"), Some(OLD)))),
            // Matched, no sidecar.
            Arc::new(pod("d", &[("app", "web")], None, None)),
            // Injected for another policy (its governor), matched by this one's selector.
            Arc::new(pod("e", &[("app", "web")], Some("other"), Some(REV))),
            // Not matched.
            Arc::new(ready(pod("f", &[("app", "db")], Some("web"), Some(REV)))),
        ];
        let reported = |p: &Pod| (p.name_any() == "b").then(|| REV.to_owned());
        let c = census(&p, &pods, Some(REV), &reported);
        assert_eq!(c, Census { matched: 5, injected: 3, current: 2, ready: 2 });
        let none = census(&p, &pods, None, &|_| None);
        assert_eq!((none.matched, none.injected, none.current), (5, 3, 0));
    }

    #[test]
    fn conditions_by_verdict() {
        let p = policy_at("web", "app", "web", 1);
        let census = Census { matched: 3, injected: 3, current: 2, ready: 3 };
        let problems = vec![
            ValidationError { path: "spec.routes[0].timeout".into(), message: "too long".into() },
            ValidationError { path: "spec.slos[0].objective".into(), message: "must be below 100".into() },
        ];
        // (verdict, revision, Accepted's (status, reason, message start), the same of Programmed)
        type Expected<'a> = (&'a str, &'a str, &'a str);
        let table: Vec<(Verdict, Option<&str>, Expected, Expected)> = vec![
            (
                Verdict::Accepted,
                Some(REV),
                ("True", "Accepted", "the spec is valid and compiled to revision sha256:0123"),
                ("False", "Pending", "2 of 3 pods on revision sha256:0123456789ab"),
            ),
            (
                Verdict::Invalid(problems),
                None,
                (
                    "False",
                    "InvalidSpec",
                    "2 problem(s): spec.routes[0].timeout: too long; spec.slos[0].objective: must be below 100",
                ),
                ("False", "InvalidSpec", "no valid config has been written yet"),
            ),
            (
                Verdict::Invalid(vec![]),
                Some(OLD),
                ("False", "InvalidSpec", "0 problem(s)"),
                ("False", "Pending", "0 of 3 pods on revision sha256:ffffffffffff; the spec is invalid"),
            ),
            (
                Verdict::Conflicted { winner: "older".into() },
                None,
                ("False", "Conflicted", "ApiPolicy older is older"),
                ("False", "Conflicted", "the pods are governed by ApiPolicy older"),
            ),
        ];
        for (verdict, revision, accepted, programmed) in table {
            let census = if revision == Some(OLD) { Census { current: 0, ..census } } else { census };
            let s = desired(Observed {
                policy: &p,
                verdict: &verdict,
                revision: revision.map(str::to_owned),
                census,
                slos: vec![],
                port_problems: vec![],
                now: ts(1000),
            });
            let [a, pr] = [&s.conditions[0], &s.conditions[1]];
            assert_eq!((a.type_.as_str(), pr.type_.as_str()), (ACCEPTED, PROGRAMMED));
            for (c, (status, reason, message)) in [(a, accepted), (pr, programmed)] {
                assert_eq!((c.status.as_str(), c.reason.as_str()), (status, reason), "{verdict:?}: {c:?}");
                assert!(c.message.starts_with(message), "{verdict:?}: {:?} vs {message:?}", c.message);
                assert_eq!(c.observed_generation, Some(1));
            }
            assert_eq!(s.observed_generation, Some(1));
            assert_eq!(s.config_revision.as_deref(), revision);
        }
    }

    #[test]
    fn all_pods_current_is_programmed_and_missing_sidecars_are_explained() {
        let p = policy_at("web", "app", "web", 1);
        let done = desired(Observed {
            policy: &p,
            verdict: &Verdict::Accepted,
            revision: Some(REV.into()),
            census: Census { matched: 0, injected: 0, current: 0, ready: 0 },
            slos: vec![],
            port_problems: vec![],
            now: ts(5),
        });
        assert_eq!(done.conditions[1].status, "True");
        assert_eq!(done.conditions[1].message, "0 of 0 pods on revision sha256:0123456789ab");
        assert_eq!(done.pods.as_ref().unwrap().summary.as_deref(), Some("0/0"));
        let partial = desired(Observed {
            policy: &p,
            verdict: &Verdict::Accepted,
            revision: Some(REV.into()),
            census: Census { matched: 4, injected: 2, current: 2, ready: 2 },
            slos: vec![],
            port_problems: vec![],
            now: ts(5),
        });
        assert_eq!(partial.conditions[1].reason, "Pending");
        assert!(partial.conditions[1].message.contains("2 matched pod(s) have no sidecar"));
    }

    #[test]
    fn transition_times_move_only_with_the_status_and_unchanged_slos_keep_their_stamp() {
        let mut p = policy_at("web", "app", "web", 1);
        let census = Census { matched: 1, injected: 1, current: 1, ready: 1 };
        let first = desired(Observed {
            policy: &p,
            verdict: &Verdict::Accepted,
            revision: Some(REV.into()),
            census,
            slos: vec![
                slo("availability", 50.0, SloState::Healthy, "t1"),
                slo("latency", -3.0, SloState::Exhausted, "t1"),
            ],
            port_problems: vec![],
            now: ts(100),
        });
        assert_eq!(first.lowest_error_budget_remaining, Some(-3.0));
        assert_eq!(first.slo_state, Some(SloState::Exhausted));
        p.status = Some(first.clone());

        // Nothing changed but the clock: the desired status equals the current one.
        let again = desired(Observed {
            policy: &p,
            verdict: &Verdict::Accepted,
            revision: Some(REV.into()),
            census,
            slos: vec![
                slo("availability", 50.0, SloState::Healthy, "t2"),
                slo("latency", -3.0, SloState::Exhausted, "t2"),
            ],
            port_problems: vec![],
            now: ts(200),
        });
        assert_eq!(again, first);

        // One SLO moved: only it gets the new stamp. Programmed flips: its time moves, Accepted's does not.
        let moved = desired(Observed {
            policy: &p,
            verdict: &Verdict::Accepted,
            revision: Some(REV.into()),
            census: Census { matched: 2, ..census },
            slos: vec![
                slo("availability", 49.0, SloState::Critical, "t3"),
                slo("latency", -3.0, SloState::Exhausted, "t3"),
            ],
            port_problems: vec![],
            now: ts(300),
        });
        assert_eq!(moved.slos[0].last_updated.as_deref(), Some("t3"));
        assert_eq!(moved.slos[1].last_updated.as_deref(), Some("t1"));
        assert_eq!(moved.slo_state, Some(SloState::Critical));
        assert_eq!(moved.conditions[0].last_transition_time, Time(ts(100)));
        assert_eq!(moved.conditions[1].last_transition_time, Time(ts(300)));
    }

    #[test]
    fn notices_on_rejection_and_new_revisions_only() {
        let p = policy_at("web", "app", "web", 1);
        let census = Census::default();
        let make = |verdict: &Verdict, revision: Option<&str>| {
            desired(Observed {
                policy: &p,
                verdict,
                revision: revision.map(str::to_owned),
                census,
                slos: vec![],
                port_problems: vec![],
                now: ts(1),
            })
        };
        let ok = make(&Verdict::Accepted, Some(REV));
        let invalid = make(
            &Verdict::Invalid(vec![ValidationError { path: "spec.x".into(), message: "bad".into() }]),
            Some(REV),
        );
        let conflicted = make(&Verdict::Conflicted { winner: "w".into() }, None);
        let cm = "apipolicy-web";
        assert_eq!(
            notices(None, &ok, cm),
            vec![Notice {
                warning: false,
                reason: "ConfigUpdated".into(),
                note: "compiled revision sha256:0123456789ab into ConfigMap apipolicy-web".into()
            }]
        );
        assert!(notices(Some(&ok), &ok, cm).is_empty());
        let n = notices(Some(&ok), &invalid, cm);
        assert_eq!(n.len(), 1);
        assert!(n[0].warning && n[0].reason == "InvalidSpec" && n[0].note == "1 problem(s): spec.x: bad");
        assert!(notices(Some(&invalid), &invalid, cm).is_empty(), "no repeat while nothing changes");
        assert_eq!(notices(None, &conflicted, cm)[0].reason, "Conflicted");
    }

    #[test]
    fn pods_whose_port_cannot_be_taken_over_get_a_condition_saying_what_to_change() {
        let mut p = policy_at("web", "app", "web", 1);
        let with = |name: &str, ports: serde_json::Value, annotations: serde_json::Value| -> Arc<Pod> {
            let mut pod = pod(name, &[("app", "web")], None, None);
            pod.metadata.annotations = serde_json::from_value(annotations).unwrap();
            pod.spec = Some(
                serde_json::from_value(serde_json::json!({"containers": [{"name": "app", "ports": ports}]}))
                    .unwrap(),
            );
            Arc::new(pod)
        };
        let none = serde_json::json!({});
        let unnamed = serde_json::json!([{"containerPort": 8080}]);
        let pods = vec![
            with("a", unnamed.clone(), none.clone()),
            with("b", serde_json::json!([{"name": "http", "containerPort": 8080}]), none.clone()),
            with("c", serde_json::json!([]), none.clone()),
            with("d", unnamed.clone(), serde_json::json!({POLICY_ANNOTATION: "web"})),
            with(
                "e",
                unnamed.clone(),
                serde_json::json!({apipolicy_api::contract::INJECT_ANNOTATION: "false"}),
            ),
            Arc::new(pod("f", &[("app", "web")], None, None)),
        ];
        let problems = port_problems(&p, &pods);
        assert_eq!(
            problems,
            vec![
                ("a".to_owned(), Problem::PortUnnamed { container: "app".into(), port: 8080 }),
                ("c".to_owned(), Problem::PortNotDeclared { port: 8080 }),
            ]
        );
        let observe = |p: &ApiPolicy, port_problems: Vec<(String, Problem)>, now: i64| {
            desired(Observed {
                policy: p,
                verdict: &Verdict::Accepted,
                revision: Some(REV.into()),
                census: Census::default(),
                slos: vec![],
                port_problems,
                now: ts(now),
            })
        };
        let s = observe(&p, problems, 10);
        let c = &s.conditions[2];
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
            (PORT_UNNAMED, "True", "PortUnnamed")
        );
        assert!(
            c.message.starts_with(
                "2 pod(s) without a sidecar, such as a: ApiPolicy web: container app declares port 8080 without a name"
            ),
            "{}",
            c.message
        );
        p.status = Some(s);
        // The pods were fixed: the condition goes.
        let fixed = observe(&p, vec![], 20);
        assert_eq!(fixed.conditions.len(), 2);
        assert!(fixed.conditions.iter().all(|c| c.type_ != PORT_UNNAMED));
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let problems: Vec<ValidationError> = (0..2000)
            .map(|i| ValidationError { path: format!("spec.routes[{i}].name"), message: "é".repeat(10) })
            .collect();
        let m = Verdict::Invalid(problems).message(None);
        assert!(m.len() <= MAX_MESSAGE && m.ends_with("..."));
    }
}
