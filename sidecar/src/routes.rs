//! Route matching: compiled once per config, then no allocation or regex compile per request.

use std::borrow::Cow;

use apipolicy_api::{CompiledSpec, Method as ApiMethod, PathConfig, compile_path_regex, prefix_matches};
use http::{HeaderName, HeaderValue, Method};
use regex::Regex;

use crate::headers::RequestHeaders;

pub struct Router {
    matchers: Vec<Matcher>,
}

struct Matcher {
    path: PathMatcher,
    /// Bit set of [`method_bit`]s; 0 matches every method.
    methods: u16,
    headers: Vec<(HeaderName, Option<HeaderValue>)>,
}

enum PathMatcher {
    Any,
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

fn method_bit(m: &Method) -> u16 {
    match *m {
        Method::GET => 1,
        Method::HEAD => 2,
        Method::POST => 4,
        Method::PUT => 8,
        Method::PATCH => 16,
        Method::DELETE => 32,
        Method::OPTIONS => 64,
        // Methods a policy cannot name match only routes that match every method.
        _ => 1 << 15,
    }
}

fn api_method_bit(m: ApiMethod) -> u16 {
    method_bit(&Method::from_bytes(m.as_str().as_bytes()).expect("API methods are valid"))
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("route {route}: {source}")]
    Regex { route: String, source: regex::Error },
    #[error("route {route}: invalid header match {name:?}")]
    Header { route: String, name: String },
}

impl Router {
    pub fn new(spec: &CompiledSpec) -> Result<Self, RouterError> {
        let matchers = spec
            .routes
            .iter()
            .map(|r| {
                let path = match &r.matches.path {
                    PathConfig::Any => PathMatcher::Any,
                    PathConfig::Prefix(p) => PathMatcher::Prefix(p.clone()),
                    PathConfig::Exact(p) => PathMatcher::Exact(p.clone()),
                    PathConfig::Regex(re) => PathMatcher::Regex(
                        compile_path_regex(re)
                            .map_err(|source| RouterError::Regex { route: r.name.clone(), source })?,
                    ),
                };
                let headers = r
                    .matches
                    .headers
                    .iter()
                    .map(|h| {
                        let bad = || RouterError::Header { route: r.name.clone(), name: h.name.clone() };
                        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad())?;
                        let value =
                            h.value.as_deref().map(HeaderValue::from_str).transpose().map_err(|_| bad())?;
                        Ok((name, value))
                    })
                    .collect::<Result<_, RouterError>>()?;
                Ok(Matcher {
                    path,
                    methods: r.matches.methods.iter().fold(0, |bits, m| bits | api_method_bit(*m)),
                    headers,
                })
            })
            .collect::<Result<_, RouterError>>()?;
        Ok(Self { matchers })
    }

    /// The index of the first route that matches; the last route matches everything.
    pub fn route(&self, method: &Method, path: &str, headers: &impl RequestHeaders) -> usize {
        let path = normalize_path(path);
        let bit = method_bit(method);
        self.matchers
            .iter()
            .position(|m| {
                (m.methods == 0 || m.methods & bit != 0)
                    && m.headers.iter().all(|(name, value)| match value {
                        None => headers.first(name).is_some(),
                        Some(v) => headers.any_is(name, v.as_bytes()),
                    })
                    && match &m.path {
                        PathMatcher::Any => true,
                        PathMatcher::Prefix(p) => prefix_matches(p, &path),
                        PathMatcher::Exact(p) => *p == *path,
                        PathMatcher::Regex(re) => re.is_match(&path),
                    }
            })
            .unwrap_or(self.matchers.len() - 1)
    }
}

/// The path a route is matched against: dot segments removed, repeated slashes merged, and
/// percent-encoded unreserved characters decoded (RFC 3986 §6.2.2), so that `/api//login`,
/// `/api/./login` and `/api/%6Cogin` cannot slip past a route for `/api/login`. The request
/// is forwarded unchanged. Borrows when nothing needs normalizing (the common case).
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    // One pass over the bytes (two substring searches cost more on the short paths of APIs).
    let b = path.as_bytes();
    let needs = b
        .iter()
        .enumerate()
        .any(|(i, &c)| c == b'%' || (c == b'/' && matches!(b.get(i + 1), Some(b'/' | b'.'))));
    if !needs {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (trailing && !out.ends_with('/')) {
        out.push('/');
    }
    Cow::Owned(out)
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let hex = |b: u8| (b as char).to_digit(16);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            let c = (h * 16 + l) as u8;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c);
            } else {
                // Reserved characters stay encoded, upper-cased as RFC 3986 prefers.
                out.extend_from_slice(&[
                    b'%',
                    bytes[i + 1].to_ascii_uppercase(),
                    bytes[i + 2].to_ascii_uppercase(),
                ]);
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    // Only ASCII was decoded, so valid UTF-8 stays valid.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths_that_could_bypass_a_route() {
        for (raw, want) in [
            ("/api/login", "/api/login"),
            ("/api//login", "/api/login"),
            ("/api/./login", "/api/login"),
            ("/api/x/../login", "/api/login"),
            ("/api/%6Cogin", "/api/login"),
            ("/api/%6c%6Fgin", "/api/login"),
            ("/../../api/login", "/api/login"),
            ("/api/a%2Fb", "/api/a%2Fb"),
            ("/api/a%2fb", "/api/a%2Fb"),
            ("/api/", "/api/"),
            ("/api/.", "/api/"),
            ("/", "/"),
            ("/%", "/%"),
            ("/a%4", "/a%4"),
        ] {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
        assert!(matches!(normalize_path("/api/products/7"), Cow::Borrowed(_)));
    }
}
