//! The sidecar's own answers. Every failure the sidecar turns into a response is a variant
//! here, and becomes an RFC 9457 `application/problem+json` response in one place only.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;

/// Why the sidecar answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the request body is larger than this route's limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the upstream did not send response headers within {timeout_ms} ms")]
    UpstreamTimeout { timeout_ms: u64 },
    #[error("the upstream could not be reached: {0}")]
    UpstreamUnavailable(String),
    #[error("the upstream connection failed: {0}")]
    BadGateway(String),
    #[error("the request could not be forwarded: {0}")]
    BadRequest(&'static str),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The stable problem type slug; the `type` URI is `https://apipolicy.dev/problems/<slug>`.
    pub fn slug(&self) -> &'static str {
        match self {
            Self::BodyTooLarge { .. } => "body-too-large",
            Self::UpstreamTimeout { .. } => "upstream-timeout",
            Self::UpstreamUnavailable(_) => "upstream-unavailable",
            Self::BadGateway(_) => "bad-gateway",
            Self::BadRequest(_) => "bad-request",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::BodyTooLarge { .. } => "Request body too large",
            Self::UpstreamTimeout { .. } => "Upstream timeout",
            Self::UpstreamUnavailable(_) => "Upstream unavailable",
            Self::BadGateway(_) => "Bad gateway",
            Self::BadRequest(_) => "Bad request",
        }
    }

    pub fn into_response(self, request_id: &HeaderValue) -> Response<ProxyBody> {
        problem(self.status(), self.slug(), self.title(), &self.to_string(), request_id)
    }
}

/// An `application/problem+json` response.
pub fn problem(
    status: StatusCode,
    slug: &str,
    title: &str,
    detail: &str,
    request_id: &HeaderValue,
) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "type": format!("https://apipolicy.dev/problems/{slug}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "requestId": request_id.to_str().unwrap_or_default(),
    });
    let mut resp = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
