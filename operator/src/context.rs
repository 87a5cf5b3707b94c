//! What the controller, the agent API and the background tasks share.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::{SystemTime, UNIX_EPOCH},
};

use apipolicy_api::ApiPolicy;
use arc_swap::ArcSwapOption;
use futures::channel::mpsc;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    Client, ResourceExt,
    discovery::ApiResource,
    runtime::{
        events::{Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
};

use crate::{
    auth::TokenReviews,
    budgets::Budgets,
    hub::{ConfigHub, PolicyKey},
    leader::Leader,
    metrics::Metrics,
    render::{HISTORY_KEY, MANAGER, slo_config_map_name},
    slo_merge::SloHistory,
};

/// Milliseconds since the Unix epoch; tests set their own.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

/// The caches every part reads; the reflectors in `run` fill them.
#[derive(Clone)]
pub struct Stores {
    pub policies: Store<ApiPolicy>,
    pub pods: Store<Pod>,
    /// Only the ConfigMaps the operator manages.
    pub config_maps: Store<ConfigMap>,
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub stores: Stores,
    pub configs: ConfigHub,
    pub budgets: Budgets,
    pub tokens: TokenReviews,
    pub leader: Leader,
    pub metrics: Arc<Metrics>,
    /// The PrometheusRule API, when the prometheus-operator CRDs are installed.
    pub prometheus_rules: ArcSwapOption<ApiResource>,
    /// The PrometheusRule last applied per policy, so unchanged rules are not written again.
    pub applied_rules: Mutex<HashMap<PolicyKey, serde_json::Value>>,
    /// Asks the controller to reconcile a policy now.
    pub triggers: mpsc::Sender<ObjectRef<ApiPolicy>>,
    pub clock: Clock,
    /// Set once every cache has been filled.
    pub ready: Arc<AtomicBool>,
    /// Which caches are filled, as the reflectors tell it (see [`crate::caches`]).
    pub caches: crate::caches::Caches,
    /// The CA (PEM) of the agent API's certificate, written beside each config for the sidecars.
    pub ca: ArcSwapOption<String>,
}

pub fn key_of(policy: &ApiPolicy) -> PolicyKey {
    (policy.namespace().unwrap_or_default(), policy.name_any())
}

impl Context {
    pub fn new(
        client: Client,
        stores: Stores,
        leader: Leader,
        metrics: Arc<Metrics>,
        identity: &str,
        triggers: mpsc::Sender<ObjectRef<ApiPolicy>>,
        clock: Clock,
    ) -> Self {
        let reporter = Reporter { controller: MANAGER.into(), instance: Some(identity.to_owned()) };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            stores,
            configs: ConfigHub::default(),
            budgets: Budgets::default(),
            tokens: TokenReviews::default(),
            leader,
            metrics,
            prometheus_rules: ArcSwapOption::empty(),
            applied_rules: Mutex::new(HashMap::new()),
            triggers,
            clock,
            ready: Arc::new(AtomicBool::new(false)),
            caches: crate::caches::Caches::default(),
            ca: ArcSwapOption::empty(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    pub fn policy(&self, key: &PolicyKey) -> Option<Arc<ApiPolicy>> {
        self.stores.policies.get(&ObjectRef::new(&key.1).within(&key.0))
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.stores.pods.get(&ObjectRef::new(name).within(namespace))
    }

    /// Asks for a reconciliation of the policy soon. A full queue drops the request: the
    /// periodic requeue catches up.
    pub fn trigger(&self, key: &PolicyKey) {
        let _ = self.triggers.clone().try_send(ObjectRef::new(&key.1).within(&key.0));
    }

    /// The saved SLO history of a policy: `apipolicy-<name>-slo` when this very policy owns
    /// it (not a deleted namesake's), else an empty one.
    pub fn load_history(&self, policy: &ApiPolicy) -> SloHistory {
        let (namespace, name) = key_of(policy);
        let Some(cm) =
            self.stores.config_maps.get(&ObjectRef::new(&slo_config_map_name(&name)).within(&namespace))
        else {
            return SloHistory::default();
        };
        let owned = cm.owner_references().iter().any(|o| Some(&o.uid) == policy.metadata.uid.as_ref());
        let bytes = cm.binary_data.as_ref().and_then(|d| d.get(HISTORY_KEY));
        match (owned, bytes) {
            (true, Some(bytes)) => SloHistory::restore(&bytes.0).unwrap_or_else(|e| {
                tracing::error!(policy = %format!("{namespace}/{name}"), error = %e, "the saved SLO history is unreadable; starting afresh");
                SloHistory::default()
            }),
            _ => SloHistory::default(),
        }
    }

    /// Drops what is held in memory for a policy that is gone.
    pub fn forget(&self, key: &PolicyKey) {
        self.configs.forget(key);
        self.budgets.forget(key);
        self.applied_rules.lock().expect("rules lock").remove(key);
    }
}
