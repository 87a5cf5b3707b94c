//! The route's `retry`: a failed try is tried again, within the route's timeout (all tries
//! together), its retry budget, and with full-jitter backoff (the app's `Retry-After` is a
//! floor). Only requests that can be sent twice are: an idempotent method (GET, HEAD,
//! OPTIONS, PUT, DELETE) or an `Idempotency-Key`, and a body whose length is known and at most
//! [`REPLAY_LIMIT`] (read whole before the first try, sent again from memory); a body of
//! unknown length (chunked) or a larger one streams through once.

use std::time::Duration;

use apipolicy_api::RetryOn;
use bytes::Bytes;
use http::{HeaderName, Method, Request, Response, StatusCode, header, request::Parts};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::{
    body::UpstreamBody,
    error::ProxyError,
    pipeline::{Cx, Service},
    resilience::RetryBudget,
};

/// The largest request body kept to be sent again.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

#[derive(Clone, Copy)]
pub struct Retry<S>(pub S);

type Tried = Result<Response<Incoming>, ProxyError>;

impl<S> Service<Request<UpstreamBody>> for Retry<S>
where
    S: Service<Request<UpstreamBody>, Response = Tried>,
{
    type Response = Tried;

    async fn call(&self, req: Request<UpstreamBody>, cx: &mut Cx<'_>) -> Tried {
        let Some(budget) = &cx.route.retry else { return self.0.call(req, cx).await };
        budget.deposit();
        let replayable = req.body().size_hint().exact().is_some_and(|n| n <= REPLAY_LIMIT);
        if !replayable || !idempotent(&req) {
            return self.0.call(req, cx).await;
        }
        // Not boxed: the loop's own state (the head kept for another try) is small beside the
        // try's future it holds anyway, and a box costs an allocation and a copy of it all.
        tries(&self.0, budget, req, cx).await
    }
}

async fn tries<S>(inner: &S, budget: &RetryBudget, req: Request<UpstreamBody>, cx: &mut Cx<'_>) -> Tried
where
    S: Service<Request<UpstreamBody>, Response = Tried>,
{
    let config = &budget.config;
    let deadline = Instant::now() + cx.route.timeout;
    let (parts, body) = req.into_parts();
    let body = read_whole(body).await?;
    let per_try = config.per_try_timeout_ms.map(Duration::from_millis);
    let mut attempt = 1;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let limit = per_try.map_or(left, |t| t.min(left));
        let try_req = Request::from_parts(copy(&parts), UpstreamBody::Replay { data: body.clone() });
        // The app's side times the try (and the breaker below counts its timeout).
        cx.try_limit = Some(limit);
        let outcome = inner.call(try_req, cx).await;
        cx.try_limit = None;
        let failed = retry_on(&outcome, &config.on);
        if !failed || attempt >= config.attempts {
            if attempt > 1 {
                if failed { &budget.retried_failure } else { &budget.retried_success }.inc();
            }
            return outcome;
        }
        let ceiling =
            config.backoff_max_ms.min(config.backoff_base_ms.saturating_mul(1 << (attempt - 1).min(20)));
        let mut wait = Duration::from_millis(fastrand::u64(0..=ceiling));
        if let Some(floor) = outcome.as_ref().ok().and_then(retry_after) {
            wait = wait.max(floor);
        }
        // No time for another try, or no budget: this answer is the request's.
        if Instant::now() + wait >= deadline || !budget.withdraw() {
            if attempt > 1 {
                budget.retried_failure.inc();
            }
            return outcome;
        }
        tracing::debug!(route = %cx.route.name, attempt, wait_ms = wait.as_millis() as u64, "retrying");
        drop(outcome);
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// GET, HEAD, OPTIONS, PUT and DELETE may be sent twice (RFC 9110 §9.2.2), and any request
/// that carries an `Idempotency-Key`.
fn idempotent<B>(req: &Request<B>) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
        || req.headers().contains_key(&IDEMPOTENCY_KEY)
}

/// The body as bytes to send on each try (`None`: no body).
async fn read_whole(body: UpstreamBody) -> Result<Option<Bytes>, ProxyError> {
    if body.is_end_stream() {
        return Ok(None);
    }
    let bytes = body.collect().await.map_err(|e| {
        if e.is::<crate::body::Stalled>() {
            ProxyError::BadRequestBody("the request body stalled before it was complete".to_owned())
        } else {
            ProxyError::BadRequestBody(format!("the request body could not be read: {e}"))
        }
    })?;
    Ok(Some(bytes.to_bytes()))
}

/// A copy of a request head for one try.
fn copy(parts: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// Whether a try's outcome is one the route retries.
fn retry_on(outcome: &Tried, on: &[RetryOn]) -> bool {
    on.iter().any(|o| match (o, outcome) {
        (RetryOn::ConnectFailure, Err(ProxyError::UpstreamUnavailable(_))) => true,
        (RetryOn::Reset, Err(ProxyError::BadGateway(_))) => true,
        (RetryOn::Timeout, Err(ProxyError::UpstreamTimeout { .. })) => true,
        (RetryOn::GatewayError, Ok(r)) => {
            matches!(
                r.status(),
                StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
            )
        }
        (RetryOn::ServerError, Ok(r)) => r.status().is_server_error(),
        (RetryOn::Status(code), Ok(r)) => r.status().as_u16() == *code,
        _ => false,
    })
}

/// The app's `Retry-After` in seconds (the date form is read too), at most a minute.
fn retry_after(resp: &Response<Incoming>) -> Option<Duration> {
    let v = resp.headers().get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    let secs = match v.parse::<u64>() {
        Ok(s) => s,
        Err(_) => {
            let at = httpdate::parse_http_date(v).ok()?;
            at.duration_since(std::time::SystemTime::now()).ok()?.as_secs()
        }
    };
    Some(Duration::from_secs(secs.min(60)))
}
