//! The reconcile loop: for each ApiPolicy, judge it, compile it, store the config, hand it to
//! the agent API, and write the status. Level-triggered and idempotent: every write is skipped
//! when the object already says the same, and only the leader writes.

use apipolicy_api::contract::POLICY_ANNOTATION;
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use apipolicy_api::{ApiPolicy, SidecarConfig, SloConfig};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Pod},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DynamicObject, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType},
        reflector::ObjectRef,
    },
};
use serde_json::json;

use crate::{
    conflict,
    context::{Context, key_of},
    error::{Error, Result},
    hub::PolicyKey,
    render::{self, MANAGER},
    slo_merge::Snapshot,
    status::{self, Observed, Verdict},
};

/// Policies with SLOs are revisited this often, so their figures follow the sliding windows.
const SLO_REQUEUE: Duration = Duration::from_secs(15);
/// Everything else is revisited this often, in case a watch event was missed.
const REQUEUE: Duration = Duration::from_secs(300);

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

pub async fn reconcile(policy: Arc<ApiPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_duration.start_timer();
    ctx.metrics.reconciles.inc();
    let namespace = policy.namespace().ok_or_else(|| Error::MissingNamespace(policy.name_any()))?;
    let key = key_of(&policy);
    if policy.metadata.deletion_timestamp.is_some() {
        // The owner references delete what the policy owns; only memory is left to clear.
        ctx.forget(&key);
        return Ok(Action::await_change());
    }
    if !ctx.ready.load(Ordering::Acquire) {
        // Until the caches are filled, a missing ConfigMap may only be not yet seen.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let now_ms = ctx.now_ms();
    let pods = ctx.stores.pods.state();
    let policies = ctx.stores.policies.state();

    let (verdict, compiled) = match apipolicy_api::compile(&policy) {
        Err(problems) => (Verdict::Invalid(problems), None),
        Ok(config) => match conflict::conflict(&policy, &policies, &pods) {
            Some(winner) => (Verdict::Conflicted { winner: winner.name_any() }, None),
            None => (Verdict::Accepted, Some(config)),
        },
    };
    // Pods keep the last valid config (still in the ConfigMap) while the spec is invalid.
    let revision = match &compiled {
        Some(c) => Some(c.revision.clone()),
        None => policy.status.as_ref().and_then(|s| s.config_revision.clone()),
    };
    let reported = |pod: &Pod| pod.metadata.uid.as_deref().and_then(|uid| ctx.configs.reported_revision(uid));
    let census = status::census(&policy, &pods, revision.as_deref(), &reported);

    // Every replica serves config, so every replica keeps it current.
    let serving: Option<SidecarConfig> = match (&verdict, compiled) {
        (Verdict::Accepted, Some(config)) => {
            ctx.configs.publish(&key, config.clone(), census.ready);
            Some(config)
        }
        (Verdict::Invalid(_), _) => {
            if ctx.configs.current(&key).is_none()
                && let Some(config) = stored_config(&ctx, &policy)
            {
                ctx.configs.publish(&key, config, census.ready);
            }
            ctx.configs.publish_ready(&key, census.ready);
            ctx.configs.current(&key).map(|c| c.config.clone())
        }
        _ => {
            ctx.configs.forget(&key);
            None
        }
    };
    let requeue =
        if serving.as_ref().is_some_and(|c| !c.spec.slos.is_empty()) { SLO_REQUEUE } else { REQUEUE };
    if !ctx.leader.is_leader() {
        return Ok(Action::requeue(REQUEUE));
    }

    if let (Verdict::Accepted, Some(config)) = (&verdict, &serving) {
        apply_config_map(&ctx, &policy, &namespace, config).await?;
        apply_prometheus_rule(&ctx, &policy, &namespace, config).await?;
    }
    let slos: &[SloConfig] = serving.as_ref().map(|c| c.spec.slos.as_slice()).unwrap_or_default();
    let figures = ctx.budgets.statuses(&key, slos, now_ms, || ctx.load_history(&policy));
    // A failed save is retried at the next reconcile; the status is written either way.
    let saved = save_history(&ctx, &policy, &namespace, slos, now_ms).await;

    let desired = status::desired(Observed {
        policy: &policy,
        verdict: &verdict,
        revision,
        census,
        slos: figures,
        port_problems: if matches!(verdict, Verdict::Accepted) {
            status::port_problems(&policy, &pods)
        } else {
            Vec::new()
        },
        now: Timestamp::from_millisecond(now_ms as i64).unwrap_or(Timestamp::UNIX_EPOCH),
    });
    if policy.status.as_ref() != Some(&desired) {
        let patch = json!({
            "apiVersion": ApiPolicy::api_version(&()),
            "kind": ApiPolicy::kind(&()),
            "status": desired,
        });
        Api::<ApiPolicy>::namespaced(ctx.client.clone(), &namespace)
            .patch_status(&policy.name_any(), &apply_params(), &Patch::Apply(&patch))
            .await
            .map_err(|source| Error::PatchStatus {
                namespace: namespace.clone(),
                name: policy.name_any(),
                source,
            })?;
        ctx.metrics.writes.with_label_values(&["status"]).inc();
        let config_map = render::config_map_name(&policy.name_any());
        for notice in status::notices(policy.status.as_ref(), &desired, &config_map) {
            let event = Event {
                type_: if notice.warning { EventType::Warning } else { EventType::Normal },
                reason: notice.reason,
                note: Some(notice.note),
                action: "Reconcile".into(),
                secondary: None,
            };
            // Events are for people reading `kubectl describe`; losing one must not stop the loop.
            if let Err(e) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
                tracing::warn!(policy = %format!("{}/{}", key.0, key.1), error = %e, "publishing an event failed");
            }
        }
    }
    saved?;
    Ok(Action::requeue(requeue))
}

