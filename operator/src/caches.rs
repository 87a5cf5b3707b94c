//! Whether the watched caches are filled, as the reflectors' own streams tell it (each one's
//! `InitDone`), for the readiness task and the webhook.
//!
//! Not `Store::wait_until_ready`: in kube-runtime 5 a store's readiness is a futures oneshot
//! receiver behind a mutex (`utils/delayed_init.rs`), and a oneshot keeps one waker, that of
//! the last task to poll it. Two tasks waiting on one store at once (the Controller's runner
//! waits on the ApiPolicy store; this operator's readiness task and each webhook call waited
//! on it too) take each other's wakeup, and the one that lost waits until something else
//! wakes it: against a real API server the readiness task then never ran again, and the
//! operator stayed unready and reconciled nothing. So nothing here polls a store's readiness;
//! the Controller is its only waiter.

use kube::runtime::watcher;
use tokio::sync::watch;

/// Which caches have been filled once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filled {
    pub policies: bool,
    pub pods: bool,
    pub config_maps: bool,
}

impl Filled {
    pub fn all(&self) -> bool {
        self.policies && self.pods && self.config_maps
    }

    /// The names of the caches not filled yet, for logs.
    pub fn missing(&self) -> Vec<&'static str> {
        [("ApiPolicies", self.policies), ("Pods", self.pods), ("ConfigMaps", self.config_maps)]
            .into_iter()
            .filter_map(|(name, filled)| (!filled).then_some(name))
            .collect()
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Cache {
    Policies,
    Pods,
    ConfigMaps,
}

/// The caches' state; a `watch` wakes every waiter, however many.
#[derive(Debug)]
pub struct Caches(watch::Sender<Filled>);

impl Default for Caches {
    fn default() -> Self {
        Self(watch::Sender::new(Filled::default()))
    }
}

impl Caches {
    /// Notes a reflector's event: its first `InitDone` means its store is filled (the reflector
    /// applies each event to the store before passing it on).
    pub fn see<K>(&self, cache: Cache, event: &Result<watcher::Event<K>, watcher::Error>) {
        if matches!(event, Ok(watcher::Event::InitDone)) {
            self.0.send_if_modified(|f| {
                let slot = match cache {
                    Cache::Policies => &mut f.policies,
                    Cache::Pods => &mut f.pods,
                    Cache::ConfigMaps => &mut f.config_maps,
                };
                !std::mem::replace(slot, true)
            });
        }
    }

    pub fn watch(&self) -> watch::Receiver<Filled> {
        self.0.subscribe()
    }

    pub fn now(&self) -> Filled {
        *self.0.borrow()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::{SinkExt, StreamExt, channel::mpsc};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{WatchStreamExt, reflector};

    use super::*;

    fn cm(name: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c.metadata.namespace = Some("ns".into());
        c
    }

    /// The cause, kept in view: two tasks waiting on one store's readiness at once, and only
    /// the last to poll is woken when it fills. If kube-runtime fixes this, this test fails and
    /// [`Caches`] can go.
    #[tokio::test]
    async fn a_stores_readiness_wakes_only_its_last_waiter() {
        let (store, writer) = reflector::store_shared::<ConfigMap>(16);
        let (mut events, rx) = mpsc::unbounded();
        let reflector = tokio::spawn(rx.reflect_shared(writer).for_each(|_| async {}));
        let first = tokio::spawn({
            let store = store.clone();
            async move { store.wait_until_ready().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = tokio::spawn({
            let store = store.clone();
            async move { store.wait_until_ready().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        for e in [watcher::Event::Init, watcher::Event::InitApply(cm("a")), watcher::Event::InitDone] {
            events.send(Ok(e)).await.unwrap();
        }
        assert!(
            tokio::time::timeout(Duration::from_secs(1), second).await.is_ok(),
            "the last waiter is woken"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(500), first).await.is_err(),
            "the first waiter was never woken, though the store is ready"
        );
        reflector.abort();
    }

    /// The fix: readiness from the reflector's own stream wakes every waiter, while another
    /// task (the Controller) waits on the store as it does.
    #[tokio::test]
    async fn every_waiter_learns_the_caches_are_filled() {
        let caches = std::sync::Arc::new(Caches::default());
        let (store, writer) = reflector::store_shared::<ConfigMap>(16);
        let (mut events, rx) = mpsc::unbounded();
        let reflector = tokio::spawn({
            let caches = caches.clone();
            rx.reflect_shared(writer).for_each(move |e| {
                caches.see(Cache::ConfigMaps, &e);
                async {}
            })
        });
        let controller = tokio::spawn({
            let store = store.clone();
            async move { store.wait_until_ready().await }
        });
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let mut rx = caches.watch();
                tokio::spawn(async move { rx.wait_for(|f| f.config_maps).await.map(|f| *f) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(caches.now().missing(), ["ApiPolicies", "Pods", "ConfigMaps"]);
        for e in [watcher::Event::Init, watcher::Event::InitApply(cm("a")), watcher::Event::InitDone] {
            events.send(Ok(e)).await.unwrap();
        }
        for w in waiters {
            let filled =
                tokio::time::timeout(Duration::from_secs(1), w).await.expect("woken").unwrap().unwrap();
            assert!(filled.config_maps);
        }
        assert!(tokio::time::timeout(Duration::from_secs(1), controller).await.is_ok(), "the controller too");
        assert_eq!(store.state().len(), 1);
        assert_eq!(caches.now().missing(), ["ApiPolicies", "Pods"]);
        reflector.abort();
    }
}
