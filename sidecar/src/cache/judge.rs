//! The response and request headers as the cache's freshness judgement reads them.
//!
//! `http-cache-semantics` judges storability, freshness and `Vary`; what it reads is fixed
//! here first, at our boundary, so that it sees well-formed input only:
//! - the targeted field the route obeys (RFC 9213: `CDN-Cache-Control`, `Surrogate-Control`),
//!   when the response has one, stands in for `Cache-Control` and `Expires`;
//! - `Cache-Control` directive names are case-insensitive (RFC 9111 §5.2): they are lowered;
//! - HTTP-dates come in three formats (RFC 9110 §5.6.7: IMF-fixdate, RFC 850, asctime), each
//!   read strictly; an invalid `Expires` means "already expired" (RFC 9111 §5.3), an invalid
//!   `Date` or `Last-Modified` is ignored;
//! - `Age` is one non-negative integer (RFC 9111 §5.1); anything else (a list of different
//!   values, a sign, a fraction, text) is judged as the largest age, so never fresh;
//! - a final status outside the library's short list of understood ones, made explicitly
//!   cacheable by the app, is judged as the 200 it is as good as (RFC 9111 §3: any final
//!   status may be stored when explicitly cacheable; partial 206 and 304 aside);
//! - with `storeSetCookie`, the cookie does not make the response's lifetime 0.

use std::time::SystemTime;

use apipolicy_api::CacheConfig;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

/// The age a cache must assume when it cannot represent or read one (RFC 9111 §1.2.2).
const MAX_AGE_VALUE: u64 = 2_147_483_648;

/// Statuses `http-cache-semantics` stores; others it never does.
const UNDERSTOOD: [u16; 14] = [200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501];

/// The targeted fields of the route's list present in `response`, in the list's order (each
/// with its values): the first one is obeyed, all of them are taken off before the response
/// leaves.
pub fn targeted(config: &CacheConfig, response: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let mut found = Vec::new();
    for name in &config.targeted {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else { continue };
        for v in response.get_all(&name) {
            found.push((name.clone(), v.clone()));
        }
    }
    found
}

/// The response as the judgement should read it (see the module's notes). `targeted` is what
/// [`targeted`] found; the first field's values replace `Cache-Control` when it has any
/// directive.
pub fn response(
    config: &CacheConfig,
    status: StatusCode,
    headers: &HeaderMap,
    targeted: &[(HeaderName, HeaderValue)],
) -> (StatusCode, HeaderMap) {
    let mut judged = headers.clone();
    if let Some((first, _)) = targeted.first() {
        let values: Vec<&HeaderValue> = targeted.iter().filter(|(n, _)| n == first).map(|(_, v)| v).collect();
        if let Some(cc) = lowered(values.iter().copied()).filter(|v| !v.is_empty()) {
            judged.insert(header::CACHE_CONTROL, cc);
            judged.remove(header::EXPIRES);
            judged.remove(header::PRAGMA);
        }
    }
    for (name, _) in targeted {
        judged.remove(name);
    }
    if judged.contains_key(header::CACHE_CONTROL) {
        match lowered(judged.get_all(header::CACHE_CONTROL).iter()) {
            Some(cc) => {
                judged.insert(header::CACHE_CONTROL, cc);
            }
            None => {
                judged.remove(header::CACHE_CONTROL);
            }
        }
    }
    // Several Expires, Date or Last-Modified values that disagree have no one meaning.
    match one_date(&judged, &header::EXPIRES) {
        Some(Some(at)) => set_date(&mut judged, header::EXPIRES, at),
        Some(None) => {
            judged.insert(header::EXPIRES, HeaderValue::from_static("0"));
        }
        None => {}
    }
    for name in [header::DATE, header::LAST_MODIFIED] {
        match one_date(&judged, &name) {
            Some(Some(at)) => set_date(&mut judged, name, at),
            Some(None) => {
                judged.remove(name);
            }
            None => {}
        }
    }
    if judged.contains_key(header::AGE) {
        judged.insert(header::AGE, HeaderValue::from(age(judged.get_all(header::AGE).iter())));
    }
    if config.store_set_cookie {
        judged.remove(header::SET_COOKIE);
    }
    let status = if UNDERSTOOD.contains(&status.as_u16())
        || !storable_status(status)
        || !explicitly_cacheable(&judged)
    {
        status
    } else {
        StatusCode::OK
    };
    (status, judged)
}