/// The config in the policy's ConfigMap, as the last valid spec compiled it.
fn stored_config(ctx: &Context, policy: &ApiPolicy) -> Option<SidecarConfig> {
    let (namespace, name) = key_of(policy);
    let cm =
        ctx.stores.config_maps.get(&ObjectRef::new(&render::config_map_name(&name)).within(&namespace))?;
    let text = cm.data.as_ref()?.get(render::CONFIG_KEY)?;
    apipolicy_api::manifest::load_sidecar_config(text).ok()
}

async fn apply_config_map(
    ctx: &Context,
    policy: &ApiPolicy,
    namespace: &str,
    config: &SidecarConfig,
) -> Result<()> {
    let ca = ctx.ca.load_full();
    let desired = render::config_map(policy, config, ca.as_deref().map(String::as_str));
    let name = desired.metadata.name.clone().expect("rendered with a name");
    let existing = ctx.stores.config_maps.get(&ObjectRef::new(&name).within(namespace));
    if existing.is_some_and(|e| render::config_map_is_current(&e, &desired)) {
        return Ok(());
    }
    Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace)
        .patch(&name, &apply_params(), &Patch::Apply(&desired))
        .await
        .map_err(|source| Error::ApplyConfigMap { namespace: namespace.to_owned(), name, source })?;
    ctx.metrics.writes.with_label_values(&["configmap"]).inc();
    Ok(())
}

async fn apply_prometheus_rule(
    ctx: &Context,
    policy: &ApiPolicy,
    namespace: &str,
    config: &SidecarConfig,
) -> Result<()> {
    let Some(resource) = ctx.prometheus_rules.load_full() else { return Ok(()) };
    let key = key_of(policy);
    let desired = render::prometheus_rule(policy, config);
    if ctx.applied_rules.lock().expect("rules lock").get(&key) == Some(&desired) {
        return Ok(());
    }
    let name = render::prometheus_rule_name(&policy.name_any());
    Api::<DynamicObject>::namespaced_with(ctx.client.clone(), namespace, &resource)
        .patch(&name, &apply_params(), &Patch::Apply(&desired))
        .await
        .map_err(|source| Error::ApplyPrometheusRule { namespace: namespace.to_owned(), name, source })?;
    ctx.metrics.writes.with_label_values(&["prometheusrule"]).inc();
    ctx.applied_rules.lock().expect("rules lock").insert(key, desired);
    Ok(())
}

