//! Every example policy, compiled as the operator compiles it, is what the sidecar runs: the
//! sidecar loads each manifest (local mode) and the compiled SidecarConfig the operator would
//! put in the ConfigMap, and both give the same revision.

use std::time::Duration;

use apipolicy_api::{compile, manifest::check_manifest};
use apipolicy_sidecar::server::{Flags, start};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

fn flags(policy: std::path::PathBuf) -> Flags {
    Flags {
        policy,
        upstream: Some("http://127.0.0.1:9".to_owned()),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        reload_interval: Duration::from_secs(60),
        drain_delay: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(1),
        access_log: false,
        replicas: 1,
        // No Redis here: Global limits fall back as configured and the cache stays in memory.
        redis: None,
        operator: None,
        cache_bytes: 1 << 20,
        hit_lane: true,
        admin_token: None,
        max_connections: 64,
        idle_timeout: Duration::from_secs(30),
        clock: apipolicy_sidecar::clock::Clock::default(),
    }
}

async fn running_revision(admin: std::net::SocketAddr) -> String {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client.get(format!("http://{admin}/config").parse().unwrap()).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["revision"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_sidecar_runs_what_the_operator_compiles() {
    let dir = std::env::temp_dir().join(format!("apipolicy-system-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let checked = check_manifest(&text);
        assert!(checked.problems.is_empty(), "{}: {:?}", path.display(), checked.problems);
        let compiled = compile(&checked.policies[0]).unwrap();

        // The manifest, as a user runs it in local mode.
        let manifest = start(flags(path.clone())).await.unwrap();
        assert_eq!(running_revision(manifest.admin_addr).await, compiled.revision, "{}", path.display());
        manifest.shutdown();
        manifest.wait().await;

        // The compiled config, as the operator writes it into the ConfigMap.
        let file = dir.join("config.json");
        std::fs::write(&file, serde_json::to_vec(&compiled).unwrap()).unwrap();
        let from_configmap = start(flags(file)).await.unwrap();
        assert_eq!(
            running_revision(from_configmap.admin_addr).await,
            compiled.revision,
            "{}",
            path.display()
        );
        from_configmap.shutdown();
        from_configmap.wait().await;
        seen += 1;
    }
    assert!(seen >= 5, "the examples are missing");
    std::fs::remove_dir_all(dir).unwrap();
}
