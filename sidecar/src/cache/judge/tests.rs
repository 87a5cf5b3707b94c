use std::time::{Duration, UNIX_EPOCH};

use proptest::prelude::*;

use super::*;

fn config(targeted: &[&str], store_set_cookie: bool) -> CacheConfig {
    serde_json::from_value(serde_json::json!({
        "mode": "Origin", "staleWhileRevalidateMs": 0, "staleIfErrorMs": 0, "private": false,
        "vary": [], "etag": true, "store": true, "maxEntrySize": 1_048_576,
        "storeSetCookie": store_set_cookie, "surrogateKeys": [], "targeted": targeted,
    }))
    .unwrap()
}

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    h
}

fn judged(pairs: &[(&str, &str)], status: u16) -> (StatusCode, HeaderMap) {
    let c = config(&["cdn-cache-control"], false);
    let h = map(pairs);
    let t = targeted(&c, &h);
    response(&c, StatusCode::from_u16(status).unwrap(), &h, &t)
}

/// The same instant in the other two formats of RFC 9110 §5.6.7, from its IMF-fixdate.
fn rfc850_and_asctime(imf: &str) -> (String, String) {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let (wkday, rest) = imf.split_once(", ").unwrap();
    let parts: Vec<&str> = rest.split(' ').collect();
    let (day, month, year, time) = (parts[0], parts[1], parts[2], parts[3]);
    let weekday = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
        .into_iter()
        .find(|w| w.starts_with(wkday))
        .unwrap();
    let rfc850 = format!("{weekday}, {day}-{month}-{} {time} GMT", &year[2..]);
    let day: u32 = day.parse().unwrap();
    let asctime = format!("{wkday} {month} {day:>2} {time} {year}");
    (rfc850, asctime)
}

proptest! {
    /// RFC 9110 §5.6.7: a recipient reads all three formats; each names the same instant.
    #[test]
    fn the_three_date_formats_read_alike(secs in 0u64..4_102_444_800) {
        let at = UNIX_EPOCH + Duration::from_secs(secs);
        let imf = httpdate::fmt_http_date(at);
        prop_assert_eq!(http_date(imf.as_bytes()), Some(at));
        let (rfc850, asctime) = rfc850_and_asctime(&imf);
        prop_assert_eq!(http_date(asctime.as_bytes()), Some(at), "{}", asctime);
        // RFC 850's two-digit year is read within 50 years of now (httpdate: 70–99 → 19xx).
        let year: u32 = imf[12..16].parse().unwrap();
        if (1970..2070).contains(&year) {
            prop_assert_eq!(http_date(rfc850.as_bytes()), Some(at), "{}", rfc850);
        }
    }

    /// A date with a space doubled anywhere is not an HTTP-date; as `Expires` it means expired.
    #[test]
    fn a_doubled_space_is_no_date(secs in 0u64..4_102_444_800, which in 0usize..5) {
        let imf = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs));
        let at = imf.match_indices(' ').nth(which).unwrap().0;
        let bad = format!("{}  {}", &imf[..at], &imf[at + 1..]);
        prop_assert_eq!(http_date(bad.as_bytes()), None);
        let (_, h) = judged(&[("expires", &bad)], 200);
        prop_assert_eq!(h.get(header::EXPIRES).unwrap(), "0");
    }

    /// RFC 9111 §5.2: directive names are case-insensitive; values are kept as sent.
    #[test]
    fn directive_names_are_lowered(
        name in prop::sample::select(vec!["no-cache", "no-store", "max-age", "s-maxage", "must-revalidate", "public", "private"]),
        mask in any::<u32>(),
        value in prop::option::of(0u32..100_000),
    ) {
        let cased: String = name.chars().enumerate()
            .map(|(i, c)| if mask >> (i % 32) & 1 == 1 { c.to_ascii_uppercase() } else { c })
            .collect();
        let sent = match value { Some(v) => format!("{cased}={v}"), None => cased };
        let (_, h) = judged(&[("cache-control", &sent)], 200);
        let want = match value { Some(v) => format!("{name}={v}"), None => name.to_owned() };
        prop_assert_eq!(h.get(header::CACHE_CONTROL).unwrap().to_str().unwrap(), want);
    }

    /// RFC 9111 §5.1: `Age` is one non-negative integer; a list of one value repeated is
    /// that value, anything else is judged as the largest age (never fresh).
    #[test]
    fn age_is_one_integer(n in 0u64..10_000_000, m in 0u64..10_000_000) {
        let v = |s: String| HeaderValue::from_str(&s).unwrap();
        prop_assert_eq!(age([v(n.to_string())].iter()), n.min(MAX_AGE_VALUE));
        prop_assert_eq!(age([v(format!("{n}, {n}"))].iter()), n.min(MAX_AGE_VALUE));
        prop_assert_eq!(age([v(n.to_string()), v(n.to_string())].iter()), n.min(MAX_AGE_VALUE));
        if n != m {
            prop_assert_eq!(age([v(format!("{n}, {m}"))].iter()), MAX_AGE_VALUE);
            prop_assert_eq!(age([v(n.to_string()), v(m.to_string())].iter()), MAX_AGE_VALUE);
        }
        prop_assert_eq!(age([v(format!("-{n}"))].iter()), MAX_AGE_VALUE);
        prop_assert_eq!(age([v(format!("{n}.0"))].iter()), MAX_AGE_VALUE);
        prop_assert_eq!(age([v(format!("+{n}"))].iter()), MAX_AGE_VALUE);
    }
}

