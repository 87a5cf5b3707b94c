//! Leader election with a Lease, so that several replicas can run and only one writes. Every
//! replica keeps its caches and serves config; the leader alone writes objects, statuses and
//! SLO histories, and takes the sidecars' SLO reports (the others forward them to it).
//!
//! The rules are client-go's (`k8s.io/client-go/tools/leaderelection`):
//! - a replica takes the Lease when nobody holds it, or when its record has not changed for a
//!   whole lease duration **by this replica's own clock** (no trust in other machines' clocks);
//! - the leader renews every retry period, and counts itself the leader only until the renew
//!   deadline after the start of its last successful renewal. The deadline is shorter than the
//!   lease, so a leader that cannot reach the API server stops leading (reconciles, status
//!   writes, report merges) before any other replica can take over: never two writers.
//!   [`Leader::is_leader`] reads the clock itself, so this holds even while the election task
//!   waits on a hung call.
//!
//! The Lease also carries the leader's agent API URL (annotation `apipolicy.dev/agent-url`), which the
//! other replicas forward reports to.

use apipolicy_api::contract::AGENT_URL_ANNOTATION;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::error::Result;

/// The Lease's name.
pub const LEASE: &str = "apipolicy-operator";

/// The election's clock: how long a Lease holds without renewal, how long the leader keeps
/// leading after its last successful renewal, and how often it tries.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub lease: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

impl Default for Timing {
    /// client-go's defaults.
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// The replica holding the Lease, as this replica last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub identity: String,
    /// Where its agent API is reached, when it said.
    pub agent_url: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct State {
    /// While this replica leads: until when, by the local clock.
    leads_until: Option<Instant>,
    holder: Option<Holder>,
}

/// Whether this replica leads, now and as it changes, and who does.
#[derive(Clone, Debug)]
pub struct Leader(watch::Receiver<State>);

impl Leader {
    /// A replica that always (or never) leads: a single replica, or a test.
    pub fn fixed(leads: bool) -> Self {
        // Far enough for any test or single replica, near enough not to overflow an Instant.
        let forever = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        Self(watch::channel(State { leads_until: leads.then_some(forever), holder: None }).1)
    }

    /// A follower that knows `holder` leads: a test.
    pub fn following(holder: Holder) -> Self {
        Self(watch::channel(State { leads_until: None, holder: Some(holder) }).1)
    }

    /// True only while the last renewal is recent enough: past the renew deadline this is false
    /// at once, whatever the election task is doing.
    pub fn is_leader(&self) -> bool {
        self.0.borrow().leads_until.is_some_and(|until| Instant::now() < until)
    }

    /// The leader as last seen in the Lease (this replica itself while it leads).
    pub fn holder(&self) -> Option<Holder> {
        self.0.borrow().holder.clone()
    }

    /// Yields each time this replica becomes the leader.
    pub fn gained(&self) -> impl Stream<Item = ()> + Send + 'static {
        self.changes().filter_map(|leads| async move { leads.then_some(()) })
    }

    /// Yields every change of leadership.
    pub fn changes(&self) -> impl Stream<Item = bool> + Send + 'static {
        let rx = self.0.clone();
        let was = rx.borrow().leads_until.is_some();
        futures::stream::unfold((rx, was), |(mut rx, was)| async move {
            loop {
                rx.changed().await.ok()?;
                let leads = rx.borrow_and_update().leads_until.is_some();
                if leads != was {
                    return Some((leads, (rx, leads)));
                }
            }
        })
    }
}

/// This replica, as it writes itself into the Lease.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub identity: String,
    pub agent_url: Option<String>,
}