/// The client's headers as the judgement should read them: `Cache-Control` names lowered.
pub fn request(headers: &mut HeaderMap) {
    if !headers.contains_key(header::CACHE_CONTROL) {
        return;
    }
    match lowered(headers.get_all(header::CACHE_CONTROL).iter()) {
        Some(cc) => headers.insert(header::CACHE_CONTROL, cc),
        None => headers.remove(header::CACHE_CONTROL),
    };
}

/// A final status a shared cache may store whole.
pub fn storable_status(status: StatusCode) -> bool {
    (200..600).contains(&status.as_u16())
        && status != StatusCode::PARTIAL_CONTENT
        && status != StatusCode::NOT_MODIFIED
}

/// `max-age`, `s-maxage`, `public` or `Expires` (RFC 9111 §3, the explicit ways to allow storing).
fn explicitly_cacheable(judged: &HeaderMap) -> bool {
    judged.contains_key(header::EXPIRES)
        || super::directives(judged.get_all(header::CACHE_CONTROL))
            .any(|(n, _)| matches!(n, "max-age" | "s-maxage" | "public"))
}

/// Directives of a comma-separated list (of one or several lines) with their names lowered,
/// joined in one value; `None` when nothing is left. Values (quoted strings included) are kept
/// as sent.
fn lowered<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Option<HeaderValue> {
    let mut out = String::new();
    for v in values {
        let Ok(v) = v.to_str() else { continue };
        for part in split_list(v) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (name, value) = match part.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (part, None),
            };
            if name.is_empty() || !apipolicy_api::is_token(name) {
                continue;
            }
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.extend(name.chars().map(|c| c.to_ascii_lowercase()));
            if let Some(value) = value {
                out.push('=');
                out.push_str(value);
            }
        }
    }
    if out.is_empty() { None } else { HeaderValue::from_str(&out).ok() }
}

/// The parts of a list, split at commas outside quoted strings.
fn split_list(v: &str) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let mut escaped = false;
    let mut start = 0;
    let mut parts = Vec::new();
    for (i, c) in v.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&v[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&v[start..]);
    parts.into_iter()
}

/// An HTTP-date in any of its three formats (RFC 9110 §5.6.7), read strictly: `None` for
/// anything else (a doubled space, a missing `GMT`, a day that does not exist).
pub fn http_date(v: &[u8]) -> Option<SystemTime> {
    httpdate::parse_http_date(std::str::from_utf8(v).ok()?).ok()
}

/// `None` without the field; `Some(None)` when its values are not one valid date.
fn one_date(headers: &HeaderMap, name: &HeaderName) -> Option<Option<SystemTime>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let at = http_date(first.as_bytes());
    Some(at.filter(|at| values.all(|v| http_date(v.as_bytes()) == Some(*at))))
}

fn set_date(headers: &mut HeaderMap, name: HeaderName, at: SystemTime) {
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(at)) {
        headers.insert(name, v);
    }
}

/// The `Age` of a response's values: one non-negative integer, the same on every line and in
/// every list member; anything else counts as the largest age there is.
pub fn age<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> u64 {
    let mut seen: Option<u64> = None;
    for v in values {
        let Ok(v) = v.to_str() else { return MAX_AGE_VALUE };
        for part in v.split(',') {
            let part = part.trim_matches([' ', '\t']);
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return MAX_AGE_VALUE;
            }
            let n = part.parse::<u64>().unwrap_or(MAX_AGE_VALUE).min(MAX_AGE_VALUE);
            match seen {
                Some(s) if s != n => return MAX_AGE_VALUE,
                _ => seen = Some(n),
            }
        }
    }
    seen.unwrap_or(MAX_AGE_VALUE)
}

#[cfg(test)]
mod tests;