/// Saves the policy's merged SLO history when it has news and the last save is old enough.
async fn save_history(
    ctx: &Context,
    policy: &ApiPolicy,
    namespace: &str,
    slos: &[SloConfig],
    now_ms: u64,
) -> Result<()> {
    let key = key_of(policy);
    let live = |pod: &str| ctx.pod(namespace, pod).is_some_and(|p| conflict::is_live(&p));
    let max_bytes = render::HISTORY_MAX_BYTES;
    let Some(Snapshot { bytes, marks, trimmed }) =
        ctx.budgets.snapshot_if_due(&key, slos, now_ms, &live, max_bytes).await?
    else {
        return Ok(());
    };
    let saved_bytes = bytes.len();
    let desired = render::slo_config_map(policy, bytes);
    let name = desired.metadata.name.clone().expect("rendered with a name");
    let applied = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace)
        .patch(&name, &apply_params(), &Patch::Apply(&desired))
        .await;
    match applied {
        Ok(_) => {
            ctx.budgets.saved(&key, marks, now_ms);
            ctx.metrics.writes.with_label_values(&["slo_history"]).inc();
            if let Some(t) = trimmed {
                for reason in t.reasons() {
                    ctx.metrics.slo_history_trimmed.with_label_values(&[reason]).inc();
                }
                let what = if t.changes_figures() {
                    "the SLO history is too large for its ConfigMap: its oldest part was left out of the save, \
                     so after a restart of the operator the figures cover less"
                } else {
                    "the SLO history is too large for its ConfigMap: data no figure reads was left out of the save"
                };
                // A history that stays too large is trimmed at every save: one warning an hour.
                macro_rules! trim_event {
                    ($level:expr) => {
                        tracing::event!(
                            $level,
                            policy = %format!("{}/{}", key.0, key.1),
                            full_bytes = t.full_bytes,
                            saved_bytes,
                            max_bytes,
                            expired_buckets = t.expired_buckets,
                            seen_processes = t.seen_processes,
                            hours = t.hours,
                            minutes = t.minutes,
                            processes = t.processes,
                            "{what}"
                        )
                    };
                }
                if ctx.budgets.warn_of_trim(&key, now_ms) {
                    trim_event!(tracing::Level::WARN);
                } else {
                    trim_event!(tracing::Level::DEBUG);
                }
            }
            Ok(())
        }
        Err(source) => {
            ctx.budgets.save_failed(&key);
            Err(Error::ApplyConfigMap { namespace: namespace.to_owned(), name, source })
        }
    }
}

/// Saves every history with unsaved reports, due or not: the last thing the leader does.
pub async fn save_all_histories(ctx: &Context) {
    if !ctx.leader.is_leader() {
        return;
    }
    for key in ctx.budgets.unsaved() {
        let Some(policy) = ctx.policy(&key) else { continue };
        let slos = ctx.configs.current(&key).map(|c| c.config.spec.slos.clone()).unwrap_or_default();
        ctx.budgets.make_due(&key);
        if let Err(e) = save_history(ctx, &policy, &key.0, &slos, ctx.now_ms()).await {
            tracing::error!(policy = %format!("{}/{}", key.0, key.1), error = %e, "saving the SLO history at shutdown failed");
        }
    }
}

pub fn error_policy(policy: Arc<ApiPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.with_label_values(&[error.metric_label()]).inc();
    tracing::warn!(policy = %format!("{}/{}", policy.namespace().unwrap_or_default(), policy.name_any()), %error, "reconcile failed");
    // A conflict means someone wrote meanwhile: the fresh object is already on its way.
    Action::requeue(if error.is_conflict() { Duration::from_secs(1) } else { Duration::from_secs(10) })
}

