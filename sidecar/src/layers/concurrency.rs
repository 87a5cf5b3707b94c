//! The route's `concurrencyLimit`: only what goes to the app takes a slot (cache hits never
//! do, so a burst of hits is never shed), held until the response ends; past the limit, 503 at
//! once. An adaptive limit learns from the time each admitted request took to get its
//! response headers (its retries included: that is what the slot was held for).

use crate::{
    error::ProxyError,
    pipeline::{AppRequest, Cx, Service, Tried},
};

#[derive(Clone, Copy)]
pub struct ConcurrencyLimit<S>(pub S);

impl<S> Service<AppRequest> for ConcurrencyLimit<S>
where
    S: Service<AppRequest, Response = Tried>,
{
    type Response = Tried;

    async fn call(&self, req: AppRequest, cx: &mut Cx<'_>) -> Self::Response {
        let Some(c) = &cx.route.concurrency else { return self.0.call(req, cx).await };
        c.admit(cx.class)?;
        cx.finish.holds_slot = true;
        let Some(gradient) = &c.adaptive else { return self.0.call(req, cx).await };
        let started = std::time::Instant::now();
        let outcome = self.0.call(req, cx).await;
        // A refusal made here or below (an open circuit) says nothing of the app's latency.
        if !matches!(&outcome, Err(e) if e.is_policy() || matches!(e, ProxyError::CircuitOpen { .. })) {
            gradient.sample(started.elapsed());
        }
        outcome
    }
}
