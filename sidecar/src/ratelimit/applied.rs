//! The headers a rate limit puts on the answers of its route: the IETF draft's
//! `RateLimit-Policy` and `RateLimit`, and the older `X-RateLimit-*`.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The response headers a limit writes.
pub const HEADER_NAMES: [&str; 5] =
    ["ratelimit-policy", "ratelimit", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"];

/// [`HEADER_NAMES`] as header names, in the same order as an [`Applied`]'s values.
static NAMES: [HeaderName; 5] = [
    HeaderName::from_static(HEADER_NAMES[0]),
    HeaderName::from_static(HEADER_NAMES[1]),
    HeaderName::from_static(HEADER_NAMES[2]),
    HeaderName::from_static(HEADER_NAMES[3]),
    HeaderName::from_static(HEADER_NAMES[4]),
];

/// Headers for a response the limit applied to: the values only, the names are [`NAMES`]
/// (a limited request carries this in its future until the response is written: 200 bytes
/// where name and value pairs took 360).
#[derive(Debug)]
pub struct Applied {
    values: [HeaderValue; 5],
}

impl Applied {
    /// `RateLimit-Policy`, `RateLimit`, `X-RateLimit-Limit`, `-Remaining` and `-Reset`.
    pub fn new(
        policy: HeaderValue,
        ratelimit: HeaderValue,
        limit: HeaderValue,
        remaining: HeaderValue,
        reset: HeaderValue,
    ) -> Self {
        Self { values: [policy, ratelimit, limit, remaining, reset] }
    }

    /// The headers as HTTP/1.1 lines, for the cache-hit fast path.
    pub fn lines(&self, out: &mut Vec<u8>) {
        for (name, value) in NAMES.iter().zip(&self.values) {
            crate::headers::header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }

    pub fn write(self, headers: &mut HeaderMap) {
        headers.reserve(self.values.len());
        for (name, value) in NAMES.iter().zip(self.values) {
            headers.insert(name.clone(), value);
        }
    }
}
