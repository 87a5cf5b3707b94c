//! `scope: Global` limits against real Redis: one server, and a 3-master Redis Cluster, all
//! started here on loopback ports.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use apipolicy_sidecar::server::{Handle, start};
use http::{Request, StatusCode};

use crate::support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `redis-server` must exist in CI (scripts/test.sh installs it); elsewhere the test is
/// skipped with a message.
fn have_redis() -> bool {
    if Command::new("redis-server").arg("--version").output().is_ok() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "redis-server is missing in CI");
    eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
    false
}

struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(dir: &TempDir, extra: &[&str]) -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", dir.0.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let r = Self { child, port };
        r.wait_for(|out| out.trim() == "PONG", &["ping"]);
        r
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_for(&self, ok: impl Fn(&str) -> bool, args: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok(&self.cli(args)) {
            assert!(Instant::now() < deadline, "redis on {} did not come up", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, name: &str) {
        Command::new("kill").args(["-s", name, &self.child.id().to_string()]).status().unwrap();
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cluster_node(dir: &TempDir, name: &str) -> Redis {
    let conf = format!("nodes-{}-{name}.conf", std::process::id());
    Redis::start(dir, &["--cluster-enabled", "yes", "--cluster-config-file", &conf])
}

fn cluster(dir: &TempDir) -> Vec<Redis> {
    let nodes: Vec<Redis> = (0..3).map(|i| cluster_node(dir, &i.to_string())).collect();
    let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    for n in &nodes {
        n.wait_for(|out| out.contains("cluster_state:ok"), &["cluster", "info"]);
    }
    nodes
}

/// Masters that join `cluster` with no slots: no key lives there, so no command is routed
/// to them.
fn spare_masters(dir: &TempDir, cluster: &[Redis], n: usize) -> Vec<Redis> {
    let spare: Vec<Redis> = (0..n).map(|i| cluster_node(dir, &format!("spare-{i}"))).collect();
    // Each meets every master: a master broadcasts a PUBLISH to the nodes it knows.
    for s in &spare {
        for m in cluster {
            assert_eq!(s.cli(&["cluster", "meet", "127.0.0.1", &m.port.to_string()]).trim(), "OK");
        }
    }
    let known = format!("cluster_known_nodes:{}", cluster.len() + n);
    for m in cluster {
        m.wait_for(|out| out.contains(&known), &["cluster", "info"]);
    }
    // And knows where the slots are, for a cluster client that asks it first. (Its own
    // `cluster_state` turns ok only seconds later, which SUBSCRIBE does not wait for.)
    for s in &spare {
        s.wait_for(|out| out.contains("cluster_slots_assigned:16384"), &["cluster", "info"]);
    }
    spare
}

/// How many clients of `node` listen on `channel`.
fn subscribers(node: &Redis, channel: &str) -> u32 {
    node.cli(&["pubsub", "numsub", channel]).lines().nth(1).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// `timeout` is Redis's: tight where timeouts are the subject, generous where exact counting
/// is, so that a busy CI machine does not turn a slow answer into a store failure.
async fn sidecars(
    n: usize,
    dir: &TempDir,
    upstream: &str,
    routes: &str,
    redis: &str,
    timeout: &str,
) -> Vec<Handle> {
    let text = policy(routes).replace(
        "  routes:\n",
        &format!("  redis: {{url: \"placeholder\", timeout: {timeout}}}\n  routes:\n"),
    );
    let text = text.replace("placeholder", redis);
    let path = dir.file("policy.yaml", &text);
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(start(flags(path.clone(), upstream)).await.unwrap());
    }
    out
}

/// 6 clients × 40 requests for one key, spread over 3 sidecars, all at once.
async fn hammer(sidecars: &[Handle]) -> (u32, u32) {
    let mut tasks = Vec::new();
    for client_no in 0..6 {
        let urls: Vec<String> = sidecars.iter().map(|s| format!("http://{}/shared", s.proxy_addr)).collect();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut limited) = (0, 0);
            for i in 0..40 {
                let req = Request::get(&urls[(i + client_no) % urls.len()]).header("x-api-key", "team-a");
                match send(&c, req.body(empty()).unwrap()).await.0 {
                    StatusCode::OK => ok += 1,
                    StatusCode::TOO_MANY_REQUESTS => limited += 1,
                    other => panic!("unexpected {other}"),
                }
            }
            (ok, limited)
        }));
    }
    let mut total = (0, 0);
    for t in tasks {
        let (ok, limited) = t.await.unwrap();
        total = (total.0 + ok, total.1 + limited);
    }
    total
}

