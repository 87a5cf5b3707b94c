//! The headers a rate limit puts on the answers of its route: the IETF draft's
//! `RateLimit-Policy` and `RateLimit`, and the older `X-RateLimit-*`.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The response headers a limit writes.
pub const HEADER_NAMES: [&str; 5] =
    ["ratelimit-policy", "ratelimit", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"];

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Headers for a response the limit applied to.
#[derive(Debug)]
pub struct Applied {
    headers: [(HeaderName, HeaderValue); 5],
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
        Self {
            headers: [
                (RATELIMIT_POLICY.clone(), policy),
                (RATELIMIT.clone(), ratelimit),
                (X_LIMIT.clone(), limit),
                (X_REMAINING.clone(), remaining),
                (X_RESET.clone(), reset),
            ],
        }
    }

    /// The headers as HTTP/1.1 lines, for the cache-hit fast path.
    pub fn lines(&self, out: &mut Vec<u8>) {
        for (name, value) in &self.headers {
            crate::headers::header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }

    pub fn write(self, headers: &mut HeaderMap) {
        headers.reserve(self.headers.len());
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
    }
}
