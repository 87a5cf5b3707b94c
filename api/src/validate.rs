//! Everything the CRD schema and its CEL rules cannot check, and the CEL rules once more, so
//! that `apipolicy-operator check` finds offline every problem the cluster would.

use std::{collections::HashMap, fmt, net::IpAddr};

use crate::{
    ApiPolicy, ApiPolicySpec, ByteSize, CacheMode, CheckTiming, Duration, LimitMode, Method, PathMatch,
    RateLimit, RouteMatch, RouteSettings, Scope, StoreFailure, types::Algorithm,
};

/// One problem with a manifest: where it is and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// The field path, such as `spec.routes[2].rateLimit.per`.
    pub path: String,
    /// A sentence saying what is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Route names are DNS labels; `default` is the name of the requests no route matches.
pub const DEFAULT_ROUTE: &str = "default";

const SECOND: u64 = 1_000;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
const MIB: u64 = 1 << 20;

#[derive(Default)]
struct Problems(Vec<ValidationError>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ValidationError { path: path.into(), message: message.into() });
    }

    fn duration(&mut self, path: &str, d: &Duration, min: u64, max: u64) {
        let ms = d.as_millis();
        if ms < min || ms > max {
            self.add(
                path,
                format!(
                    "{d} is out of range: use a value from {} to {}",
                    Duration::from_millis(min),
                    Duration::from_millis(max)
                ),
            );
        }
    }

    fn size(&mut self, path: &str, q: &ByteSize, min: u64, max: u64) {
        if q.bytes() < min || q.bytes() > max {
            self.add(path, format!("{q} is out of range: use a size from {min} bytes to {} MiB", max / MIB));
        }
    }
}

/// Checks a whole ApiPolicy and returns every problem found, each with its field path.
pub fn validate(policy: &ApiPolicy) -> Result<(), Vec<ValidationError>> {
    let mut p = Problems::default();
    match policy.metadata.name.as_deref() {
        None | Some("") => p.add("metadata.name", "every ApiPolicy needs a name"),
        Some(name) if !is_dns_subdomain(name) || name.len() > 200 => p.add(
            "metadata.name",
            format!("{name:?} is not a valid name: use at most 200 lower-case letters, digits, '-' and '.'"),
        ),
        Some(_) => {}
    }
    spec(&mut p, &policy.spec);
    if p.0.is_empty() { Ok(()) } else { Err(p.0) }
}

fn spec(p: &mut Problems, s: &ApiPolicySpec) {
    selector(p, s);
    upstream(p, s);

    let ctx = Ctx { spec: s };
    if let Some(defaults) = &s.defaults {
        ctx.settings(p, "spec.defaults", defaults, &[]);
    }
    let names = routes(p, s, &ctx);
    slos(p, s, &names);
    priorities(p, s, &names);
    health_checks(p, s);
}

/// The upstream, the trusted proxies and Redis.
fn upstream(p: &mut Problems, s: &ApiPolicySpec) {
    p.duration_opt("spec.upstream.timeout", s.upstream.timeout.as_ref(), 1, HOUR);
    p.duration_opt("spec.upstream.connectTimeout", s.upstream.connect_timeout.as_ref(), 1, MINUTE);
    p.duration_opt("spec.upstream.idleTimeout", s.upstream.idle_timeout.as_ref(), SECOND, HOUR);
    if s.upstream.port == 0 {
        p.add("spec.upstream.port", "the port must be from 1 to 65535");
    }

    if let Some(client_ip) = &s.client_ip {
        for (i, proxy) in client_ip.trusted_proxies.iter().enumerate() {
            if proxy.parse::<ipnet::IpNet>().is_err() && proxy.parse::<IpAddr>().is_err() {
                p.add(
                    format!("spec.clientIp.trustedProxies[{i}]"),
                    format!("{proxy:?} is not an IP address or CIDR range such as 10.0.0.0/8"),
                );
            }
        }
    }

    if let Some(redis) = &s.redis {
        match (&redis.url, &redis.secret_ref) {
            (Some(_), Some(_)) | (None, None) => p.add("spec.redis", "set exactly one of url and secretRef"),
            (Some(url), None) => {
                for (i, node) in url.split(',').enumerate() {
                    if let Err(why) = check_redis_url(node.trim()) {
                        let at = if url.contains(',') { format!(" (node {})", i + 1) } else { String::new() };
                        p.add("spec.redis.url", format!("{why}{at}"));
                    }
                }
            }
            (None, Some(secret)) => {
                if !is_dns_subdomain(&secret.name) {
                    p.add("spec.redis.secretRef.name", format!("{:?} is not a Secret name", secret.name));
                }
            }
        }
        p.duration_opt("spec.redis.timeout", redis.timeout.as_ref(), 1, 10 * SECOND);
    }
}

