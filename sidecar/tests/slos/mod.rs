//! SLO accounting and health checks over real sockets.

use std::time::{Duration, Instant};

use apipolicy_sidecar::server::start;
use http::StatusCode;

use crate::support::*;

const ROUTES: &str = "  - name: api
    match: {path: {prefix: /status}}
  - name: slow
    match: {path: {prefix: /slow}}
    timeout: 250ms
  - name: limited
    match: {path: {prefix: /limited}}
    rateLimit: {requests: 1, per: 1m, burst: 2}
  slos:
  - name: availability
    objective: 99
    indicator: {availability: {}}
  - name: api-latency
    objective: 95
    window: 1d
    indicator: {latency: {threshold: 100ms}}
    routes: [api, slow]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slo_and_metrics_agree_with_what_was_sent() {
    let up = Upstream::start().await;
    let dir = TempDir::new("slo");
    let path = dir.file("policy.yaml", &policy(ROUTES));
    let sc = start(flags(path, &up.url())).await.unwrap();
    let c = client();
    let base = format!("http://{}", sc.proxy_addr);
    // 40 fine, 10 app errors (5xx), 5 client errors (4xx: good), 3 sidecar timeouts (504:
    // bad), 2 slow-but-fine (good for availability, bad for latency), 6 rate-limited (2
    // allowed and 4 refused: the refused ones are excluded).
    let mut sent = Vec::new();
    for _ in 0..40 {
        sent.push(get(&c, format!("{base}/status?code=200")).await.0);
    }
    for _ in 0..10 {
        sent.push(get(&c, format!("{base}/status?code=503")).await.0);
    }
    for _ in 0..5 {
        sent.push(get(&c, format!("{base}/status?code=404")).await.0);
    }
    for _ in 0..3 {
        sent.push(get(&c, format!("{base}/slow?ms=1000")).await.0);
    }
    for _ in 0..2 {
        sent.push(get(&c, format!("{base}/slow?ms=150")).await.0);
    }
    for _ in 0..6 {
        sent.push(get(&c, format!("{base}/limited")).await.0);
    }
    assert_eq!(sent.iter().filter(|s| **s == StatusCode::GATEWAY_TIMEOUT).count(), 3);
    assert_eq!(sent.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count(), 4);
    // Counting happens when each response body ends, just after the client read it (each
    // request is counted by every SLO at once).
    eventually("the last request counted", Duration::from_secs(5), || async {
        let (_, _, body) = get(&c, format!("http://{}/slo", sc.admin_addr)).await;
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        doc["slos"][0]["totalRequests"].as_u64() >= Some(62)
    })
    .await;

    let (status, _, body) = get(&c, format!("http://{}/slo", sc.admin_addr)).await;
    assert_eq!(status, StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let slos = doc["slos"].as_array().unwrap();
    let availability = &slos[0];
    let latency = &slos[1];
    // Availability: 40 + 10 + 5 + 3 + 2 + 2 allowed = 62 counted; bad = 10 + 3 = 13.
    assert_eq!(availability["name"], "availability");
    assert_eq!(
        (availability["totalRequests"].as_u64(), availability["goodRequests"].as_u64()),
        (Some(62), Some(49))
    );
    let sli = 100.0 * 49.0 / 62.0;
    assert!((availability["sli"].as_f64().unwrap() - sli).abs() < 0.001, "{availability}");
    // The budget is 1% of 62 = 0.62 requests; 13 bad ones spend it many times over.
    assert_eq!(availability["errorBudgetRemaining"], -100.0);
    assert_eq!(availability["state"], "Critical", "a 5m and 1h burn far over 14.4");
    assert_eq!(
        availability["burnRates"]["5m"].as_f64().unwrap(),
        ((13.0 / 62.0 / 0.01) * 10_000.0_f64).round() / 10_000.0
    );
    // Latency (api and slow only): 40 + 10 + 5 + 3 + 2 = 60; good = 40 + 5 (fast, not 5xx).
    assert_eq!((latency["totalRequests"].as_u64(), latency["goodRequests"].as_u64()), (Some(60), Some(45)));
    assert_eq!(latency["windowMs"], 86_400_000);

    let text =
        String::from_utf8(get(&c, format!("http://{}/metrics", sc.admin_addr)).await.2.to_vec()).unwrap();
    for (series, want) in [
        (r#"apipolicy_slo_requests_total{result="good",slo="availability"}"#, 49.0),
        (r#"apipolicy_slo_requests_total{result="bad",slo="availability"}"#, 13.0),
        (r#"apipolicy_slo_excluded_requests_total{slo="availability"}"#, 4.0),
        (r#"apipolicy_slo_requests_total{result="good",slo="api-latency"}"#, 45.0),
        (r#"apipolicy_slo_requests_total{result="bad",slo="api-latency"}"#, 15.0),
    ] {
        assert_eq!(metric(&text, series), Some(want), "{series}");
    }
    // The gauges follow within a second.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let text =
            String::from_utf8(get(&c, format!("http://{}/metrics", sc.admin_addr)).await.2.to_vec()).unwrap();
        if metric(&text, r#"apipolicy_slo_error_budget_remaining{slo="availability"}"#) == Some(-100.0) {
            assert!(
                metric(&text, r#"apipolicy_slo_burn_rate{slo="availability",window="1h"}"#).unwrap() > 14.4
            );
            break;
        }
        assert!(Instant::now() < deadline, "the budget gauge did not follow: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A reload that keeps the SLO's name keeps its history; one that drops it drops it.
    let path = dir.0.join("policy.yaml");
    write_atomic(&path, &policy(&ROUTES.replace("objective: 99\n", "objective: 98\n")));
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let doc: serde_json::Value =
            serde_json::from_slice(&get(&c, format!("http://{}/slo", sc.admin_addr)).await.2).unwrap();
        if doc["slos"][0]["objective"] == 98.0 {
            assert_eq!(doc["slos"][0]["totalRequests"], 62, "history kept across the reload");
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependencies_flip_readyz_within_interval_times_threshold() {
    let up = Upstream::start().await;
    let dependency = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dep_addr = dependency.local_addr().unwrap();
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let spare_addr = spare.local_addr().unwrap();
    drop(spare);
    let routes = format!(
        "  - name: echo
    match: {{path: {{exact: /echo}}}}
  healthChecks:
    upstream: {{path: /status, interval: 1s, timeout: 500ms}}
    dependencies:
    - {{name: db, tcp: {{address: \"{dep_addr}\"}}, interval: 1s, timeout: 200ms, unhealthyThreshold: 2, healthyThreshold: 1}}
    - {{name: optional, tcp: {{address: \"{spare_addr}\"}}, interval: 1s, timeout: 200ms, critical: false}}
"
    );
    let dir = TempDir::new("health");
    let path = dir.file("policy.yaml", &policy(&routes));
    let sc = start(flags(path, &up.url())).await.unwrap();
    let c = client();
    let readyz = || {
        let (c, url) = (c.clone(), format!("http://{}/readyz", sc.admin_addr));
        async move {
            let (status, _, body) = get(&c, url).await;
            (status, serde_json::from_slice::<serde_json::Value>(&body).unwrap())
        }
    };
    let wait_for = |want: StatusCode, within: Duration| async move {
        let t = Instant::now();
        loop {
            let (status, body) = readyz().await;
            if status == want {
                return (t.elapsed(), body);
            }
            assert!(t.elapsed() < within, "readyz stayed {status} for {:?}: {body}", t.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (_, mut body) = wait_for(StatusCode::OK, Duration::from_secs(2)).await;
    let status_of = |body: &serde_json::Value, n: &str| {
        body["checks"].as_array().unwrap().iter().find(|c| c["name"] == n).unwrap()["status"].clone()
    };
    // Ready needs the critical checks only: the optional one may not have run yet.
    let t = Instant::now();
    while status_of(&body, "optional") == "pending" && t.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        body = readyz().await.1;
    }
    let checks = body["checks"].as_array().unwrap();
    let by_name = |n: &str| checks.iter().find(|c| c["name"] == n).unwrap().clone();
    assert_eq!(by_name("upstream")["status"], "up");
    assert_eq!(by_name("db")["status"], "up");
    assert_eq!(by_name("optional")["status"], "down", "a non-critical dependency does not block readiness");

    // The database goes away: not ready within interval × unhealthyThreshold (2 s), plus
    // one interval of phase.
    drop(dependency);
    // Not ready *because the database is down* (on a machine busy with the rest of the suite the
    // upstream's own check may miss a beat too, which says nothing of this one).
    let t = Instant::now();
    let body = loop {
        let (status, body) = readyz().await;
        if status == StatusCode::SERVICE_UNAVAILABLE && status_of(&body, "db") == "down" {
            break body;
        }
        assert!(t.elapsed() < Duration::from_millis(3_500), "db not down after {:?}: {body}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let db = body["checks"].as_array().unwrap().iter().find(|c| c["name"] == "db").unwrap().clone();
    assert_eq!(db["status"], "down");
    assert!(db["lastError"].as_str().unwrap().contains(&dep_addr.to_string()));
    assert!(db["lastChange"].as_str().unwrap().ends_with('Z'));
    let (status, _, _) = get(&c, format!("http://{}/healthz", sc.admin_addr)).await;
    assert_eq!(status, StatusCode::OK, "liveness does not depend on dependencies");
    // And back.
    let _back = std::net::TcpListener::bind(dep_addr).unwrap();
    wait_for(StatusCode::OK, Duration::from_millis(2_500)).await;
    let text =
        String::from_utf8(get(&c, format!("http://{}/metrics", sc.admin_addr)).await.2.to_vec()).unwrap();
    assert_eq!(metric(&text, r#"apipolicy_health_check_up{check="db"}"#), Some(1.0));
    assert_eq!(metric(&text, r#"apipolicy_health_check_up{check="optional"}"#), Some(0.0));
    assert!(metric(&text, r#"apipolicy_health_check_duration_seconds_count{check="db"}"#).unwrap() >= 3.0);
}
