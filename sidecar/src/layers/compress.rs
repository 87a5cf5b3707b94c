//! Compression of what the app streams (`compression`): negotiated from the client's
//! `Accept-Encoding`, never for HEAD; cached answers come compressed from the cache and are
//! left alone. Every answer of a compressing route says `Vary: Accept-Encoding`, problem
//! answers included.

use http::{HeaderValue, Method, Response, header};

use crate::{
    body::ProxyBody,
    compress,
    pipeline::{ClientRequest, Cx, Service},
};

pub struct Compress<S>(pub S);

impl<S> Service<ClientRequest> for Compress<S>
where
    S: Service<ClientRequest, Response = Response<ProxyBody>>,
{
    type Response = Response<ProxyBody>;

    async fn call(&self, req: ClientRequest, cx: &mut Cx<'_>) -> Response<ProxyBody> {
        if cx.route.compression.is_none() || req.method() == Method::HEAD {
            return self.0.call(req, cx).await;
        }
        let accept = req.headers().get(header::ACCEPT_ENCODING).cloned();
        let resp = self.0.call(req, cx).await;
        match &cx.route.compression {
            Some(config) => compress_streaming(resp, config, accept.as_ref()),
            None => resp,
        }
    }
}

/// Compresses a response that streams from the app (cached responses come compressed from
/// the cache and are left alone).
pub fn compress_streaming(
    resp: Response<ProxyBody>,
    config: &apipolicy_api::CompressionConfig,
    accept: Option<&HeaderValue>,
) -> Response<ProxyBody> {
    if !compress::compressible(resp.status(), resp.headers(), config) {
        return resp;
    }
    let (mut parts, mut body) = resp.into_parts();
    compress::add_vary(&mut parts.headers, "accept-encoding");
    let Some(encoding) = compress::negotiate(accept, &config.algorithms) else {
        return Response::from_parts(parts, body);
    };
    let Some(upstream) = body.take_upstream() else {
        return Response::from_parts(parts, body);
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::ACCEPT_RANGES);
    parts.headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding.as_str()));
    if let Some(etag) = parts.headers.get(header::ETAG).cloned() {
        match crate::cache::conditional::encoded_etag(&etag, encoding.as_str()) {
            Some(e) => parts.headers.insert(header::ETAG, e),
            None => parts.headers.remove(header::ETAG),
        };
    }
    Response::from_parts(parts, ProxyBody::boxed(compress::compress_stream(encoding, upstream)))
}
