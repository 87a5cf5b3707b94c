//! The manifest checks as users meet them: every example is valid and round-trips, and each
//! invalid manifest of the table is rejected at the right field path.

use apipolicy_api::{ApiPolicy, ApiPolicySpec, compile, manifest::check_manifest};
use serde_json::{Value, json};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

fn examples() -> Vec<(String, String)> {
    let mut files: Vec<_> = std::fs::read_dir(EXAMPLES)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "the examples are missing");
    files
        .into_iter()
        .map(|p| {
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

#[test]
fn every_example_passes_check_and_compiles() {
    for (name, text) in examples() {
        let checked = check_manifest(&text);
        assert!(checked.problems.is_empty(), "{name}: {:#?}", checked.problems);
        assert_eq!(checked.policies.len(), 1, "{name}");
        let policy = &checked.policies[0];
        let config = compile(policy).unwrap();
        assert_eq!(config.default_route().name, "default");
        assert!(config.revision.starts_with("sha256:") && config.revision.len() == 71, "{name}");
        let spec = serde_json::to_value(&policy.spec).unwrap();
        ApiPolicySpec::validate_cel(&spec, None)
            .unwrap_or_else(|e| panic!("{name}: the CEL rules refuse it: {e:?}"));
    }
}

#[test]
fn every_example_round_trips() {
    for (name, text) in examples() {
        let original: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let policy: ApiPolicy = serde_yaml::from_str(&text).unwrap();
        let back: serde_yaml::Value = serde_yaml::to_value(&policy).unwrap();
        // Compare as JSON so that YAML flow/block style does not matter; nulls are dropped by
        // both the API server and us.
        let a = numbers_as_floats(serde_json::to_value(&original).unwrap());
        let b = numbers_as_floats(serde_json::to_value(&back).unwrap());
        assert_eq!(a, b, "{name} does not serialize back to the same document");
    }
}

/// `99` and `99.0` are the same number to the API server.
fn numbers_as_floats(v: Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64().unwrap()),
        Value::Array(items) => Value::Array(items.into_iter().map(numbers_as_floats).collect()),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, numbers_as_floats(v))).collect())
        }
        other => other,
    }
}

#[test]
fn the_same_spec_gives_the_same_revision() {
    let (_, text) = examples().into_iter().find(|(n, _)| n == "quickstart.yaml").unwrap();
    let policy: ApiPolicy = serde_yaml::from_str(&text).unwrap();
    let a = compile(&policy).unwrap();
    let b = compile(&serde_yaml::from_str(&text).unwrap()).unwrap();
    assert_eq!(a.revision, b.revision);
    let mut changed = policy.clone();
    changed.spec.upstream.port = 9090;
    assert_ne!(compile(&changed).unwrap().revision, a.revision);
    // The config file the sidecar reads accepts the compiled form and checks its revision.
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(apipolicy_api::manifest::load_sidecar_config(&json).unwrap(), a);
    let tampered = json.replace("\"port\":8080", "\"port\":8081");
    let err = apipolicy_api::manifest::load_sidecar_config(&tampered).unwrap_err();
    assert_eq!(err[0].path, "revision");
}

#[test]
fn defaults_are_merged_into_routes() {
    let (_, text) = examples().into_iter().find(|(n, _)| n == "quickstart.yaml").unwrap();
    let config = compile(&serde_yaml::from_str(&text).unwrap()).unwrap();
    let routes = &config.spec.routes;
    let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["list-products", "slow-report", "login", "default"]);
    assert_eq!(routes[0].timeout_ms, 2_000, "the route's own timeout");
    assert_eq!(routes[2].timeout_ms, 10_000, "defaults.timeout");
    assert_eq!(routes[2].max_request_body, Some(1 << 20), "defaults.maxRequestBody");
    assert_eq!(routes[0].compression.as_ref().unwrap().min_size, 1024);
    let cache = routes[0].cache.as_ref().unwrap();
    assert_eq!(
        (cache.max_age_ms, cache.stale_while_revalidate_ms, cache.stale_if_error_ms),
        (Some(60_000), 300_000, 3_600_000)
    );
    assert_eq!(cache.vary, ["accept-language"]);
    let rl = routes[2].rate_limit.as_ref().unwrap();
    assert_eq!((rl.limit.requests, rl.limit.per_ms, rl.limit.burst), (1, 10_000, 5));
    assert!(rl.key.client_ip);
    assert_eq!(config.spec.slos[0].routes, names, "an SLO without routes counts them all");
    assert_eq!(config.spec.upstream.connect_timeout_ms, 1_000);
}

