use super::*;

fn store() -> Store {
    let g = |n: &str| IntGauge::new(n, n).unwrap();
    let c = |n: &str| IntCounter::new(n, n).unwrap();
    Store::new(1 << 20, CacheMetrics { bytes: g("b"), entries: g("e"), evictions: c("v"), coalesced: c("c") })
}

fn origin() -> CacheConfig {
    serde_json::from_value(serde_json::json!({
        "mode": "Origin", "staleWhileRevalidateMs": 0, "staleIfErrorMs": 0, "private": false,
        "vary": [], "etag": true, "store": true, "maxEntrySize": 1_048_576,
        "storeSetCookie": false, "surrogateKeys": [],
    }))
    .unwrap()
}

fn map(pairs: &[(&str, &str)]) -> HeaderMap {
    pairs.iter().map(|(n, v)| (n.parse::<HeaderName>().unwrap(), v.parse().unwrap())).collect()
}

#[test]
fn the_url_hash_is_the_hash_of_the_key_text() {
    let many: String = (0..40).rev().map(|i| format!("p{i}={i}")).collect::<Vec<_>>().join("&");
    for (host, path, query, sort, text) in [
        ("API.Example:8080", "/a/b", None, true, "api.example:8080\n/a/b".to_owned()),
        ("h", "/x", Some("b=2&a=1&&c"), true, "h\n/x?a=1&b=2&c".to_owned()),
        ("h", "/x", Some("b=2&a=1&&c"), false, "h\n/x?b=2&a=1&&c".to_owned()),
        ("h", "/x", Some("a=2&b=1&a=1"), true, "h\n/x?a=2&a=1&b=1".to_owned()),
        ("h", "/x", Some("a=2&a=1"), false, "h\n/x?a=2&a=1".to_owned()),
        ("h", "/x", Some(""), true, "h\n/x".to_owned()),
        ("h", "/x", Some("&&"), true, "h\n/x?".to_owned()),
        (&"H".repeat(150), "/", Some("z&y"), true, format!("{}\n/?y&z", "h".repeat(150))),
        ("h", "/many", Some(many.as_str()), true, {
            let mut p: Vec<String> = (0..40).map(|i| format!("p{i}={i}")).collect();
            p.sort_by_key(|p| param_name(p).to_owned());
            format!("h\n/many?{}", p.join("&"))
        }),
    ] {
        assert_eq!(
            url_hash(host.as_bytes(), path, query, sort),
            xxhash_rust::xxh3::xxh3_64(text.as_bytes()),
            "{text}"
        );
        assert_eq!(CacheKey::new(host, path, query, sort).hash, url_hash(host.as_bytes(), path, query, sort));
    }
    assert_ne!(url_hash(b"h", "/q", Some("a=1&a=2"), true), url_hash(b"h", "/q", Some("a=2&a=1"), true));
    assert_ne!(url_hash(b"h", "/q", Some("a=1&b=2"), false), url_hash(b"h", "/q", Some("b=2&a=1"), false));
}

#[test]
fn compressibility_is_remembered_per_config_and_route() {
    let key = CacheKey::new("h", "/p", None, false);
    let e = entry(
        &origin(),
        &key,
        &HeaderMap::new(),
        StatusCode::OK,
        map(&[("cache-control", "max-age=60")]),
        Bytes::from_static(b"body"),
        SystemTime::now(),
    );
    let mut judged = 0;
    let mut ask = |generation, route, answer| {
        e.compressible_on(generation, route, || {
            judged += 1;
            answer
        })
    };
    assert!(ask(7, 0, true));
    assert!(ask(7, 0, false), "remembered, not judged again");
    assert!(!ask(7, 1, false), "another route is judged");
    assert!(ask(8, 1, true), "another config is judged");
    assert!(ask(8, 1, false), "and remembered");
    assert!(!ask(7, 0, false), "only the last answer is kept");
    assert_eq!(judged, 4);
}

/// The fast hit path and the full judgement agree on every plain request, and the hit
/// head's Age and TTL are the policy's.
#[test]
fn fast_hits_agree_with_the_full_judgement() {
    let now = SystemTime::now();
    let responses: &[&[(&str, &str)]] = &[
        &[("cache-control", "public, max-age=60")],
        &[("cache-control", "max-age=60"), ("age", "20")],
        &[("cache-control", "s-maxage=30, max-age=0")],
        &[("cache-control", "max-age=60, no-cache")],
        &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
        &[("cache-control", "max-age=60"), ("vary", "accept-encoding, X-Tier")],
        &[("cache-control", "max-age=60"), ("vary", "x-forwarded-host")],
        &[("cache-control", "max-age=0")],
        &[("cache-control", "Public, MAX-AGE=60")],
        &[("cache-control", "no-store"), ("cdn-cache-control", "max-age=60")],
        &[("cache-control", "max-age=60"), ("age", "20, 0")],
    ];
    let requests: &[&[(&str, &str)]] = &[
        &[("host", "h")],
        &[("host", "h"), ("accept-language", "en")],
        &[("host", "h"), ("accept-language", "fr")],
        &[("host", "h"), ("x-tier", "gold"), ("accept-encoding", "gzip")],
        &[("host", "h"), ("cache-control", "max-age=5")],
        &[("host", "h"), ("cache-control", "no-cache")],
        &[("host", "h"), ("pragma", "no-cache")],
    ];
    let key = CacheKey::new("h", "/p", None, false);
    let (mut fast_hits, mut judged_apart) = (0, 0);
    for res in responses {
        for stored_for in requests {
            let store = store();
            let e = Arc::new(entry(
                &origin(),
                &key,
                &map(stored_for),
                StatusCode::OK,
                map(res),
                Bytes::from_static(b"body"),
                now,
            ));
            store.insert(&key, e.clone(), &map(stored_for), now);
            for later in [0, 10, 25, 59, 61] {
                let at = now + Duration::from_secs(later);
                assert_eq!(e.age(at), e.policy.age(at), "{res:?} at +{later}s");
                assert_eq!(e.ttl(at).as_secs(), e.policy.time_to_live(at).as_secs(), "{res:?} at +{later}s");
                for req in requests {
                    let headers = map(req);
                    let full = matches!(store.lookup(&key, &headers, at, false), Lookup::Fresh(_));
                    match store.fresh(key.hash, &headers, RequestCacheHeaders::of(&headers), at) {
                        Some(_) => {
                            assert!(full, "fast hit the full judgement refuses: {res:?} {req:?}");
                            fast_hits += 1;
                        }
                        None if RequestCacheHeaders::of(&headers).plain() && e.vary.is_some() => {
                            assert!(!full, "a plain request the fast path missed: {res:?} {req:?}")
                        }
                        None => judged_apart += 1,
                    }
                }
            }
        }
    }
    // Both kinds of request were seen.
    assert!(
        fast_hits > 100 && judged_apart > 100,
        "{fast_hits} fast hits, {judged_apart} left to the policy"
    );
}
