//! SLO protection's `ShedByPriority`: while an SLO that counts the route protects it, requests
//! of class `Sheddable` that would reach the app (cache hits were answered above) get 503
//! `shed-by-priority` at once, counted in `apipolicy_shed_total{route,priority}`. The answer
//! is the policy working, so SLOs leave it out.

use http::Response;

use crate::{
    body::ProxyBody,
    error::ProxyError,
    layers::cache::Fills,
    pipeline::{ClientRequest, Cx, Service, rescue},
    priority::Class,
};

pub struct ShedByPriority<S>(pub S);

impl<S: Fills> Fills for ShedByPriority<S> {
    type Upstream = S::Upstream;

    fn upstream(&self) -> S::Upstream {
        self.0.upstream()
    }
}

impl<S> Service<ClientRequest> for ShedByPriority<S>
where
    S: Service<ClientRequest, Response = Response<ProxyBody>>,
{
    type Response = Response<ProxyBody>;

    async fn call(&self, req: ClientRequest, cx: &mut Cx<'_>) -> Response<ProxyBody> {
        if cx.protection.shed && cx.class == Class::Sheddable {
            if let Some(shed) = cx.route.shed.as_ref() {
                shed[Class::Sheddable.index()].inc();
            }
            return rescue(ProxyError::Shed { class: Class::Sheddable.as_str() }, cx);
        }
        self.0.call(req, cx).await
    }
}