fn base() -> Value {
    json!({
        "apiVersion": "apipolicy.dev/v1alpha1",
        "kind": "ApiPolicy",
        "metadata": {"name": "products", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "products"}},
            "upstream": {"port": 8080, "timeout": "15s"},
            "routes": [
                {"name": "list", "match": {"path": {"prefix": "/api/products"}, "methods": ["GET", "HEAD"]},
                 "cache": {"maxAge": "60s"}},
                {"name": "login", "match": {"path": {"exact": "/api/login"}, "methods": ["POST"]},
                 "rateLimit": {"requests": 1, "per": "10s", "burst": 5}}
            ],
            "slos": [{"name": "availability", "objective": 99.9, "indicator": {"availability": {}}}]
        }
    })
}

/// Sets (or with `Value::Null`, removes) the value at a JSON pointer, creating objects on the way.
fn set(mut doc: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let mut at = &mut doc;
    for part in parent.split('/').skip(1) {
        at = match at {
            Value::Array(items) => &mut items[part.parse::<usize>().unwrap()],
            other => other.as_object_mut().unwrap().entry(part).or_insert_with(|| json!({})),
        };
    }
    match at {
        Value::Array(items) => items[key.parse::<usize>().unwrap()] = value,
        Value::Object(map) if value.is_null() => {
            map.remove(key);
        }
        Value::Object(map) => {
            map.insert(key.to_owned(), value);
        }
        _ => panic!("{pointer} is not in the document"),
    }
    doc
}

/// One invalid manifest: the change to the valid base, the path `check` must name, a part of
/// its message, and whether the API server's CEL rules refuse it too.
struct Case {
    doc: Value,
    path: &'static str,
    says: &'static str,
    cel: bool,
}

fn case(pointer: &str, value: Value, path: &'static str, says: &'static str) -> Case {
    Case { doc: set(base(), pointer, value), path, says, cel: false }
}

fn cel(mut c: Case) -> Case {
    c.cel = true;
    c
}

