//! The route's cache (`cache`): fresh hits, 304s and stale-while-revalidate are answered here;
//! a miss is coalesced with the same URL's other misses and filled through the upstream-side
//! layers below pass-through ([`Fills::upstream`]), so a fill is framed, timed, limited and
//! counted like any request to the app. What the cache may not answer passes through; an
//! unsafe request that the app took invalidates the cached URL.

use http::{Method, Response};

use crate::{
    body::ProxyBody,
    cache::{RequestCacheHeaders, request},
    outbound::Forward,
    pipeline::{ClientRequest, Cx, Service, ToApp, rescue},
};

pub struct Cache<S>(pub S);

/// A layer below the cache that reaches the app: the cache fills through it.
pub trait Fills {
    type Upstream: ToApp;

    fn upstream(&self) -> Self::Upstream;
}

impl<U: ToApp> Fills for Forward<U> {
    type Upstream = U;

    fn upstream(&self) -> U {
        *Forward::upstream(self)
    }
}

impl<S> Service<ClientRequest> for Cache<S>
where
    S: Service<ClientRequest, Response = Response<ProxyBody>> + Fills,
{
    type Response = Response<ProxyBody>;

    async fn call(&self, req: ClientRequest, cx: &mut Cx<'_>) -> Response<ProxyBody> {
        if let Some(cache) = &cx.route.cache {
            let asks = RequestCacheHeaders::of(req.headers());
            match request::eligible(cache, &req, asks) {
                Some(true) => {
                    return match request::serve(self.0.upstream(), req, asks, cx).await {
                        Ok(resp) => resp,
                        Err(e) => rescue(e, cx),
                    };
                }
                Some(false) => cx.route.cache_lookups.bypass.inc(),
                None => {}
            }
        }
        // Unsafe requests invalidate what the cache holds for their URL once the app took them
        // (RFC 9111 §4.4), on whichever route they came: a 2xx or 3xx answer to anything but
        // GET, HEAD, OPTIONS or TRACE.
        let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE);
        let target =
            (!safe).then(|| request::target(&req, cx.route.cache.as_ref().is_some_and(|c| c.sort_query)));
        let resp = self.0.call(req, cx).await;
        if let Some(target) = target
            && (resp.status().is_success() || resp.status().is_redirection())
        {
            request::invalidate(cx.active, &target, resp.headers());
        }
        resp
    }
}
