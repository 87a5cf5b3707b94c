//! A path the route matcher refused (`%00`, an escaped slash under `escapedSlashes: Reject`…)
//! is answered here, before any limit or cache sees the request.

use http::{Request, Response};
use hyper::body::Incoming;

use crate::{
    body::ProxyBody,
    error::ProxyError,
    pipeline::{Cx, Service, rescue},
};

pub struct RefuseBadPath<S>(pub S);

impl<S> Service<Request<Incoming>> for RefuseBadPath<S>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>>,
{
    type Response = Response<ProxyBody>;

    async fn call(&self, req: Request<Incoming>, cx: &mut Cx<'_>) -> Response<ProxyBody> {
        match cx.bad_path.take() {
            Some(e) => rescue(ProxyError::InvalidPath(e), cx),
            None => self.0.call(req, cx).await,
        }
    }
}
