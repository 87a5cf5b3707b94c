//! The route's request header rules (`requestHeaders`): headers removed from, then set on,
//! every request the route sends the app, pass-through and cache fills alike. The cache key
//! was taken above, from the client's request.

use http::{Request, Response};
use hyper::body::Incoming;

use crate::{
    body::UpstreamBody,
    error::ProxyError,
    pipeline::{Cx, Service},
};

#[derive(Clone, Copy)]
pub struct SetRequestHeaders<S>(pub S);

impl<S> Service<Request<UpstreamBody>> for SetRequestHeaders<S>
where
    S: Service<Request<UpstreamBody>, Response = Result<Response<Incoming>, ProxyError>>,
{
    type Response = Result<Response<Incoming>, ProxyError>;

    async fn call(&self, mut req: Request<UpstreamBody>, cx: &mut Cx<'_>) -> Self::Response {
        if let Some(rules) = &cx.route.request_headers {
            rules.apply(req.headers_mut());
        }
        self.0.call(req, cx).await
    }
}
