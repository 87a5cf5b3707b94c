//! Conditional requests (RFC 9110 §13) against a response the sidecar holds whole.

use std::time::SystemTime;

use http::{HeaderMap, HeaderValue, header};

/// A strong validator for a response the app sent without one: the 128-bit XXH3 hash `h` of
/// its body, made while the body streamed in.
pub fn etag_of_hash(h: u128) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{h:032x}\"")).expect("hex is a valid header value")
}

/// The entity-tag of an encoded form: a strong tag must differ per representation.
pub fn encoded_etag(etag: &HeaderValue, coding: &str) -> Option<HeaderValue> {
    let s = etag.to_str().ok()?;
    let (weak, tag) = s.strip_prefix("W/").map_or((false, s), |t| (true, t));
    let inner = tag.strip_prefix('"')?.strip_suffix('"')?;
    HeaderValue::from_str(&format!("{}\"{inner}-{coding}\"", if weak { "W/" } else { "" })).ok()
}

fn opaque(tag: &str) -> &str {
    tag.trim().strip_prefix("W/").unwrap_or(tag.trim())
}

/// Whether `If-None-Match` (weak comparison) or, without it, `If-Modified-Since` says the
/// client's copy is current, so a 304 answers.
pub fn not_modified(
    request: &HeaderMap,
    etag: Option<&HeaderValue>,
    last_modified: Option<&HeaderValue>,
) -> bool {
    let inm: Vec<&str> = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if !inm.is_empty() {
        let Some(ours) = etag.and_then(|e| e.to_str().ok()) else { return false };
        return inm.iter().any(|t| *t == "*" || opaque(t) == opaque(ours));
    }
    // The stored Last-Modified is parsed only for a request that asks.
    let Some(since) =
        request.get(header::IF_MODIFIED_SINCE).and_then(|v| v.to_str().ok()).and_then(parse_date)
    else {
        return false;
    };
    last_modified.and_then(|v| v.to_str().ok()).and_then(parse_date).is_some_and(|modified| modified <= since)
}

fn parse_date(s: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(s.trim()).ok()
}

/// The headers a 304 carries (RFC 9110 §15.4.5): those a 200 would have sent among
/// Cache-Control, Content-Location, Date, ETag, Expires and Vary, plus Age and Last-Modified.
pub fn not_modified_headers(full: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::VARY,
        header::AGE,
        header::LAST_MODIFIED,
    ] {
        for v in full.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let tag = HeaderValue::from_static("\"abc\"");
        assert!(not_modified(&req(&[("if-none-match", "\"abc\"")]), Some(&tag), None));
        assert!(not_modified(&req(&[("if-none-match", "W/\"abc\"")]), Some(&tag), None));
        assert!(not_modified(&req(&[("if-none-match", "\"x\", \"abc\"")]), Some(&tag), None));
        assert!(not_modified(&req(&[("if-none-match", "*")]), Some(&tag), None));
        assert!(!not_modified(&req(&[("if-none-match", "\"abd\"")]), Some(&tag), None));
        assert!(!not_modified(&req(&[("if-none-match", "\"abc\"")]), None, None));
    }

    #[test]
    fn if_modified_since_only_without_if_none_match() {
        let lm = HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT");
        assert!(not_modified(
            &req(&[("if-modified-since", "Wed, 21 Oct 2015 07:28:00 GMT")]),
            None,
            Some(&lm)
        ));
        assert!(not_modified(
            &req(&[("if-modified-since", "Thu, 22 Oct 2015 07:28:00 GMT")]),
            None,
            Some(&lm)
        ));
        assert!(!not_modified(
            &req(&[("if-modified-since", "Tue, 20 Oct 2015 07:28:00 GMT")]),
            None,
            Some(&lm)
        ));
        assert!(!not_modified(&req(&[("if-modified-since", "garbage")]), None, Some(&lm)));
        let tag = HeaderValue::from_static("\"abc\"");
        assert!(
            !not_modified(
                &req(&[("if-none-match", "\"zzz\""), ("if-modified-since", "Thu, 22 Oct 2015 07:28:00 GMT")]),
                Some(&tag),
                Some(&lm)
            ),
            "If-None-Match wins over If-Modified-Since"
        );
    }

    fn etag_for(body: &[u8]) -> HeaderValue {
        etag_of_hash(xxhash_rust::xxh3::xxh3_128(body))
    }

    #[test]
    fn etags() {
        let mut streamed = xxhash_rust::xxh3::Xxh3::new();
        streamed.update(b"hel");
        streamed.update(b"lo");
        assert_eq!(etag_of_hash(streamed.digest128()), etag_for(b"hello"));
        let a = etag_for(b"hello");
        assert_eq!(a, etag_for(b"hello"));
        assert_ne!(a, etag_for(b"hello!"));
        assert_eq!(a.len(), 34);
        assert_eq!(encoded_etag(&HeaderValue::from_static("\"abc\""), "br").unwrap(), "\"abc-br\"");
        assert_eq!(encoded_etag(&HeaderValue::from_static("W/\"abc\""), "gzip").unwrap(), "W/\"abc-gzip\"");
    }
}