/// Competes for the Lease `namespace/LEASE` until `stop` resolves, then releases it so that
/// another replica takes over at once.
pub fn elect(
    client: Client,
    namespace: &str,
    candidate: Candidate,
    timing: Timing,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> (Leader, JoinHandle<()>) {
    let (tx, rx) = watch::channel(State::default());
    let election =
        Election { api: Api::namespaced(client, namespace), candidate, timing, observed: None, tx };
    (Leader(rx), tokio::spawn(election.run(stop)))
}

/// A Lease record as last seen, and when this replica saw it change.
struct Observed {
    lease: Lease,
    at: Instant,
}

struct Election {
    api: Api<Lease>,
    candidate: Candidate,
    timing: Timing,
    observed: Option<Observed>,
    tx: watch::Sender<State>,
}

/// What a try at the Lease came to.
enum Outcome {
    /// This replica holds it, renewed by a call started at the given instant.
    Holds(Instant),
    /// Another replica holds it (or won the race to it).
    Follows,
}

impl Election {
    async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let started = Instant::now();
            // A hung call must not keep the loop from retrying; the leadership itself expires by
            // the clock in any case.
            let attempt = tokio::time::timeout(self.timing.renew_deadline, self.try_acquire_or_renew());
            let outcome = tokio::select! {
                biased;
                () = &mut stop => break,
                outcome = attempt => outcome,
            };
            match outcome {
                Ok(Ok(Outcome::Holds(since))) => self.lead(since),
                Ok(Ok(Outcome::Follows)) => self.follow(),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "leader election: the Lease could not be read or written; retrying")
                }
                Err(_) => tracing::warn!(
                    waited_ms = started.elapsed().as_millis() as u64,
                    "leader election: the API server did not answer; retrying"
                ),
            }
            // Until the next try, or until the leadership runs out, whichever comes first (both
            // past: the leadership ends first).
            let leads_until = self.tx.borrow().leads_until;
            let next = started + self.timing.retry;
            tokio::select! {
                biased;
                () = &mut stop => break,
                () = tokio::time::sleep_until(leads_until.unwrap_or(next)), if leads_until.is_some() => {
                    self.step_down();
                }
                () = tokio::time::sleep_until(next) => {}
            }
        }
        self.release().await;
    }

    fn lead(&mut self, since: Instant) {
        let until = since + self.timing.renew_deadline;
        let holder =
            Holder { identity: self.candidate.identity.clone(), agent_url: self.candidate.agent_url.clone() };
        self.tx.send_modify(|s| {
            if s.leads_until.is_none() {
                tracing::info!(identity = %holder.identity, "leadership changed leads=true");
            }
            s.leads_until = Some(until);
            s.holder = Some(holder);
        });
    }

    fn follow(&mut self) {
        let holder = self.observed.as_ref().and_then(|o| holder_of(&o.lease));
        self.tx.send_if_modified(|s| {
            let was = s.leads_until.take().is_some();
            if was {
                tracing::warn!(
                    holder = holder.as_ref().map(|h| h.identity.as_str()),
                    "leadership changed leads=false: another replica holds the Lease"
                );
            }
            let changed = was || s.holder != holder;
            s.holder = holder;
            changed
        });
    }

    /// The renew deadline passed without a successful renewal.
    fn step_down(&mut self) {
        let deadline_ms = self.timing.renew_deadline.as_millis() as u64;
        self.tx.send_modify(|s| {
            s.leads_until = None;
            s.holder = None;
        });
        tracing::error!(
            renew_deadline_ms = deadline_ms,
            "leadership changed leads=false: the Lease could not be renewed within the renew deadline; \
             reconciles and report merges stop until it is won again"
        );
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Outcome, kube::Error> {
        let started = Instant::now();
        let now = MicroTime(Timestamp::now());
        let Some(current) = self.api.get_opt(LEASE).await? else {
            let lease = self.record(None, now);
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(made) => {
                    self.observed = Some(Observed { lease: made, at: started });
                    Ok(Outcome::Holds(started))
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Follows),
                Err(e) => Err(e),
            };
        };
        // The record changed since last seen: the lease runs from now, by this clock.
        let changed = self.observed.as_ref().is_none_or(|o| o.lease.spec != current.spec);
        if changed {
            self.observed = Some(Observed { lease: current.clone(), at: started });
        }
        let spec = current.spec.clone().unwrap_or_default();
        let held_by = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let mine = held_by == Some(self.candidate.identity.as_str());
        let lease_for =
            spec.lease_duration_seconds.map_or(self.timing.lease, |s| Duration::from_secs(s.max(0) as u64));
        let seen_at = self.observed.as_ref().map_or(started, |o| o.at);
        if held_by.is_some() && !mine && started < seen_at + lease_for {
            return Ok(Outcome::Follows);
        }
        let mut lease = self.record(Some(&current), now);
        lease.metadata.resource_version = current.metadata.resource_version.clone();
        match self.api.replace(LEASE, &PostParams::default(), &lease).await {
            Ok(written) => {
                if !mine {
                    tracing::info!(previous = held_by, "took the Lease");
                }
                self.observed = Some(Observed { lease: written, at: started });
                Ok(Outcome::Holds(started))
            }
            // Another replica wrote it first.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Follows),
            Err(e) => Err(e),
        }
    }

    /// The Lease with this replica as its holder, renewed now.
    fn record(&self, current: Option<&Lease>, now: MicroTime) -> Lease {
        let spec = current.and_then(|l| l.spec.clone()).unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.candidate.identity.as_str());
        let mut annotations = current.map(|l| l.annotations().clone()).unwrap_or_default();
        match &self.candidate.agent_url {
            Some(url) => annotations.insert(AGENT_URL_ANNOTATION.to_owned(), url.clone()),
            None => annotations.remove(AGENT_URL_ANNOTATION),
        };
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE.to_owned()),
                annotations: Some(annotations),
                labels: current.and_then(|l| l.metadata.labels.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.candidate.identity.clone()),
                lease_duration_seconds: Some(self.timing.lease.as_secs().max(1) as i32),
                acquire_time: if mine { spec.acquire_time.clone() } else { Some(now.clone()) },
                renew_time: Some(now),
                lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!mine)),
                ..LeaseSpec::default()
            }),
        }
    }

    /// Gives the Lease up at once (holder cleared, as client-go's ReleaseOnCancel), so another
    /// replica takes over without waiting for it to expire.
    async fn release(&mut self) {
        let led = self.tx.borrow().leads_until.is_some();
        self.tx.send_modify(|s| {
            s.leads_until = None;
            s.holder = None;
        });
        if !led {
            return;
        }
        let released = async {
            let Some(mut lease) = self.api.get_opt(LEASE).await? else { return Ok(()) };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.candidate.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api.replace(LEASE, &PostParams::default(), &lease).await.map(drop)
        };
        match tokio::time::timeout(self.timing.retry, released).await {
            Ok(Ok(())) => tracing::info!("released the Lease"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "releasing the Lease failed; another replica takes over when it expires")
            }
            Err(_) => {
                tracing::warn!("releasing the Lease timed out; another replica takes over when it expires")
            }
        }
    }
}

