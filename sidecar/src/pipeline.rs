//! The pieces every layer of the request pipeline shares: the request's context ([`Cx`]), the
//! [`Service`] each layer is, and [`rescue`], the one place where an error becomes the answer
//! the client gets. The stack itself is assembled in [`crate::proxy::stack`], in request order.
//!
//! Layers are [`tower::Layer`]s, composed by `tower::ServiceBuilder`; their calls are not
//! `tower::Service`'s: a layer is called by reference with the request's context borrowed
//! (`&self`, `&mut Cx`), so that a request costs no clone of the stack, no boxed future per
//! layer and no readiness polling. Layers hold no config: each reads its own slice of the
//! route the request matched (`cx.route`), so one stack serves every route and every config
//! revision.
//!
//! Two kinds of service meet in the stack. Client-side layers take the client's request and
//! always answer (`Response<ProxyBody>`: a failure is rescued into a problem answer on the
//! spot, so the layers above still decorate it). Upstream-side layers take a request for the
//! app (`Request<UpstreamBody>`) and give the app's answer or the error (`Result`), which the
//! caller may still turn into something else (the cache serves stale on an error).

use std::{future::Future, net::SocketAddr, sync::Arc};

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;

use crate::{
    accounting::Accounting,
    body::{ProxyBody, UpstreamBody},
    error::ProxyError,
    routes::PathError,
    runtime::{PolicyRuntime, RouteRuntime},
};

/// What a request carries through the pipeline besides itself.
pub struct Cx<'a> {
    /// The config the request runs under (one snapshot for the whole request).
    pub active: &'a Arc<PolicyRuntime>,
    /// The route it matched, and that route's index in `active.routes`.
    pub route: &'a RouteRuntime,
    pub route_index: usize,
    pub peer: SocketAddr,
    pub id: &'a HeaderValue,
    /// What is recorded when the response ends.
    pub finish: &'a mut Accounting,
    /// Why the request's path is refused, when it is (it then matched no route).
    pub bad_path: Option<PathError>,
    /// How long the current try to the app may wait for its response headers, when a retry
    /// policy shortened the route's timeout for it (`perTryTimeout`, or what is left of the
    /// route's timeout after earlier tries).
    pub try_limit: Option<std::time::Duration>,
    /// The request's priority class (`spec.priorities`).
    pub class: crate::priority::Class,
    /// What SLO protection asks of the request's route now.
    pub protection: crate::priority::Protection,
}

/// One layer of the pipeline, or the service at its bottom.
pub trait Service<Req>: Sync {
    type Response;

    fn call(&self, req: Req, cx: &mut Cx<'_>) -> impl Future<Output = Self::Response> + Send;
}

/// What an upstream-side layer answers: the app's response, or why there is none.
pub type Tried = Result<Response<Incoming>, ProxyError>;

/// The upstream-side layers as the cache holds them: copied into a background refresh.
pub trait ToApp: Service<Request<UpstreamBody>, Response = Tried> + Copy + Send + 'static {}

impl<U> ToApp for U where U: Service<Request<UpstreamBody>, Response = Tried> + Copy + Send + 'static {}

/// The client's answer to a failure: problem+json with the request id; an answer the policy
/// meant (a limit, shedding, a client's mistake) is marked so that SLOs leave it out.
pub fn rescue(e: ProxyError, cx: &mut Cx<'_>) -> Response<ProxyBody> {
    cx.finish.policy_answer = e.is_policy();
    e.into_response(cx.id)
}
