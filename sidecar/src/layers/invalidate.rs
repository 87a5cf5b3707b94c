//! Unsafe requests invalidate what the cache holds for their URL once the app took them
//! (RFC 9111 §4.4): a 2xx or 3xx answer to anything but GET, HEAD, OPTIONS or TRACE.

use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::{
    body::ProxyBody,
    cache::flow,
    pipeline::{Cx, Service},
};

pub struct Invalidate<S>(pub S);

impl<S> Service<Request<Incoming>> for Invalidate<S>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>>,
{
    type Response = Response<ProxyBody>;

    async fn call(&self, req: Request<Incoming>, cx: &mut Cx<'_>) -> Response<ProxyBody> {
        let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE);
        let target =
            (!safe).then(|| flow::target(&req, cx.route.cache.as_ref().is_some_and(|c| c.sort_query)));
        let resp = self.0.call(req, cx).await;
        if let Some(target) = target
            && (resp.status().is_success() || resp.status().is_redirection())
        {
            flow::invalidate(cx.active, &target, resp.headers());
        }
        resp
    }
}