fn holder_of(lease: &Lease) -> Option<Holder> {
    let identity = lease.spec.as_ref()?.holder_identity.clone().filter(|h| !h.is_empty())?;
    Some(Holder { identity, agent_url: lease.annotations().get(AGENT_URL_ANNOTATION).cloned() })
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    };

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;

    /// Just enough of the API server for one Lease: get, create, and replace with optimistic
    /// concurrency (a stale resourceVersion is a 409), as the real one does.
    #[derive(Default)]
    struct FakeLeases {
        lease: Option<Value>,
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
        fn answer(&mut self, method: &Method, mut body: Value) -> Response<Body> {
            match *method {
                Method::GET => return self.current(),
                Method::POST if self.lease.is_some() => return status(409, "AlreadyExists"),
                Method::PUT => {
                    let Some(lease) = &self.lease else { return status(404, "NotFound") };
                    if body["metadata"]["resourceVersion"] != lease["metadata"]["resourceVersion"] {
                        return status(409, "Conflict");
                    }
                }
                Method::POST => {}
                _ => return status(405, "MethodNotAllowed"),
            }
            self.version += 1;
            body["metadata"]["namespace"] = json!("ops");
            body["metadata"]["resourceVersion"] = json!(self.version.to_string());
            self.lease = Some(body);
            self.current()
        }

        fn current(&self) -> Response<Body> {
            match &self.lease {
                None => status(404, "NotFound"),
                Some(lease) => {
                    Response::builder().body(Body::from(serde_json::to_vec(lease).unwrap())).unwrap()
                }
            }
        }

        fn holder(&self) -> Option<String> {
            self.lease.as_ref()?["spec"]["holderIdentity"].as_str().map(str::to_owned)
        }
    }

    const HEALTHY: u8 = 0;
    /// Calls are never answered.
    const HANGS: u8 = 1;
    /// Calls are answered 500.
    const FAILS: u8 = 2;

    /// A client of `fake` whose calls behave as `fault` says at the moment they are made.
    fn client_of(fake: Arc<Mutex<FakeLeases>>, fault: Arc<AtomicU8>) -> Client {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let mut hung = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                assert!(
                    request.uri().path().starts_with("/apis/coordination.k8s.io/v1/namespaces/ops/leases")
                );
                match fault.load(Ordering::SeqCst) {
                    HANGS => {
                        hung.push(send);
                        continue;
                    }
                    FAILS => {
                        send.send_response(status(500, "InternalError"));
                        continue;
                    }
                    _ => {}
                }
                let method = request.method().clone();
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body =
                    if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
                let response = fake.lock().unwrap().answer(&method, body);
                send.send_response(response);
            }
        });
        Client::new(mock, "ops")
    }

    fn candidate(name: &str) -> Candidate {
        Candidate { identity: name.into(), agent_url: Some(format!("https://{name}:8443")) }
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

    #[tokio::test(start_paused = true)]
    async fn one_replica_leads_and_hands_over_at_once_when_it_stops() {
        let fake = Arc::new(Mutex::new(FakeLeases::default()));
        let healthy = Arc::new(AtomicU8::new(HEALTHY));
        let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
        let timing = Timing::default();
        let (a, task_a) =
            elect(client_of(fake.clone(), healthy.clone()), "ops", candidate("a"), timing, async move {
                let _ = stopped_a.await;
            });
        until(&a, true, Duration::from_secs(1)).await;
        assert_eq!(fake.lock().unwrap().holder().as_deref(), Some("a"));
        assert_eq!(
            a.holder(),
            Some(Holder { identity: "a".into(), agent_url: Some("https://a:8443".into()) })
        );

        let (_stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
        let (b, _task_b) =
            elect(client_of(fake.clone(), healthy), "ops", candidate("b"), timing, async move {
                let _ = stopped_b.await;
            });
        let mut gained = Box::pin(b.gained());
        // A renews within its lease; B follows for longer than one lease, and knows where A is.
        tokio::time::sleep(timing.lease * 3).await;
        assert!(a.is_leader() && !b.is_leader());
        assert_eq!(fake.lock().unwrap().holder().as_deref(), Some("a"));
        assert_eq!(
            b.holder(),
            Some(Holder { identity: "a".into(), agent_url: Some("https://a:8443".into()) })
        );

        let stopped_at = Instant::now();
        stop_a.send(()).unwrap();
        task_a.await.unwrap();
        assert!(!a.is_leader(), "a stopped replica does not lead");
        tokio::time::timeout(timing.retry * 2, gained.next()).await.expect("B took over").unwrap();
        assert!(b.is_leader());
        assert!(
            stopped_at.elapsed() <= timing.retry * 2,
            "a released Lease is taken without waiting for it to expire"
        );
        assert_eq!(fake.lock().unwrap().holder().as_deref(), Some("b"));
    }

    /// The leader loses the API server (its calls hang, or fail) while another replica still
    /// reaches it: the leader stops leading by the renew deadline, the other takes over only
    /// after the lease expired, and at no moment do both lead.
    async fn a_cut_off_leader_steps_down_before_another_takes_over(fault: u8) {
        let fake = Arc::new(Mutex::new(FakeLeases::default()));
        let a_fault = Arc::new(AtomicU8::new(HEALTHY));
        let timing = Timing::default();
        let never = || futures::future::pending::<()>();
        let (a, _task_a) =
            elect(client_of(fake.clone(), a_fault.clone()), "ops", candidate("a"), timing, never());
        until(&a, true, Duration::from_secs(1)).await;
        let (b, _task_b) = elect(
            client_of(fake.clone(), Arc::new(AtomicU8::new(HEALTHY))),
            "ops",
            candidate("b"),
            timing,
            never(),
        );
        tokio::time::sleep(timing.lease).await;
        assert!(a.is_leader() && !b.is_leader());

        a_fault.store(fault, Ordering::SeqCst);
        let cut = Instant::now();
        let (mut a_stopped, mut b_started) = (None, None);
        while cut.elapsed() < timing.lease * 3 {
            let (a_leads, b_leads) = (a.is_leader(), b.is_leader());
            assert!(!(a_leads && b_leads), "two leaders {:?} after the cut", cut.elapsed());
            if !a_leads && a_stopped.is_none() {
                a_stopped = Some(cut.elapsed());
            }
            if b_leads && b_started.is_none() {
                b_started = Some(cut.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let a_stopped = a_stopped.expect("the cut-off leader stopped leading");
        let b_started = b_started.expect("the other replica took over");
        // A's last renewal began at most one retry period before the cut.
        assert!(a_stopped <= timing.renew_deadline, "A led {a_stopped:?} past the cut");
        assert!(
            b_started >= a_stopped + (timing.lease - timing.renew_deadline) - timing.retry,
            "{a_stopped:?} {b_started:?}"
        );
        assert!(b_started <= timing.lease + timing.retry * 2, "B took {b_started:?}");
        assert_eq!(fake.lock().unwrap().holder().as_deref(), Some("b"));

        // A reaches the API server again: it follows B and knows where B is.
        a_fault.store(HEALTHY, Ordering::SeqCst);
        tokio::time::sleep(timing.renew_deadline + timing.retry * 2).await;
        assert!(!a.is_leader() && b.is_leader());
        assert_eq!(a.holder().map(|h| h.identity).as_deref(), Some("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_calls_hang_steps_down_before_another_takes_over() {
        a_cut_off_leader_steps_down_before_another_takes_over(HANGS).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_calls_fail_steps_down_before_another_takes_over() {
        a_cut_off_leader_steps_down_before_another_takes_over(FAILS).await;
    }

    #[test]
    fn leadership_ends_by_the_clock_even_when_nobody_says_so() {
        let (_tx, rx) = watch::channel(State { leads_until: Some(Instant::now()), holder: None });
        assert!(!Leader(rx).is_leader(), "past the deadline");
        assert!(Leader::fixed(true).is_leader());
        assert!(!Leader::fixed(false).is_leader());
    }
}