#[test]
fn a_list_valued_age_is_judged_old() {
    let (_, h) = judged(&[("cache-control", "max-age=3600"), ("age", "7200, 0")], 200);
    assert_eq!(h.get(header::AGE).unwrap(), "2147483648");
}

#[test]
fn quoted_commas_do_not_split_a_directive() {
    let (_, h) = judged(&[("cache-control", "No-Cache=\"Set-Cookie, X-A\", MAX-AGE=5")], 200);
    assert_eq!(h.get(header::CACHE_CONTROL).unwrap(), "no-cache=\"Set-Cookie, X-A\", max-age=5");
}

#[test]
fn explicitly_cacheable_statuses_are_judged_storable() {
    assert_eq!(judged(&[("cache-control", "max-age=100")], 299).0, StatusCode::OK);
    assert_eq!(judged(&[("cache-control", "public")], 402).0, StatusCode::OK);
    assert_eq!(judged(&[("expires", "Sun, 06 Nov 2094 08:49:37 GMT")], 418).0, StatusCode::OK);
    // Without an explicit allowance, or for a partial answer, the status stands.
    assert_eq!(judged(&[], 299).0.as_u16(), 299);
    assert_eq!(judged(&[("cache-control", "max-age=100")], 206).0.as_u16(), 206);
    assert_eq!(judged(&[("cache-control", "max-age=100")], 302).0.as_u16(), 302);
}

#[test]
fn a_targeted_field_stands_in_for_cache_control() {
    // RFC 9213 §2.1: its directives, not Cache-Control's (nor Expires), and it is taken off.
    let (_, h) =
        judged(&[("cache-control", "no-store"), ("expires", "0"), ("cdn-cache-control", "Max-Age=100")], 200);
    assert_eq!(h.get(header::CACHE_CONTROL).unwrap(), "max-age=100");
    assert!(!h.contains_key(header::EXPIRES));
    assert!(!h.contains_key("cdn-cache-control"));
    // The route's list decides which field counts, in its order.
    let c = config(&["surrogate-control", "cdn-cache-control"], false);
    let h = map(&[
        ("cache-control", "max-age=1"),
        ("cdn-cache-control", "no-store"),
        ("surrogate-control", "max-age=60"),
    ]);
    let t = targeted(&c, &h);
    assert_eq!(t.len(), 2);
    let (_, j) = response(&c, StatusCode::OK, &h, &t);
    assert_eq!(j.get(header::CACHE_CONTROL).unwrap(), "max-age=60");
    // Not listed: ignored, and left on the response.
    let c = config(&[], false);
    let t = targeted(&c, &h);
    assert!(t.is_empty());
    assert_eq!(response(&c, StatusCode::OK, &h, &t).1.get(header::CACHE_CONTROL).unwrap(), "max-age=1");
}

#[test]
fn store_set_cookie_keeps_the_lifetime() {
    let c = config(&[], true);
    let h = map(&[("cache-control", "max-age=100"), ("set-cookie", "a=b")]);
    assert!(!response(&c, StatusCode::OK, &h, &[]).1.contains_key(header::SET_COOKIE));
    let c = config(&[], false);
    assert!(response(&c, StatusCode::OK, &h, &[]).1.contains_key(header::SET_COOKIE));
}
