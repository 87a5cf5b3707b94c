//! The objects the controller writes for an ApiPolicy. Pure: each is a function of the policy
//! and what was compiled or measured from it.

use apipolicy_api::contract::{CONFIG_REVISION_ANNOTATION, POLICY_LABEL};
use std::collections::BTreeMap;

use apipolicy_api::{ApiPolicy, SidecarConfig, SloConfig};
use k8s_openapi::{
    ByteString,
    api::core::v1::ConfigMap,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

/// The field manager of every write, so server-side apply knows what the operator owns.
pub const MANAGER: &str = "apipolicy-operator";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The label selector of the ConfigMaps the operator watches.
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=apipolicy-operator";
/// The key of the compiled SidecarConfig (JSON) in the policy's ConfigMap.
pub const CONFIG_KEY: &str = "config.json";
/// The key of the CA (PEM) that signs the agent API's certificate, which the sidecar trusts.
pub const CA_KEY: &str = "ca.crt";
/// The key of the gzipped SLO history in `apipolicy-<name>-slo`.
pub const HISTORY_KEY: &str = "history.json.gz";
/// The most the gzipped SLO history may take. The API server refuses a ConfigMap whose `data`
/// and `binaryData` hold more than 1 MiB (counted decoded: `binaryData` travels as base64, a
/// third more, but is counted and stored as bytes); this leaves room to spare. The object on the
/// wire is then at most about 1.2 MB, below the API server's 3 MiB requests and etcd's 1.5 MiB
/// values.
pub const HISTORY_MAX_BYTES: usize = 900 * 1024;

pub fn config_map_name(policy: &str) -> String {
    format!("apipolicy-{policy}")
}

pub fn slo_config_map_name(policy: &str) -> String {
    format!("apipolicy-{policy}-slo")
}

/// Makes `policy` the controlling owner, so that deleting the policy deletes the object.
pub fn owner_reference(policy: &ApiPolicy) -> OwnerReference {
    policy.controller_owner_ref(&()).expect("a stored ApiPolicy has a name and uid")
}

fn meta(policy: &ApiPolicy, name: String, annotations: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: policy.namespace(),
        labels: Some(BTreeMap::from([
            (MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned()),
            (POLICY_LABEL.to_owned(), policy.name_any()),
        ])),
        annotations,
        owner_references: Some(vec![owner_reference(policy)]),
        ..ObjectMeta::default()
    }
}