/// The policies a pod concerns: those that select it and the one named on it.
pub fn policies_for_pod(policies: &[Arc<ApiPolicy>], pod: &Pod) -> Vec<ObjectRef<ApiPolicy>> {
    let Some(namespace) = pod.namespace() else { return Vec::new() };
    let named = pod.annotations().get(POLICY_ANNOTATION);
    policies
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
        .filter(|p| Some(&p.name_any()) == named || conflict::selects(&p.spec.selector, pod.labels()))
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

/// The other policies of a namespace: a change to one may settle or start their conflict.
pub fn siblings(policies: &[Arc<ApiPolicy>], of: &PolicyKey) -> Vec<PolicyKey> {
    policies.iter().map(|p| key_of(p)).filter(|k| k.0 == of.0 && k.1 != of.1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Scenario, Seed, pod, policy_at, quickstart, timeout_after_1s};

    #[tokio::test]
    async fn a_new_policy_gets_its_configmap_status_and_event() {
        let policy = quickstart();
        let (ctx, verifier) = Context::test(Seed::with_policies(vec![policy.clone()]));
        let mocks = verifier.run(Scenario::Created(policy.clone()));
        let action = reconcile(Arc::new(policy.clone()), ctx.clone()).await.expect("reconciles");
        assert_eq!(action, Action::requeue(SLO_REQUEUE), "a policy with SLOs is revisited for its figures");
        timeout_after_1s(mocks).await;
        let served = ctx.configs.current(&key_of(&policy)).expect("the agent API serves the config");
        assert_eq!(served.config, apipolicy_api::compile(&policy).unwrap());
        assert_eq!(ctx.metrics.writes.with_label_values(&["configmap"]).get(), 1);
    }

    #[tokio::test]
    async fn an_unchanged_policy_writes_nothing() {
        let (policy, config_map) = crate::fixtures::reconciled(quickstart());
        let (ctx, verifier) = Context::test(Seed {
            policies: vec![policy.clone()],
            config_maps: vec![config_map],
            ..Seed::default()
        });
        let mocks = verifier.run(Scenario::Nothing);
        reconcile(Arc::new(policy), ctx.clone()).await.expect("reconciles");
        timeout_after_1s(mocks).await;
        assert_eq!(ctx.metrics.writes.with_label_values(&["status"]).get(), 0);
    }

    #[tokio::test]
    async fn an_updated_spec_rewrites_the_configmap_and_status() {
        let (mut policy, config_map) = crate::fixtures::reconciled(quickstart());
        policy.spec.upstream.port = 9090;
        policy.metadata.generation = Some(2);
        let (ctx, verifier) = Context::test(Seed {
            policies: vec![policy.clone()],
            config_maps: vec![config_map],
            ..Seed::default()
        });
        let mocks = verifier.run(Scenario::Updated(policy.clone()));
        reconcile(Arc::new(policy), ctx).await.expect("reconciles");
        timeout_after_1s(mocks).await;
    }

    #[tokio::test]
    async fn an_invalid_spec_is_rejected_with_every_problem_and_a_warning() {
        let mut policy = quickstart();
        policy.spec.upstream.port = 0;
        policy.spec.slos[0].objective = 100.0;
        let (ctx, verifier) = Context::test(Seed::with_policies(vec![policy.clone()]));
        let mocks = verifier.run(Scenario::Invalid(policy.clone()));
        reconcile(Arc::new(policy.clone()), ctx.clone()).await.expect("a rejection is not an error");
        timeout_after_1s(mocks).await;
        assert!(ctx.configs.current(&key_of(&policy)).is_none(), "nothing valid to serve");
    }

    #[tokio::test]
    async fn the_newer_of_two_policies_on_the_same_pods_is_conflicted() {
        let older = policy_at("older", "app", "products", 100);
        let mut newer = quickstart();
        newer.metadata.creation_timestamp = older.metadata.creation_timestamp.clone().map(|t| {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                t.0 + k8s_openapi::jiff::SignedDuration::from_secs(60),
            )
        });
        let pods = vec![pod("products-1", &[("app", "products")], None, None)];
        let (ctx, verifier) =
            Context::test(Seed { policies: vec![older, newer.clone()], pods, ..Seed::default() });
        let mocks = verifier.run(Scenario::Conflicted(newer.clone(), "older".into()));
        reconcile(Arc::new(newer.clone()), ctx.clone()).await.expect("a conflict is not an error");
        timeout_after_1s(mocks).await;
        assert!(ctx.configs.current(&key_of(&newer)).is_none(), "the loser serves no config");
    }

    #[tokio::test]
    async fn a_policy_being_deleted_is_forgotten_without_writes() {
        let mut policy = quickstart();
        let key = key_of(&policy);
        let (ctx, verifier) = Context::test(Seed::with_policies(vec![policy.clone()]));
        ctx.configs.publish(&key, apipolicy_api::compile(&policy).unwrap(), 1);
        policy.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::from_second(2_000_000_000).unwrap(),
        ));
        let mocks = verifier.run(Scenario::Nothing);
        let action = reconcile(Arc::new(policy), ctx.clone()).await.unwrap();
        assert_eq!(action, Action::await_change());
        timeout_after_1s(mocks).await;
        assert!(ctx.configs.current(&key).is_none());
    }

    #[tokio::test]
    async fn a_conflict_on_the_status_patch_is_an_error_retried_quickly() {
        let policy = quickstart();
        let (ctx, verifier) = Context::test(Seed::with_policies(vec![policy.clone()]));
        let mocks = verifier.run(Scenario::StatusConflict(policy.clone()));
        let err = reconcile(Arc::new(policy.clone()), ctx.clone()).await.expect_err("the 409 surfaces");
        timeout_after_1s(mocks).await;
        assert!(matches!(err, Error::PatchStatus { .. }) && err.is_conflict(), "{err}");
        assert_eq!(
            error_policy(Arc::new(policy), &err, ctx.clone()),
            Action::requeue(Duration::from_secs(1))
        );
        assert_eq!(ctx.metrics.reconcile_errors.with_label_values(&["patch_status"]).get(), 1);
    }

    #[tokio::test]
    async fn a_follower_serves_config_but_writes_nothing() {
        let policy = quickstart();
        let (ctx, verifier) =
            Context::test(Seed { leader: Some(false), ..Seed::with_policies(vec![policy.clone()]) });
        let mocks = verifier.run(Scenario::Nothing);
        reconcile(Arc::new(policy.clone()), ctx.clone()).await.unwrap();
        timeout_after_1s(mocks).await;
        assert!(ctx.configs.current(&key_of(&policy)).is_some());
    }

    /// The quickstart policy as reconciled, with a sidecar's report (990 good of 1000) merged
    /// into the history `saved` gives (what the operator loads for the policy at `now`).
    fn reconciled_with_a_report(
        saved: impl FnOnce(&ApiPolicy, u64) -> crate::slo_merge::SloHistory,
    ) -> (ApiPolicy, Arc<Context>, crate::fixtures::ApiServerVerifier, PolicyKey, u64) {
        let (policy, config_map) = crate::fixtures::reconciled(quickstart());
        let (ctx, verifier) = Context::test(Seed {
            policies: vec![policy.clone()],
            config_maps: vec![config_map],
            ..Seed::default()
        });
        let key = key_of(&policy);
        let now = ctx.now_ms();
        let report = crate::fixtures::report("products-1", now, 990, 1000);
        ctx.budgets.merge(&key, &["availability"], &report, now, || saved(&policy, now)).unwrap();
        (policy, ctx, verifier, key, now)
    }

    #[tokio::test]
    async fn slo_reports_reach_the_status_and_the_history_configmap() {
        let (policy, ctx, verifier, key, now) = reconciled_with_a_report(|_, _| Default::default());
        let mocks = verifier.run(Scenario::SloFigures(policy.clone()));
        reconcile(Arc::new(policy), ctx.clone()).await.unwrap();
        timeout_after_1s(mocks).await;
        // Saved: the next report is acknowledged up to the one just merged.
        let next = crate::fixtures::report("products-1", now + 1, 990, 1000);
        let merged = ctx.budgets.merge(&key, &["availability"], &next, now + 1, || unreachable!()).unwrap();
        assert_eq!(merged.ack.ack_ms, now);
    }

    /// A history the API server refuses to save does not hold the status back; the save is
    /// retried at the next reconcile, and the error counted.
    #[tokio::test]
    async fn a_refused_history_save_still_writes_the_status_and_is_retried() {
        let (policy, ctx, verifier, key, _) = reconciled_with_a_report(|_, _| Default::default());
        let mocks = verifier.run(Scenario::SloHistoryRefused(policy.clone()));
        let result = reconcile(Arc::new(policy), ctx.clone()).await;
        assert!(matches!(result, Err(Error::ApplyConfigMap { .. })), "{result:?}");
        timeout_after_1s(mocks).await;
        assert_eq!(ctx.budgets.unsaved(), vec![key], "saved at the next chance");
    }

    /// Tens of thousands of sidecar processes make a history too large for a ConfigMap whole:
    /// it is saved within the limit, and the trimming counted.
    #[tokio::test]
    async fn a_history_too_large_for_a_config_map_is_saved_trimmed_and_counted() {
        let mut processes = 0;
        let (policy, ctx, verifier, _, _) = reconciled_with_a_report(|policy, now| {
            let slos = apipolicy_api::compile(policy).unwrap().spec.slos;
            let huge = crate::slo_merge::pathological(&slos, 100_000, 50, 30_000, now);
            assert!(huge.snapshot().unwrap().0.len() > render::HISTORY_MAX_BYTES);
            processes = huge.processes() + 1;
            huge
        });
        let mocks = verifier.run(Scenario::SloHistoryTrimmed(policy.clone(), processes));
        reconcile(Arc::new(policy), ctx.clone()).await.unwrap();
        timeout_after_1s(mocks).await;
        let trimmed = |reason: &str| ctx.metrics.slo_history_trimmed.with_label_values(&[reason]).get();
        assert_eq!([trimmed("expired"), trimmed("seen"), trimmed("hours")], [1, 1, 0]);
        assert!(
            ctx.metrics.render().contains(r#"apipolicy_operator_slo_history_trimmed_total{reason="seen"} 1"#)
        );
    }

    #[tokio::test]
    async fn a_prometheus_rule_is_written_when_its_api_exists() {
        let (policy, config_map) = crate::fixtures::reconciled(quickstart());
        let (ctx, verifier) = Context::test(Seed {
            policies: vec![policy.clone()],
            config_maps: vec![config_map],
            ..Seed::default()
        });
        ctx.prometheus_rules.store(Some(Arc::new(crate::fixtures::prometheus_rule_resource())));
        let mocks = verifier.run(Scenario::PrometheusRule(policy.clone()));
        reconcile(Arc::new(policy.clone()), ctx.clone()).await.unwrap();
        let verifier = timeout_after_1s(mocks).await;
        // Unchanged: not written again.
        let mocks = verifier.run(Scenario::Nothing);
        reconcile(Arc::new(policy), ctx.clone()).await.unwrap();
        timeout_after_1s(mocks).await;
    }

    #[tokio::test]
    async fn the_ca_is_written_beside_the_config() {
        let (policy, config_map) = crate::fixtures::reconciled(quickstart());
        let (ctx, verifier) = Context::test(Seed {
            policies: vec![policy.clone()],
            config_maps: vec![config_map],
            ..Seed::default()
        });
        ctx.ca.store(Some(Arc::new("CA PEM".into())));
        let mocks = verifier.run(Scenario::CaWritten(policy.clone(), "CA PEM".into()));
        reconcile(Arc::new(policy), ctx).await.unwrap();
        timeout_after_1s(mocks).await;
    }

    #[tokio::test]
    async fn a_pod_with_an_unnamed_upstream_port_puts_a_condition_on_the_policy() {
        let (policy, config_map) = crate::fixtures::reconciled(quickstart());
        let mut unnamed = pod("products-1", &[("app", "products")], None, None);
        unnamed.spec = Some(
            serde_json::from_value(
                json!({"containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]}),
            )
            .unwrap(),
        );
        let (ctx, verifier) = Context::test(Seed {
            policies: vec![policy.clone()],
            config_maps: vec![config_map],
            pods: vec![unnamed],
            ..Seed::default()
        });
        let mocks = verifier.run(Scenario::PortUnnamed(policy.clone(), "products-1".into()));
        reconcile(Arc::new(policy), ctx).await.unwrap();
        timeout_after_1s(mocks).await;
    }

    #[test]
    fn pods_map_to_the_policies_they_concern() {
        let policies = vec![
            Arc::new(policy_at("web", "app", "web", 1)),
            Arc::new(policy_at("named", "app", "nothing", 2)),
            Arc::new(policy_at("db", "app", "db", 3)),
        ];
        let p = pod("w", &[("app", "web")], Some("named"), None);
        let names: Vec<String> = policies_for_pod(&policies, &p).into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["web", "named"]);
        assert_eq!(
            siblings(&policies, &("shop".into(), "web".into())),
            [("shop".to_owned(), "named".to_owned()), ("shop".to_owned(), "db".to_owned())]
        );
    }
}