/// Each route's name, match and settings, and routes that can never match; returns the
/// route names by index.
fn routes<'s>(p: &mut Problems, s: &'s ApiPolicySpec, ctx: &Ctx<'_>) -> HashMap<&'s str, usize> {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, route) in s.routes.iter().enumerate() {
        let at = format!("spec.routes[{i}]");
        if route.name == DEFAULT_ROUTE {
            p.add(
                format!("{at}.name"),
                "the name \"default\" is reserved for requests that no route matches; choose another",
            );
        } else if !is_dns_label(&route.name) {
            p.add(
                format!("{at}.name"),
                format!(
                    "{:?} is not a valid route name: use lower-case letters, digits and '-' (at most 63)",
                    route.name
                ),
            );
        }
        if let Some(first) = names.insert(&route.name, i) {
            names.insert(&route.name, first);
            p.add(
                format!("{at}.name"),
                format!(
                    "the name {:?} is already used by spec.routes[{first}]; route names must be unique",
                    route.name
                ),
            );
        }
        route_match(p, &at, &route.matches);
        ctx.settings(p, &at, &route.settings, &route.matches.methods);
        for (j, earlier) in s.routes[..i].iter().enumerate() {
            if covers(&earlier.matches, &route.matches) {
                p.add(
                    format!("{at}.match"),
                    format!(
                        "this route can never match: spec.routes[{j}] ({:?}) comes first and matches every request it would; move this route above it or narrow the earlier one",
                        earlier.name
                    ),
                );
                break;
            }
        }
    }
    names
}

fn slos(p: &mut Problems, s: &ApiPolicySpec, names: &HashMap<&str, usize>) {
    let mut slo_names: HashMap<&str, usize> = HashMap::new();
    for (i, slo) in s.slos.iter().enumerate() {
        let at = format!("spec.slos[{i}]");
        if !is_dns_label(&slo.name) {
            p.add(
                format!("{at}.name"),
                format!("{:?} is not a valid SLO name: use lower-case letters, digits and '-'", slo.name),
            );
        }
        if let Some(first) = slo_names.insert(&slo.name, i) {
            slo_names.insert(&slo.name, first);
            p.add(
                format!("{at}.name"),
                format!(
                    "the name {:?} is already used by spec.slos[{first}]; SLO names must be unique",
                    slo.name
                ),
            );
        }
        if !(slo.objective > 0.0 && slo.objective < 100.0) {
            p.add(
                format!("{at}.objective"),
                format!(
                    "{} is not a percentage strictly between 0 and 100: write 99.9 for 99.9% good requests",
                    slo.objective
                ),
            );
        }
        if let Some(window) = &slo.window {
            p.duration(&format!("{at}.window"), window, HOUR, 90 * DAY);
            if !window.as_millis().is_multiple_of(MINUTE) {
                p.add(
                    format!("{at}.window"),
                    format!("{window} is not a whole number of minutes, the SLO bucket size"),
                );
            }
        }
        match (&slo.indicator.availability, &slo.indicator.latency) {
            (Some(_), Some(_)) | (None, None) => {
                p.add(format!("{at}.indicator"), "set exactly one of availability and latency")
            }
            (None, Some(latency)) => {
                p.duration(&format!("{at}.indicator.latency.threshold"), &latency.threshold, 1, HOUR)
            }
            (Some(_), None) => {}
        }
        if let Some(routes) = &slo.routes {
            if routes.is_empty() {
                p.add(
                    format!("{at}.routes"),
                    "an empty list counts no request: name routes, or leave routes out to count them all",
                );
            }
            for (k, name) in routes.iter().enumerate() {
                if name != DEFAULT_ROUTE && !names.contains_key(name.as_str()) {
                    p.add(
                        format!("{at}.routes[{k}]"),
                        format!("there is no route named {name:?}; name one of spec.routes, or \"default\" for requests no route matches"),
                    );
                }
                if routes[..k].contains(name) {
                    p.add(format!("{at}.routes[{k}]"), format!("{name:?} is named twice"));
                }
            }
        }
    }
}

