//! The route's request header rules (`requestHeaders`): headers removed from, then set on,
//! every request the route sends the app, pass-through and cache fills alike. The cache key
//! was taken above, from the client's request.

use http::{HeaderName, HeaderValue, Request, Response};
use hyper::body::Incoming;

use crate::{
    body::UpstreamBody,
    error::ProxyError,
    pipeline::{Cx, Service},
};

/// `requestHeaders` parsed once per config.
#[derive(Debug, Default)]
pub struct HeaderRules {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderRules {
    /// Validation refuses what does not parse; a config that skipped it has the entry named.
    pub fn new(config: &apipolicy_api::HeaderRulesConfig) -> Result<Self, String> {
        let name =
            |n: &str| HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{n:?} is not a header name"));
        Ok(Self {
            remove: config.remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
            set: config
                .set
                .iter()
                .map(|(n, v)| {
                    let value = HeaderValue::from_str(v)
                        .map_err(|_| format!("the value of {n} is not a header value"))?;
                    Ok((name(n)?, value))
                })
                .collect::<Result<_, String>>()?,
        })
    }

    fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

#[derive(Clone, Copy)]
pub struct SetRequestHeaders<S>(pub S);

impl<S> Service<Request<UpstreamBody>> for SetRequestHeaders<S>
where
    S: Service<Request<UpstreamBody>, Response = Result<Response<Incoming>, ProxyError>>,
{
    type Response = Result<Response<Incoming>, ProxyError>;

    async fn call(&self, mut req: Request<UpstreamBody>, cx: &mut Cx<'_>) -> Self::Response {
        if let Some(rules) = &cx.route.request_headers {
            rules.apply(req.headers_mut());
        }
        self.0.call(req, cx).await
    }
}
