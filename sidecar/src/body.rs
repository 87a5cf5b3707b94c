//! Body types. Bodies stream through: nothing is buffered unless a feature needs it (the
//! cache, up to `maxEntrySize`).

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited, combinators::UnsyncBoxBody};
use hyper::body::Incoming;

use crate::accounting::Accounting;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body broke (bad chunk framing, a connection cut mid-body): the
/// client's fault, never the app's, whatever error the upstream connection reports for it.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body is malformed or was cut off: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// A body that sent nothing for longer than its route's `streamIdleTimeout`.
#[derive(Debug, thiserror::Error)]
#[error("the body stalled: nothing arrived for {0:?}")]
pub struct Stalled(pub Duration);

/// Ends a body that stalls: armed only on bodies that stream from a peer. Nothing is done
/// while frames are ready; the clock is read when the body starts to wait, and the timer is
/// made (boxed, so that every body stays small) on the first wait and moved on only when it
/// fires during a later wait: a small body that is ready at once costs nothing.
pub struct IdleTimer {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Since when the body has been waiting (`None`: a frame came last).
    waiting_since: Option<tokio::time::Instant>,
    /// `None`: off.
    after: Option<Duration>,
}

impl IdleTimer {
    pub fn off() -> Self {
        Self { sleep: None, waiting_since: None, after: None }
    }

    pub fn new(after: Duration) -> Self {
        Self { sleep: None, waiting_since: None, after: Some(after) }
    }

    /// Called after the body was polled: a frame ends a wait; a wait longer than the timeout
    /// is an error.
    fn check<T, E: From<Stalled>>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<Option<Result<T, E>>>,
    ) -> Poll<Option<Result<T, E>>> {
        let Some(after) = self.after else { return polled };
        if !polled.is_pending() {
            self.waiting_since = None;
            return polled;
        }
        let since = *self.waiting_since.get_or_insert_with(tokio::time::Instant::now);
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(since + after)));
        while sleep.as_mut().poll(cx).is_ready() {
            if tokio::time::Instant::now() >= since + after {
                return Poll::Ready(Some(Err(Stalled(after).into())));
            }
            // It was set for an earlier wait: this one ends later.
            sleep.as_mut().reset(since + after);
        }
        Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// A response body: the upstream's, streamed, or one the sidecar made. When it ends, or the
    /// client goes away, its `Accounting` runs once with the bytes sent (metrics, access log).
    pub struct ProxyBody {
        #[pin]
        inner: Inner,
        idle: IdleTimer,
        sent: u64,
        // Boxed: a response is moved through every layer of the stack, and its body with it
        // (a response of 400 bytes becomes one of 240, 1.1k fewer instructions a request).
        finish: Option<Box<Accounting>>,
    }

    impl PinnedDrop for ProxyBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(finish) = this.finish.take() {
                finish.done(*this.sent);
            }
        }
    }
}

