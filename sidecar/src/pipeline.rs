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
//! app ([`AppRequest`]) and give the app's answer or the error (`Result`), which the
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

/// The client's request as the client-side layers hand it down, and a request for the app as
/// the upstream-side ones do: boxed. An async fn keeps its arguments in its future for its
/// whole life (rust-lang/rust#62958), each layer's future holds the one below it, and each is
/// copied whole into its caller's when it is made: by value (264 and 312 bytes), a request made
/// every level of the stack that much larger, and the copies with it. Boxed, a level keeps a
/// pointer, for one allocation per request on each side.
pub type ClientRequest = Box<Request<Incoming>>;
pub type AppRequest = Box<Request<UpstreamBody>>;

/// What an upstream-side layer answers: the app's response, or why there is none.
pub type Tried = Result<Response<Incoming>, ProxyError>;

/// The upstream-side layers as the cache holds them: copied into a background refresh.
pub trait ToApp: Service<AppRequest, Response = Tried> + Copy + Send + 'static {}

impl<U> ToApp for U where U: Service<AppRequest, Response = Tried> + Copy + Send + 'static {}

/// The client's answer to a failure: problem+json with the request id; an answer the policy
/// meant (a limit, shedding, a client's mistake) is marked so that SLOs leave it out.
pub fn rescue(e: ProxyError, cx: &mut Cx<'_>) -> Response<ProxyBody> {
    cx.finish.policy_answer = e.is_policy();
    e.into_response(cx.id)
}
