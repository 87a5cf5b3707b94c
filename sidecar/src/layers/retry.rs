//! The route's `retry`: a failed try is tried again, within the route's timeout (all tries
//! together), its retry budget, and with full-jitter backoff (the app's `Retry-After` is a
//! floor). Only requests that can be sent twice are: an idempotent method (GET, HEAD,
//! OPTIONS, PUT, DELETE) or an `Idempotency-Key`, and a body whose length is known and at most
//! [`REPLAY_LIMIT`] (read whole before the first try, sent again from memory); a body of
//! unknown length (chunked) or a larger one streams through once.

use std::{
    cell::RefCell,
    time::{Duration, Instant},
};

use apipolicy_api::RetryOn;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use crate::{
    body::UpstreamBody,
    error::ProxyError,
    pipeline::{AppRequest, Cx, Service, Tried},
};

/// The largest request body kept to be sent again.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

#[derive(Clone, Copy)]
pub struct Retry<S>(pub S);

impl<S> Service<AppRequest> for Retry<S>
where
    S: Service<AppRequest, Response = Tried>,
{
    type Response = Tried;

    async fn call(&self, mut req: AppRequest, cx: &mut Cx<'_>) -> Tried {
        let Some(budget) = &cx.route.retry else { return self.0.call(req, cx).await };
        budget.deposit(cx.finish.started());
        let replayable = req.body().size_hint().exact().is_some_and(|n| n <= REPLAY_LIMIT);
        if !replayable || !idempotent(&req) {
            return self.0.call(req, cx).await;
        }
        // The tries, in this function: another level of future would be copied whole each time
        // a request goes through, and a box costs an allocation and the same copy.
        let config = &budget.config;
        let body = read_whole(req.body_mut()).await?;
        *req.body_mut() = UpstreamBody::Replay { data: body.clone() };
        // The first try sends the request itself; what a later one needs of its head is kept
        // aside.
        let spare = Spare::of(&req);
        let per_try = config.per_try_timeout_ms.map(Duration::from_millis);
        // The first try has the route's timeout, as a request without retries (no clock read);
        // a later one what is left of it.
        let mut limit = cx.route.timeout;
        let mut attempt = 1;
        loop {
            // The app's side times the try (and the breaker below counts its timeout).
            cx.try_limit = Some(per_try.map_or(limit, |t| t.min(limit)));
            let outcome = self.0.call(req, cx).await;
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
            // All tries together within the route's timeout, from the request's start.
            let deadline = cx.finish.started() + cx.route.timeout;
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
            limit = deadline.saturating_duration_since(Instant::now());
            req = Box::new(spare.request(UpstreamBody::Replay { data: body.clone() }));
        }
    }
}

/// A request head as its first try sent it, to send again. The target and the fields are
/// written out as lines (`target`, then `name:value`) in one buffer: clones of them cost twice
/// as much to make and to drop (a reference count each), and most requests never need them.
/// The buffer comes from [`BUFFERS`] and goes back there.
struct Spare {
    method: Method,
    version: Version,
    lines: Vec<u8>,
}

thread_local! {
    /// The buffers of spares whose requests have ended, for the next ones on this thread: an
    /// allocation and a free saved per request (at most [`KEPT`] of at most [`KEPT_CAPACITY`]
    /// bytes).
    static BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}
const KEPT: usize = 64;
const KEPT_CAPACITY: usize = 8 * 1024;

impl Spare {
    fn of<B>(req: &Request<B>) -> Self {
        let mut lines = BUFFERS.with_borrow_mut(|kept| kept.pop()).unwrap_or_else(|| Vec::with_capacity(512));
        // Origin form after `outbound::prepare`; any other written whole.
        match req.uri().path_and_query() {
            Some(target) if req.uri().scheme().is_none() && req.uri().authority().is_none() => {
                lines.extend_from_slice(target.as_str().as_bytes())
            }
            _ => lines.extend_from_slice(req.uri().to_string().as_bytes()),
        }
        lines.push(b'\n');
        for (name, value) in req.headers() {
            lines.extend_from_slice(name.as_str().as_bytes());
            lines.push(b':');
            // A field value never holds a line feed (`HeaderValue` refuses control bytes).
            lines.extend_from_slice(value.as_bytes());
            lines.push(b'\n');
        }
        Self { method: req.method().clone(), version: req.version(), lines }
    }

