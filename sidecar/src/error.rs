//! The sidecar's own answers. Every failure the sidecar turns into a response is a variant
//! here, and becomes an RFC 9457 `application/problem+json` response in one place only.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::LengthLimitError;

use crate::{
    body::{ClientBodyError, ProxyBody, Stalled},
    ratelimit::applied::Applied,
};

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
    #[error("the request path is refused: {0}")]
    InvalidPath(crate::routes::PathError),
    #[error("{0}")]
    BadRequestBody(String),
    #[error("the request body stalled: nothing arrived for {timeout_ms} ms")]
    RequestBodyTimeout { timeout_ms: u64 },
    #[error("this route is limited per {header} header, and the request carries it more than once")]
    AmbiguousKey { header: String },
    #[error("too many requests: this route's rate limit allows the next one in {retry_after_s} s")]
    RateLimited { retry_after_s: u64, headers: Box<Applied> },
    #[error("this route is limited per {header} header, and the request has none")]
    MissingKey { header: String, status: u16 },
    #[error("this route already has {max_in_flight} requests in flight; retry shortly")]
    Overloaded { max_in_flight: u32 },
    #[error("the rate-limit store is unavailable and this route fails closed: {0}")]
    LimitStoreUnavailable(String),
    #[error("the app failed too often: this route's circuit is open for {retry_after_s} s more")]
    CircuitOpen { retry_after_s: u64 },
    #[error(
        "the app is over its error budget and requests of priority {class} are shed for now; retry later"
    )]
    Shed { class: &'static str },
}

impl ProxyError {
    /// Whose fault a failed exchange with the app was: the client's body (larger than the
    /// route's `max_body`, malformed, stalled past `idle`) or the app's.
    pub fn of_exchange(e: &hyper::Error, max_body: Option<u64>, idle: Duration) -> Self {
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if s.is::<LengthLimitError>() {
                return Self::BodyTooLarge { limit: max_body.unwrap_or_default() };
            }
            if let Some(bad) = s.downcast_ref::<ClientBodyError>() {
                return Self::BadRequestBody(chain(bad));
            }
            if s.is::<Stalled>() {
                return Self::RequestBodyTimeout { timeout_ms: idle.as_millis() as u64 };
            }
            source = s.source();
        }
        Self::BadGateway(chain(e))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::BadRequest(_)
            | Self::InvalidPath(_)
            | Self::BadRequestBody(_)
            | Self::AmbiguousKey { .. } => StatusCode::BAD_REQUEST,
            Self::RequestBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::MissingKey { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::UNAUTHORIZED)
            }
            Self::Overloaded { .. }
            | Self::LimitStoreUnavailable(_)
            | Self::CircuitOpen { .. }
            | Self::Shed { .. } => StatusCode::SERVICE_UNAVAILABLE,
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
            Self::InvalidPath(_) => "invalid-path",
            Self::BadRequestBody(_) => "bad-request-body",
            Self::RequestBodyTimeout { .. } => "request-body-timeout",
            Self::AmbiguousKey { .. } => "ambiguous-rate-limit-key",
            Self::RateLimited { .. } => "rate-limited",
            Self::MissingKey { .. } => "missing-rate-limit-key",
            Self::Overloaded { .. } => "overloaded",
            Self::LimitStoreUnavailable(_) => "rate-limit-store-unavailable",
            Self::CircuitOpen { .. } => "circuit-open",
            Self::Shed { .. } => "shed-by-priority",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::BodyTooLarge { .. } => "Request body too large",
            Self::UpstreamTimeout { .. } => "Upstream timeout",
            Self::UpstreamUnavailable(_) => "Upstream unavailable",
            Self::BadGateway(_) => "Bad gateway",
            Self::BadRequest(_) => "Bad request",
            Self::InvalidPath(_) => "Invalid path",
            Self::BadRequestBody(_) => "Malformed request body",
            Self::RequestBodyTimeout { .. } => "Request body timeout",
            Self::AmbiguousKey { .. } => "Ambiguous rate limit key",
            Self::RateLimited { .. } => "Too many requests",
            Self::MissingKey { .. } => "Rate limit key missing",
            Self::Overloaded { .. } => "Overloaded",
            Self::LimitStoreUnavailable(_) => "Rate limit store unavailable",
            Self::CircuitOpen { .. } => "Circuit open",
            Self::Shed { .. } => "Shed by priority",
        }
    }

    /// Answers the sidecar gave because the policy worked as meant (a limit, shedding) or the
    /// client's request was at fault (4xx): SLOs leave them out, so that no client can spend an
    /// app's error budget by sending broken requests.
    pub fn is_policy(&self) -> bool {
        !matches!(
            self,
            Self::UpstreamTimeout { .. }
                | Self::UpstreamUnavailable(_)
                | Self::BadGateway(_)
                | Self::LimitStoreUnavailable(_)
                | Self::CircuitOpen { .. }
        )
    }

    pub fn into_response(self, request_id: &HeaderValue) -> Response<ProxyBody> {
        let mut resp = problem(self.status(), self.slug(), self.title(), &self.to_string(), request_id);
        match self {
            Self::RateLimited { retry_after_s, headers } => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
                headers.write(resp.headers_mut());
            }
            Self::Overloaded { .. } | Self::LimitStoreUnavailable(_) => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::Shed { .. } => {
                // Protection lasts at least its minute of calm.
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
            }
            Self::CircuitOpen { retry_after_s } => {
                resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s.max(1)));
            }
            _ => {}
        }
        resp
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

/// An error and its causes, `: `-separated, for problem details and logs.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
