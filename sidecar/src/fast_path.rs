//! The cache-hit fast path (`--hit-lane`): HTTP/1.1 connections to a config with a cache are read here first, so
//! that a plain fresh hit is answered straight from the parsed request bytes and the entry's
//! ready head, without hyper building a request and a response (about half the CPU of a hit).
//!
//! The fast path answers one kind of request only: an HTTP/1.1 GET or HEAD in origin form, without
//! a body or `Connection`/`Upgrade`/`Expect` header, whose route has a cache and no `Global`
//! rate limit, and which [`crate::proxy::Proxy::fast_hit`] finds a plain fresh hit for (a
//! limit kept in the pod is applied there, its refusal written here). Anything
//! else goes to hyper and [`crate::proxy::Proxy::handle`], which judge every case:
//! - a request whose extent is known (no `Transfer-Encoding`, one plain `Content-Length` or
//!   none) is handed over alone: hyper reads exactly its bytes, answers it, and gives the
//!   connection back, so the next request can be a hit again;
//! - anything else (chunked bodies, upgrades, HTTP/1.0, HTTP/2's preface, a head httparse
//!   refuses, too many headers…) hands the whole connection to hyper, with the bytes read so
//!   far, for good; so does a connection whose hand-overs cost more than its hits save
//!   ([`Payoff`]).
//!
//! Request heads are parsed by httparse with the configuration hyper uses for requests, so the
//! fast path reads a head exactly as hyper would; it never decides the framing of a body.

