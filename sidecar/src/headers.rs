//! Request headers as the route matcher and the cache's hit path read them: from hyper's
//! `HeaderMap`, or straight from the parsed bytes of an HTTP/1 request head (the cache-hit
//! fast path), so that a hit needs no map built.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// The request id header, kept or made for every request.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub trait RequestHeaders {
    /// The first value of `name` (what `HeaderMap::get` gives).
    fn first(&self, name: &HeaderName) -> Option<&[u8]>;
    /// Whether any value of `name` is exactly `value`.
    fn any_is(&self, name: &HeaderName, value: &[u8]) -> bool;
    /// Every value of `name`, in order.
    fn all<'s>(&'s self, name: &'s HeaderName) -> impl DoubleEndedIterator<Item = &'s [u8]>;
    /// The names present (in any case; a name sent twice may come twice).
    fn names(&self) -> impl Iterator<Item = &[u8]>;
    /// The first value of `name` as a value of its own (a map's is shared, not copied).
    fn owned(&self, name: &HeaderName) -> Option<HeaderValue>;
}

/// Whether a value is text as `HeaderValue::to_str` judges it: visible ASCII, space or tab.
pub fn is_text(value: &[u8]) -> bool {
    value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// A value as text, as `HeaderValue::to_str` reads it: `None` unless [`is_text`].
pub fn text(value: &[u8]) -> Option<&str> {
    if is_text(value) { std::str::from_utf8(value).ok() } else { None }
}

/// An HTTP/1.1 status line as hyper writes it: a reason always (many parsers expect one).
pub fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// An HTTP/1.1 header line.
pub fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

impl RequestHeaders for HeaderMap {
    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }

    fn any_is(&self, name: &HeaderName, value: &[u8]) -> bool {
        self.get_all(name).iter().any(|v| v.as_bytes() == value)
    }

    fn all<'s>(&'s self, name: &'s HeaderName) -> impl DoubleEndedIterator<Item = &'s [u8]> {
        self.get_all(name).into_iter().map(|v| v.as_bytes())
    }

    fn names(&self) -> impl Iterator<Item = &[u8]> {
        self.keys().map(|n| n.as_str().as_bytes())
    }

    fn owned(&self, name: &HeaderName) -> Option<HeaderValue> {
        self.get(name).cloned()
    }
}

/// The headers of a request head as `httparse` found them: names in any case, values as sent
/// (httparse trims the whitespace around them, as for the values hyper puts in a map).
#[derive(Clone, Copy)]
pub struct Raw<'a>(pub &'a [httparse::Header<'a>]);

/// Whether a name on the wire (any case) is `lower` (HeaderName's text: lowercase already, so
/// only one side is folded).
#[inline]
fn is(wire: &str, lower: &[u8]) -> bool {
    let wire = wire.as_bytes();
    wire.len() == lower.len() && wire.iter().zip(lower).all(|(w, l)| w.to_ascii_lowercase() == *l)
}

impl RequestHeaders for Raw<'_> {
    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        let name = name.as_str().as_bytes();
        self.0.iter().find(|h| is(h.name, name)).map(|h| h.value)
    }

    fn any_is(&self, name: &HeaderName, value: &[u8]) -> bool {
        let name = name.as_str().as_bytes();
        self.0.iter().any(|h| is(h.name, name) && h.value == value)
    }

    fn all<'s>(&'s self, name: &'s HeaderName) -> impl DoubleEndedIterator<Item = &'s [u8]> {
        let name = name.as_str().as_bytes();
        self.0.iter().filter(move |h| is(h.name, name)).map(|h| h.value)
    }

    fn names(&self) -> impl Iterator<Item = &[u8]> {
        self.0.iter().map(|h| h.name.as_bytes())
    }

    fn owned(&self, name: &HeaderName) -> Option<HeaderValue> {
        self.first(name).and_then(crate::values::cut)
    }
}

/// `requestHeaders` parsed once per config.
#[derive(Debug, Default)]
pub struct HeaderRules {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderRules {
    /// Validation refuses what does not parse; a config that skipped it has the entry named.
    pub fn new(config: &apipolicy_api::HeaderRulesConfig) -> Result<Self, String> {
        let name =
            |n: &str| HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{n:?} is not a header name"));
        Ok(Self {
            remove: config.remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
            set: config
                .set
                .iter()
                .map(|(n, v)| {
                    let value = HeaderValue::from_str(v)
                        .map_err(|_| format!("the value of {n} is not a header value"))?;
                    Ok((name(n)?, value))
                })
                .collect::<Result<_, String>>()?,
        })
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, header};

    use super::*;

    #[test]
    fn raw_and_map_read_alike() {
        let raw = [
            httparse::Header { name: "Host", value: b"a.example" },
            httparse::Header { name: "ACCEPT", value: b"text/html" },
            httparse::Header { name: "accept", value: b"application/json" },
        ];
        let mut map = HeaderMap::new();
        map.insert(header::HOST, HeaderValue::from_static("a.example"));
        map.append(header::ACCEPT, HeaderValue::from_static("text/html"));
        map.append(header::ACCEPT, HeaderValue::from_static("application/json"));
        let raw = Raw(&raw);
        for name in [header::HOST, header::ACCEPT, header::RANGE] {
            assert_eq!(raw.first(&name), map.first(&name), "{name}");
            assert!(raw.all(&name).eq(map.all(&name)), "{name}");
            assert!(raw.all(&name).rev().eq(map.all(&name).rev()), "{name}");
            for value in [&b"a.example"[..], b"application/json", b"text/html", b""] {
                assert_eq!(raw.any_is(&name, value), map.any_is(&name, value), "{name} {value:?}");
            }
        }
    }
}
