//! Route matching: compiled once per config, then no allocation or regex compile per request.

use std::borrow::Cow;

use apipolicy_api::{
    CompiledSpec, EscapedSlashes, Method as ApiMethod, PathConfig, PathNormalizationConfig, prefix_matches,
};
use http::{HeaderName, HeaderValue, Method};
use regex::Regex;

use crate::headers::RequestHeaders;

pub struct Router {
    matchers: Vec<Matcher>,
    normalization: PathNormalizationConfig,
}

struct Matcher {
    path: PathMatcher,
    /// Bit set of [`method_bit`]s; 0 matches every method.
    methods: u16,
    headers: Vec<(HeaderName, Option<HeaderValue>)>,
    ignore_case: bool,
    ignore_trailing_slash: bool,
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

/// Why a request path is refused before any route sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error(
        "the path holds an escaped slash (%2F or %5C), which this policy refuses (spec.pathNormalization.escapedSlashes: Reject)"
    )]
    EscapedSlash,
    #[error("the path holds an encoded NUL (%00)")]
    Nul,
}

impl Router {
    pub fn new(spec: &CompiledSpec) -> Result<Self, RouterError> {
        let matchers = spec
            .routes
            .iter()
            .map(|r| {
                let m = &r.matches;
                let path = match &m.path {
                    PathConfig::Any => PathMatcher::Any,
                    PathConfig::Prefix(p) => PathMatcher::Prefix(p.clone()),
                    PathConfig::Exact(p) => PathMatcher::Exact(p.clone()),
                    PathConfig::Regex(re) => PathMatcher::Regex(
                        compile_path_regex(re, m.ignore_case)
                            .map_err(|source| RouterError::Regex { route: r.name.clone(), source })?,
                    ),
                };
                let headers = m
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
                    methods: m.methods.iter().fold(0, |bits, m| bits | api_method_bit(*m)),
                    headers,
                    ignore_case: m.ignore_case,
                    ignore_trailing_slash: m.ignore_trailing_slash,
                })
            })
            .collect::<Result<_, RouterError>>()?;
        Ok(Self { matchers, normalization: spec.path_normalization })
    }

    /// The path routes match and the app receives (see [`normalize_path`]).
    pub fn normalize<'a>(&self, path: &'a str) -> Result<Cow<'a, str>, PathError> {
        normalize_path(path, self.normalization)
    }

    /// The index of the first route that matches a normalized path ([`Router::normalize`]);
    /// the last route matches everything.
    pub fn route(&self, method: &Method, path: &str, headers: &impl RequestHeaders) -> usize {
        let bit = method_bit(method);
        self.matchers
            .iter()
            .position(|m| {
                (m.methods == 0 || m.methods & bit != 0)
                    && m.headers.iter().all(|(name, value)| match value {
                        None => headers.first(name).is_some(),
                        Some(v) => headers.any_is(name, v.as_bytes()),
                    })
                    && (m.path_matches(path)
                        || (m.ignore_trailing_slash
                            && path.len() > 1
                            && path.ends_with('/')
                            && m.path_matches(&path[..path.len() - 1])))
            })
            .unwrap_or(self.matchers.len() - 1)
    }
}

impl Matcher {
    fn path_matches(&self, path: &str) -> bool {
        match &self.path {
            PathMatcher::Any => true,
            PathMatcher::Prefix(p) if self.ignore_case => {
                path.len() >= p.len()
                    && path.is_char_boundary(p.len())
                    && path[..p.len()].eq_ignore_ascii_case(p)
                    && prefix_matches(&path[..p.len()], path)
            }
            PathMatcher::Prefix(p) => prefix_matches(p, path),
            PathMatcher::Exact(p) if self.ignore_case => p.eq_ignore_ascii_case(path),
            PathMatcher::Exact(p) => p == path,
            PathMatcher::Regex(re) => re.is_match(path),
        }
    }
}

/// The regex of a `regex` path match, anchored, in any case when the route ignores case.
fn compile_path_regex(re: &str, ignore_case: bool) -> Result<Regex, regex::Error> {
    if ignore_case {
        regex::RegexBuilder::new(&format!("^(?:{re})$")).size_limit(1 << 20).case_insensitive(true).build()
    } else {
        apipolicy_api::compile_path_regex(re)
    }
}