use std::{
    io::{self, IoSlice},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::{Buf, Bytes};
use futures::task::AtomicWaker;
use http::Method;
use hyper_util::{
    rt::TokioIo,
    server::graceful::{GracefulConnection, Watcher},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    sync::watch,
};

use crate::{
    body::ProxyBody,
    headers::{Raw, header_line, status_line},
    proxy::{HitAnswer, HitRequest},
    sidecar::Conns,
    values::Text,
};

/// Header slots for a request head; a head with more goes to hyper (which allows 100).
const MAX_HEADERS: usize = 64;
/// A head not complete within this many bytes goes to hyper (which allows ~400 KiB).
const HEAD_LIMIT: usize = 64 * 1024;
/// Bodies up to this size are copied behind the head: one write, one packet.
const COPY_BODY: usize = 16 * 1024;
/// Whether a connection is worth keeping in the fast path. Measured (callgrind, release): a hit
/// costs ~7k instructions here against ~18.6k through hyper (saves ~11.6k); a hand-over
/// costs 7–9k more than the same request on a hyper connection (a new hyper connection: its
/// buffers and header map, which a long-lived one reuses). So hits count +4, hand-overs −3
/// (about 11.6 : 8.9, erring towards leaving), and the connection leaves once it is clearly
/// losing: four hand-overs in a row from the start, or any mix with fewer than ~3 hits per 4
/// hand-overs. The credit is capped, so a connection whose traffic turns to misses leaves
/// within about 16 requests.
#[derive(Default)]
struct Payoff(i32);

impl Payoff {
    const HIT: i32 = 4;
    const HANDOVER: i32 = 3;
    const CAP: i32 = 36;
    const FLOOR: i32 = -9;

    fn hit(&mut self) {
        self.0 = (self.0 + Self::HIT).min(Self::CAP);
    }

    /// Counts a hand-over; `false` when the connection should leave the fast path.
    fn handover(&mut self) -> bool {
        self.0 -= Self::HANDOVER;
        self.0 >= Self::FLOOR
    }
}

/// What to do with the bytes at the front of the buffer.
enum Step {
    /// No complete head yet.
    Read,
    /// A hit the fast path answers: the head's length and what to write.
    Hit { head_len: usize, answer: Box<HitAnswer>, head_only: bool },
    /// A request hyper answers alone: its head's length and its body's.
    HandOne { head_len: usize, body_len: u64 },
    /// The connection goes to hyper for good.
    HandOver,
}

/// Serves one accepted connection until it closes or leaves for hyper.
pub async fn serve(
    conns: Arc<Conns>,
    mut stream: TcpStream,
    peer: SocketAddr,
    watcher: Watcher,
    closing: watch::Receiver<bool>,
) {
    let mut buf = Buffer::new();
    let mut out = Vec::with_capacity(1024);
    let mut worth = Payoff::default();
    let timeout = conns.header_read_timeout;
    // The wait for a head starts at `waiting_since`; the timer is armed once and moved on
    // only when it fires early, not for every request.
    let mut waiting_since = Instant::now();
    let timer = tokio::time::sleep(timeout);
    tokio::pin!(timer);
    // One future for the whole connection: made per wait, it would cost more than a hit.
    let closed_rx = closing.clone();
    let closed = closed(closing);
    tokio::pin!(closed);
    // How much of a partial head was parsed already: it is parsed again only once bytes that
    // may end it arrive (as hyper does), so a head sent byte by byte costs linear time.
    let mut partial = 0;
    loop {
        let now = if partial > 0 && !may_end_head(buf.data(), partial) {
            Step::Read
        } else {
            step(&conns, buf.data(), peer)
        };
        partial = 0;
        match now {
            Step::Read => {
                partial = buf.len();
                if buf.len() >= HEAD_LIMIT {
                    return leave(&conns, stream, buf.data(), peer, watcher, &closed_rx).await;
                }
                let idle = buf.is_empty();
                tokio::select! {
                    biased;
                    read = stream.read(buf.spare()) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.filled(n),
                    },
                    () = &mut timer => {
                        if waiting_since.elapsed() >= timeout {
                            tracing::debug!(%peer, "no complete request head within the header read timeout");
                            return;
                        }
                        timer.as_mut().reset((waiting_since + timeout).into());
                    }
                    () = &mut closed, if idle => return,
                }
            }
            Step::Hit { head_len, answer, head_only } => {
                buf.consume(head_len);
                worth.hit();
                // Shutting down: the client is told this is the connection's last answer.
                let last = *closed_rx.borrow();
                out.clear();
                let (finish, body) = match *answer {
                    HitAnswer::Hit { hit, id, limit, finish } => {
                        out.extend_from_slice(&hit.head.wire);
                        if !hit.head.dated {
                            date_line(&mut out);
                        }
                        if let Some(limit) = &limit {
                            limit.lines(&mut out);
                        }
                        header_line(&mut out, b"x-request-id", id.as_bytes());
                        (finish, hit.body)
                    }
                    HitAnswer::Refused { response, finish } => (finish, refusal(*response, &mut out)),
                };
                if last {
                    header_line(&mut out, b"connection", b"close");
                }
                out.extend_from_slice(b"\r\n");
                let body = if head_only { &[][..] } else { &body[..] };
                let written = if body.len() <= COPY_BODY {
                    out.extend_from_slice(body);
                    stream.write_all(&out).await
                } else {
                    write_all_vectored(&mut stream, &out, body).await
                };
                finish.done(if written.is_ok() { body.len() as u64 } else { 0 });
                if written.is_err() || last {
                    return;
                }
                waiting_since = Instant::now();
            }
            Step::HandOne { head_len, body_len } => {
                if !worth.handover() {
                    return leave(&conns, stream, buf.data(), peer, watcher, &closed_rx).await;
                }
                let buffered = (buf.len() - head_len).min(usize::try_from(body_len).unwrap_or(usize::MAX));
                let pending = Bytes::copy_from_slice(&buf.data()[..head_len + buffered]);
                buf.consume(head_len + buffered);
                let signal = Arc::new(Signal::default());
                let io = OneRequest {
                    stream,
                    pending,
                    remaining: body_len - buffered as u64,
                    signal: signal.clone(),
                    answered: false,
                    ended: false,
                };
                let mut conn = conns
                    .one
                    .serve_connection(TokioIo::new(io), signalled_service(&conns, peer, signal.clone()));
                // hyper's own end (not `without_shutdown`): it flushes all it wrote before it
                // shuts the socket, which `OneRequest` turns into a no-op.
                let (served, told) = run(Pin::new(&mut conn), &signal.taken, closed.as_mut()).await;
                match served {
                    Ok(()) => {
                        let parts = conn.into_parts();
                        let io = parts.io.into_inner();
                        // The socket goes on only after hyper found the input's end while
                        // idle, with the request read whole: not after an answer that left
                        // part of the body unread (the next request's start is unknown), nor
                        // when hyper closed the connection itself.
                        if told
                            || !io.ended
                            || !parts.read_buf.is_empty()
                            || !io.pending.is_empty()
                            || io.remaining > 0
                        {
                            return;
                        }
                        stream = io.stream;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "connection ended with an error");
                        return;
                    }
                }
                waiting_since = Instant::now();
            }
            Step::HandOver => return leave(&conns, stream, buf.data(), peer, watcher, &closed_rx).await,
        }
    }
}