/// `spec.priorities`, and the SLO protections that need them.
fn priorities(p: &mut Problems, s: &ApiPolicySpec, names: &HashMap<&str, usize>) {
    for (i, prio) in s.priorities.iter().enumerate() {
        let at = format!("spec.priorities[{i}]");
        if prio.header.is_none() && prio.routes.is_empty() {
            p.add(at.clone(), "matches no request: give header, routes, or both");
        }
        if let Some(h) = &prio.header
            && !is_token(&h.name)
        {
            p.add(format!("{at}.header.name"), format!("{:?} is not a header name", h.name));
        }
        for (k, name) in prio.routes.iter().enumerate() {
            if name != DEFAULT_ROUTE && !names.contains_key(name.as_str()) {
                p.add(format!("{at}.routes[{k}]"), format!("there is no route named {name:?}"));
            }
        }
    }
    for (i, slo) in s.slos.iter().enumerate() {
        let Some(protect) = &slo.protect else { continue };
        let at = format!("spec.slos[{i}].protect");
        if let Some(t) = protect.tighten_to
            && !(t > 0.0 && t < 1.0)
        {
            p.add(
                format!("{at}.tightenTo"),
                format!("{t} is out of range: above 0 and below 1 (0.5 halves the rate)"),
            );
        }
        if protect.actions.contains(&crate::ProtectAction::ShedByPriority)
            && !s.priorities.iter().any(|p| p.class == crate::PriorityClass::Sheddable)
        {
            p.add(
                format!("{at}.actions"),
                "ShedByPriority sheds requests of class Sheddable, and spec.priorities names none",
            );
        }
    }
}

fn health_checks(p: &mut Problems, s: &ApiPolicySpec) {
    if let Some(hc) = &s.health_checks {
        if let Some(up) = &hc.upstream {
            if !up.path.starts_with('/') {
                p.add("spec.healthChecks.upstream.path", format!("{:?} must start with /", up.path));
            }
            timing(p, "spec.healthChecks.upstream", &up.timing);
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, dep) in hc.dependencies.iter().enumerate() {
            let at = format!("spec.healthChecks.dependencies[{i}]");
            if !is_dns_label(&dep.name) {
                p.add(
                    format!("{at}.name"),
                    format!(
                        "{:?} is not a valid check name: use lower-case letters, digits and '-'",
                        dep.name
                    ),
                );
            }
            if let Some(first) = seen.insert(&dep.name, i) {
                seen.insert(&dep.name, first);
                p.add(
                    format!("{at}.name"),
                    format!(
                        "the name {:?} is already used by spec.healthChecks.dependencies[{first}]",
                        dep.name
                    ),
                );
            }
            match (&dep.tcp, &dep.http) {
                (Some(_), Some(_)) | (None, None) => p.add(at.clone(), "set exactly one of tcp and http"),
                (Some(tcp), None) => {
                    if let Err(why) = check_host_port(&tcp.address) {
                        p.add(format!("{at}.tcp.address"), why);
                    }
                }
                (None, Some(http)) => {
                    match http.url.strip_prefix("http://") {
                        Some(rest) => {
                            let authority = rest.split('/').next().unwrap_or_default();
                            let hostport = if authority.contains(':') {
                                authority.to_owned()
                            } else {
                                format!("{authority}:80")
                            };
                            if let Err(why) = check_host_port(&hostport) {
                                p.add(format!("{at}.http.url"), why);
                            }
                        }
                        None => p.add(
                            format!("{at}.http.url"),
                            format!(
                                "{:?} must be an http:// URL (for a TLS endpoint use a tcp check)",
                                http.url
                            ),
                        ),
                    }
                    if let Some(code) = http.expected_status
                        && !(100..=599).contains(&code)
                    {
                        p.add(format!("{at}.http.expectedStatus"), format!("{code} is not an HTTP status"));
                    }
                }
            }
            timing(p, &at, &dep.timing);
        }
    }
}

impl Problems {
    fn duration_opt(&mut self, path: &str, d: Option<&Duration>, min: u64, max: u64) {
        if let Some(d) = d {
            self.duration(path, d, min, max);
        }
    }
}

