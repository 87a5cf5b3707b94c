//! Single byte ranges served from a complete stored response (RFC 9110 §14): a `Range` for
//! one range of a stored 200 gets a 206 with `Content-Range`; one that cannot be satisfied
//! gets a 416 with `Content-Range: bytes */length`. A request for several ranges, or in any
//! unit but bytes, or one that does not parse, gets the whole response (a server may ignore
//! `Range`, §14.2), as does one whose `If-Range` does not match the stored response.

use std::ops::RangeInclusive;

use http::{HeaderMap, HeaderValue, header};

/// What a `Range` asks of a body of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Wanted {
    /// The whole body (no `Range`, or one to ignore).
    Whole,
    /// These bytes.
    Part(RangeInclusive<u64>),
    /// Nothing it asks for exists (416).
    Unsatisfiable,
}

/// Reads a `Range` field value against a body of `len` bytes.
pub fn wanted(range: &[u8], len: u64) -> Wanted {
    let Some(spec) = std::str::from_utf8(range).ok().and_then(|r| strip_unit(r.trim())) else {
        return Wanted::Whole;
    };
    let mut specs = spec.split(',').map(str::trim).filter(|s| !s.is_empty());
    let (Some(one), None) = (specs.next(), specs.next()) else { return Wanted::Whole };
    let Some((first, last)) = one.split_once('-') else { return Wanted::Whole };
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<u64>().ok()).flatten()
    };
    match (first.trim(), last.trim()) {
        ("", suffix) => match number(suffix) {
            None => Wanted::Whole,
            Some(0) => Wanted::Unsatisfiable,
            Some(_) if len == 0 => Wanted::Unsatisfiable,
            Some(n) => Wanted::Part(len.saturating_sub(n)..=len - 1),
        },
        (first, last) => {
            let Some(first) = number(first) else { return Wanted::Whole };
            let last = match last {
                "" => None,
                l => match number(l) {
                    Some(l) if l >= first => Some(l),
                    // `last < first` makes the whole field invalid (§14.1.1): ignored.
                    _ => return Wanted::Whole,
                },
            };
            if first >= len {
                return Wanted::Unsatisfiable;
            }
            Wanted::Part(first..=last.map_or(len - 1, |l| l.min(len - 1)))
        }
    }
}

/// `bytes=` (the unit in any case) taken off.
fn strip_unit(r: &str) -> Option<&str> {
    let (unit, spec) = r.split_once('=')?;
    unit.trim().eq_ignore_ascii_case("bytes").then_some(spec)
}

/// Whether the request's `If-Range` (if any) lets the range apply to the stored response:
/// an entity-tag must match its strong `ETag` exactly, a date its `Last-Modified` exactly
/// (RFC 9110 §13.1.5).
pub fn if_range_allows(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(condition) = request.get(header::IF_RANGE) else { return true };
    let c = condition.as_bytes();
    if c.starts_with(b"\"") {
        return stored.get(header::ETAG).is_some_and(|t| t.as_bytes() == c);
    }
    if c.starts_with(b"W/") {
        return false;
    }
    stored.get(header::LAST_MODIFIED).is_some_and(|lm| lm.as_bytes() == c)
        && super::judge::http_date(c).is_some()
}

/// `bytes first-last/len`, or `bytes */len` for a 416.
pub fn content_range(part: Option<&RangeInclusive<u64>>, len: u64) -> HeaderValue {
    let text = match part {
        Some(r) => format!("bytes {}-{}/{len}", r.start(), r.end()),
        None => format!("bytes */{len}"),
    };
    HeaderValue::from_str(&text).expect("digits and ASCII are a valid value")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_forms_of_one_range() {
        let w = |r: &str| wanted(r.as_bytes(), 10);
        assert_eq!(w("bytes=0-4"), Wanted::Part(0..=4));
        assert_eq!(w("bytes=5-"), Wanted::Part(5..=9));
        assert_eq!(w("bytes=-3"), Wanted::Part(7..=9));
        assert_eq!(w("bytes=-30"), Wanted::Part(0..=9));
        assert_eq!(w("bytes=8-100"), Wanted::Part(8..=9));
        assert_eq!(w("Bytes = 2-3"), Wanted::Part(2..=3));
        assert_eq!(w("bytes=10-"), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=9999-"), Wanted::Unsatisfiable);
        assert_eq!(w("bytes=-0"), Wanted::Unsatisfiable);
        // Ignored: several ranges, another unit, nonsense, a last before the first.
        for ignored in
            ["bytes=0-1,3-4", "items=0-1", "bytes=a-b", "bytes=5-2", "bytes=", "bytes=-", "0-4", "bytes=+1-2"]
        {
            assert_eq!(w(ignored), Wanted::Whole, "{ignored}");
        }
    }

    #[test]
    fn if_range_needs_an_exact_strong_match() {
        let map = |pairs: &[(&str, &str)]| -> HeaderMap {
            pairs.iter().map(|(n, v)| (n.parse().unwrap(), v.parse().unwrap())).collect()
        };
        let stored = map(&[("etag", "\"a\""), ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")]);
        assert!(if_range_allows(&map(&[]), &stored));
        assert!(if_range_allows(&map(&[("if-range", "\"a\"")]), &stored));
        assert!(!if_range_allows(&map(&[("if-range", "\"b\"")]), &stored));
        assert!(!if_range_allows(&map(&[("if-range", "W/\"a\"")]), &stored));
        assert!(if_range_allows(&map(&[("if-range", "Sun, 06 Nov 1994 08:49:37 GMT")]), &stored));
        assert!(!if_range_allows(&map(&[("if-range", "Sun, 06 Nov 1994 08:49:38 GMT")]), &stored));
    }

    proptest! {
        /// Every range served lies within the body, and is what the numbers ask for.
        #[test]
        fn ranges_stay_within_the_body(len in 0u64..1000, a in 0u64..1200, b in 0u64..1200, form in 0u8..3) {
            let spec = match form { 0 => format!("bytes={a}-{b}"), 1 => format!("bytes={a}-"), _ => format!("bytes=-{b}") };
            match wanted(spec.as_bytes(), len) {
                Wanted::Part(r) => {
                    prop_assert!(r.start() <= r.end() && *r.end() < len);
                    match form {
                        0 => prop_assert_eq!(r, a..=b.min(len - 1)),
                        1 => prop_assert_eq!(r, a..=len - 1),
                        _ => prop_assert_eq!(r, len.saturating_sub(b)..=len - 1),
                    }
                }
                Wanted::Unsatisfiable => prop_assert!((form != 2 && a >= len) || (form == 2 && (b == 0 || len == 0))),
                Wanted::Whole => prop_assert!(form == 0 && b < a),
            }
        }
    }
}