/// Ends when the sidecar closes its connections (at once if it does already).
async fn closed(mut closing: watch::Receiver<bool>) {
    // An error means the sender is gone: the sidecar stopped.
    let _ = closing.wait_for(|c| *c).await;
}

/// Hands the connection to hyper for good, with the bytes read and not answered.
async fn leave(
    conns: &Conns,
    stream: TcpStream,
    read: &[u8],
    peer: SocketAddr,
    watcher: Watcher,
    closing: &watch::Receiver<bool>,
) {
    let taken = Arc::new(AtomicBool::new(read.is_empty()));
    let io = Prefixed { pending: Bytes::copy_from_slice(read), stream, taken: taken.clone() };
    let conn = conns
        .auto
        .serve_connection_with_upgrades(
            TokioIo::new(io),
            crate::sidecar::proxy_service(conns.sidecar.clone(), peer),
        )
        .into_owned();
    // The watcher is held to the end: the sidecar waits for this connection as for any other
    // (it is not asked to watch it: it would signal before hyper's first read, see `run`).
    let closed = std::pin::pin!(closed(closing.clone()));
    let (ended, _) = run(std::pin::pin!(conn), &taken, closed).await;
    drop(watcher);
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Runs a hyper connection to its end. Once the sidecar is closing, hyper is asked to shut
/// down gracefully (it then answers with `Connection: close`), but only once it has the bytes
/// the fast path passed on (`taken`): asked before, it would drop that request unanswered. Returns
/// the end and whether hyper was asked.
async fn run<C: GracefulConnection>(
    mut conn: Pin<&mut C>,
    taken: &AtomicBool,
    mut closed: Pin<&mut impl Future<Output = ()>>,
) -> (Result<(), C::Error>, bool) {
    let mut asked = false;
    let ended = std::future::poll_fn(|cx| {
        let polled = conn.as_mut().poll(cx);
        if polled.is_pending()
            && !asked
            && taken.load(Ordering::Acquire)
            && closed.as_mut().poll(cx).is_ready()
        {
            asked = true;
            conn.as_mut().graceful_shutdown();
            return conn.as_mut().poll(cx);
        }
        polled
    })
    .await;
    (ended, asked)
}

/// The proxy service for one handed-over request: its response body tells the socket
/// wrapper when it is done ([`Signal`]).
fn signalled_service(
    conns: &Conns,
    peer: SocketAddr,
    signal: Arc<Signal>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<Signalled>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<hyper::Response<Signalled>, std::convert::Infallible>> + Send,
> {
    let sidecar = conns.sidecar.clone();
    hyper::service::service_fn(move |req| {
        let (sidecar, signal) = (sidecar.clone(), signal.clone());
        let req = Box::new(req);
        async move {
            let resp = sidecar.proxy.handle(req, peer).await;
            Ok(resp.map(|body| Signalled { body, signal }))
        }
    })
}

/// Between a handed-over request's response body and its socket wrapper: set when hyper is
/// done with the body (it drops it after its last frame, or on an error).
#[derive(Default)]
struct Signal {
    /// hyper has read the bytes the fast path had (the request's head at least).
    taken: AtomicBool,
    body_done: AtomicBool,
    reader: AtomicWaker,
}

pin_project_lite::pin_project! {
    /// A response body that sets [`Signal::body_done`] when dropped.
    struct Signalled {
        #[pin]
        body: ProxyBody,
        signal: Arc<Signal>,
    }

    impl PinnedDrop for Signalled {
        fn drop(this: Pin<&mut Self>) {
            this.signal.body_done.store(true, Ordering::Release);
            this.signal.reader.wake();
        }
    }
}

impl http_body::Body for Signalled {
    type Data = Bytes;
    type Error = <ProxyBody as http_body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Parses the head at the front of `data` and decides who answers it.
fn step(conns: &Conns, data: &[u8], peer: SocketAddr) -> Step {
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(data, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Step::Read,
        // hyper answers what httparse refuses (400, 431) and HTTP/2's preface.
        Err(_) => return Step::HandOver,
    };
    if req.version != Some(1) {
        return Step::HandOver;
    }
    let (Some(method), Some(target)) = (req.method, req.path) else { return Step::HandOver };
    let mut content_length = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            if content_length.is_some() {
                return Step::HandOver;
            }
            match plain_length(h.value) {
                Some(n) => content_length = Some(n),
                None => return Step::HandOver,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
            || (name.eq_ignore_ascii_case(b"connection") && !h.value.eq_ignore_ascii_case(b"keep-alive"))
        {
            return Step::HandOver;
        }
    }
    if method == "CONNECT" {
        return Step::HandOver;
    }
    let body_len = content_length.unwrap_or(0);
    let method = match method {
        "GET" => &Method::GET,
        "HEAD" => &Method::HEAD,
        _ => return Step::HandOne { head_len, body_len },
    };
    if body_len > 0 || !plain_target(target) {
        return Step::HandOne { head_len, body_len };
    }
    let request = HitRequest { peer, method, target, headers: Raw(req.headers) };
    match conns.sidecar.proxy.fast_hit(&request) {
        Some(answer) => Step::Hit { head_len, answer: Box::new(answer), head_only: method == Method::HEAD },
        None => Step::HandOne { head_len, body_len },
    }
}

/// The head lines (status, headers, `Content-Length`, `Date`) of a response the sidecar made
/// itself (a limit's refusal: a problem+json body, whole), and its body.
fn refusal(response: hyper::Response<ProxyBody>, out: &mut Vec<u8>) -> Bytes {
    let (parts, body) = response.into_parts();
    let mut body = std::pin::pin!(body);
    // A body the sidecar made is whole already: its one frame is ready at once.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let bytes = match http_body::Body::poll_frame(body.as_mut(), &mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    };
    status_line(out, parts.status);
    for (name, value) in &parts.headers {
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let mut length = Text::default();
    length.push_u64(bytes.len() as u64);
    header_line(out, b"content-length", length.as_bytes());
    date_line(out);
    bytes
}

/// Whether the bytes after the first `parsed` (and the three before, where an end may start)
/// hold an end of head: a blank line, CRLF or bare LF as httparse accepts.
fn may_end_head(data: &[u8], parsed: usize) -> bool {
    let from = parsed.saturating_sub(3);
    data[from..].windows(2).any(|w| w == b"\n\n" || w == b"\n\r")
}

/// A `Content-Length` of digits only (what hyper also accepts, less its rare list forms).
fn plain_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// An origin-form target of the characters RFC 3986 allows in a path and query, without a
/// fragment: the fast path reads it as `http::Uri` would (anything else goes to hyper).
fn plain_target(t: &str) -> bool {
    static ALLOWED: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            table[b] = c.is_ascii_alphanumeric();
            b += 1;
        }
        let extra = b"-._~!$&'()*+,;=:@/?%";
        let mut i = 0;
        while i < extra.len() {
            table[extra[i] as usize] = true;
            i += 1;
        }
        table
    };
    t.starts_with('/') && t.bytes().all(|b| ALLOWED[b as usize])
}

/// A `Date` line, as hyper adds to responses without one: the text is made once a second.
fn date_line(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second || text.is_empty() {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        header_line(out, b"date", text.as_bytes());
    });
}

async fn write_all_vectored(stream: &mut TcpStream, head: &[u8], body: &[u8]) -> io::Result<()> {
    let mut bufs = [IoSlice::new(head), IoSlice::new(body)];
    let mut slices = &mut bufs[..];
    while !slices.is_empty() {
        let n = stream.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// The fast path's read buffer: bytes at `start..end` of `data`, moved to the front only when a
/// partial head must grow.
struct Buffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buffer {
    fn new() -> Self {
        Self { data: vec![0; 8 * 1024], start: 0, end: 0 }
    }

    fn data(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room to read into, made at the end (a partial head moves to the front, or the buffer
    /// doubles, up to a little over [`HEAD_LIMIT`]).
    fn spare(&mut self) -> &mut [u8] {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown = (self.data.len() * 2).min(HEAD_LIMIT + 8 * 1024);
                self.data.resize(grown.max(self.data.len() + 1024), 0);
            }
        }
        &mut self.data[self.end..]
    }

    fn filled(&mut self, n: usize) {
        self.end += n;
    }
}

/// Gives hyper what the fast path read first, as much as `buf` takes; `taken` once all of it is.
/// `false` when nothing is left to give (the socket's turn).
fn replay_into(pending: &mut Bytes, buf: &mut ReadBuf<'_>, taken: &AtomicBool) -> bool {
    if pending.is_empty() {
        return false;
    }
    let n = pending.len().min(buf.remaining());
    buf.put_slice(&pending[..n]);
    pending.advance(n);
    if pending.is_empty() {
        taken.store(true, Ordering::Release);
    }
    true
}

/// The socket wrappers write straight to the socket.
macro_rules! write_to_stream {
    () => {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.stream).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.stream.is_write_vectored()
        }
    };
}

/// The socket for one request handed to hyper: the request's bytes read already, then at
/// most `remaining` more (the rest of its body). Past those, reads wait, watching the client
/// (a client that closes ends the request, as on a plain hyper connection), until the answer
/// is out: hyper's response body is done and hyper has flushed (it flushes the socket only
/// with its own buffer empty). Then the input ends: hyper, idle, finds the end and gives the
/// socket back (its shutdown of the socket, after flushing, is a no-op here).
struct OneRequest {
    stream: TcpStream,
    pending: Bytes,
    remaining: u64,
    signal: Arc<Signal>,
    /// The response is written whole.
    answered: bool,
    /// hyper was given the input's end after the answer.
    ended: bool,
}

impl AsyncRead for OneRequest {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if replay_into(&mut this.pending, buf, &this.signal.taken) {
            return Poll::Ready(Ok(()));
        }
        if this.remaining > 0 {
            let max = usize::try_from(this.remaining).unwrap_or(usize::MAX).min(buf.remaining());
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(max));
            std::task::ready!(Pin::new(&mut this.stream).poll_read(cx, &mut limited))?;
            let n = limited.filled().len();
            buf.advance(n);
            this.remaining -= n as u64;
            return Poll::Ready(Ok(()));
        }
        if this.answered {
            this.ended = true;
            return Poll::Ready(Ok(()));
        }
        this.signal.reader.register(cx.waker());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        match this.stream.poll_peek(cx, &mut probe) {
            // The client closed: hyper sees the input end in the middle of its request.
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // The next request is there already: it waits for this one's answer (the signal
            // wakes this reader).
            Poll::Ready(Ok(_)) | Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for OneRequest {
    write_to_stream!();

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(Pin::new(&mut this.stream).poll_flush(cx))?;
        // hyper flushes the socket once its buffer is written out: after the body is done,
        // that is the whole answer.
        if !this.answered && this.signal.body_done.load(Ordering::Acquire) {
            this.answered = true;
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    /// hyper's end of the connection, its output flushed: the fast path decides what comes next.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The socket handed to hyper for good, with the bytes the fast path read first (`taken` once
/// hyper has them all).
struct Prefixed {
    pending: Bytes,
    stream: TcpStream,
    taken: Arc<AtomicBool>,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if replay_into(&mut this.pending, buf, &this.taken) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    write_to_stream!();

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worth_follows_the_mix() {
        let run = |pattern: &[bool], rounds: usize| {
            let mut w = Payoff::default();
            for _ in 0..rounds {
                for &hit in pattern {
                    if hit {
                        w.hit();
                    } else if !w.handover() {
                        return false;
                    }
                }
            }
            true
        };
        assert!(!run(&[false; 4], 1), "four hand-overs from the start leave");
        assert!(run(&[false; 3], 1));
        assert!(run(&[true, false], 1000), "half hits stay");
        assert!(run(&[true, true, true, false, false, false, false], 1000), "3 hits per 4 hand-overs stay");
        assert!(!run(&[true, false, false, false], 1000), "1 hit per 3 hand-overs leaves");
        // After a long run of hits, a turn to misses leaves within 16 hand-overs.
        let mut w = Payoff::default();
        (0..1000).for_each(|_| w.hit());
        assert_eq!((0..20).position(|_| !w.handover()), Some(15));
    }

    #[test]
    fn lengths_and_targets() {
        assert_eq!(plain_length(b"0"), Some(0));
        assert_eq!(plain_length(b"1234"), Some(1234));
        for bad in [&b""[..], b"+1", b"1,1", b" 1", b"-0", b"99999999999999999999"] {
            assert_eq!(plain_length(bad), None, "{bad:?}");
        }
        assert!(plain_target("/a/b?c=1&d=%20"));
        for bad in ["*", "http://x/a", "/a#f", "/a b", "/a\"b", "/{x}", "/a\\b"] {
            assert!(!plain_target(bad), "{bad}");
        }
    }

    #[test]
    fn buffer_keeps_partial_heads() {
        let mut b = Buffer::new();
        let n = b.spare().len();
        b.spare()[..n].fill(b'x');
        b.filled(n);
        b.consume(n - 10);
        assert_eq!(b.len(), 10);
        let room = b.spare().len();
        assert_eq!(room, n - 10, "the partial head moved to the front");
        assert_eq!(b.data(), &[b'x'; 10][..]);
        b.spare()[..room].fill(b'y');
        b.filled(room);
        assert!(b.spare().len() >= 1024, "a full buffer with a head at the front grows");
        assert_eq!(b.len(), n);
    }
}
