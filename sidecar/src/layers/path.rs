//! A path the route matcher refused (`%00`, an escaped slash under `escapedSlashes: Reject`…)
//! is answered here, before any limit or cache sees the request.

use http::Response;

use crate::{
    body::ProxyBody,
    error::ProxyError,
    pipeline::{ClientRequest, Cx, Service, rescue},
};

pub struct RefuseBadPath<S>(pub S);

impl<S> Service<ClientRequest> for RefuseBadPath<S>
where
    S: Service<ClientRequest, Response = Response<ProxyBody>>,
{
    type Response = Response<ProxyBody>;

    async fn call(&self, req: ClientRequest, cx: &mut Cx<'_>) -> Response<ProxyBody> {
        match cx.bad_path.take() {
            Some(e) => rescue(ProxyError::InvalidPath(e), cx),
            None => self.0.call(req, cx).await,
        }
    }
}
