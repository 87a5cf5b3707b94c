//! Which ApiPolicy governs a pod, and whether a policy loses its pods to an older one. Pure: the
//! injection webhook and the agent API use the same rule as the controller.
//!
//! A pod is governed by the oldest ApiPolicy of its namespace that selects it (creation time,
//! then name, so the choice is total and stable). A policy that selects any pod governed by
//! another policy, or that has the same selector as an older one, is in conflict.

use std::{collections::BTreeMap, sync::Arc};

use apipolicy_api::ApiPolicy;
use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{LabelSelector, Time},
};
use kube::{
    ResourceExt,
    core::{Selector, SelectorExt},
};

/// Whether `selector` selects a pod with `labels`. An empty or malformed selector selects
/// nothing: validation rejects both, and an empty one would otherwise take the whole namespace.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    match Selector::try_from(selector.clone()) {
        Ok(s) => !s.selects_all() && s.matches(labels),
        Err(_) => false,
    }
}

/// The order in which policies claim pods: older first, then by name.
fn seniority(p: &ApiPolicy) -> (Option<&Time>, &str) {
    (p.metadata.creation_timestamp.as_ref(), p.metadata.name.as_deref().unwrap_or_default())
}

fn older(a: &ApiPolicy, b: &ApiPolicy) -> bool {
    // `None` (not yet persisted) sorts before `Some`; treat it as the newest instead.
    match (seniority(a), seniority(b)) {
        ((Some(ta), na), (Some(tb), nb)) => (ta.0, na) < (tb.0, nb),
        ((None, _), (Some(_), _)) => false,
        ((Some(_), _), (None, _)) => true,
        ((None, na), (None, nb)) => na < nb,
    }
}

/// A pod still counts while it may run: not finished, not being deleted.
pub fn is_live(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

fn in_play(p: &ApiPolicy) -> bool {
    p.metadata.deletion_timestamp.is_none()
}

/// The policy that governs a pod with these labels in `namespace`, if any.
pub fn governing<'a>(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    policies: impl IntoIterator<Item = &'a ApiPolicy>,
) -> Option<&'a ApiPolicy> {
    policies
        .into_iter()
        .filter(|p| in_play(p) && p.namespace().as_deref() == Some(namespace))
        .filter(|p| selects(&p.spec.selector, labels))
        .reduce(|best, p| if older(p, best) { p } else { best })
}

