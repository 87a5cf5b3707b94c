//! A path the route matcher refused (`%00`, an escaped slash under `escapedSlashes: Reject`…)
//! is answered here, before any limit or cache sees the request.

use std::future::{Future, ready};

use futures::future::Either;
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

    fn call(
        &self,
        req: Request<Incoming>,
        cx: &mut Cx<'_>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        // The common case adds no state of its own to the stack's future.
        match cx.bad_path.take() {
            Some(e) => Either::Left(ready(rescue(ProxyError::InvalidPath(e), cx))),
            None => Either::Right(self.0.call(req, cx)),
        }
    }
}
