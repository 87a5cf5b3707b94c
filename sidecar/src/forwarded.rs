//! Forwarding headers, in one place: the sidecar owns them. From a peer that is not a trusted
//! proxy (`spec.clientIp.trustedProxies`) every one the client sent is dropped, and the
//! sidecar sets its own `X-Forwarded-For` (the peer) and `X-Forwarded-Proto`. From a trusted
//! proxy they are kept (the peer appended to `X-Forwarded-For`), and on cached routes their
//! values are part of the cache key, so that no header the key leaves out can change a
//! stored response (web cache poisoning, PortSwigger's "Practical Web Cache Poisoning").

use std::{borrow::Cow, net::SocketAddr};

use http::{HeaderMap, HeaderName};

use crate::clientip::TrustedProxies;

/// Headers through which a client could tell the app who or where it is, or which URL or
/// method it "really" asked for: set only by the sidecar or a trusted proxy. The last six
/// rewrite the request itself ([`rewriting`]).
pub static FORWARDING: [HeaderName; 25] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-uri"),
    HeaderName::from_static("x-forwarded-path"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    HeaderName::from_static("x-original-host"),
    HeaderName::from_static("x-host"),
    HeaderName::from_static("x-url-scheme"),
    HeaderName::from_static("front-end-https"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-original-uri"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Those of [`FORWARDING`] that rewrite the request itself (its URL or method), its last six:
/// on cached routes they never reach the app, whoever sent them, since one request would fill
/// the entry of another.
pub fn rewriting() -> &'static [HeaderName] {
    &FORWARDING[FORWARDING.len() - 6..]
}

/// Whether `name` (lower case, as `HeaderName` or `httparse` after folding give it) is one of
/// [`FORWARDING`]: a first-byte test, then length and byte compares, no hashing.
pub fn is_forwarding(name: &str) -> bool {
    // Every one starts with f, t or x: most headers (host, accept…) stop at the first byte.
    matches!(name.as_bytes().first(), Some(b'f' | b'F' | b't' | b'T' | b'x' | b'X'))
        && FORWARDING.iter().any(|f| f.as_str().len() == name.len() && f.as_str().eq_ignore_ascii_case(name))
}

/// Drops the forwarding headers a client that is not a trusted proxy sent (the sidecar writes
/// its own when it forwards the request). One pass over the names; nothing else is done for a
/// request without any (most of them).
pub fn own(headers: &mut HeaderMap, peer: SocketAddr, trusted: &TrustedProxies) {
    if !headers.keys().any(|n| is_forwarding(n.as_str())) || trusted.trusts(peer.ip()) {
        return;
    }
    for name in &FORWARDING {
        headers.remove(name);
    }
}

/// The host part of a cache key: the Host, and after it the kept forwarding headers of a
/// trusted proxy (`X-Forwarded-For` aside: it names the client, not the resource), so that
/// responses made for different forwarded hosts, schemes or prefixes are stored apart.
/// Borrows when there are none (the common case).
pub fn cache_host<'a>(host: &'a str, headers: &HeaderMap) -> Cow<'a, str> {
    let mut out: Option<String> = None;
    for (name, value) in headers {
        let n = name.as_str();
        if !is_forwarding(n) || n == "x-forwarded-for" {
            continue;
        }
        let s = out.get_or_insert_with(|| host.to_owned());
        s.push('\n');
        s.push_str(n);
        s.push('=');
        s.push_str(&String::from_utf8_lossy(value.as_bytes()));
    }
    out.map_or(Cow::Borrowed(host), Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_is_recognized_in_any_case() {
        for name in &FORWARDING {
            assert!(is_forwarding(name.as_str()));
            assert!(is_forwarding(&name.as_str().to_ascii_uppercase()));
        }
        let rewriting: Vec<&str> = rewriting().iter().map(|n| n.as_str()).collect();
        assert_eq!(
            rewriting,
            [
                "x-original-url",
                "x-rewrite-url",
                "x-original-uri",
                "x-http-method-override",
                "x-http-method",
                "x-method-override"
            ]
        );
        assert!(!is_forwarding("x-forwarded"));
        assert!(!is_forwarding("host"));
    }

    #[test]
    fn an_untrusted_client_loses_its_forwarding_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-host", "evil.example".parse().unwrap());
        h.insert("forwarded", "for=1.2.3.4;proto=https".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        let trusted = TrustedProxies::new(&["10.0.0.0/8".to_owned()]);
        let mut from_proxy = h.clone();
        own(&mut h, "192.0.2.1:1000".parse().unwrap(), &trusted);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        own(&mut from_proxy, "10.1.1.1:1000".parse().unwrap(), &trusted);
        assert_eq!(from_proxy.len(), 3);
        assert_eq!(
            cache_host("a.example", &from_proxy),
            "a.example\nx-forwarded-host=evil.example\nforwarded=for=1.2.3.4;proto=https"
        );
        assert!(matches!(cache_host("a.example", &h), Cow::Borrowed("a.example")));
    }
}
