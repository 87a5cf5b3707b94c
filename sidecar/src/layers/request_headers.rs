//! The route's request header rules (`requestHeaders`): headers removed from, then set on,
//! every request the route sends the app, pass-through and cache fills alike. The cache key
//! was taken above, from the client's request.

use std::future::Future;

use crate::pipeline::{AppRequest, Cx, Service, Tried};

#[derive(Clone, Copy)]
pub struct SetRequestHeaders<S>(pub S);

impl<S> Service<AppRequest> for SetRequestHeaders<S>
where
    S: Service<AppRequest, Response = Tried>,
{
    type Response = Tried;

    // Not async: the request is changed here and the app's future handed up as it is, so this
    // layer adds no state (and no copy) to the stack's future.
    fn call(&self, mut req: AppRequest, cx: &mut Cx<'_>) -> impl Future<Output = Self::Response> + Send {
        if let Some(rules) = &cx.route.request_headers {
            rules.apply(req.headers_mut());
        }
        self.0.call(req, cx)
    }
}
