//! Unsafe requests invalidate what the cache holds for their URL once the app took them
//! (RFC 9111 §4.4): a 2xx or 3xx answer to anything but GET, HEAD, OPTIONS or TRACE.

use std::future::Future;

use futures::future::Either;
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

    fn call(
        &self,
        req: Request<Incoming>,
        cx: &mut Cx<'_>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE);
        if safe {
            return Either::Left(self.0.call(req, cx));
        }
        let target = flow::target(&req, cx.route.cache.as_ref().is_some_and(|c| c.sort_query));
        Either::Right(async move {
            let resp = self.0.call(req, cx).await;
            if resp.status().is_success() || resp.status().is_redirection() {
                flow::invalidate(cx.active, &target, resp.headers());
            }
            resp
        })
    }
}