pin_project_lite::pin_project! {
    #[project = InnerProj]
    enum Inner {
        Upstream { #[pin] body: Incoming },
        Full { #[pin] body: Full<Bytes> },
        /// What the cache read of a body too large to store, then the rest of it.
        Prefixed { prefix: Option<Bytes>, #[pin] rest: Incoming },
        /// A transformed stream (compression).
        Boxed { #[pin] body: UnsyncBoxBody<Bytes, BoxError> },
    }
}

impl ProxyBody {
    fn new(inner: Inner) -> Self {
        Self { inner, idle: IdleTimer::off(), sent: 0, finish: None }
    }

    pub fn upstream(body: Incoming) -> Self {
        Self::new(Inner::Upstream { body })
    }

    pub fn full(bytes: Bytes) -> Self {
        Self::new(Inner::Full { body: Full::new(bytes) })
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    pub fn prefixed(prefix: Bytes, rest: Incoming) -> Self {
        Self::new(Inner::Prefixed { prefix: Some(prefix), rest })
    }

    pub fn boxed(body: UnsyncBoxBody<Bytes, BoxError>) -> Self {
        Self::new(Inner::Boxed { body })
    }

    /// Takes the upstream body out, for a transformation, leaving an empty body; `None` (and
    /// the body untouched) if it is not the upstream's.
    pub fn take_upstream(&mut self) -> Option<Incoming> {
        match std::mem::replace(&mut self.inner, Inner::Full { body: Full::new(Bytes::new()) }) {
            Inner::Upstream { body } => Some(body),
            other => {
                self.inner = other;
                None
            }
        }
    }

    /// Whether the body streams from the app (and so can stall), rather than being whole.
    pub fn streams(&self) -> bool {
        !matches!(self.inner, Inner::Full { .. })
    }

    /// Ends the body with an error when the app sends nothing for `after`.
    pub fn idle_timeout(&mut self, after: Duration) {
        self.idle = IdleTimer::new(after);
    }

    /// Runs `finish` when the body ends or is dropped.
    pub fn on_finish(&mut self, finish: Accounting) {
        self.finish = Some(Box::new(finish));
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = match this.inner.project() {
            InnerProj::Upstream { body } => body.poll_frame(cx).map_err(|e| e.into()),
            InnerProj::Full { body } => body.poll_frame(cx).map_err(|never| match never {}),
            InnerProj::Prefixed { prefix, rest } => match prefix.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => rest.poll_frame(cx).map_err(|e| e.into()),
            },
            InnerProj::Boxed { body } => body.poll_frame(cx),
        };
        let polled = this.idle.check(cx, polled);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            *this.sent += data.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream { body } => body.is_end_stream(),
            Inner::Full { body } => body.is_end_stream(),
            Inner::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            Inner::Boxed { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream { body } => body.size_hint(),
            Inner::Full { body } => body.size_hint(),
            Inner::Prefixed { .. } => SizeHint::default(),
            Inner::Boxed { body } => body.size_hint(),
        }
    }
}

pin_project_lite::pin_project! {
    /// What goes to the upstream: the client's body (under the route's size limit when it has
    /// one, and ended when it stalls), a body read whole to be sent again on a retry
    /// (`Replay`), or nothing (a cache fill or revalidation).
    #[project = UpstreamProj]
    pub enum UpstreamBody {
        Client { #[pin] body: Incoming, idle: IdleTimer },
        Limited { #[pin] body: Limited<Incoming>, idle: IdleTimer },
        Replay { data: Option<Bytes> },
        Empty,
    }
}

/// The client's body errors as [`ClientBodyError`] (a size limit's error stays as it is).
fn client_error(e: BoxError) -> BoxError {
    match e.downcast::<hyper::Error>() {
        Ok(e) => Box::new(ClientBodyError(*e)),
        Err(e) => e,
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            UpstreamProj::Client { body, idle } => {
                let polled = body.poll_frame(cx).map_err(|e| Box::new(ClientBodyError(e)) as BoxError);
                idle.check(cx, polled)
            }
            UpstreamProj::Limited { body, idle } => {
                let polled = body.poll_frame(cx).map_err(client_error);
                idle.check(cx, polled)
            }
            UpstreamProj::Replay { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            UpstreamProj::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Client { body, .. } => body.is_end_stream(),
            Self::Limited { body, .. } => body.is_end_stream(),
            Self::Replay { data } => data.is_none(),
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Client { body, .. } => body.size_hint(),
            Self::Limited { body, .. } => body.size_hint(),
            Self::Replay { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A body read whole (with the XXH3-128 hash of its bytes, made as they arrived), or what
/// was read before it proved larger than the limit.
pub enum Buffered {
    Complete(Bytes, u128),
    TooLarge(Bytes, Incoming),
}

/// Reads `body` whole if it is at most `limit` bytes, hashing each chunk as it comes: the
/// strong ETag of a stored response costs no second pass over its body.
pub async fn buffer(mut body: Incoming, limit: u64) -> Result<Buffered, hyper::Error> {
    let mut buf = bytes::BytesMut::new();
    let mut hash = xxhash_rust::xxh3::Xxh3::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() as u64 > limit {
                return Ok(Buffered::TooLarge(buf.freeze(), body));
            }
            hash.update(&data);
        }
    }
    Ok(Buffered::Complete(buf.freeze(), hash.digest128()))
}