/// `apipolicy-<name>`: the compiled config the injector mounts into the sidecar, and the CA of
/// the agent API when the operator has one.
pub fn config_map(policy: &ApiPolicy, config: &SidecarConfig, ca: Option<&str>) -> ConfigMap {
    let json = serde_json::to_string_pretty(config).expect("a SidecarConfig always serializes");
    let mut data = BTreeMap::from([(CONFIG_KEY.to_owned(), json)]);
    if let Some(ca) = ca {
        data.insert(CA_KEY.to_owned(), ca.to_owned());
    }
    ConfigMap {
        metadata: meta(
            policy,
            config_map_name(&policy.name_any()),
            Some(BTreeMap::from([(CONFIG_REVISION_ANNOTATION.to_owned(), config.revision.clone())])),
        ),
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// `apipolicy-<name>-slo`: the merged SLO history, so a restart of the operator loses no budget.
pub fn slo_config_map(policy: &ApiPolicy, history: Vec<u8>) -> ConfigMap {
    ConfigMap {
        metadata: meta(policy, slo_config_map_name(&policy.name_any()), None),
        binary_data: Some(BTreeMap::from([(HISTORY_KEY.to_owned(), ByteString(history))])),
        ..ConfigMap::default()
    }
}

/// Whether `existing` already holds what `desired` would write, so no write is needed.
pub fn config_map_is_current(existing: &ConfigMap, desired: &ConfigMap) -> bool {
    let subset = |want: &Option<BTreeMap<String, String>>, have: &Option<BTreeMap<String, String>>| {
        want.iter().flatten().all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    existing.data == desired.data
        && existing.binary_data == desired.binary_data
        && subset(&desired.metadata.labels, &existing.metadata.labels)
        && subset(&desired.metadata.annotations, &existing.metadata.annotations)
        && desired
            .metadata
            .owner_references
            .iter()
            .flatten()
            .all(|o| existing.metadata.owner_references.iter().flatten().any(|e| e.uid == o.uid))
}

/// The SRE workbook's windows: each alert fires when a long and a short window both burn the
/// budget faster than the factor.
struct BurnAlert {
    severity: &'static str,
    pairs: [(&'static str, &'static str, f64); 2],
}

const ALERTS: [BurnAlert; 2] = [
    // Page: 2% of a 30-day budget in an hour, or 5% in six hours.
    BurnAlert { severity: "critical", pairs: [("1h", "5m", 14.4), ("6h", "30m", 6.0)] },
    // Ticket: 10% of the budget in a day, or 10% in three days.
    BurnAlert { severity: "warning", pairs: [("1d", "2h", 3.0), ("3d", "6h", 1.0)] },
];

const RATE_WINDOWS: [&str; 7] = ["5m", "30m", "1h", "2h", "6h", "1d", "3d"];

/// The recorded series: the share of bad requests of one SLO over a window.
pub fn error_ratio_series(window: &str) -> String {
    format!("apipolicy:slo_error_ratio:rate{window}")
}

/// The name of the PrometheusRule of a policy.
pub fn prometheus_rule_name(policy: &str) -> String {
    format!("apipolicy-{policy}")
}

/// A PrometheusRule (`monitoring.coreos.com/v1`) with, for each SLO, recording rules of its
/// error ratio over the burn-rate windows and the workbook's multi-window burn-rate alerts.
///
/// The series are the sidecars' `apipolicy_slo_requests_total{slo,result}`, to which Prometheus
/// adds `namespace` and `pod` when it scrapes them; the rules keep `namespace` and `slo` and add
/// `apipolicy_policy`.
pub fn prometheus_rule(policy: &ApiPolicy, config: &SidecarConfig) -> Value {
    let namespace = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let groups: Vec<Value> = config.spec.slos.iter().map(|slo| rule_group(&namespace, &name, slo)).collect();
    let meta = meta(policy, prometheus_rule_name(&name), None);
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": meta,
        "spec": {"groups": groups},
    })
}

fn rule_group(namespace: &str, policy: &str, slo: &SloConfig) -> Value {
    let labels = json!({"apipolicy_policy": policy});
    let series = format!(r#"apipolicy_slo_requests_total{{namespace="{namespace}",slo="{}""#, slo.name);
    let mut rules: Vec<Value> = RATE_WINDOWS
        .iter()
        .map(|w| {
            json!({
                "record": error_ratio_series(w),
                "expr": format!(
                    "sum by (namespace, slo) (rate({series},result=\"bad\"}}[{w}]))\n/\n\
                     sum by (namespace, slo) (rate({series}}}[{w}]))"
                ),
                "labels": labels,
            })
        })
        .collect();
    // The allowed share of bad requests, written from the objective as the user wrote it.
    let budget = format!("(1 - {} / 100)", slo.objective);
    let selector = format!(r#"{{namespace="{namespace}",slo="{}",apipolicy_policy="{policy}"}}"#, slo.name);
    for alert in &ALERTS {
        let clauses: Vec<String> = alert
            .pairs
            .iter()
            .map(|(long, short, factor)| {
                format!(
                    "({long_s}{selector} > {factor} * {budget}\nand\n{short_s}{selector} > {factor} * {budget})",
                    long_s = error_ratio_series(long),
                    short_s = error_ratio_series(short),
                )
            })
            .collect();
        rules.push(json!({
            "alert": "ApiPolicySloBurnRate",
            "expr": clauses.join("\nor\n"),
            "labels": {"severity": alert.severity, "slo": slo.name, "apipolicy_policy": policy},
            "annotations": {
                "summary": format!("ApiPolicy {namespace}/{policy}: SLO {} is burning its error budget", slo.name),
                "description": format!(
                    "The error ratio of SLO {} ({}% objective) burns the budget faster than the {} threshold \
                     of the multi-window burn-rate rules ({}).",
                    slo.name,
                    slo.objective,
                    alert.severity,
                    alert.pairs.iter().map(|(l, s, f)| format!("{l} and {s} over {f}")).collect::<Vec<_>>().join(", or ")
                ),
            },
        }));
    }
    json!({"name": format!("apipolicy.{namespace}.{policy}.{}", slo.name), "rules": rules})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{policy_at, quickstart};

    #[test]
    fn config_map_carries_the_config_owner_and_revision() {
        let policy = quickstart();
        let config = apipolicy_api::compile(&policy).unwrap();
        let cm = config_map(&policy, &config, None);
        assert_eq!(cm.metadata.name.as_deref(), Some("apipolicy-products"));
        assert!(!cm.data.as_ref().unwrap().contains_key(CA_KEY));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("shop"));
        let owner = &cm.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("ApiPolicy", "products", Some(true))
        );
        assert_eq!(owner.api_version, "apipolicy.dev/v1alpha1");
        assert_eq!(cm.metadata.annotations.as_ref().unwrap()[CONFIG_REVISION_ANNOTATION], config.revision);
        assert_eq!(cm.metadata.labels.as_ref().unwrap()[MANAGED_BY_LABEL], MANAGER);
        // The sidecar loads exactly this text.
        let text = &cm.data.as_ref().unwrap()[CONFIG_KEY];
        assert_eq!(apipolicy_api::manifest::load_sidecar_config(text).unwrap(), config);

        assert!(config_map_is_current(&cm, &cm));
        let mut stale = cm.clone();
        stale.data.as_mut().unwrap().insert(CONFIG_KEY.into(), "{}".into());
        assert!(!config_map_is_current(&stale, &cm));
        let mut unowned = cm.clone();
        unowned.metadata.owner_references = None;
        assert!(!config_map_is_current(&unowned, &cm));
        let mut extra = cm.clone();
        extra.metadata.labels.as_mut().unwrap().insert("someone".into(), "else".into());
        assert!(config_map_is_current(&extra, &cm), "labels added by others do not matter");

        // With a CA, the sidecar finds it beside the config; a new CA is a change to write.
        let with_ca = config_map(&policy, &config, Some("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(with_ca.data.as_ref().unwrap()[CA_KEY], "-----BEGIN CERTIFICATE-----\n");
        assert!(!config_map_is_current(&cm, &with_ca));
        assert!(!config_map_is_current(&with_ca, &config_map(&policy, &config, Some("another CA"))));
    }

    #[test]
    fn slo_config_map_holds_binary_history() {
        let policy = policy_at("web", "app", "web", 1);
        let cm = slo_config_map(&policy, vec![1, 2, 3]);
        assert_eq!(cm.metadata.name.as_deref(), Some("apipolicy-web-slo"));
        assert_eq!(cm.binary_data.as_ref().unwrap()[HISTORY_KEY].0, vec![1, 2, 3]);
        assert!(cm.data.is_none());
    }

    #[test]
    fn a_history_at_its_limit_fits_a_config_map() {
        let cm = slo_config_map(&quickstart(), vec![0xa5; HISTORY_MAX_BYTES]);
        // The API server refuses more than 1 MiB of data and binaryData, counted decoded.
        let binary: usize = cm.binary_data.iter().flatten().map(|(_, v)| v.0.len()).sum();
        let text: usize = cm.data.iter().flatten().map(|(_, v)| v.len()).sum();
        assert!(binary + text <= 1024 * 1024 - 100 * 1024, "{} bytes counted", binary + text);
        // On the wire binaryData is base64, a third more: still well below etcd's 1.5 MiB.
        let wire = serde_json::to_vec(&cm).unwrap().len();
        assert!(wire <= 1536 * 1024 - 256 * 1024, "{wire} bytes on the wire");
    }

    #[test]
    fn prometheus_rule_has_the_workbook_alerts_for_each_slo() {
        let policy = quickstart();
        let config = apipolicy_api::compile(&policy).unwrap();
        let rule = prometheus_rule(&policy, &config);
        assert_eq!(rule["kind"], "PrometheusRule");
        assert_eq!(rule["metadata"]["name"], "apipolicy-products");
        assert_eq!(rule["metadata"]["ownerReferences"][0]["kind"], "ApiPolicy");
        let groups = rule["spec"]["groups"].as_array().unwrap();
        assert_eq!(groups.len(), config.spec.slos.len());
        let rules = groups[0]["rules"].as_array().unwrap();
        let records: Vec<&str> = rules.iter().filter_map(|r| r["record"].as_str()).collect();
        assert_eq!(records.len(), 7);
        assert!(records.contains(&"apipolicy:slo_error_ratio:rate5m"));
        assert_eq!(
            rules[0]["expr"],
            "sum by (namespace, slo) (rate(apipolicy_slo_requests_total{namespace=\"shop\",slo=\"availability\",result=\"bad\"}[5m]))\n/\n\
             sum by (namespace, slo) (rate(apipolicy_slo_requests_total{namespace=\"shop\",slo=\"availability\"}[5m]))"
        );
        let alerts: Vec<&Value> = rules.iter().filter(|r| r.get("alert").is_some()).collect();
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[0]["labels"]["severity"], "critical");
        let page = alerts[0]["expr"].as_str().unwrap();
        assert!(page.contains(
            "apipolicy:slo_error_ratio:rate1h{namespace=\"shop\",slo=\"availability\",apipolicy_policy=\"products\"} > 14.4 * (1 - 99.9 / 100)"
        ));
        assert!(page.contains("apipolicy:slo_error_ratio:rate5m{"));
        assert!(
            page.contains("rate6h{") && page.contains("rate30m{") && page.contains("> 6 * (1 - 99.9 / 100)")
        );
        let ticket = alerts[1]["expr"].as_str().unwrap();
        assert_eq!(alerts[1]["labels"]["severity"], "warning");
        assert!(ticket.contains("rate1d{") && ticket.contains("rate2h{") && ticket.contains("> 3 * "));
        assert!(ticket.contains("rate3d{") && ticket.contains("rate6h{") && ticket.contains("> 1 * "));
    }
}