fn cases() -> Vec<Case> {
    vec![
        case(
            "/spec/routes/1/rateLimit/per",
            json!("10 seconds"),
            "spec.routes[1].rateLimit.per",
            "is not a duration",
        ),
        case(
            "/spec/routes/0/cache/maxAge",
            json!("1w"),
            "spec.routes[0].cache.maxAge",
            "units are ms, s, m, h and d",
        ),
        case(
            "/spec/routes/0/cache/maxAgee",
            json!("60s"),
            "spec.routes[0].cache.maxAgee",
            "did you mean \"maxAge\"",
        ),
        case("/spec/upstream/prot", json!(8080), "spec.upstream.prot", "unknown field"),
        case("/spec/upstream/port", json!(0), "spec.upstream.port", "too small"),
        case("/spec/upstream/port", json!(70000), "spec.upstream.port", "too large"),
        case("/spec/upstream/port", json!("http"), "spec.upstream.port", "expected an integer"),
        case("/spec/upstream", Value::Null, "spec.upstream", "required"),
        case("/spec/selector", json!({}), "spec.selector", "empty selector"),
        case("/metadata/name", Value::Null, "metadata.name", "needs a name"),
        case("/spec/routes/0/name", json!("List_Products"), "spec.routes[0].name", "does not match"),
        cel(case("/spec/routes/0/name", json!("default"), "spec.routes[0].name", "reserved")),
        case("/spec/routes/1/name", json!("list"), "spec.routes[1].name", "already used by spec.routes[0]"),
        cel(case(
            "/spec/routes/0/match/path",
            json!({"prefix": "/a", "exact": "/a"}),
            "spec.routes[0].match.path",
            "exactly one of prefix, exact and regex",
        )),
        cel(case(
            "/spec/routes/0/match/path",
            json!({"prefix": "api/products"}),
            "spec.routes[0].match.path.prefix",
            "must start with /",
        )),
        case(
            "/spec/routes/0/match/path",
            json!({"regex": "/api/(products"}),
            "spec.routes[0].match.path.regex",
            "not a valid regular expression",
        ),
        case(
            "/spec/routes/0/match/methods",
            json!(["GET", "FETCH"]),
            "spec.routes[0].match.methods[1]",
            "is not one of",
        ),
        case(
            "/spec/routes/1/match",
            json!({"path": {"prefix": "/api/products/special"}, "methods": ["GET"]}),
            "spec.routes[1].match",
            "can never match: spec.routes[0]",
        ),
        case(
            "/spec/routes/0/cache",
            json!({"staleWhileRevalidate": "5m"}),
            "spec.routes[0].cache.maxAge",
            "needs maxAge",
        ),
        cel(case(
            "/spec/routes/0/cache",
            json!({"mode": "Origin", "maxAge": "60s"}),
            "spec.routes[0].cache.maxAge",
            "mode Origin",
        )),
        case(
            "/spec/routes/0/cache/mode",
            json!("Always"),
            "spec.routes[0].cache.mode",
            "is not one of Override, Origin",
        ),
        case("/spec/routes/1/cache", json!({"maxAge": "60s"}), "spec.routes[1].cache", "only GET and HEAD"),
        case(
            "/spec/routes/0/cache/store",
            json!({"maxEntrySize": "1.5Mi"}),
            "spec.routes[0].cache.store.maxEntrySize",
            "fractions are not allowed",
        ),
        case(
            "/spec/routes/0/cache/store",
            json!({"maxEntrySize": "1Gi"}),
            "spec.routes[0].cache.store.maxEntrySize",
            "out of range",
        ),
        case("/spec/routes/0/cache/vary", json!(["*"]), "spec.routes[0].cache.vary[0]", "Vary: *"),
        case("/spec/routes/1/rateLimit/requests", json!(0), "spec.routes[1].rateLimit.requests", "too small"),
        case("/spec/routes/1/rateLimit/burst", json!(-1), "spec.routes[1].rateLimit.burst", "too small"),
        case(
            "/spec/routes/1/rateLimit/scope",
            json!("Global"),
            "spec.routes[1].rateLimit.scope",
            "set spec.redis",
        ),
        cel(case(
            "/spec/routes/1/rateLimit/algorithm",
            json!("SlidingWindow"),
            "spec.routes[1].rateLimit.burst",
            "no meaning for SlidingWindow",
        )),
        case(
            "/spec/routes/1/rateLimit/onStoreFailure",
            json!("FailOpen"),
            "spec.routes[1].rateLimit.onStoreFailure",
            "only to scope: Global",
        ),
        cel(case("/spec/routes/1/rateLimit/key", json!({}), "spec.routes[1].rateLimit.key", "set clientIp")),
        case(
            "/spec/routes/1/rateLimit/key",
            json!({"header": {"name": "X Api Key"}}),
            "spec.routes[1].rateLimit.key.header.name",
            "does not match",
        ),
        case(
            "/spec/routes/1/rateLimit/overrides",
            json!([{"values": ["a"], "requests": 5}, {"values": ["a"], "requests": 9}]),
            "spec.routes[1].rateLimit.overrides[1].values[0]",
            "already has a limit",
        ),
        case(
            "/spec/routes/1/timeout",
            json!("20s"),
            "spec.routes[1].timeout",
            "longer than spec.upstream.timeout",
        ),
        case(
            "/spec/routes/1/compression",
            json!({"algorithms": ["gzip", "deflate"]}),
            "spec.routes[1].compression.algorithms[1]",
            "is not one of br, zstd, gzip",
        ),
        case(
            "/spec/routes/1/compression",
            json!({"contentTypes": ["json"]}),
            "spec.routes[1].compression.contentTypes[0]",
            "not a media type",
        ),
        case(
            "/spec/routes/1/concurrencyLimit",
            json!({"maxInFlight": 0}),
            "spec.routes[1].concurrencyLimit.maxInFlight",
            "too small",
        ),
        case("/spec/routes/1/maxRequestBody", json!(0), "spec.routes[1].maxRequestBody", "out of range"),
        case("/spec/slos/0/objective", json!(100), "spec.slos[0].objective", "less than 100"),
        case("/spec/slos/0/objective", json!(0), "spec.slos[0].objective", "greater than 0"),
        case("/spec/slos/0/window", json!("5m"), "spec.slos[0].window", "out of range"),
        cel(case(
            "/spec/slos/0/routes",
            json!(["list", "checkout"]),
            "spec.slos[0].routes[1]",
            "no route named \"checkout\"",
        )),
        cel(case(
            "/spec/slos/0/indicator",
            json!({"availability": {}, "latency": {"threshold": "300ms"}}),
            "spec.slos[0].indicator",
            "exactly one of availability and latency",
        )),
        case(
            "/spec/slos/0/indicator",
            json!({"latency": {}}),
            "spec.slos[0].indicator.latency.threshold",
            "required",
        ),
        case(
            "/spec/clientIp",
            json!({"trustedProxies": ["10.0.0.0/33"]}),
            "spec.clientIp.trustedProxies[0]",
            "not an IP address or CIDR",
        ),
        cel(case(
            "/spec/redis",
            json!({"url": "redis://r:6379", "secretRef": {"name": "redis"}}),
            "spec.redis",
            "exactly one of url and secretRef",
        )),
        case(
            "/spec/redis",
            json!({"url": "http://redis:6379"}),
            "spec.redis.url",
            "must start with redis://",
        ),
        case(
            "/spec/healthChecks",
            json!({"upstream": {"path": "/healthz", "interval": "1s", "timeout": "2s"}}),
            "spec.healthChecks.upstream.timeout",
            "shorter than the interval",
        ),
        cel(case(
            "/spec/healthChecks",
            json!({"dependencies": [{"name": "db"}]}),
            "spec.healthChecks.dependencies[0]",
            "exactly one of tcp and http",
        )),
        case(
            "/spec/healthChecks",
            json!({"dependencies": [{"name": "db", "tcp": {"address": "postgres"}}]}),
            "spec.healthChecks.dependencies[0].tcp.address",
            "must be host:port",
        ),
        case(
            "/spec/healthChecks",
            json!({"dependencies": [{"name": "api", "http": {"url": "https://api:443/"}}]}),
            "spec.healthChecks.dependencies[0].http.url",
            "must be an http:// URL",
        ),
        case("/apiVersion", json!("apipolicy.dev/v1"), "apiVersion", "use apipolicy.dev/v1alpha1"),
        case(
            "/spec/routes/0/requestHeaders",
            json!({"set": {"Host": "elsewhere"}}),
            "spec.routes[0].requestHeaders.set[\"Host\"]",
            "Host cannot be set",
        ),
        case(
            "/spec/routes/0/requestHeaders",
            json!({"remove": ["x-forwarded-for"]}),
            "spec.routes[0].requestHeaders.remove[0]",
            "x-forwarded-for cannot be removed",
        ),
        case(
            "/spec/defaults/requestHeaders",
            json!({"set": {"x-tenant": "acme\r\nx-admin: 1"}}),
            "spec.defaults.requestHeaders.set[\"x-tenant\"]",
            "no line breaks",
        ),
        case(
            "/spec/routes/0/requestHeaders",
            json!({"set": {"x-tenant": "a", "X-Tenant": "b"}}),
            "spec.routes[0].requestHeaders.set[\"x-tenant\"]",
            "set twice",
        ),
        case(
            "/spec/routes/0/requestHeaders",
            json!({"set": {"x-debug": "0"}, "remove": ["X-Debug"]}),
            "spec.routes[0].requestHeaders.remove[0]",
            "both set and removed",
        ),
        case(
            "/spec/routes/0/requestHeaders",
            json!({"set": {"bad name": "1"}}),
            "spec.routes[0].requestHeaders.set[\"bad name\"]",
            "is not a header name",
        ),
        case(
            "/spec/routes/0/retry",
            json!({"on": ["sometimes"]}),
            "spec.routes[0].retry.on[0]",
            "not a retry condition",
        ),
        case("/spec/routes/0/retry", json!({"attempts": 9}), "spec.routes[0].retry.attempts", "at most 5"),
        case(
            "/spec/routes/0/retry",
            json!({"backoff": {"base": "1s", "max": "10ms"}}),
            "spec.routes[0].retry.backoff.max",
            "shorter than base",
        ),
        case(
            "/spec/routes/0/retry",
            json!({"budget": {"ratio": 1.5}}),
            "spec.routes[0].retry.budget.ratio",
            "at most 1",
        ),
        case(
            "/spec/routes/0/circuitBreaker",
            json!({"failureRatio": 0}),
            "spec.routes[0].circuitBreaker.failureRatio",
            "out of range",
        ),
        case(
            "/spec/routes/0/circuitBreaker",
            json!({"halfOpenRequests": 0}),
            "spec.routes[0].circuitBreaker.halfOpenRequests",
            "at least 1",
        ),
        case(
            "/spec/routes/0/cache/targeted",
            json!(["Cache-Control"]),
            "spec.routes[0].cache.targeted[0]",
            "obeyed when no targeted",
        ),
        case(
            "/spec/routes/0/concurrencyLimit",
            json!({}),
            "spec.routes[0].concurrencyLimit",
            "give maxInFlight",
        ),
        case(
            "/spec/routes/0/concurrencyLimit",
            json!({"maxInFlight": 5, "adaptive": {}}),
            "spec.routes[0].concurrencyLimit",
            "not both",
        ),
        case(
            "/spec/routes/0/concurrencyLimit",
            json!({"adaptive": {"minLimit": 10, "maxLimit": 5}}),
            "spec.routes[0].concurrencyLimit.adaptive.maxLimit",
            "below minLimit",
        ),
        case(
            "/spec/routes/0/cache/statuses",
            json!([206]),
            "spec.routes[0].cache.statuses[0]",
            "cannot be stored",
        ),
    ]
}

