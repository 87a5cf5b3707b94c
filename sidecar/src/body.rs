//! Body types. Bodies stream through: nothing is buffered unless a feature needs it.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Full, Limited};
use hyper::body::Incoming;

use crate::proxy::Finish;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// A response body: the upstream's, streamed, or one the sidecar made. When it ends, or the
    /// client goes away, its `Finish` runs once with the bytes sent (metrics, access log).
    pub struct ProxyBody {
        #[pin]
        inner: Inner,
        sent: u64,
        finish: Option<Finish>,
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
    }
}

impl ProxyBody {
    pub fn upstream(body: Incoming) -> Self {
        Self { inner: Inner::Upstream { body }, sent: 0, finish: None }
    }

    pub fn full(bytes: Bytes) -> Self {
        Self { inner: Inner::Full { body: Full::new(bytes) }, sent: 0, finish: None }
    }

    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    /// Runs `finish` when the body ends or is dropped.
    pub fn on_finish(&mut self, finish: Finish) {
        self.finish = Some(finish);
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
        };
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
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream { body } => body.size_hint(),
            Inner::Full { body } => body.size_hint(),
        }
    }
}

/// What goes to the upstream: the client's body, under the route's size limit when it has one.
pub type UpstreamBody = http_body_util::Either<Incoming, Limited<Incoming>>;