/// The older policy that `policy` is in conflict with, if any: the one governing a pod that
/// `policy` selects, or one with the very same selector (which conflicts even before any pod
/// exists). When several, the oldest is named.
pub fn conflict<'a>(
    policy: &ApiPolicy,
    policies: &'a [Arc<ApiPolicy>],
    pods: &[Arc<Pod>],
) -> Option<&'a ApiPolicy> {
    let namespace = policy.namespace()?;
    let me = (namespace.as_str(), policy.name_any());
    let is_me = |p: &ApiPolicy| (p.namespace().as_deref(), p.name_any()) == (Some(me.0), me.1.clone());
    let mut winners: Vec<&ApiPolicy> = Vec::new();
    for pod in pods.iter().filter(|p| is_live(p) && p.namespace().as_deref() == Some(me.0)) {
        let labels = pod.labels();
        if !selects(&policy.spec.selector, labels) {
            continue;
        }
        if let Some(g) = governing(me.0, labels, policies.iter().map(|p| &**p)).filter(|g| !is_me(g)) {
            winners.push(g);
        }
    }
    winners.extend(policies.iter().map(|p| &**p).filter(|p| {
        in_play(p)
            && !is_me(p)
            && p.namespace().as_deref() == Some(me.0)
            && p.spec.selector == policy.spec.selector
            && older(p, policy)
    }));
    winners.into_iter().reduce(|best, p| if older(p, best) { p } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{pod, policy_at};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn selectors() {
        let by_app: LabelSelector =
            serde_json::from_value(serde_json::json!({"matchLabels": {"app": "a"}})).unwrap();
        let expr: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}]
        }))
        .unwrap();
        let bad: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchExpressions": [{"key": "tier", "operator": "Near"}]
        }))
        .unwrap();
        let table = [
            (&by_app, labels(&[("app", "a")]), true),
            (&by_app, labels(&[("app", "a"), ("x", "y")]), true),
            (&by_app, labels(&[("app", "b")]), false),
            (&by_app, labels(&[]), false),
            (&expr, labels(&[("tier", "api")]), true),
            (&expr, labels(&[("tier", "db")]), false),
            (&bad, labels(&[("tier", "db")]), false),
            (&LabelSelector::default(), labels(&[("app", "a")]), false),
        ];
        for (selector, labels, expected) in table {
            assert_eq!(selects(selector, &labels), expected, "{selector:?} on {labels:?}");
        }
    }

    #[test]
    fn the_older_policy_wins() {
        let old = Arc::new(policy_at("old", "app", "web", 100));
        let new = Arc::new(policy_at("new", "app", "web", 200));
        let other = Arc::new(policy_at("other", "app", "db", 50));
        // Same creation second: the name decides.
        let twin = Arc::new(policy_at("aaa-twin", "app", "web", 100));
        let web = Arc::new(pod("web-1", &[("app", "web")], None, None));
        let db = Arc::new(pod("db-1", &[("app", "db")], None, None));
        let pods = vec![web.clone(), db.clone()];

        let two = vec![old.clone(), new.clone(), other.clone()];
        assert_eq!(
            governing("shop", web.labels(), two.iter().map(|p| &**p)).map(|p| p.name_any()).as_deref(),
            Some("old")
        );
        assert_eq!(conflict(&new, &two, &pods).map(|p| p.name_any()).as_deref(), Some("old"));
        assert!(conflict(&old, &two, &pods).is_none(), "the winner has no conflict");
        assert!(conflict(&other, &two, &pods).is_none(), "disjoint pods: no conflict");

        let three = vec![old.clone(), new.clone(), twin.clone()];
        assert_eq!(conflict(&old, &three, &pods).map(|p| p.name_any()).as_deref(), Some("aaa-twin"));
        assert_eq!(conflict(&new, &three, &pods).map(|p| p.name_any()).as_deref(), Some("aaa-twin"));

        // No pods at all: the same selector still conflicts, a different one does not.
        assert_eq!(conflict(&new, &two, &[]).map(|p| p.name_any()).as_deref(), Some("old"));
        assert!(conflict(&other, &two, &[]).is_none());

        // A policy being deleted no longer claims pods.
        let mut leaving = policy_at("old", "app", "web", 100);
        leaving.metadata.deletion_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::from_second(300).unwrap()));
        let with_leaving = vec![Arc::new(leaving), new.clone()];
        assert!(conflict(&new, &with_leaving, &pods).is_none());

        // Finished pods do not count; another namespace does not count.
        let mut done = pod("web-2", &[("app", "web")], None, None);
        done.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        let mut elsewhere = policy_at("elsewhere", "app", "web", 1);
        elsewhere.metadata.namespace = Some("other".into());
        let new_only = vec![new.clone(), Arc::new(elsewhere)];
        assert!(conflict(&new, &new_only, &[Arc::new(done)]).is_none());
    }

    #[test]
    fn overlapping_chains_name_the_governor_of_the_shared_pods() {
        // a (oldest) selects tier=web; b selects app=shop; c (newest) selects team=x.
        // Pod 1 is web+shop: a governs it. Pod 2 is shop+x: b governs it (a does not select it).
        let a = Arc::new(policy_at("a", "tier", "web", 1));
        let b = Arc::new(policy_at("b", "app", "shop", 2));
        let c = Arc::new(policy_at("c", "team", "x", 3));
        let p1 = Arc::new(pod("p1", &[("tier", "web"), ("app", "shop")], None, None));
        let p2 = Arc::new(pod("p2", &[("app", "shop"), ("team", "x")], None, None));
        let all = vec![a.clone(), b.clone(), c.clone()];
        let pods = vec![p1, p2];
        assert!(conflict(&a, &all, &pods).is_none());
        assert_eq!(conflict(&b, &all, &pods).map(|p| p.name_any()).as_deref(), Some("a"));
        assert_eq!(conflict(&c, &all, &pods).map(|p| p.name_any()).as_deref(), Some("b"));
    }
}
