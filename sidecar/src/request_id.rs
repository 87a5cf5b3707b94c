//! Request ids: every request carries one to the app and back to the client (`X-Request-Id`),
//! and in the access log and problem answers.

use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;

use crate::headers::{RequestHeaders, X_REQUEST_ID};

/// Request ids: the client's `X-Request-Id` when it is sane, else a new one made of a random
/// per-process prefix and a counter (unique without coordination, cheap to make).
pub struct RequestIds {
    prefix: u64,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIds {
    pub fn new() -> Self {
        Self { prefix: fastrand::u64(..), next: AtomicU64::new(fastrand::u64(..)) }
    }

    pub fn for_request(&self, headers: &impl RequestHeaders) -> HeaderValue {
        match headers.first(&X_REQUEST_ID).filter(|v| sane_id(v)) {
            Some(_) => headers.owned(&X_REQUEST_ID).unwrap_or_else(|| self.make()),
            None => self.make(),
        }
    }

    fn make(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        hex16(self.prefix, &mut buf[..16]);
        hex16(n, &mut buf[16..]);
        crate::values::cut(&buf).expect("hex digits are a valid header value")
    }
}

fn sane_id(v: &[u8]) -> bool {
    (1..=128).contains(&v.len()) && v.iter().all(|b| b.is_ascii_graphic())
}

fn hex16(n: u64, out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;
    use crate::headers::Raw;

    #[test]
    fn request_ids_are_kept_or_made() {
        let ids = RequestIds::new();
        let mut h = HeaderMap::new();
        let a = ids.for_request(&h);
        let b = ids.for_request(&h);
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(ids.for_request(&h), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        assert_ne!(ids.for_request(&h), "has space");
        // The same judgement from a request head's bytes (the hit fast path's).
        let raw = |value: &'static str| [httparse::Header { name: "X-Request-ID", value: value.as_bytes() }];
        assert_eq!(ids.for_request(&Raw(&raw("abc-123"))), "abc-123");
        assert_ne!(ids.for_request(&Raw(&raw("has space"))), "has space");
        assert_eq!(ids.for_request(&Raw(&[])).len(), 32);
    }
}