/// The path routes are matched against and the app receives: dot segments removed,
/// percent-encoded unreserved characters decoded (RFC 3986 §6.2.2), repeated slashes merged
/// (unless the policy says not to), and escaped slashes refused, decoded or kept as the policy
/// says; so that `/api//login`, `/api/./login`, `/api/%6Cogin` and `/api%2Flogin` cannot slip
/// past a route for `/api/login`. An encoded NUL is always refused. Borrows when nothing needs
/// normalizing (the common case).
pub fn normalize_path(path: &str, how: PathNormalizationConfig) -> Result<Cow<'_, str>, PathError> {
    // One pass over the bytes (two substring searches cost more on the short paths of APIs).
    let b = path.as_bytes();
    let needs = b.iter().enumerate().any(|(i, &c)| {
        c == b'%'
            || (c == b'/'
                && match b.get(i + 1) {
                    Some(b'.') => true,
                    Some(b'/') => how.merge_slashes,
                    _ => false,
                })
    });
    if !needs {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path, how.escaped_slashes)?;
    let mut segments: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for (i, seg) in decoded.split('/').enumerate() {
        match seg {
            // The empty text before the leading slash; and empty segments, unless they stay.
            "" if i == 0 || how.merge_slashes => {}
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    // An empty segment at the end stands for the trailing slash, written below.
    if trailing && segments.last() == Some(&"") {
        segments.pop();
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (trailing && !out.ends_with('/')) {
        out.push('/');
    }
    Ok(if out == path { Cow::Borrowed(path) } else { Cow::Owned(out) })
}

/// Decodes the percent-encoded unreserved characters, and escaped slashes as `how` says.
fn decode(path: &str, how: EscapedSlashes) -> Result<String, PathError> {
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
            } else if c == 0 {
                return Err(PathError::Nul);
            } else if matches!(c, b'/' | b'\\') && how != EscapedSlashes::Keep {
                if how == EscapedSlashes::Reject {
                    return Err(PathError::EscapedSlash);
                }
                out.push(b'/');
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
    Ok(String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: PathNormalizationConfig =
        PathNormalizationConfig { escaped_slashes: EscapedSlashes::Keep, merge_slashes: true };

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
            ("/api//", "/api/"),
            ("/", "/"),
            ("/%", "/%"),
            ("/a%4", "/a%4"),
            ("/a%20b", "/a%20b"),
        ] {
            assert_eq!(normalize_path(raw, KEEP).unwrap(), want, "{raw}");
        }
        assert!(matches!(normalize_path("/api/products/7", KEEP), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalize_path("/a%20b", KEEP), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn escaped_slashes_are_refused_decoded_or_kept() {
        let reject = PathNormalizationConfig::default();
        let decode = PathNormalizationConfig { escaped_slashes: EscapedSlashes::DecodeAndForward, ..reject };
        for raw in ["/api%2Flogin", "/api%2flogin", "/%2Fapi%2Flogin", "/api%5Clogin", "/api%5c..%5clogin"] {
            assert_eq!(normalize_path(raw, reject), Err(PathError::EscapedSlash), "{raw}");
        }
        for (raw, want) in [
            ("/api%2Flogin", "/api/login"),
            ("/api%2flogin", "/api/login"),
            ("/%2Fapi%2Flogin", "/api/login"),
            ("/api%5Clogin", "/api/login"),
            ("/api/x%2F..%2Flogin", "/api/login"),
        ] {
            assert_eq!(normalize_path(raw, decode).unwrap(), want, "{raw}");
        }
        assert_eq!(normalize_path("/api%2flogin", KEEP).unwrap(), "/api%2Flogin");
        for how in [reject, decode, KEEP] {
            assert_eq!(normalize_path("/api/login%00.json", how), Err(PathError::Nul));
        }
    }

    #[test]
    fn slashes_stay_when_not_merged() {
        let keep = PathNormalizationConfig { merge_slashes: false, ..KEEP };
        assert!(matches!(normalize_path("/api//login", keep), Ok(Cow::Borrowed("/api//login"))));
        assert_eq!(normalize_path("/api//x/../login", keep).unwrap(), "/api//login");
    }

    fn router(routes: &str) -> Router {
        let policy = format!(
            "apiVersion: apipolicy.dev/v1alpha1\nkind: ApiPolicy\nmetadata: {{name: t}}\nspec:\n  selector: {{matchLabels: {{a: b}}}}\n  upstream: {{port: 8080}}\n  routes:\n{routes}"
        );
        let policy: apipolicy_api::ApiPolicy = serde_yaml::from_str(&policy).unwrap();
        Router::new(&apipolicy_api::compile(&policy).unwrap().spec).unwrap()
    }

    #[test]
    fn case_and_trailing_slash_match_only_when_the_route_says() {
        let r = router(
            "  - {name: strict, match: {path: {exact: /api/login}}}
  - {name: lenient, match: {path: {exact: /v2/login, ignoreCase: true, ignoreTrailingSlash: true}}}
  - {name: files, match: {path: {prefix: /Files, ignoreCase: true}}}
  - {name: re, match: {path: {regex: '/r/[a-z]+', ignoreCase: true}}}
",
        );
        let h = http::HeaderMap::new();
        let at = |p: &str| r.route(&Method::GET, p, &h);
        assert_eq!(at("/api/login"), 0);
        assert_eq!(at("/API/LOGIN"), 4);
        assert_eq!(at("/api/login/"), 4);
        assert_eq!(at("/V2/Login/"), 1);
        assert_eq!(at("/v2/login"), 1);
        assert_eq!(at("/v2/login//"), 4);
        assert_eq!(at("/files/a"), 2);
        assert_eq!(at("/FILES"), 2);
        assert_eq!(at("/filesystem"), 4);
        assert_eq!(at("/R/ABC"), 3);
    }
}
