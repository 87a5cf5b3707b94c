//! The route's rate limit (`routes[].rateLimit`): a refused request costs nothing further, and
//! the limit's headers go on every answer of the route, problem answers included.

use http::Response;

use crate::{
    body::ProxyBody,
    pipeline::{ClientRequest, Cx, Service, rescue},
};

pub struct RateLimit<S>(pub S);

impl<S> Service<ClientRequest> for RateLimit<S>
where
    S: Service<ClientRequest, Response = Response<ProxyBody>>,
{
    type Response = Response<ProxyBody>;

    async fn call(&self, req: ClientRequest, cx: &mut Cx<'_>) -> Response<ProxyBody> {
        let Some(limiter) = &cx.route.limiter else { return self.0.call(req, cx).await };
        let applied = match limiter
            .check(req.headers(), cx.peer, &cx.active.trusted, cx.protection.tighten_permille)
            .await
        {
            Ok(applied) => applied,
            Err(e) => return rescue(e, cx),
        };
        let mut resp = self.0.call(req, cx).await;
        if let Some(applied) = applied {
            applied.write(resp.headers_mut());
        }
        resp
    }
}