fn selector(p: &mut Problems, s: &ApiPolicySpec) {
    let labels = s.selector.match_labels.as_ref().is_some_and(|m| !m.is_empty());
    let exprs = s.selector.match_expressions.as_ref().is_some_and(|e| !e.is_empty());
    if !labels && !exprs {
        p.add(
            "spec.selector",
            "select the pods to govern, for example matchLabels: {app: products}; an empty selector would put the sidecar into every pod of the namespace",
        );
    }
    for (i, e) in s.selector.match_expressions.iter().flatten().enumerate() {
        let at = format!("spec.selector.matchExpressions[{i}]");
        let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
        match e.operator.as_str() {
            "In" | "NotIn" if !has_values => {
                p.add(format!("{at}.values"), format!("operator {} needs at least one value", e.operator))
            }
            "Exists" | "DoesNotExist" if has_values => {
                p.add(format!("{at}.values"), format!("operator {} takes no values", e.operator))
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => p.add(
                format!("{at}.operator"),
                format!("{other:?} is not an operator: use In, NotIn, Exists or DoesNotExist"),
            ),
        }
    }
}

fn timing(p: &mut Problems, at: &str, t: &CheckTiming) {
    p.duration_opt(&format!("{at}.interval"), t.interval.as_ref(), SECOND, HOUR);
    p.duration_opt(&format!("{at}.timeout"), t.timeout.as_ref(), 1, MINUTE);
    let interval = t.interval.as_ref().map_or(5 * SECOND, Duration::as_millis);
    let timeout = t.timeout.as_ref().map_or(SECOND, Duration::as_millis);
    if timeout >= interval {
        p.add(
            format!("{at}.timeout"),
            format!(
                "the timeout ({}) must be shorter than the interval ({})",
                Duration::from_millis(timeout),
                Duration::from_millis(interval)
            ),
        );
    }
    for (field, v) in
        [("unhealthyThreshold", t.unhealthy_threshold), ("healthyThreshold", t.healthy_threshold)]
    {
        if let Some(v) = v
            && !(1..=100).contains(&v)
        {
            p.add(format!("{at}.{field}"), format!("{v} is out of range: use 1 to 100"));
        }
    }
}

fn route_match(p: &mut Problems, at: &str, m: &RouteMatch) {
    let path = &m.path;
    match (&path.prefix, &path.exact, &path.regex) {
        (Some(v), None, None) | (None, Some(v), None) => {
            let field = if path.prefix.is_some() { "prefix" } else { "exact" };
            if !v.starts_with('/') {
                p.add(format!("{at}.match.path.{field}"), format!("{v:?} must start with /"));
            } else if v.contains(['?', '#']) || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                p.add(
                    format!("{at}.match.path.{field}"),
                    format!("{v:?} must be a path only: no query, fragment or spaces"),
                );
            }
        }
        (None, None, Some(re)) => {
            if let Err(e) = compile_path_regex(re) {
                p.add(
                    format!("{at}.match.path.regex"),
                    format!("{re:?} is not a valid regular expression: {}", regex_reason(&e)),
                );
            }
        }
        _ => p.add(format!("{at}.match.path"), "set exactly one of prefix, exact and regex"),
    }
    for (k, method) in m.methods.iter().enumerate() {
        if m.methods[..k].contains(method) {
            p.add(format!("{at}.match.methods[{k}]"), format!("{} is listed twice", method.as_str()));
        }
    }
    for (k, h) in m.headers.iter().enumerate() {
        if !is_token(&h.name) {
            p.add(format!("{at}.match.headers[{k}].name"), format!("{:?} is not a header name", h.name));
        }
    }
}

/// The regex of a `regex` path match, anchored to match the whole path.
/// The regex crate's reason in one line, without the pattern it compiled (which wraps the
/// user's in `^(?:…)$`): its message's `error: …` line.
fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map_or_else(|| text.lines().last().unwrap_or_default().trim().to_owned(), str::to_owned)
}

pub fn compile_path_regex(re: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{re})$")).size_limit(1 << 20).build()
}

/// Whether a segment-wise prefix matches a path (see `PathMatch::prefix`).
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (path.len() == prefix.len() || prefix.ends_with('/') || path.as_bytes()[prefix.len()] == b'/')
}

