//! Leader election with a Lease (kube-lease-manager), so that several replicas can run and only
//! one writes. Every replica keeps its caches and serves config; the leader alone writes
//! objects, statuses and SLO histories.

use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::{sync::watch, task::JoinHandle};

use crate::error::Result;

/// The Lease's name.
pub const LEASE: &str = "apipolicy-operator";
/// How long a lease holds without renewal, and how early before that the holder renews.
const LEASE_SECONDS: u64 = 15;
const GRACE_SECONDS: u64 = 5;

/// Whether this replica leads, now and as it changes.
#[derive(Clone, Debug)]
pub struct Leader(watch::Receiver<bool>);

impl Leader {
    /// A replica that always (or never) leads: a single replica, or a test.
    pub fn fixed(leads: bool) -> Self {
        Self(watch::channel(leads).1)
    }

    pub fn is_leader(&self) -> bool {
        *self.0.borrow()
    }

    /// Yields each time this replica becomes the leader.
    pub fn gained(&self) -> impl Stream<Item = ()> + Send + 'static {
        receiver_stream(self.0.clone()).filter_map(|leads| async move { leads.then_some(()) })
    }

    /// Yields every change of leadership.
    pub fn changes(&self) -> impl Stream<Item = bool> + Send + 'static {
        receiver_stream(self.0.clone())
    }
}

/// The values a receiver takes after now.
fn receiver_stream(rx: watch::Receiver<bool>) -> impl Stream<Item = bool> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let leads = *rx.borrow_and_update();
        Some((leads, rx))
    })
}

/// Competes for the lease `namespace/LEASE` as `identity` until `stop` resolves, then releases
/// it so that another replica takes over at once.
pub async fn elect(
    client: Client,
    namespace: &str,
    identity: &str,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Leader, JoinHandle<()>)> {
    elect_with(client, namespace, identity, (LEASE_SECONDS, GRACE_SECONDS), stop).await
}

/// [`elect`] with another lease duration and renewal grace, in seconds.
pub async fn elect_with(
    client: Client,
    namespace: &str,
    identity: &str,
    (duration, grace): (u64, u64),
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Leader, JoinHandle<()>)> {
    let manager = LeaseManagerBuilder::new(client, LEASE)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(duration)
        .with_grace(grace)
        .build()
        .await?;
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(campaign(manager, tx, stop));
    Ok((Leader(rx), task))
}

async fn campaign(
    manager: LeaseManager,
    tx: watch::Sender<bool>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut failures = 0u32;
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            changed = manager.changed() => match changed {
                Ok(leads) => {
                    failures = 0;
                    tracing::info!(leads, "leadership changed");
                    tx.send_replace(leads);
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "leader election failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250 * u64::from(failures.min(20)))).await;
                }
            },
        }
    }
    tx.send_replace(false);
    if let Err(e) = manager.release().await {
        tracing::warn!(error = %e, "releasing the lease failed; another replica takes over when it expires");
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{Arc, Mutex},
    };

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;

    /// Just enough of the API server for Leases: get, create, server-side apply with field
    /// ownership (an apply that would take another manager's field is a 409), and strategic
    /// merge patches (a null removes the field).
    #[derive(Default)]
    struct FakeLeases {
        lease: Option<Value>,
        owners: HashMap<String, String>,
        version: u64,
    }

    fn status(code: u16, reason: &str) -> Response<Body> {
        let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason});
        Response::builder()
            .status(StatusCode::from_u16(code).unwrap())
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    impl FakeLeases {
        fn answer(
            &mut self,
            method: &Method,
            query: &str,
            content_type: &str,
            body: Value,
        ) -> Response<Body> {
            let manager = query
                .split('&')
                .find_map(|p| p.strip_prefix("fieldManager="))
                .unwrap_or("anonymous")
                .to_owned();
            match *method {
                Method::GET => return self.current(),
                Method::POST if self.lease.is_some() => return status(409, "AlreadyExists"),
                Method::POST => self.lease = Some(body),
                Method::PATCH => {
                    let Some(lease) = self.lease.as_mut() else { return status(404, "NotFound") };
                    let spec = lease["spec"].as_object().cloned().unwrap_or_default();
                    let mut spec = spec;
                    let changes = body["spec"].as_object().cloned().unwrap_or_default();
                    if content_type.starts_with("application/apply-patch") {
                        let taken = changes.iter().any(|(field, value)| {
                            self.owners.get(field).is_some_and(|o| *o != manager)
                                && spec.get(field) != Some(value)
                        });
                        if taken {
                            return status(409, "Conflict");
                        }
                    }
                    for (field, value) in changes {
                        if value.is_null() {
                            spec.remove(&field);
                            self.owners.remove(&field);
                        } else {
                            spec.insert(field.clone(), value);
                            self.owners.insert(field, manager.clone());
                        }
                    }
                    lease["spec"] = Value::Object(spec);
                }
                _ => return status(405, "MethodNotAllowed"),
            }
            self.version += 1;
            self.current()
        }

        fn current(&mut self) -> Response<Body> {
            match self.lease.as_mut() {
                None => status(404, "NotFound"),
                Some(lease) => {
                    lease["metadata"]["namespace"] = json!("ops");
                    lease["metadata"]["resourceVersion"] = json!(self.version.to_string());
                    Response::builder().body(Body::from(serde_json::to_vec(lease).unwrap())).unwrap()
                }
            }
        }
    }

    fn client_of(fake: Arc<Mutex<FakeLeases>>) -> Client {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                assert!(
                    request.uri().path().starts_with("/apis/coordination.k8s.io/v1/namespaces/ops/leases")
                );
                let method = request.method().clone();
                let query = request.uri().query().unwrap_or_default().to_owned();
                let content_type = request
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body =
                    if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
                let response = fake.lock().unwrap().answer(&method, &query, &content_type, body);
                send.send_response(response);
            }
        });
        Client::new(mock, "ops")
    }

    async fn until(leader: &Leader, leads: bool, within: Duration) {
        tokio::time::timeout(within, async {
            while leader.is_leader() != leads {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("leadership did not become {leads} within {within:?}"));
    }

    #[tokio::test]
    async fn one_replica_leads_and_hands_over_when_it_stops() {
        let fake = Arc::new(Mutex::new(FakeLeases::default()));
        let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
        let (a, task_a) = elect_with(client_of(fake.clone()), "ops", "replica-a", (2, 1), async move {
            let _ = stopped_a.await;
        })
        .await
        .unwrap();
        until(&a, true, Duration::from_secs(3)).await;
        let holder = |f: &Arc<Mutex<FakeLeases>>| {
            f.lock()
                .unwrap()
                .lease
                .as_ref()
                .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
        };
        assert_eq!(holder(&fake).as_deref(), Some("replica-a"));

        let (_stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
        let (b, _task_b) = elect_with(client_of(fake.clone()), "ops", "replica-b", (2, 1), async move {
            let _ = stopped_b.await;
        })
        .await
        .unwrap();
        let mut gained = Box::pin(b.gained());
        // A renews within its lease; B stays a follower for longer than one lease.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert!(a.is_leader() && !b.is_leader());
        assert_eq!(holder(&fake).as_deref(), Some("replica-a"));

        stop_a.send(()).unwrap();
        task_a.await.unwrap();
        assert!(!a.is_leader(), "a stopped replica does not lead");
        tokio::time::timeout(Duration::from_secs(5), gained.next()).await.expect("B took over").unwrap();
        assert!(b.is_leader());
        assert_eq!(holder(&fake).as_deref(), Some("replica-b"));
    }
}