const SHARED: &str = "  - name: shared
    match: {path: {prefix: /shared}}
    rateLimit: {algorithm: ALGO, requests: 50, per: 1m, BURST key: {header: {name: X-Api-Key}}, scope: Global, onStoreFailure: FailClosed}
";

fn shared(algorithm: &str) -> String {
    let burst = if algorithm == "SlidingWindow" { "" } else { "burst: 50," };
    SHARED.replace("ALGO", algorithm).replace("BURST ", burst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_share_one_limit_through_redis() {
    if !have_redis() {
        return;
    }
    let up = Upstream::start().await;
    for algorithm in ["TokenBucket", "GCRA", "SlidingWindow"] {
        let dir = TempDir::new("global");
        let redis = Redis::start(&dir, &[]);
        let scs = sidecars(3, &dir, &up.url(), &shared(algorithm), &redis.url(), "2s").await;
        let (ok, limited) = hammer(&scs).await;
        eprintln!(
            "{algorithm}, one Redis: 240 requests over 3 sidecars, limit 50: {ok} allowed (overshoot {})",
            ok as i64 - 50
        );
        assert_eq!((ok, limited), (50, 190), "{algorithm}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_share_one_limit_through_a_redis_cluster() {
    if !have_redis() {
        return;
    }
    let up = Upstream::start().await;
    let dir = TempDir::new("cluster");
    let nodes = cluster(&dir);
    let urls: Vec<String> = nodes.iter().map(Redis::url).collect();
    let scs = sidecars(3, &dir, &up.url(), &shared("GCRA"), &urls.join(","), "2s").await;
    // The cluster connection is made in the background: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let req = Request::get(format!("http://{}/warmup", scs[0].proxy_addr)).body(empty()).unwrap();
        let _ = send(&client(), req).await;
        let active =
            scs.iter().all(|s| s.sidecar.proxy.active.load().redis.as_ref().is_some_and(|r| r.cluster));
        // Every sidecar's own connection, not only the first's: one still connecting would
        // fail closed (503) under the hammer below.
        let mut reached = active;
        for s in &scs {
            let store = s.sidecar.proxy.active.load().redis.clone();
            reached = reached && matches!(store, Some(r) if r.ping().await.is_ok());
        }
        if reached {
            break;
        }
        assert!(Instant::now() < deadline, "the sidecars did not reach the cluster");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, limited) = hammer(&scs).await;
    eprintln!(
        "GCRA, 3-master Redis Cluster: 240 requests over 3 sidecars, limit 50: {ok} allowed (overshoot {})",
        ok as i64 - 50
    );
    assert_eq!((ok, limited), (50, 190));
    // Keys of different clients land on different masters, and each keeps its own count.
    let c = client();
    let mut keys_per_node = vec![0; 3];
    for k in 0..30 {
        let req = Request::get(format!("http://{}/shared", scs[k % 3].proxy_addr))
            .header("x-api-key", format!("k{k}"));
        assert_eq!(send(&c, req.body(empty()).unwrap()).await.0, StatusCode::OK);
    }
    for (i, n) in nodes.iter().enumerate() {
        keys_per_node[i] = n.cli(&["dbsize"]).trim().parse::<u32>().unwrap();
    }
    assert_eq!(keys_per_node.iter().sum::<u32>(), 31, "{keys_per_node:?}");
    assert!(
        keys_per_node.iter().filter(|n| **n > 0).count() >= 2,
        "keys spread over masters: {keys_per_node:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_stuck_redis_falls_back_as_configured_and_never_holds_requests() {
    if !have_redis() {
        return;
    }
    let up = Upstream::start().await;
    let dir = TempDir::new("redis-down");
    let redis = Redis::start(&dir, &[]);
    let route = |name: &str, failure: &str| {
        format!(
            "  - name: {name}\n    match: {{path: {{prefix: /{name}}}}}\n    rateLimit: {{requests: 1, per: 1m, burst: 2, scope: Global, onStoreFailure: {failure}}}\n"
        )
    };
    let routes =
        route("open", "FailOpen") + &route("closed", "FailClosed") + &route("fallback", "LocalFallback");
    let sc = sidecars(1, &dir, &up.url(), &routes, &redis.url(), "50ms").await.remove(0);
    let c = client();
    let url = |r: &str| format!("http://{}/{r}", sc.proxy_addr);
    for r in ["open", "closed", "fallback"] {
        let (status, h, _) = get(&c, url(r)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h["x-ratelimit-remaining"], "1", "{r}: counted in Redis");
    }

    for (how, signal) in [("stuck (SIGSTOP)", "STOP"), ("dead (SIGKILL)", "KILL")] {
        redis.signal(signal);
        let mut slowest = Duration::ZERO;
        let mut timed = |started: Instant| slowest = slowest.max(started.elapsed());
        for _ in 0..4 {
            let t = Instant::now();
            let (status, h, _) = get(&c, url("open")).await;
            timed(t);
            assert_eq!(status, StatusCode::OK, "{how}: FailOpen lets requests through");
            assert!(h.get("ratelimit").is_none());
            let t = Instant::now();
            let (status, _, body) = get(&c, url("closed")).await;
            timed(t);
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{how}: FailClosed refuses");
            let p: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(p["type"], "https://apipolicy.dev/problems/rate-limit-store-unavailable");
        }
        // LocalFallback limits this pod alone, with the same parameters: a fresh local bucket
        // of 2 when the first outage starts.
        let mut codes = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            codes.push(get(&c, url("fallback")).await.0.as_u16());
            timed(t);
        }
        if signal == "STOP" {
            assert_eq!(codes, [200, 200, 429], "{how}: LocalFallback limits locally");
        } else {
            assert_eq!(codes, [429, 429, 429], "{how}: the local bucket is still spent");
        }
        // 50 ms Redis timeout; the rest is a debug build on a busy machine.
        assert!(slowest < Duration::from_millis(400), "{how}: a request waited {slowest:?}");
    }
    let text =
        String::from_utf8(get(&c, format!("http://{}/metrics", sc.admin_addr)).await.2.to_vec()).unwrap();
    // Every decision made without Redis is counted once, by why: 2 outages × (4 open + 4
    // closed + 3 fallback); after 5 failures in a row the breaker skips Redis, and those count
    // too (they did not before: 64 counted for 99,000 decisions).
    let errors = |reason: &str| {
        metric(&text, &format!("apipolicy_ratelimit_store_errors_total{{reason=\"{reason}\"}}")).unwrap()
    };
    assert_eq!(errors("error") + errors("timeout") + errors("circuit_open"), 22.0, "{text}");
    assert!(errors("circuit_open") > 0.0, "{text}");
}

const CACHED: &str = "  - name: cached
    match: {path: {prefix: /app/cached}, methods: [GET, HEAD]}
    cache: {maxAge: 60s, surrogateKeys: [catalog]}
";

/// The channel the pods of the test policy tell each other about purges and invalidations on.
const EVENTS: &str = "apipolicy:events:default/test";

/// A GET of `path` from `pod` by the Service's host name: the status, `Cache-Status`, and the
/// app's number for the answer (it counts the requests to each path).
async fn cached(c: &HttpClient, pod: &Handle, path: &str) -> (StatusCode, String, Option<u64>) {
    let url = format!("http://{}{path}", pod.proxy_addr);
    let req = Request::get(url).header("host", "api.test").body(empty()).unwrap();
    let (status, h, body) = send(c, req).await;
    let n = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["n"].as_u64();
    (status, h.get("cache-status").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default(), n)
}

/// Has every pod serve `path` from its own memory; returns the app's number for that copy.
async fn in_every_memory(c: &HttpClient, pods: &[Handle], path: &str) -> u64 {
    let mut copies = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let mut tries = 0;
        loop {
            let (status, cache, n) = cached(c, pod, path).await;
            assert_eq!(status, StatusCode::OK);
            // A memory hit names no detail; one from the shared tier says `detail=shared`.
            if cache.contains("hit") && !cache.contains("detail") {
                copies.push(n.unwrap());
                break;
            }
            tries += 1;
            assert!(tries < 3, "pod {i} does not keep {path} in memory: {cache}");
        }
    }
    assert!(copies.iter().all(|n| *n == copies[0]), "one copy for all pods: {copies:?}");
    copies[0]
}

/// Asks `pod` for `path` until it no longer serves copy `stale`; returns the first other
/// answer's `Cache-Status`.
async fn until_dropped(c: &HttpClient, pod: &Handle, path: &str, stale: u64, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (status, cache, n) = cached(c, pod, path).await;
        assert_eq!(status, StatusCode::OK);
        if n != Some(stale) {
            return cache;
        }
        assert!(
            Instant::now() < deadline,
            "{} still serves copy {stale} of {path} after {within:?}: {cache}",
            pod.proxy_addr
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn purge(c: &HttpClient, pod: &Handle, keys: &str) {
    let purge = Request::post(format!("http://{}/purge", pod.admin_addr))
        .body(full(format!(r#"{{"keys": ["{keys}"]}}"#)))
        .unwrap();
    let (status, _, body) = send(c, purge).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["shared"],
        true,
        "the generation moved"
    );
}

/// Pod 0 changes `/app/cached/{name}` by a POST, which invalidates it (RFC 9111 §4.4), then
/// purges it by a surrogate key the app gave it: each time, pods 1 and 2, which hold it in
/// memory, stop serving their copy within a few seconds.
async fn changes_reach_other_pods(c: &HttpClient, pods: &[Handle], up: &Upstream, name: &str) {
    let (path, url) = (format!("/app/cached/{name}"), format!("/app/cached/{name}?skey={name}"));
    let copy = in_every_memory(c, pods, &url).await;
    let post = Request::post(format!("http://{}{url}", pods[0].proxy_addr))
        .header("host", "api.test")
        .body(empty())
        .unwrap();
    assert_eq!(send(c, post).await.0, StatusCode::OK);
    for pod in &pods[1..] {
        until_dropped(c, pod, &url, copy, Duration::from_secs(3)).await;
    }

    let copy = in_every_memory(c, pods, &url).await;
    purge(c, &pods[0], name).await;
    let hits = up.hits(&path);
    // Pod 2 misses (its copy and the shared one are gone) and refills, once; pod 1 drops its copy too.
    let cache = until_dropped(c, &pods[2], &url, copy, Duration::from_secs(3)).await;
    assert!(!cache.contains("hit"), "{cache}");
    assert_eq!(up.hits(&path), hits + 1, "refilled once");
    until_dropped(c, &pods[1], &url, copy, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_cache_tier_warms_new_pods_and_fills_once_for_all() {
    if !have_redis() {
        return;
    }
    let up = Upstream::start().await;
    let dir = TempDir::new("shared-cache");
    let redis = Redis::start(&dir, &[]);
    let mut pods = sidecars(3, &dir, &up.url(), CACHED, &redis.url(), "2s").await;
    let c = client();
    // Clients reach every pod by the Service's one host name, which is part of the cache key.
    // Pod 0 fills; pod 1, which never saw the URL, starts warm from Redis.
    let (_, status, n) = cached(&c, &pods[0], "/app/cached/warm").await;
    assert!(status.contains("stored") && n == Some(1), "{status}");
    let (_, status, n) = cached(&c, &pods[1], "/app/cached/warm").await;
    assert!(status.contains("detail=shared"), "{status}");
    assert_eq!((n, up.hits("/app/cached/warm")), (Some(1), 1));

    // Ten requests on each of three pods, at once, for a cold URL the app takes 300 ms on:
    // one request reaches the app.
    let mut tasks = Vec::new();
    for pod in &pods {
        for _ in 0..10 {
            let (c, url) = (c.clone(), format!("http://{}/app/cached/cold?ms=300", pod.proxy_addr));
            let req = Request::get(url).header("host", "api.test").body(empty()).unwrap();
            tasks.push(tokio::spawn(async move { send(&c, req).await.0 }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(up.hits("/app/cached/cold"), 1, "one fill for 30 requests on 3 pods");

    // A purge on one pod reaches the others' memory and retires the shared tier.
    let (_, _, n) = cached(&c, &pods[2], "/app/cached/warm").await;
    assert_eq!(n, Some(1));
    let purge = Request::post(format!("http://{}/purge", pods[0].admin_addr))
        .body(full(r#"{"keys": ["catalog"]}"#))
        .unwrap();
    let (status, _, body) = send(&c, purge).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["shared"], true);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (_, status, _) = cached(&c, &pods[2], "/app/cached/warm").await;
        if !status.contains("hit") {
            break;
        }
        assert!(Instant::now() < deadline, "pod 2 still serves the purged entry: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.hits("/app/cached/warm"), 2, "refilled once");
    // An invalidation by POST reaches the others' memory too (and a purge by a key warm lacks
    // leaves warm in pod 2's memory).
    changes_reach_other_pods(&c, &pods, &up, "changed").await;

    // Redis gone: the memory tier goes on, and no request waits on Redis past its timeout.
    drop(redis);
    let (status, cache, _) = cached(&c, &pods[2], "/app/cached/warm").await;
    assert_eq!(status, StatusCode::OK);
    assert!(cache.contains("hit"), "{cache}");
    let t = Instant::now();
    let (status, _, _) = cached(&c, &pods[1], "/app/cached/new").await;
    assert_eq!(status, StatusCode::OK);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    pods.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_and_invalidations_reach_every_pod_through_a_redis_cluster() {
    if !have_redis() {
        return;
    }
    let up = Upstream::start().await;
    let dir = TempDir::new("cluster-cache");
    // Three masters without slots, listed first: the pods listen on the first, and no PUBLISH
    // is sent there (it goes to the master of the channel's slot), so what they hear has
    // crossed the cluster bus.
    let masters = cluster(&dir);
    let spare = spare_masters(&dir, &masters, 3);
    let urls: Vec<String> = spare.iter().chain(&masters).map(Redis::url).collect();
    let pods = sidecars(3, &dir, &up.url(), CACHED, &urls.join(","), "1s").await;
    // The cluster connection is made in the background, and the subscriptions too: wait.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut connected = true;
        for pod in &pods {
            let redis = pod.sidecar.proxy.active.load().redis.clone().unwrap();
            connected &= redis.cluster && redis.ping().await.is_ok();
        }
        if connected && subscribers(&spare[0], EVENTS) == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the sidecars did not reach the cluster");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = client();
    changes_reach_other_pods(&c, &pods, &up, "across").await;

    // The node the pods listen on hangs, the next is dead and the one after hangs too: a purge
    // made meanwhile reaches no pod, yet each drops its copy once it listens again, on the
    // first master.
    let copy = in_every_memory(&c, &pods, "/app/cached/missed").await;
    spare[0].signal("STOP");
    spare[1].signal("KILL");
    spare[2].signal("STOP");
    purge(&c, &pods[0], "catalog").await;
    let listening: u32 = masters.iter().map(|m| subscribers(m, EVENTS)).sum();
    assert_eq!(listening, 0, "no pod listened when the purge was made");
    let hits = up.hits("/app/cached/missed");
    // Up to 2 s to the next ping and 1 s for its answer (the Redis timeout, at least 1 s), then
    // backoffs of 0.2, 0.4 and 0.8 s around the dead node and the 1 s subscription timeout.
    let cache = until_dropped(&c, &pods[2], "/app/cached/missed", copy, Duration::from_secs(15)).await;
    assert!(!cache.contains("hit"), "{cache}");
    assert_eq!(up.hits("/app/cached/missed"), hits + 1, "refilled once");
    until_dropped(&c, &pods[1], "/app/cached/missed", copy, Duration::from_secs(3)).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while subscribers(&masters[0], EVENTS) < 3 {
        assert!(Instant::now() < deadline, "the pods did not move on to the first master");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    changes_reach_other_pods(&c, &pods, &up, "moved").await;
}