#[test]
fn each_invalid_manifest_is_rejected_at_its_field() {
    let cases = cases();
    assert!(cases.len() >= 30);
    for (i, c) in cases.iter().enumerate() {
        let text = serde_yaml::to_string(&c.doc).unwrap();
        let checked = check_manifest(&text);
        assert!(checked.policies.is_empty(), "case {i} ({}) was accepted", c.path);
        assert!(
            checked.problems.iter().any(|p| p.path == c.path && p.message.contains(c.says)),
            "case {i}: expected {} saying {:?}, got {:#?}",
            c.path,
            c.says,
            checked.problems
        );
        if c.cel {
            let spec = &c.doc["spec"];
            assert!(
                ApiPolicySpec::validate_cel(spec, None).is_err(),
                "case {i}: the CEL rules let {} through",
                c.path
            );
        }
    }
}

#[test]
fn the_base_of_the_table_is_valid() {
    let checked = check_manifest(&serde_yaml::to_string(&base()).unwrap());
    assert!(checked.problems.is_empty(), "{:#?}", checked.problems);
    ApiPolicySpec::validate_cel(&base()["spec"], None).unwrap();
}

#[test]
fn every_problem_is_reported_at_once() {
    let doc = set(
        set(set(base(), "/spec/upstream/port", json!(0)), "/spec/routes/1/rateLimit/per", json!("soon")),
        "/spec/bogus",
        json!(1),
    );
    let checked = check_manifest(&serde_yaml::to_string(&doc).unwrap());
    let paths: Vec<&str> = checked.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["spec.bogus", "spec.routes[1].rateLimit.per", "spec.upstream.port"]);

    let doc = set(set(base(), "/spec/routes/1/name", json!("list")), "/spec/slos/0/window", json!("91d"));
    let checked = check_manifest(&serde_yaml::to_string(&doc).unwrap());
    let paths: Vec<&str> = checked.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["spec.routes[1].name", "spec.slos[0].window"]);
}

#[test]
fn several_documents_and_other_kinds() {
    let text = format!(
        "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\n---\n{}",
        serde_yaml::to_string(&base()).unwrap(),
        serde_yaml::to_string(&set(base(), "/metadata/name", json!("second"))).unwrap()
    );
    let checked = check_manifest(&text);
    assert_eq!((checked.policies.len(), checked.skipped, checked.problems.len()), (2, 1, 0));

    let broken = "apiVersion: apipolicy.dev/v1alpha1\nkind: ApiPolicy\nspec: [unclosed\n";
    let checked = check_manifest(broken);
    assert_eq!(checked.problems.len(), 1);
    assert_eq!(checked.problems[0].path, "(yaml)");
    assert!(checked.problems[0].message.contains("line"), "{}", checked.problems[0].message);
}
