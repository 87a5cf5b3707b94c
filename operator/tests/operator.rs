//! The operator's command line and the CRD it ships.

use std::process::Command;

use serde_json::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const BIN: &str = env!("CARGO_BIN_EXE_apipolicy-operator");

#[test]
fn committed_crd_is_up_to_date() {
    let generated = apipolicy_operator::cli::crd_yaml();
    let committed =
        std::fs::read_to_string(format!("{ROOT}/crds/apipolicy.dev_apipolicies.yaml")).unwrap_or_default();
    assert!(
        generated == committed,
        "crds/apipolicy.dev_apipolicies.yaml is out of date: run `cargo run -p apipolicy-operator -- crd > crds/apipolicy.dev_apipolicies.yaml`"
    );
    let printed = Command::new(BIN).arg("crd").output().unwrap();
    assert!(printed.status.success());
    assert_eq!(String::from_utf8(printed.stdout).unwrap(), generated);
}

#[test]
fn crd_is_a_structural_schema() {
    let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
        serde_yaml::from_str(&apipolicy_operator::cli::crd_yaml()).unwrap();
    assert_eq!(crd.metadata.name.as_deref(), Some("apipolicies.apipolicy.dev"));
    let version = &crd.spec.versions[0];
    assert!(version.served && version.storage);
    assert!(version.subresources.as_ref().unwrap().status.is_some(), "status is a subresource");
    let columns: Vec<&str> =
        version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(columns, ["Accepted", "Pods", "Budget", "SLO", "Age"]);
    let schema =
        serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap();
    let mut problems = Vec::new();
    structural(&schema, "openAPIV3Schema", false, &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The rules of "structural schema" in the Kubernetes CRD documentation.
fn structural(s: &Value, at: &str, in_junctor: bool, out: &mut Vec<String>) {
    let obj = s.as_object().expect("every schema node is an object");
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if in_junctor {
        for forbidden in ["description", "type", "default", "additionalProperties", "nullable"] {
            if obj.contains_key(forbidden) {
                out.push(format!("{at}: {forbidden} inside anyOf/allOf/oneOf/not"));
            }
        }
    } else {
        match obj.get("type").and_then(Value::as_str) {
            Some("object" | "array" | "string" | "integer" | "number" | "boolean") => {}
            Some(other) => out.push(format!("{at}: unknown type {other}")),
            None if int_or_string || preserve => {}
            None => out.push(format!("{at}: no type")),
        }
    }
    if int_or_string && obj.contains_key("type") {
        out.push(format!("{at}: x-kubernetes-int-or-string with a type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        out.push(format!("{at}: properties beside additionalProperties"));
    }
    if let Some(Value::Array(_)) = obj.get("items") {
        out.push(format!("{at}: items must be one schema"));
    }
    if obj.get("type").and_then(Value::as_str) == Some("array") && !obj.contains_key("items") && !in_junctor {
        out.push(format!("{at}: an array needs items"));
    }
    if let Some(list_type) = obj.get("x-kubernetes-list-type").and_then(Value::as_str) {
        match list_type {
            "atomic" | "set" => {}
            "map" => {
                let keys: Vec<&str> = obj["x-kubernetes-list-map-keys"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k.as_str().unwrap())
                    .collect();
                let required: Vec<&str> = obj["items"]["required"]
                    .as_array()
                    .map(|r| r.iter().map(|k| k.as_str().unwrap()).collect())
                    .unwrap_or_default();
                for key in keys {
                    if !required.contains(&key) {
                        out.push(format!("{at}: list-map key {key} must be required in items"));
                    }
                    let ty = obj["items"]["properties"][key]["type"].as_str();
                    if !matches!(ty, Some("string" | "integer" | "boolean")) {
                        out.push(format!("{at}: list-map key {key} must be a scalar"));
                    }
                }
            }
            other => out.push(format!("{at}: unknown list type {other}")),
        }
    }
    for rule in obj.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten() {
        if rule.get("rule").and_then(Value::as_str).is_none_or(str::is_empty) {
            out.push(format!("{at}: a validation without a rule"));
        }
    }
    if let Some(Value::Array(values)) = obj.get("enum") {
        let ty = obj.get("type").and_then(Value::as_str);
        let nullable = obj.get("nullable") == Some(&Value::Bool(true));
        if values.iter().any(|v| ty == Some("string") && !v.is_string() && !(nullable && v.is_null())) {
            out.push(format!("{at}: enum values of the wrong type"));
        }
    }
    for (key, sub) in obj.iter() {
        match key.as_str() {
            "properties" => {
                for (name, child) in sub.as_object().unwrap() {
                    structural(child, &format!("{at}.{name}"), in_junctor, out);
                }
            }
            "items" | "additionalProperties" if sub.is_object() => {
                structural(sub, &format!("{at}[]"), in_junctor, out)
            }
            "anyOf" | "allOf" | "oneOf" => {
                for (i, child) in sub.as_array().unwrap().iter().enumerate() {
                    structural(child, &format!("{at}.{key}[{i}]"), true, out);
                }
            }
            "not" => structural(sub, &format!("{at}.not"), true, out),
            _ => {}
        }
    }
}

#[test]
fn check_accepts_the_examples() {
    let out = Command::new(BIN).args(["check", &format!("{ROOT}/examples")]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}{stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains("0 problem(s)"), "{stderr}");
}

#[test]
fn check_prints_every_problem_with_file_document_and_path() {
    let dir = std::env::temp_dir().join(format!("apipolicy-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    let quickstart = std::fs::read_to_string(format!("{ROOT}/examples/quickstart.yaml")).unwrap();
    let second = quickstart
        .replace("name: products", "name: second")
        .replace("per: 10s", "per: ten")
        .replace("maxAge: 60s", "maxAgee: 60s");
    std::fs::write(&file, format!("{quickstart}---\n{second}")).unwrap();
    let out = Command::new(BIN).arg("check").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    let shown = file.display().to_string();
    assert_eq!(
        lines,
        [
            format!(
                "{shown}: second: spec.routes[0].cache.maxAgee: unknown field \"maxAgee\"; did you mean \"maxAge\"?"
            ),
            format!(
                "{shown}: second: spec.routes[2].rateLimit.per: \"ten\" is not a duration: each part must start with a number (write it like 250ms, 1m30s, 2h or 30d)"
            ),
        ]
    );
    let missing = Command::new(BIN).args(["check", "/nonexistent/policy.yaml"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stdout).starts_with("/nonexistent/policy.yaml: cannot be read"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// The end-to-end suite, against whatever cluster `KUBECONFIG` names: it installs the CRD,
/// starts the operator out of cluster, applies every example and some invalid policies in a
/// namespace of its own, checks what `kubectl get apipolicies` shows, and cleans up. Without a
/// reachable cluster it says so and passes.
mod e2e {
    use std::{
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use apipolicy_api::ApiPolicy;
    use futures::FutureExt;
    use k8s_openapi::{
        api::core::v1::{ConfigMap, Namespace},
        apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    };
    use kube::{
        Api, Client, ResourceExt,
        api::{DeleteParams, Patch, PatchParams},
    };
    use serde::Deserialize;
    use serde_json::{Value, json};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{BIN, ROOT};

    const MANAGER: &str = "apipolicy-e2e";
    const WAIT: Duration = Duration::from_secs(90);

    async fn cluster() -> Result<Client, String> {
        if std::env::var_os("KUBECONFIG").is_none() {
            return Err("KUBECONFIG is not set".into());
        }
        let client = Client::try_default().await.map_err(|e| format!("the kubeconfig is unusable: {e}"))?;
        match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
            Ok(Ok(_)) => Ok(client),
            Ok(Err(e)) => Err(format!("the cluster does not answer: {e}")),
            Err(_) => Err("the cluster did not answer within 5 s".into()),
        }
    }

    #[test]
    fn against_a_cluster() {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let client = match cluster().await {
                Ok(c) => c,
                Err(why) => {
                    println!(
                        "e2e: SKIPPED: {why}; point KUBECONFIG at a cluster to run the end-to-end suite"
                    );
                    return;
                }
            };
            let ns = format!("apipolicy-e2e-{}-{}", std::process::id(), fastrand::u32(..) % 100_000);
            let namespaces: Api<Namespace> = Api::all(client.clone());
            install_crd(&client).await;
            namespaces
                .patch(
                    &ns,
                    &PatchParams::apply(MANAGER),
                    &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
                )
                .await
                .unwrap();
            let log = std::env::temp_dir().join(format!("{ns}.log"));
            let mut operator = start_operator(&ns, &log);
            let outcome = std::panic::AssertUnwindSafe(suite(&client, &ns, &operator.1)).catch_unwind().await;
            let _ = operator.0.kill();
            let _ = operator.0.wait();
            let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
            if let Err(panic) = outcome {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("operator log (last lines, newest first):\n{}", tail.join("\n"));
                std::panic::resume_unwind(panic);
            }
        });
    }

    async fn install_crd(client: &Client) {
        let text = std::fs::read_to_string(format!("{ROOT}/crds/apipolicy.dev_apipolicies.yaml")).unwrap();
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        api.patch(&crd.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&crd)).await.unwrap();
        eventually("the CRD is established", || async {
            let crd = api.get(&crd.name_any()).await.ok()?;
            let conditions = crd.status?.conditions?;
            conditions.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
        })
        .await;
    }

    /// Ports for the agent API and metrics: free now, taken by the operator a moment later.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// The operator, and its (agent, metrics) ports.
    fn start_operator(ns: &str, log: &std::path::Path) -> (Child, (u16, u16)) {
        let (agent, metrics) = (free_port(), free_port());
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--insecure-agent-api", "--namespace", ns, "--webhook-addr", "127.0.0.1:0"])
            .args([
                "--agent-addr",
                &format!("127.0.0.1:{agent}"),
                "--metrics-addr",
                &format!("127.0.0.1:{metrics}"),
            ])
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap();
        (child, (agent, metrics))
    }

    async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            assert!(start.elapsed() < WAIT, "timed out after {WAIT:?} waiting until {what}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A plain HTTP GET on the loopback: (status, body).
    async fn get(port: u16, path: &str) -> Option<(u16, String)> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Some((status, body))
    }

    fn condition<'a>(
        p: &'a ApiPolicy,
        type_: &str,
    ) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        p.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
    }

    async fn apply(api: &Api<ApiPolicy>, policy: &ApiPolicy) -> Result<ApiPolicy, kube::Error> {
        let mut body = serde_json::to_value(policy).unwrap();
        body["metadata"] = json!({"name": policy.name_any(), "namespace": policy.namespace()});
        body.as_object_mut().unwrap().remove("status");
        api.patch(&policy.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body)).await
    }

    fn examples(ns: &str) -> Vec<ApiPolicy> {
        let mut files: Vec<_> = std::fs::read_dir(format!("{ROOT}/examples"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        let mut out = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value = serde_yaml::Value::deserialize(doc).unwrap();
                if value.get("kind").and_then(|k| k.as_str()) != Some("ApiPolicy") {
                    continue;
                }
                let mut policy: ApiPolicy = serde_yaml::from_value(value).unwrap();
                policy.metadata.namespace = Some(ns.to_owned());
                out.push(policy);
            }
        }
        out
    }

    async fn suite(client: &Client, ns: &str, &(agent, metrics): &(u16, u16)) {
        eventually("the operator is ready", || async {
            (get(metrics, "/readyz").await?.0 == 200).then_some(())
        })
        .await;
        let api: Api<ApiPolicy> = Api::namespaced(client.clone(), ns);
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);

        let policies = examples(ns);
        assert!(policies.len() >= 5, "every example is applied");
        for p in &policies {
            apply(&api, p)
                .await
                .unwrap_or_else(|e| panic!("the API server accepts example {}: {e}", p.name_any()));
        }
        for p in &policies {
            let name = p.name_any();
            let got = eventually(&format!("{name} is Accepted and Programmed"), || async {
                let got = api.get(&name).await.ok()?;
                let fresh = got.status.as_ref()?.observed_generation == got.metadata.generation;
                let accepted = condition(&got, "Accepted")?.status == "True";
                let programmed = condition(&got, "Programmed")?.status == "True";
                (fresh && accepted && programmed).then_some(got)
            })
            .await;
            let revision = got.status.as_ref().unwrap().config_revision.clone().expect("a revision");
            let cm = eventually(&format!("the ConfigMap of {name} exists"), || async {
                config_maps.get_opt(&format!("apipolicy-{name}")).await.ok()?
            })
            .await;
            assert_eq!(cm.annotations()["apipolicy.dev/revision"], revision);
            let config = &cm.data.as_ref().unwrap()["config.json"];
            assert_eq!(apipolicy_api::manifest::load_sidecar_config(config).unwrap().revision, revision);
            assert_eq!(cm.owner_references()[0].uid, got.uid().unwrap());
        }

        // The agent API serves the compiled config; the metrics count the reconciles.
        let products = api.get("products").await.unwrap();
        let revision = products.status.as_ref().unwrap().config_revision.clone().unwrap();
        let (status, body) =
            get(agent, &format!("/v1/policies/{ns}/products/config")).await.expect("the agent API answers");
        assert_eq!(status, 200, "{body}");
        let served: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(served["config"]["revision"], revision.as_str());
        let (_, text) = get(metrics, "/metrics").await.unwrap();
        assert!(text.contains("apipolicy_operator_reconciles_total"), "{text}");

        // The API server rejects what the CRD's schema and CEL rules catch.
        let mut both_paths = policies.iter().find(|p| p.name_any() == "products").unwrap().clone();
        both_paths.metadata.name = Some("e2e-both-paths".into());
        both_paths.spec.routes[0].matches.path.exact = Some("/x".into());
        let refused = apply(&api, &both_paths).await.expect_err("the API server refuses two path matches");
        assert!(refused.to_string().contains("set exactly one of prefix, exact and regex"), "{refused}");

        // The operator rejects, with the field path, what only its validation catches.
        let mut too_slow = both_paths.clone();
        too_slow.metadata.name = Some("e2e-too-slow".into());
        too_slow.spec.routes[0].matches.path.exact = None;
        too_slow.spec.selector =
            serde_json::from_value(json!({"matchLabels": {"app": "e2e-too-slow"}})).unwrap();
        too_slow.spec.upstream.timeout = Some("2h".parse().unwrap());
        apply(&api, &too_slow).await.unwrap();
        let rejected = eventually("e2e-too-slow is rejected", || async {
            let got = api.get("e2e-too-slow").await.ok()?;
            let c = condition(&got, "Accepted")?;
            (c.status == "False").then(|| c.clone())
        })
        .await;
        assert_eq!(rejected.reason, "InvalidSpec");
        assert!(rejected.message.contains("spec.upstream.timeout"), "{}", rejected.message);

        // A newer policy on the same pods is in conflict with the older one.
        let mut twin = policies.iter().find(|p| p.name_any() == "products").unwrap().clone();
        twin.metadata.name = Some("e2e-twin".into());
        apply(&api, &twin).await.unwrap();
        let conflicted = eventually("e2e-twin is conflicted", || async {
            let got = api.get("e2e-twin").await.ok()?;
            let c = condition(&got, "Accepted")?;
            (c.status == "False").then(|| c.clone())
        })
        .await;
        assert_eq!(conflicted.reason, "Conflicted");
        assert!(conflicted.message.contains("ApiPolicy products"), "{}", conflicted.message);

        // What `kubectl get apipolicies` shows: the server's table of the printer columns.
        let request = http::Request::get(format!("/apis/apipolicy.dev/v1alpha1/namespaces/{ns}/apipolicies"))
            .header(http::header::ACCEPT, "application/json;as=Table;v=v1;g=meta.k8s.io")
            .body(Vec::new())
            .unwrap();
        let table: Value = client.request(request).await.unwrap();
        let columns: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(columns, ["Name", "Accepted", "Pods", "Budget", "SLO", "Age"]);
        let row = table["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["cells"][0] == "products")
            .expect("a products row");
        assert_eq!(row["cells"][1], "True");
        assert_eq!(row["cells"][2], "0/0");
        assert_eq!(row["cells"][3].as_f64(), Some(100.0));
        assert_eq!(row["cells"][4], "Healthy");
        let twin_row =
            table["rows"].as_array().unwrap().iter().find(|r| r["cells"][0] == "e2e-twin").unwrap();
        assert_eq!(twin_row["cells"][1], "False");
        if let Ok(out) = Command::new("kubectl").args(["get", "apipolicies", "-n", ns]).output()
            && out.status.success()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            let header: Vec<&str> = text.lines().next().unwrap_or_default().split_whitespace().collect();
            assert_eq!(header, ["NAME", "ACCEPTED", "PODS", "BUDGET", "SLO", "AGE"], "{text}");
        }

        // Deleting a policy deletes its ConfigMap.
        api.delete("products", &DeleteParams::default()).await.unwrap();
        eventually("the ConfigMap of products is gone", || async {
            config_maps.get_opt("apipolicy-products").await.ok()?.is_none().then_some(())
        })
        .await;
    }
}
