//! The route's `maxInFlight`: only what goes to the app takes a slot (cache hits never do, so
//! a burst of hits is never shed), held until the response ends; past the limit, 503 at once.

use http::{Request, Response};
use hyper::body::Incoming;

use crate::{
    body::UpstreamBody,
    error::ProxyError,
    pipeline::{Cx, Service},
};

#[derive(Clone, Copy)]
pub struct ConcurrencyLimit<S>(pub S);

impl<S> Service<Request<UpstreamBody>> for ConcurrencyLimit<S>
where
    S: Service<Request<UpstreamBody>, Response = Result<Response<Incoming>, ProxyError>>,
{
    type Response = Result<Response<Incoming>, ProxyError>;

    async fn call(&self, req: Request<UpstreamBody>, cx: &mut Cx<'_>) -> Self::Response {
        if let Some(c) = &cx.route.concurrency {
            c.admit()?;
            cx.finish.holds_slot = true;
        }
        self.0.call(req, cx).await
    }
}
