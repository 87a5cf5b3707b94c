//! What the agent API hands out: each policy's compiled config and ready-replica count, with
//! a watch channel per policy so that long-polls wake the moment either changes, and the
//! revision each sidecar last said it runs.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use apipolicy_api::{SidecarConfig, report::AgentConfig};
use tokio::sync::watch;

/// (namespace, name) of an ApiPolicy.
pub type PolicyKey = (String, String);

pub type Current = Option<Arc<AgentConfig>>;

#[derive(Default)]
pub struct ConfigHub {
    policies: Mutex<HashMap<PolicyKey, watch::Sender<Current>>>,
    /// Pod uid → the revision its sidecar last reported.
    revisions: Mutex<HashMap<String, String>>,
}

impl ConfigHub {
    fn sender<'a>(
        map: &'a mut HashMap<PolicyKey, watch::Sender<Current>>,
        key: &PolicyKey,
    ) -> &'a watch::Sender<Current> {
        map.entry(key.clone()).or_insert_with(|| watch::channel(None).0)
    }

    /// Makes `config` the policy's config; wakes the long-polls when it or the ready count
    /// changed. Returns whether anything changed.
    pub fn publish(&self, key: &PolicyKey, config: SidecarConfig, ready_replicas: u32) -> bool {
        let mut map = self.policies.lock().expect("config hub lock");
        Self::sender(&mut map, key).send_if_modified(|current| match current {
            Some(c) if c.config.revision == config.revision && c.ready_replicas == ready_replicas => false,
            _ => {
                *current = Some(Arc::new(AgentConfig { config, ready_replicas }));
                true
            }
        })
    }

    /// Updates only the ready count, keeping the config (a policy whose new spec is invalid
    /// keeps its last valid config). Does nothing for a policy without config.
    pub fn publish_ready(&self, key: &PolicyKey, ready_replicas: u32) -> bool {
        let map = self.policies.lock().expect("config hub lock");
        let Some(sender) = map.get(key) else { return false };
        sender.send_if_modified(|current| match current {
            Some(c) if c.ready_replicas != ready_replicas => {
                *current = Some(Arc::new(AgentConfig { config: c.config.clone(), ready_replicas }));
                true
            }
            _ => false,
        })
    }

    pub fn current(&self, key: &PolicyKey) -> Current {
        self.policies.lock().expect("config hub lock").get(key).and_then(|s| s.borrow().clone())
    }

    /// A receiver that sees every later publish, and the policy's removal as a closed channel.
    pub fn subscribe(&self, key: &PolicyKey) -> watch::Receiver<Current> {
        Self::sender(&mut self.policies.lock().expect("config hub lock"), key).subscribe()
    }

    /// The policy is gone or governs nothing: long-polls on it end.
    pub fn forget(&self, key: &PolicyKey) {
        self.policies.lock().expect("config hub lock").remove(key);
    }

    /// Records the revision a pod's sidecar runs; returns whether it changed.
    pub fn report_revision(&self, pod_uid: &str, revision: &str) -> bool {
        let mut map = self.revisions.lock().expect("revision lock");
        if map.get(pod_uid).map(String::as_str) == Some(revision) {
            return false;
        }
        map.insert(pod_uid.to_owned(), revision.to_owned());
        true
    }

    pub fn reported_revision(&self, pod_uid: &str) -> Option<String> {
        self.revisions.lock().expect("revision lock").get(pod_uid).cloned()
    }

    pub fn forget_pod(&self, pod_uid: &str) {
        self.revisions.lock().expect("revision lock").remove(pod_uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::quickstart;

    #[tokio::test]
    async fn publishes_wake_subscribers_only_on_change() {
        let hub = ConfigHub::default();
        let key: PolicyKey = ("shop".into(), "products".into());
        let config = apipolicy_api::compile(&quickstart()).unwrap();
        let mut rx = hub.subscribe(&key);
        assert!(rx.borrow_and_update().is_none());
        assert!(!hub.publish_ready(&key, 3), "no config yet");
        assert!(hub.publish(&key, config.clone(), 2));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().ready_replicas, 2);
        assert!(!hub.publish(&key, config.clone(), 2), "same revision and count");
        assert!(!rx.has_changed().unwrap());
        assert!(hub.publish_ready(&key, 3));
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().ready_replicas, 3);
        assert_eq!(hub.current(&key).unwrap().config, config);
        hub.forget(&key);
        assert!(rx.changed().await.is_err(), "forgetting closes the channel");
        assert!(hub.current(&key).is_none());

        assert!(hub.report_revision("uid-1", "sha256:a"));
        assert!(!hub.report_revision("uid-1", "sha256:a"));
        assert_eq!(hub.reported_revision("uid-1").as_deref(), Some("sha256:a"));
        hub.forget_pod("uid-1");
        assert!(hub.reported_revision("uid-1").is_none());
    }
}