/// Whether every request `later` matches is matched by `earlier` too.
fn covers(earlier: &RouteMatch, later: &RouteMatch) -> bool {
    let methods = earlier.methods.is_empty()
        || (!later.methods.is_empty() && later.methods.iter().all(|m| earlier.methods.contains(m)));
    let headers = earlier.headers.iter().all(|h| later.headers.contains(h));
    let path = match (&earlier.path, &later.path) {
        (PathMatch { prefix: Some(a), .. }, PathMatch { prefix: Some(b), .. }) => prefix_matches(a, b),
        (PathMatch { prefix: Some(a), .. }, PathMatch { exact: Some(b), .. }) => prefix_matches(a, b),
        (PathMatch { exact: Some(a), .. }, PathMatch { exact: Some(b), .. }) => a == b,
        (PathMatch { prefix: Some(a), .. }, PathMatch { regex: Some(_), .. }) => a == "/",
        (PathMatch { regex: Some(a), .. }, PathMatch { regex: Some(b), .. }) => a == b,
        _ => false,
    };
    methods && headers && path
}

struct Ctx<'a> {
    spec: &'a ApiPolicySpec,
}

impl Ctx<'_> {
    /// `methods` are the route's methods (empty: every method, as for `defaults`).
    fn settings(&self, p: &mut Problems, at: &str, s: &RouteSettings, methods: &[Method]) {
        if let Some(t) = &s.timeout {
            p.duration(&format!("{at}.timeout"), t, 1, HOUR);
            if let Some(ceiling) = &self.spec.upstream.timeout
                && t.as_millis() > ceiling.as_millis()
            {
                p.add(
                    format!("{at}.timeout"),
                    format!("{t} is longer than spec.upstream.timeout ({ceiling}); raise that or lower this"),
                );
            }
        }
        if let Some(c) = &s.cache {
            let at = format!("{at}.cache");
            if !methods.is_empty() && !methods.iter().any(|m| matches!(m, Method::Get | Method::Head)) {
                p.add(
                    at.clone(),
                    "only GET and HEAD responses are cached, and this route matches neither: remove cache or add GET to match.methods",
                );
            }
            match c.mode.unwrap_or_default() {
                CacheMode::Override => match &c.max_age {
                    None => p.add(format!("{at}.maxAge"), "mode Override needs maxAge, how long a response stays fresh (for example 60s); or use mode: Origin to honour the app's Cache-Control"),
                    Some(d) => p.duration(&format!("{at}.maxAge"), d, 0, 365 * DAY),
                },
                CacheMode::Origin => {
                    for (field, set) in [("maxAge", c.max_age.is_some()), ("staleWhileRevalidate", c.stale_while_revalidate.is_some()), ("staleIfError", c.stale_if_error.is_some())] {
                        if set {
                            p.add(format!("{at}.{field}"), "with mode Origin the app's own Cache-Control decides this: remove the field, or use mode: Override");
                        }
                    }
                }
            }
            p.duration_opt(
                &format!("{at}.staleWhileRevalidate"),
                c.stale_while_revalidate.as_ref(),
                0,
                365 * DAY,
            );
            p.duration_opt(&format!("{at}.staleIfError"), c.stale_if_error.as_ref(), 0, 365 * DAY);
            for (k, v) in c.vary.iter().enumerate() {
                if v == "*" {
                    p.add(format!("{at}.vary[{k}]"), "Vary: * makes every response unusable from a cache; remove cache from the route instead");
                } else if !is_token(v) {
                    p.add(format!("{at}.vary[{k}]"), format!("{v:?} is not a header name"));
                }
            }
            for (k, f) in c.targeted.iter().flatten().enumerate() {
                if !is_token(f) {
                    p.add(format!("{at}.targeted[{k}]"), format!("{f:?} is not a header name"));
                } else if f.eq_ignore_ascii_case("cache-control") {
                    p.add(format!("{at}.targeted[{k}]"), "Cache-Control is obeyed when no targeted field is present: list only targeted fields such as CDN-Cache-Control");
                }
            }
            for (k, status) in c.statuses.iter().flatten().enumerate() {
                if !(200..=599).contains(status) || *status == 206 || *status == 304 {
                    p.add(format!("{at}.statuses[{k}]"), format!("{status} cannot be stored: a final status from 200 to 599, other than 206 and 304 (partial and not-modified answers are never stored whole)"));
                }
            }
            if let Some(store) = &c.store {
                if c.private == Some(true) && store.enabled == Some(true) {
                    p.add(
                        format!("{at}.store.enabled"),
                        "private responses are for one client and the sidecar is a shared cache: set store.enabled: false or private: false",
                    );
                }
                if let Some(size) = &store.max_entry_size {
                    p.size(&format!("{at}.store.maxEntrySize"), size, 1, 64 * MIB);
                }
            }
            for (k, key) in c.surrogate_keys.iter().enumerate() {
                if key.is_empty() || !key.chars().all(|ch| ch.is_ascii_graphic()) {
                    p.add(
                        format!("{at}.surrogateKeys[{k}]"),
                        format!("{key:?} is not a surrogate key: use visible ASCII characters and no spaces"),
                    );
                }
            }
        }
        if let Some(rl) = &s.rate_limit {
            self.rate_limit(p, &format!("{at}.rateLimit"), rl);
        }
        if let Some(c) = &s.compression {
            let at = format!("{at}.compression");
            for (k, a) in c.algorithms.iter().enumerate() {
                if c.algorithms[..k].contains(a) {
                    p.add(format!("{at}.algorithms[{k}]"), format!("{} is listed twice", a.as_str()));
                }
            }
            if let Some(size) = &c.min_size {
                p.size(&format!("{at}.minSize"), size, 0, 1024 * MIB);
            }
            for (k, ct) in c.content_types.iter().enumerate() {
                let ok = ct.split_once('/').is_some_and(|(t, sub)| {
                    is_token(t) && !sub.is_empty() && sub.split('+').all(|part| part == "*" || is_token(part))
                });
                if !ok {
                    p.add(
                        format!("{at}.contentTypes[{k}]"),
                        format!("{ct:?} is not a media type such as application/json or text/*"),
                    );
                }
            }
        }
        if let Some(cl) = &s.concurrency_limit {
            concurrency(p, &format!("{at}.concurrencyLimit"), cl);
        }
        if let Some(size) = &s.max_request_body {
            p.size(&format!("{at}.maxRequestBody"), size, 1, 64 * 1024 * MIB);
        }
        if let Some(r) = &s.retry {
            retry(p, &format!("{at}.retry"), r, s.timeout.as_ref());
        }
        if let Some(c) = &s.circuit_breaker {
            circuit_breaker(p, &format!("{at}.circuitBreaker"), c);
        }
        if let Some(rules) = &s.request_headers {
            header_rules(p, &format!("{at}.requestHeaders"), rules);
        }
    }

    fn rate_limit(&self, p: &mut Problems, at: &str, rl: &RateLimit) {
        if rl.requests == 0 {
            p.add(format!("{at}.requests"), "must be at least 1");
        }
        p.duration(&format!("{at}.per"), &rl.per, 10, 7 * DAY);
        if rl.algorithm == Some(Algorithm::SlidingWindow) && rl.burst.is_some() {
            p.add(format!("{at}.burst"), "burst has no meaning for SlidingWindow, which allows `requests` in any window of `per`: remove it, or use TokenBucket or GCRA");
        }
        if let Some(burst) = rl.burst
            && burst > 1_000_000
        {
            p.add(format!("{at}.burst"), format!("{burst} is out of range: use 0 to 1000000"));
        }
        if let Some(key) = &rl.key {
            match (&key.client_ip, &key.header) {
                (None, None) => p.add(format!("{at}.key"), "set clientIp: {}, header: {name: ...}, or both"),
                (_, Some(h)) => {
                    if !is_token(&h.name) {
                        p.add(format!("{at}.key.header.name"), format!("{:?} is not a header name", h.name));
                    }
                    if let Some(status) = h.reject_status {
                        if status != 401 && status != 429 {
                            p.add(
                                format!("{at}.key.header.rejectStatus"),
                                format!("{status} is not allowed: use 401 or 429"),
                            );
                        }
                        if h.on_missing != Some(crate::MissingKey::Reject) {
                            p.add(
                                format!("{at}.key.header.rejectStatus"),
                                "rejectStatus applies only with onMissing: Reject",
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        if rl.scope == Some(Scope::Global) && self.spec.redis.is_none() {
            p.add(
                format!("{at}.scope"),
                "scope Global counts in Redis: set spec.redis (url or secretRef), or use scope Pod or Replicas",
            );
        }
        if rl.on_store_failure.is_some() && rl.scope != Some(Scope::Global) {
            p.add(
                format!("{at}.onStoreFailure"),
                "onStoreFailure applies only to scope: Global, the one that uses Redis",
            );
        }
        if rl.mode == Some(LimitMode::Shadow) && rl.on_store_failure == Some(StoreFailure::FailClosed) {
            p.add(format!("{at}.onStoreFailure"), "a Shadow limit never rejects, so FailClosed would reject where the limit itself never does: use FailOpen or LocalFallback");
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, o) in rl.overrides.iter().enumerate() {
            let oat = format!("{at}.overrides[{i}]");
            if o.values.is_empty() {
                p.add(format!("{oat}.values"), "list at least one key value");
            }
            for (k, v) in o.values.iter().enumerate() {
                if let Some(first) = seen.insert(v, i) {
                    seen.insert(v, first);
                    p.add(
                        format!("{oat}.values[{k}]"),
                        format!("{v:?} already has a limit in {at}.overrides[{first}]"),
                    );
                }
            }
            if o.requests == 0 {
                p.add(format!("{oat}.requests"), "must be at least 1");
            }
            if let Some(per) = &o.per {
                p.duration(&format!("{oat}.per"), per, 10, 7 * DAY);
            }
            if rl.algorithm == Some(Algorithm::SlidingWindow) && o.burst.is_some() {
                p.add(format!("{oat}.burst"), "burst has no meaning for SlidingWindow: remove it");
            }
        }
    }
}

/// Its messages show the URL with its password hidden: they reach status, events and logs.
fn check_redis_url(url: &str) -> Result<(), String> {
    let shown = crate::redact_url(url);
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .ok_or_else(|| format!("{shown:?} must start with redis:// or rediss://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let hostport = authority.rsplit('@').next().unwrap_or_default();
    let hostport = if hostport.contains(':') && !hostport.ends_with(']') {
        hostport.to_owned()
    } else {
        format!("{hostport}:6379")
    };
    check_host_port(&hostport).map_err(|why| format!("{shown:?}: {why}"))
}

fn check_host_port(address: &str) -> Result<(), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("{address:?} must be host:port"));
    };
    if host.is_empty() {
        return Err(format!("{address:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{address:?} has no valid port (1 to 65535)")),
    }
}

/// RFC 9110 token characters (header names).
/// Request headers a route may not set or remove: they frame the message or route it hop by
/// hop (RFC 9110 §7.6.1), or the sidecar owns them (the host, the request id, the forwarding
/// headers it sets or drops by trust).
const UNCHANGEABLE_HEADERS: [&str; 14] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "x-request-id",
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
];

fn unchangeable(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    UNCHANGEABLE_HEADERS.contains(&name.as_str()) || name.starts_with("x-forwarded-")
}

fn concurrency(p: &mut Problems, at: &str, cl: &crate::ConcurrencyLimit) {
    match (cl.max_in_flight, &cl.adaptive) {
        (Some(_), Some(_)) => p.add(at.to_owned(), "give maxInFlight (a fixed limit) or adaptive, not both"),
        (None, None) => p.add(at.to_owned(), "give maxInFlight (a fixed limit) or adaptive"),
        (Some(max), None) if !(1..=1_000_000).contains(&max) => {
            p.add(format!("{at}.maxInFlight"), format!("{max} is out of range: use 1 to 1000000"))
        }
        _ => {}
    }
    if let Some(a) = &cl.adaptive {
        if let (Some(min), Some(max)) = (a.min_limit, a.max_limit)
            && min > max
        {
            p.add(format!("{at}.adaptive.maxLimit"), format!("{max} is below minLimit {min}"));
        }
        if let Some(t) = a.latency_tolerance
            && !(1.0..=10.0).contains(&t)
        {
            p.add(
                format!("{at}.adaptive.latencyTolerance"),
                format!("{t} is out of range: a factor from 1 to 10"),
            );
        }
        p.duration_opt(&format!("{at}.adaptive.sampleWindow"), a.sample_window.as_ref(), 10, 60_000);
    }
}

fn retry(p: &mut Problems, at: &str, r: &crate::Retry, timeout: Option<&Duration>) {
    if let Some(n) = r.attempts
        && !(2..=5).contains(&n)
    {
        p.add(
            format!("{at}.attempts"),
            format!("{n} is out of range: tries in all, the first included, 2 to 5"),
        );
    }
    for (k, on) in r.on.iter().enumerate() {
        if crate::RetryOn::parse(on).is_none() {
            p.add(
                format!("{at}.on[{k}]"),
                format!("{on:?} is not a retry condition: use connect-failure, reset, timeout, gateway-error, 5xx, or a status from 400 to 599"),
            );
        }
    }
    p.duration_opt(&format!("{at}.perTryTimeout"), r.per_try_timeout.as_ref(), 1, 3_600_000);
    if let (Some(per_try), Some(route)) = (&r.per_try_timeout, timeout)
        && per_try.as_millis() > route.as_millis()
    {
        p.add(
            format!("{at}.perTryTimeout"),
            "longer than the route's timeout, which bounds all tries together: it would never apply",
        );
    }
    if let Some(b) = &r.backoff {
        p.duration_opt(&format!("{at}.backoff.base"), b.base.as_ref(), 1, 60_000);
        p.duration_opt(&format!("{at}.backoff.max"), b.max.as_ref(), 1, 60_000);
        if let (Some(base), Some(max)) = (&b.base, &b.max)
            && base.as_millis() > max.as_millis()
        {
            p.add(format!("{at}.backoff.max"), "shorter than base");
        }
    }
    if let Some(b) = &r.budget {
        if let Some(ratio) = b.ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            p.add(
                format!("{at}.budget.ratio"),
                format!("{ratio} is out of range: 0 to 1 (0.2 lets retries add a fifth)"),
            );
        }
        if let Some(n) = b.min_per_second
            && n > 10_000
        {
            p.add(format!("{at}.budget.minPerSecond"), format!("{n} is out of range: 0 to 10000"));
        }
        p.duration_opt(&format!("{at}.budget.ttl"), b.ttl.as_ref(), 1000, 60_000);
    }
}

fn circuit_breaker(p: &mut Problems, at: &str, c: &crate::CircuitBreaker) {
    if c.consecutive_failures == Some(0) {
        p.add(format!("{at}.consecutiveFailures"), "0 would keep the circuit open: use 1 or more");
    }
    if let Some(r) = c.failure_ratio
        && !(r > 0.0 && r <= 1.0)
    {
        p.add(format!("{at}.failureRatio"), format!("{r} is out of range: above 0, at most 1"));
    }
    if c.half_open_requests == Some(0) {
        p.add(format!("{at}.halfOpenRequests"), "0 would never close the circuit: use 1 or more");
    }
    p.duration_opt(&format!("{at}.window"), c.window.as_ref(), 1000, 600_000);
    p.duration_opt(&format!("{at}.openFor"), c.open_for.as_ref(), 100, 600_000);
}

fn header_rules(p: &mut Problems, at: &str, rules: &crate::HeaderRules) {
    let mut seen = std::collections::BTreeSet::new();
    for (name, value) in &rules.set {
        let path = format!("{at}.set[{name:?}]");
        if !is_token(name) {
            p.add(&path, format!("{name:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~)"));
        } else if unchangeable(name) {
            p.add(&path, format!("{name} cannot be set: the sidecar or the HTTP framing owns it"));
        } else if !seen.insert(name.to_ascii_lowercase()) {
            p.add(&path, format!("{name} is set twice (header names are case-insensitive)"));
        }
        if value.len() > 8192 {
            p.add(&path, "the value is longer than 8192 bytes");
        } else if !value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
            p.add(&path, "the value may hold visible ASCII, spaces and tabs only (no line breaks)");
        }
    }
    for (i, name) in rules.remove.iter().enumerate() {
        let path = format!("{at}.remove[{i}]");
        if !is_token(name) {
            p.add(&path, format!("{name:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~)"));
        } else if unchangeable(name) {
            p.add(&path, format!("{name} cannot be removed: the sidecar or the HTTP framing owns it"));
        } else if seen.contains(&name.to_ascii_lowercase()) {
            p.add(&path, format!("{name} is both set and removed"));
        }
    }
}

pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bad_redis_url_is_named_without_its_password() {
        for url in ["http://:s3cret@redis:6379", "redis://:s3cret@redis:99999"] {
            let why = super::check_redis_url(url).unwrap_err();
            assert!(!why.contains("s3cret") && why.contains("***"), "{why}");
        }
    }
}
