//! The route's `circuitBreaker`: each try to the app is admitted by the route's breaker
//! ([`crate::resilience::Breaker`]) and its outcome recorded; while the circuit is open a try
//! fails at once with 503 `circuit-open` (a cache fill then serves its stale entry within
//! `staleIfError`, as for any failure of the app). Below the retries, so each try counts.

use crate::{
    error::ProxyError,
    pipeline::{AppRequest, Cx, Service, Tried},
    resilience::{Admitted, Breaker},
};

#[derive(Clone, Copy)]
pub struct CircuitBreak<S>(pub S);

impl<S> Service<AppRequest> for CircuitBreak<S>
where
    S: Service<AppRequest, Response = Tried>,
{
    type Response = Tried;

    async fn call(&self, req: AppRequest, cx: &mut Cx<'_>) -> Tried {
        let Some(breaker) = &cx.route.breaker else { return self.0.call(req, cx).await };
        let admitted = breaker.admit().map_err(|retry_after_s| ProxyError::CircuitOpen { retry_after_s })?;
        // A try dropped before its outcome (the client left, a per-try timeout) tells nothing.
        let mut pending = Pending { breaker, admitted, done: false };
        let outcome = self.0.call(req, cx).await;
        let failed = match &outcome {
            Ok(resp) => Some(resp.status().is_server_error()),
            Err(e) if !e.is_policy() => Some(true),
            Err(_) => None,
        };
        pending.done = true;
        breaker.record(admitted, failed);
        outcome
    }
}

struct Pending<'a> {
    breaker: &'a Breaker,
    admitted: Admitted,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(self.admitted, None);
        }
    }
}
