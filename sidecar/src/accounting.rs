//! What is recorded of every request once its response ends: an [`Accounting`] rides on the
//! response body and, when the body ends (or the client goes away), hands what it saw to the
//! [`Ledger`] of the config the request ran under (metrics, SLO counters, the access log).
//!
//! The ledger is a trait so that bodies and this file know nothing of the config: the active
//! config ([`crate::runtime::PolicyRuntime`]) implements it.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use http::{HeaderValue, Method, uri::PathAndQuery};

/// Where finished requests are recorded.
pub trait Ledger: Send + Sync {
    /// Whether the access log is on (a request then keeps its path and id for it).
    fn logs_access(&self) -> bool;
    /// A client's request whose response ended after `elapsed`, `bytes` of body sent.
    fn record(&self, entry: &Accounting, elapsed: Duration, bytes: u64);
    /// A client's request dropped before its answer began (the client went away).
    fn abandon(&self, entry: &Accounting, elapsed: Duration);
    /// Gives back one of the route's concurrency slots.
    fn release_slot(&self, route: usize);
}

/// What is recorded when a response ends.
pub struct Accounting {
    pub method: Method,
    /// Only with the access log on.
    pub path: Option<PathAndQuery>,
    pub request_id: Option<HeaderValue>,
    route: usize,
    pub status: u16,
    start: Instant,
    pub upstream_ms: Option<f64>,
    /// The request holds one of its route's `maxInFlight` slots until the response ends.
    pub holds_slot: bool,
    /// The sidecar answered because the policy worked as meant (429, shedding): SLOs leave
    /// such requests out.
    pub policy_answer: bool,
    /// A client's request, counted in flight until [`Accounting::done`] (or until dropped: a
    /// request whose client went away before its answer began).
    counted: bool,
    ledger: Arc<dyn Ledger>,
}

impl Drop for Accounting {
    /// A request dropped before its answer began (its client went away, and hyper dropped the
    /// handler): it gives back its `maxInFlight` slot and its place in flight, and counts as
    /// 499 (nginx's "client closed request") in the request metrics; SLOs do not count it.
    fn drop(&mut self) {
        self.release();
        if std::mem::take(&mut self.counted) {
            let this = &*self;
            this.ledger.abandon(this, this.start.elapsed());
        }
    }
}

impl Accounting {
    pub fn route(&self) -> usize {
        self.route
    }

    /// For a client's request (counted in flight by the caller). The path and id are kept for
    /// the access log only: `path` is asked only when it is on.
    pub fn request(
        ledger: Arc<dyn Ledger>,
        method: &Method,
        route: usize,
        id: &HeaderValue,
        start: Instant,
        path: impl FnOnce() -> Option<PathAndQuery>,
    ) -> Self {
        let log = ledger.logs_access();
        Self {
            method: method.clone(),
            path: if log { path() } else { None },
            request_id: if log { Some(id.clone()) } else { None },
            route,
            status: 0,
            start,
            upstream_ms: None,
            holds_slot: false,
            policy_answer: false,
            counted: true,
            ledger,
        }
    }

    /// For work the sidecar does on its own (a background revalidation): it counts nothing,
    /// but may hold a concurrency slot, given back by [`Accounting::release`].
    pub fn background(ledger: Arc<dyn Ledger>, route: usize) -> Self {
        Self {
            method: Method::GET,
            path: None,
            request_id: Some(HeaderValue::from_static("background")),
            route,
            status: 0,
            start: Instant::now(),
            upstream_ms: None,
            holds_slot: false,
            policy_answer: false,
            counted: false,
            ledger,
        }
    }

    /// When the request began (its deadline's origin).
    pub fn started(&self) -> Instant {
        self.start
    }

    pub fn release(&mut self) {
        if std::mem::take(&mut self.holds_slot) {
            self.ledger.release_slot(self.route);
        }
    }

    pub fn done(mut self, bytes: u64) {
        self.release();
        // Only a client's request is counted (a background one never reaches here).
        if std::mem::take(&mut self.counted) {
            self.ledger.record(&self, self.start.elapsed(), bytes);
        }
    }
}