    /// The head again, with `body` (the request's extensions are not the app's business).
    fn request(&self, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.version_mut() = self.version;
        let all = Bytes::copy_from_slice(&self.lines);
        let mut start = 0;
        for (i, line) in self.lines.split(|&b| b == b'\n').enumerate() {
            let end = start + line.len();
            let line_bytes = all.slice(start..end);
            start = end + 1;
            if i == 0 {
                // It was a URI already.
                if let Ok(uri) = Uri::from_maybe_shared(line_bytes) {
                    *req.uri_mut() = uri;
                }
                continue;
            }
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                let name = HeaderName::from_bytes(&line[..colon]);
                let value = HeaderValue::from_maybe_shared(line_bytes.slice(colon + 1..));
                // Both were a name and a value already.
                if let (Ok(name), Ok(value)) = (name, value) {
                    req.headers_mut().append(name, value);
                }
            }
        }
        req
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        let mut buffer = std::mem::take(&mut self.lines);
        if buffer.capacity() <= KEPT_CAPACITY {
            buffer.clear();
            // Not while the thread ends (its locals may be gone).
            let _ = BUFFERS.try_with(|kept| {
                let mut kept = kept.borrow_mut();
                if kept.len() < KEPT {
                    kept.push(buffer);
                }
            });
        }
    }
}

/// GET, HEAD, OPTIONS, PUT and DELETE may be sent twice (RFC 9110 §9.2.2), and any request
/// that carries an `Idempotency-Key`.
fn idempotent<B>(req: &Request<B>) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
        || req.headers().contains_key(&IDEMPOTENCY_KEY)
}

/// The body as bytes to send on each try (`None`: no body).
async fn read_whole(body: &mut UpstreamBody) -> Result<Option<Bytes>, ProxyError> {
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

/// Whether a try's outcome is one the route retries.
fn retry_on(outcome: &Tried, on: &[RetryOn]) -> bool {
    // Most answers: no status retried is below 400 (validation says so).
    if outcome.as_ref().is_ok_and(|r| r.status().as_u16() < 400) {
        return false;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn head(target: &str) -> Request<UpstreamBody> {
        let mut req = Request::builder()
            .method(Method::PUT)
            .uri(target)
            .header(header::HOST, "app.local")
            .header("x-custom", "one")
            .header(header::ACCEPT, "text/plain")
            .header("x-custom", "two, three")
            .header("x-empty", "")
            .header("x-colons", "a:b::c")
            .body(UpstreamBody::Replay { data: None })
            .unwrap();
        req.headers_mut().append("x-obs-text", HeaderValue::from_bytes(b"caf\xe9 \t tab").unwrap());
        req
    }

    #[test]
    fn a_spare_sends_the_same_head_again() {
        for target in ["/items?page=2&q=a%20b", "http://app.local:8080/items?x=1", "*"] {
            let first = head(target);
            let spare = Spare::of(&first);
            let again = spare.request(UpstreamBody::Replay { data: None });
            assert_eq!(again.method(), first.method(), "{target}");
            assert_eq!(again.uri(), first.uri(), "{target}");
            assert_eq!(again.version(), first.version(), "{target}");
            let pairs = |r: &Request<UpstreamBody>| {
                r.headers().iter().map(|(n, v)| (n.clone(), v.clone())).collect::<Vec<_>>()
            };
            assert_eq!(pairs(&again), pairs(&first), "{target}: every field, in order, values kept apart");
            // A second retry from the same spare is the same again.
            assert_eq!(pairs(&spare.request(UpstreamBody::Replay { data: None })), pairs(&first));
        }
    }

    #[test]
    fn a_spares_buffer_is_used_again_unless_it_grew_large() {
        let first = head("/a");
        let spare = Spare::of(&first);
        let kept = spare.lines.as_ptr();
        drop(spare);
        let spare = Spare::of(&first);
        assert_eq!(spare.lines.as_ptr(), kept, "the buffer came back");
        drop(spare);
        let mut big = head("/a");
        big.headers_mut().insert("x-big", HeaderValue::from_str(&"b".repeat(KEPT_CAPACITY)).unwrap());
        let spare = Spare::of(&big);
        assert!(BUFFERS.with_borrow(|kept| kept.is_empty()), "the kept one was taken (and grew)");
        assert!(spare.lines.capacity() > KEPT_CAPACITY);
        drop(spare);
        assert!(BUFFERS.with_borrow(|kept| kept.is_empty()), "a large buffer is not kept");
    }
}
