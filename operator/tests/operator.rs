//! The operator's command line and the CRD it ships.

use std::process::Command;

use serde::Deserialize;
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
    let text = format!("{quickstart}---\n{second}");
    std::fs::write(&file, &text).unwrap();
    // Where each field is: `FILE:LINE:COLUMN:`, as a compiler says it (the second document's).
    let at = |field: &str| {
        let (n, line) = text.lines().enumerate().filter(|(_, l)| l.contains(field)).last().unwrap();
        format!("{}:{}", n + 1, line.find(field).unwrap() + 1)
    };
    let out = Command::new(BIN).arg("check").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    let shown = file.display().to_string();
    assert_eq!(
        lines,
        [
            format!(
                "{shown}:{}: second: spec.routes[0].cache.maxAgee: unknown field \"maxAgee\"; did you mean \"maxAge\"?",
                at("maxAgee")
            ),
            format!(
                "{shown}:{}: second: spec.routes[2].rateLimit.per: \"ten\" is not a duration: each part must start with a number (write it like 250ms, 1m30s, 2h or 30d)",
                at("per: ten")
            ),
        ]
    );
    let missing = Command::new(BIN).args(["check", "/nonexistent/policy.yaml"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stdout).starts_with("/nonexistent/policy.yaml: cannot be read"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// `check` as a newcomer meets it: type errors and rule problems in the same run, documents
/// counted whether valid or not, a misspelt kind named, `-` for standard input, one problem a
/// line (a bad regex says why without the compiled pattern), a duration's units spelled out.
#[test]
fn check_reports_type_and_rule_problems_in_one_run_and_reads_stdin() {
    let quickstart = std::fs::read_to_string(format!("{ROOT}/examples/quickstart.yaml")).unwrap();
    let typed = quickstart
        .replace("name: products", "name: typed")
        .replace("timeout: 15s", "timeout: 5 minutes")
        .replace("prefix: /api/products", "regex: \"/api/([\"");
    let misspelt =
        quickstart.replace("kind: ApiPolicy", "kind: APIPolicy").replace("name: products", "name: misspelt");
    let input = format!("{quickstart}---\n{typed}---\n{misspelt}");
    let mut child = Command::new(BIN)
        .args(["check", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let find = |path: &str| {
        stdout.lines().find(|l| l.contains(path)).unwrap_or_else(|| panic!("no {path}: {stdout}"))
    };
    // The type errors…
    assert!(find(": typed: spec.upstream.timeout:").contains("without a space"), "{stdout}");
    // …and, in the same run, the rule checks of what is left.
    let regex = find(": typed: spec.routes[0].match.path.regex:");
    assert!(regex.contains("not a valid regular expression") && !regex.contains("^(?:"), "{regex}");
    assert!(find(": misspelt: kind:").contains("use ApiPolicy"), "{stdout}");
    for line in stdout.lines() {
        assert!(line.starts_with("-:"), "one problem a line: {line:?}");
    }
    // The line and column of the field: the typed document's timeout is on the quickstart's
    // line of `timeout: 15s`, one document further down.
    let first = quickstart.lines().position(|l| l.contains("timeout: 15s")).unwrap() + 1;
    let column = quickstart.lines().nth(first - 1).unwrap().find("timeout").unwrap() + 1;
    let offset = quickstart.lines().count() + 1;
    assert!(
        find(": typed: spec.upstream.timeout:").starts_with(&format!("-:{}:{column}: ", first + offset)),
        "{stdout}"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("checked 3 ApiPolicy document(s) in 1 file(s)"), "{stderr}");
}

/// The injection webhook over real HTTPS, fed AdmissionReview JSON as the API server sends it.
mod webhook_over_https {
    use std::{sync::Arc, time::Duration};

    use apipolicy_api::ApiPolicy;
    use apipolicy_operator::{
        caches::{Cache, Caches},
        certs,
        inject::InjectConfig,
        metrics::Metrics,
        serve,
        tls::ServerTls,
        webhook::{PATH, Webhook},
    };
    use bytes::Bytes;
    use http::{Method, Request, StatusCode, header};
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use k8s_openapi::ByteString;
    use kube::runtime::{reflector, watcher};
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    use serde_json::{Value, json};
    use tokio::{net::TcpStream, sync::oneshot};

    use super::ROOT;

    fn products() -> ApiPolicy {
        let text = std::fs::read_to_string(format!("{ROOT}/examples/quickstart.yaml")).unwrap();
        let mut p: ApiPolicy = serde_yaml::from_str(&text).unwrap();
        p.metadata.uid = Some("0b5e7c1e-policy".into());
        p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap(),
        ));
        p
    }

    struct Server {
        port: u16,
        ca: String,
        _stop: oneshot::Sender<()>,
        /// A cache whose writer is gone fails at once instead of staying unfilled.
        _writer: reflector::store::Writer<ApiPolicy>,
        _caches: Caches,
    }

    /// The webhook on a loopback port, with its policy cache filled (or never, when `filled` is
    /// false) and a certificate for `localhost`.
    async fn start(policies: Vec<ApiPolicy>, filled: bool) -> Server {
        let (store, mut writer) = reflector::store::<ApiPolicy>();
        let caches = Caches::default();
        if filled {
            caches.see(Cache::Policies, &Ok::<_, watcher::Error>(watcher::Event::<ApiPolicy>::InitDone));
            writer.apply_watcher_event(&watcher::Event::Init);
            for p in policies {
                writer.apply_watcher_event(&watcher::Event::InitApply(p));
            }
            writer.apply_watcher_event(&watcher::Event::InitDone);
        }
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let bundle = certs::issue(&["localhost".into()], now).unwrap();
        let tls = ServerTls::from_pem(&bundle.cert, &bundle.key).unwrap();
        let config = InjectConfig {
            operator_url: Some("https://apipolicy-operator.apipolicy-system.svc:8443".into()),
            ca: true,
            ..InjectConfig::new("ghcr.io/apipolicy/apipolicy:e2e")
        };
        let handler =
            Webhook::new(store, caches.watch(), config, None, Arc::new(Metrics::new().unwrap())).handler();
        let listener = serve::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve::serve(listener, Some(tls.acceptor()), handler, async move {
            let _ = stopped.await;
        }));
        Server { port, ca: bundle.ca_cert, _stop: stop, _writer: writer, _caches: caches }
    }

    /// A POST over HTTPS that trusts only the webhook's CA, with the protocol the server picks
    /// by ALPN (the API server speaks HTTP/2 when offered).
    async fn post(server: &Server, path: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(server.ca.as_bytes()).unwrap()).unwrap();
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("the webhook's certificate verifies against its CA");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("https://localhost:{}{path}?timeout=5s", server.port))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
            .await
            .expect("the webhook answers")
            .unwrap();
        let status = response.status();
        (status, response.into_body().collect().await.unwrap().to_bytes().to_vec())
    }

    /// A pod of a Deployment as the API server hands it to mutating webhooks: defaulted, with
    /// the service-account volume, no name yet.
    fn deployment_pod(annotations: Value, port: Value) -> Value {
        json!({
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "generateName": "products-7c9d8b6f4-",
                "namespace": "shop",
                "creationTimestamp": null,
                "labels": {"app": "products", "pod-template-hash": "7c9d8b6f4"},
                "annotations": annotations,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "products-7c9d8b6f4",
                                     "uid": "1d5e2e8a-3b1f-4c61-9f3a-6a7b0c2d9e11", "controller": true, "blockOwnerDeletion": true}],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                                   "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]
            },
            "spec": {
                "volumes": [{"name": "kube-api-access-x8r2p", "projected": {"sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
                ], "defaultMode": 420}}],
                "containers": [{
                    "name": "products",
                    "image": "registry.example/products:1.4.2",
                    "ports": [port],
                    "resources": {"requests": {"cpu": "100m"}},
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http", "scheme": "HTTP"},
                                       "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3},
                    "volumeMounts": [{"name": "kube-api-access-x8r2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent"
                }],
                "restartPolicy": "Always",
                "terminationGracePeriodSeconds": 30,
                "dnsPolicy": "ClusterFirst",
                "serviceAccountName": "default",
                "serviceAccount": "default",
                "securityContext": {},
                "schedulerName": "default-scheduler",
                "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
                "priority": 0,
                "enableServiceLinks": true,
                "preemptionPolicy": "PreemptLowerPriority"
            },
            "status": {}
        })
    }

    fn review(uid: &str, pod: &Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "kind": "AdmissionReview",
            "apiVersion": "admission.k8s.io/v1",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                             "uid": "5a0c1c63-8a5e-4b1e-9d39-1b2f6f0f6c1a",
                             "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]},
                "object": pod,
                "oldObject": null,
                "dryRun": false,
                "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
            }
        }))
        .unwrap()
    }

    /// The response of an AdmissionReview, checked for what the API server requires.
    fn response_of(body: &[u8], uid: &str) -> Value {
        let review: Value = serde_json::from_slice(body).expect("a JSON answer");
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        let response = review["response"].clone();
        assert_eq!(response["uid"], uid);
        assert_eq!(response["allowed"], true, "pods are never refused");
        response
    }

    /// The pod after the API server applied the response's patch (base64 JSON Patch).
    fn apply(pod: &Value, response: &Value) -> Value {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes: ByteString = serde_json::from_value(response["patch"].clone()).expect("a base64 patch");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes.0).expect("a JSON Patch");
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).expect("the patch applies to the pod that was sent");
        patched
    }

    /// What the injector adds, written out in full.
    fn sidecar() -> Value {
        json!({
            "name": "apipolicy-sidecar",
            "image": "ghcr.io/apipolicy/apipolicy:e2e",
            "command": ["apipolicy-sidecar"],
            "restartPolicy": "Always",
            "ports": [{"name": "http", "containerPort": 15080, "protocol": "TCP"},
                      {"name": "apipolicy-admin", "containerPort": 15090, "protocol": "TCP"}],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "APIPOLICY_POLICY", "value": "/etc/apipolicy/config.json"},
                {"name": "APIPOLICY_UPSTREAM", "value": "http://127.0.0.1:8080"},
                {"name": "APIPOLICY_LISTEN", "value": "0.0.0.0:15080"},
                {"name": "APIPOLICY_ADMIN", "value": "0.0.0.0:15090"},
                {"name": "APIPOLICY_DRAIN_DELAY", "value": "5s"},
                {"name": "APIPOLICY_THREADS", "value": "2"},
                {"name": "APIPOLICY_TOKEN_FILE", "value": "/var/run/secrets/apipolicy.dev/token"},
                {"name": "APIPOLICY_OPERATOR", "value": "https://apipolicy-operator.apipolicy-system.svc:8443"},
                {"name": "APIPOLICY_CA_FILE", "value": "/etc/apipolicy/ca.crt"}
            ],
            "volumeMounts": [
                {"name": "apipolicy-config", "mountPath": "/etc/apipolicy", "readOnly": true},
                {"name": "apipolicy-token", "mountPath": "/var/run/secrets/apipolicy.dev", "readOnly": true}
            ],
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "apipolicy-admin"}, "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "apipolicy-admin"}, "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
            "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
            "securityContext": {
                "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false, "privileged": false,
                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}
            },
            "terminationMessagePolicy": "FallbackToLogsOnError"
        })
    }

    #[tokio::test]
    async fn a_deployments_pod_comes_back_with_the_sidecar_and_its_port() {
        let policy = products();
        let revision = apipolicy_api::compile(&policy).unwrap().revision;
        let server = start(vec![policy], true).await;
        let pod = deployment_pod(
            json!({"team": "shop"}),
            json!({"name": "http", "containerPort": 8080, "protocol": "TCP"}),
        );

        let (status, body) = post(&server, PATH, review("a1b2c3d4-0001", &pod)).await;
        assert_eq!(status, StatusCode::OK);
        let response = response_of(&body, "a1b2c3d4-0001");
        assert!(response.get("warnings").is_none(), "{response}");
        let patched = apply(&pod, &response);

        let mut expected = pod.clone();
        expected["metadata"]["annotations"]["apipolicy.dev/policy"] = json!("products");
        expected["metadata"]["annotations"]["apipolicy.dev/injected-revision"] = json!(revision);
        expected["spec"]["containers"][0]["ports"][0]["name"] = json!("app-http");
        expected["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = json!("app-http");
        expected["spec"]["initContainers"] = json!([sidecar()]);
        let volumes = expected["spec"]["volumes"].as_array_mut().unwrap();
        volumes.push(json!({"name": "apipolicy-config", "configMap": {"name": "apipolicy-products"}}));
        volumes.push(json!({"name": "apipolicy-token", "projected": {"sources": [
            {"serviceAccountToken": {"audience": "apipolicy.dev", "expirationSeconds": 3600, "path": "token"}}
        ]}}));
        assert_eq!(patched, expected, "the patched pod\n{patched:#}");

        // The API server calls again when another webhook changed the pod (reinvocation): no
        // second sidecar, no patch.
        let (_, body) = post(&server, PATH, review("a1b2c3d4-0002", &patched)).await;
        let again = response_of(&body, "a1b2c3d4-0002");
        assert!(again.get("patch").is_none() && again.get("patchType").is_none(), "{again}");
    }

    #[tokio::test]
    async fn pods_it_leaves_alone_are_admitted_unchanged() {
        let server = start(vec![products()], true).await;
        let named = json!({"name": "http", "containerPort": 8080});
        let cases = [
            ("opted out", deployment_pod(json!({"apipolicy.dev/inject": "false"}), named.clone()), None),
            (
                "unnamed port",
                deployment_pod(json!({}), json!({"containerPort": 8080})),
                Some("declares port 8080 without a name"),
            ),
        ];
        for (i, (case, pod, warning)) in cases.into_iter().enumerate() {
            let uid = format!("uid-{i}");
            let (status, body) = post(&server, PATH, review(&uid, &pod)).await;
            assert_eq!(status, StatusCode::OK, "{case}");
            let response = response_of(&body, &uid);
            assert!(response.get("patch").is_none(), "{case}: {response}");
            match warning {
                Some(w) => {
                    assert!(response["warnings"][0].as_str().unwrap().contains(w), "{case}: {response}")
                }
                None => assert!(response.get("warnings").is_none(), "{case}: {response}"),
            }
        }
        let (status, _) =
            post(&server, "/validate", review("x", &deployment_pod(json!({}), named.clone()))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, body) = post(&server, PATH, b"{\"kind\": \"Nonsense\"}".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&body));
    }

    #[tokio::test]
    async fn before_the_cache_is_filled_it_fails_so_the_failure_policy_decides() {
        let server = start(vec![products()], false).await;
        let pod = deployment_pod(json!({}), json!({"name": "http", "containerPort": 8080}));
        let (status, _) = post(&server, PATH, review("u", &pod)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
}

/// The end-to-end suite, against whatever cluster `KUBECONFIG` names: it installs the CRD,
/// starts the operator out of cluster, applies every example and some invalid policies in a
/// namespace of its own, checks what `kubectl get apipolicies` shows, has pods injected through
/// the webhook (when the API server can reach this machine), and cleans up. Without a reachable
/// cluster it says so and passes.
mod e2e {
    use std::{
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use apipolicy_api::ApiPolicy;
    use futures::FutureExt;
    use k8s_openapi::{
        api::{
            admissionregistration::v1::MutatingWebhookConfiguration,
            core::v1::{ConfigMap, Container, Namespace, Node, Pod},
        },
        apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    };
    use kube::{
        Api, Client, ResourceExt,
        api::{DeleteParams, Patch, PatchParams, PostParams},
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

    /// Ignored, so that a run without a cluster counts it as skipped, not passed:
    /// `KUBECONFIG=… cargo test -p apipolicy-operator --test operator e2e -- --include-ignored`
    /// (scripts/test.sh adds `--include-ignored` when KUBECONFIG is set).
    #[test]
    #[ignore = "needs a cluster: set KUBECONFIG and pass --include-ignored"]
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
            // The operator in a namespace of its own, as the chart installs it: its webhook
            // never injects pods of its own namespace, so the apps' pods must be elsewhere.
            let operator_ns = format!("{ns}-operator");
            for name in [&ns, &operator_ns] {
                namespaces
                    .patch(
                        name,
                        &PatchParams::apply(MANAGER),
                        &Patch::Apply(
                            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
                        ),
                    )
                    .await
                    .unwrap();
            }
            let log = std::env::temp_dir().join(format!("{ns}.log"));
            let host = webhook_host(&client).await;
            // A configuration of its own, so that an operator installed in the cluster is untouched.
            let webhook_config = format!("apipolicy-injector-{ns}");
            let mut operator = start_operator(&operator_ns, &log, host.as_deref(), &webhook_config);
            let injection = host.is_some().then_some(webhook_config.as_str());
            let outcome =
                std::panic::AssertUnwindSafe(suite(&client, &ns, &operator_ns, &operator.1, injection))
                    .catch_unwind()
                    .await;
            let _ = operator.0.kill();
            let _ = operator.0.wait();
            let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
            let _ = configs.delete(&webhook_config, &DeleteParams::default()).await;
            for name in [&ns, &operator_ns] {
                let _ = namespaces.delete(name, &DeleteParams::default()).await;
            }
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

    /// An address of this machine that the API server reaches: APIPOLICY_E2E_WEBHOOK_HOST, or on
    /// kind the gateway of the nodes' docker network.
    async fn webhook_host(client: &Client) -> Option<String> {
        if let Ok(host) = std::env::var("APIPOLICY_E2E_WEBHOOK_HOST")
            && !host.is_empty()
        {
            return Some(host);
        }
        let nodes = Api::<Node>::all(client.clone()).list(&Default::default()).await.ok()?;
        let kind = nodes.items.iter().find(|n| {
            n.spec.as_ref().and_then(|s| s.provider_id.as_deref()).is_some_and(|p| p.starts_with("kind://"))
        })?;
        let addresses = kind.status.as_ref()?.addresses.as_ref()?;
        let ip: std::net::Ipv4Addr =
            addresses.iter().find(|a| a.type_ == "InternalIP")?.address.parse().ok()?;
        let [a, b, c, _] = ip.octets();
        Some(format!("{a}.{b}.{c}.1"))
    }

    /// The operator, and its (agent, metrics) ports. With a host the API server reaches, its
    /// webhook listens there and it installs its webhook configuration, pointing at that host.
    fn start_operator(
        ns: &str,
        log: &std::path::Path,
        host: Option<&str>,
        config: &str,
    ) -> (Child, (u16, u16)) {
        let (agent, metrics, webhook) = (free_port(), free_port(), free_port());
        let out = std::fs::File::create(log).unwrap();
        let mut command = Command::new(BIN);
        command.args(["run", "--insecure-agent-api", "--namespace", ns, "--webhook-configuration", config]);
        match host {
            // Fail, not Ignore: a webhook the API server cannot reach shows as an error.
            Some(host) => command.args([
                "--webhook-addr",
                &format!("0.0.0.0:{webhook}"),
                "--webhook-url",
                &format!("https://{host}:{webhook}/mutate"),
                "--failure-policy",
                "Fail",
            ]),
            None => command.args(["--webhook-addr", "127.0.0.1:0", "--manage-webhook", "false"]),
        };
        let child = command
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
    fn sidecar(pod: &Pod) -> Option<&Container> {
        let spec = pod.spec.as_ref()?;
        spec.init_containers.iter().flatten().chain(&spec.containers).find(|c| c.name == "apipolicy-sidecar")
    }

    /// Pods created in the labelled namespace come back injected, unless opted out.
    async fn injection(client: &Client, ns: &str, config: &str, revision: &str) {
        let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let installed = eventually("the operator installed its webhook configuration", || async {
            configs.get_opt(config).await.ok()?
        })
        .await;
        let hook = &installed.webhooks.as_ref().unwrap()[0];
        assert!(hook.client_config.url.as_deref().is_some_and(|u| u.ends_with("/mutate")), "{hook:?}");
        assert!(hook.client_config.ca_bundle.is_some(), "the CA is in the configuration");
        Api::<Namespace>::all(client.clone())
            .patch(
                ns,
                &PatchParams::apply(MANAGER),
                &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "labels": {"apipolicy.dev/injection": "enabled"}}})),
            )
            .await
            .unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let pod = |prefix: &str, annotations: Value| -> Pod {
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": prefix, "labels": {"app": "products"}, "annotations": annotations},
                "spec": {"containers": [{"name": "products", "image": "registry.k8s.io/pause:3.10",
                                         "ports": [{"name": "http", "containerPort": 8080}]}]},
            }))
            .unwrap()
        };
        // The API server may take a moment to call a new configuration; a pod created before is
        // deleted and made again.
        let injected = eventually("a pod of the labelled namespace comes back injected", || async {
            match pods.create(&PostParams::default(), &pod("injected-", json!({}))).await {
                Ok(p) if sidecar(&p).is_some() => Some(p),
                Ok(p) => {
                    let _ = pods.delete(&p.name_any(), &DeleteParams::default()).await;
                    None
                }
                Err(e) => {
                    eprintln!("e2e: creating a pod failed (retrying): {e}");
                    None
                }
            }
        })
        .await;
        assert_eq!(injected.annotations()["apipolicy.dev/policy"], "products");
        assert_eq!(injected.annotations()["apipolicy.dev/injected-revision"], revision);
        let s = sidecar(&injected).unwrap();
        assert_eq!(
            s.ports.as_ref().unwrap()[0].name.as_deref(),
            Some("http"),
            "the sidecar took the port's name"
        );
        let app = &injected.spec.as_ref().unwrap().containers[0];
        assert_eq!(app.ports.as_ref().unwrap()[0].name.as_deref(), Some("app-http"));
        let volumes = injected.spec.as_ref().unwrap().volumes.as_ref().unwrap();
        assert!(
            volumes.iter().any(|v| v.config_map.as_ref().is_some_and(|c| c.name == "apipolicy-products"))
        );

        let opted_out = pods
            .create(&PostParams::default(), &pod("opted-out-", json!({"apipolicy.dev/inject": "false"})))
            .await
            .unwrap();
        assert!(sidecar(&opted_out).is_none(), "an opted-out pod has no sidecar");
        assert!(!opted_out.annotations().contains_key("apipolicy.dev/policy"));
        let app = &opted_out.spec.as_ref().unwrap().containers[0];
        assert_eq!(app.ports.as_ref().unwrap()[0].name.as_deref(), Some("http"));
        for p in [injected, opted_out] {
            let _ = pods.delete(&p.name_any(), &DeleteParams::default()).await;
        }
    }

    /// The sidecar binary beside the operator's, built when missing.
    fn sidecar_binary() -> std::path::PathBuf {
        let path = std::path::Path::new(BIN).with_file_name("apipolicy-sidecar");
        if !path.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let built = Command::new(cargo)
                .args(["build", "-p", "apipolicy-sidecar", "--bin", "apipolicy-sidecar"])
                .current_dir(ROOT)
                .status()
                .unwrap();
            assert!(built.success(), "building the sidecar failed");
        }
        path
    }

    /// A second replica follows; a sidecar on the follower's agent API gets every one of 50
    /// policy edits within a second, and its SLO reports reach the leader through the follower
    /// (the policy's status counts them).
    async fn replicas_and_push(client: &Client, ns: &str, operator_ns: &str) {
        let api: Api<ApiPolicy> = Api::namespaced(client.clone(), ns);
        let log = std::env::temp_dir().join(format!("{ns}-follower.log"));
        let mut follower = start_operator(operator_ns, &log, None, &format!("apipolicy-injector-{ns}"));
        let (follower_agent, follower_metrics) = follower.1;
        let gauge = |text: &str, name: &str| {
            text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        };
        eventually("the second replica is ready and follows", || async {
            let (status, _) = get(follower_metrics, "/readyz").await?;
            let (_, text) = get(follower_metrics, "/metrics").await?;
            (status == 200 && gauge(&text, "apipolicy_operator_leader ") == Some(0.0)).then_some(())
        })
        .await;

        let config_map: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let cm = config_map.get("apipolicy-products").await.unwrap();
        let file = std::env::temp_dir().join(format!("{ns}-products.json"));
        std::fs::write(&file, &cm.data.as_ref().unwrap()["config.json"]).unwrap();
        let (listen, admin, dead) = (free_port(), free_port(), free_port());
        let sidecar_log =
            std::fs::File::create(std::env::temp_dir().join(format!("{ns}-sidecar.log"))).unwrap();
        let mut sidecar = Command::new(sidecar_binary())
            .args(["--policy", file.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{listen}"), "--admin", &format!("127.0.0.1:{admin}")])
            .args(["--upstream", &format!("http://127.0.0.1:{dead}")])
            .args(["--operator", &format!("http://127.0.0.1:{follower_agent}")])
            .args(["--pod-name", "e2e-sidecar", "--report-interval", "1s", "--log", "warn"])
            .stdout(Stdio::from(sidecar_log.try_clone().unwrap()))
            .stderr(Stdio::from(sidecar_log))
            .spawn()
            .unwrap();
        let revision_of_sidecar = || async {
            let (status, body) = get(admin, "/config").await?;
            let config: Value = serde_json::from_str(&body).ok()?;
            (status == 200).then(|| config["revision"].as_str().map(str::to_owned)).flatten()
        };
        let mut previous = eventually("the sidecar is up", revision_of_sidecar).await;

        // 50 edits, one at a time: from `kubectl apply` returning to the sidecar's /config.
        let base = api.get("products").await.unwrap();
        let mut latencies = Vec::new();
        for i in 0..50 {
            let mut edited = base.clone();
            edited.spec.upstream.timeout = Some(format!("{}s", 20 + i).parse().unwrap());
            apply(&api, &edited).await.unwrap();
            let applied = Instant::now();
            loop {
                if let Some(now) = revision_of_sidecar().await
                    && now != previous
                {
                    previous = now;
                    break;
                }
                assert!(
                    applied.elapsed() < Duration::from_secs(20),
                    "edit {i} did not reach the sidecar in 20 s"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            latencies.push(applied.elapsed());
        }
        latencies.sort();
        let (p50, p99, max) = (latencies[24], latencies[48], latencies[49]);
        println!("e2e: 50 policy edits reached the sidecar: p50 {p50:?}, p99 {p99:?}, max {max:?}");
        assert!(
            max < Duration::from_secs(1),
            "every edit lands within 1 s: p50 {p50:?} p99 {p99:?} max {max:?}"
        );
        let status_revision = eventually("the status shows the last edit", || async {
            let got = api.get("products").await.ok()?;
            let s = got.status?;
            (s.observed_generation == got.metadata.generation).then_some(s.config_revision?)
        })
        .await;
        assert_eq!(status_revision, previous, "the sidecar runs the revision of the last edit");

        // Requests through the sidecar (the app is down: 503s), reported to the follower, merged
        // by the leader into the status.
        for _ in 0..20 {
            let (status, _) = get(listen, "/api/products").await.expect("the sidecar answers");
            assert_eq!(status, 503);
        }
        eventually("the leader's status counts the reports the follower forwarded", || async {
            let got = api.get("products").await.ok()?;
            let slo = got.status?.slos.into_iter().find(|s| s.name == "availability")?;
            (slo.total_requests >= 20).then_some(())
        })
        .await;
        let (_, text) = get(follower_metrics, "/metrics").await.unwrap();
        assert_eq!(gauge(&text, "apipolicy_operator_leader "), Some(0.0), "the follower still follows");
        let _ = sidecar.kill();
        let _ = sidecar.wait();
        let _ = follower.0.kill();
        let _ = follower.0.wait();
        let _ = std::fs::remove_file(&file);
    }

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

    async fn suite(
        client: &Client,
        ns: &str,
        operator_ns: &str,
        &(agent, metrics): &(u16, u16),
        webhook_config: Option<&str>,
    ) {
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

        // A newer policy on the same pods is in conflict with the older one. On a fresh API server
        // both may be made in the same second: then the name decides (the conflict rule's
        // tie-break), so the twin's name sorts after the original's.
        let mut twin = policies.iter().find(|p| p.name_any() == "products").unwrap().clone();
        twin.metadata.name = Some("products-twin".into());
        apply(&api, &twin).await.unwrap();
        let conflicted = eventually("products-twin is conflicted", || async {
            let got = api.get("products-twin").await.ok()?;
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
            table["rows"].as_array().unwrap().iter().find(|r| r["cells"][0] == "products-twin").unwrap();
        assert_eq!(twin_row["cells"][1], "False");
        if let Ok(out) = Command::new("kubectl").args(["get", "apipolicies", "-n", ns]).output()
            && out.status.success()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            let header: Vec<&str> = text.lines().next().unwrap_or_default().split_whitespace().collect();
            assert_eq!(header, ["NAME", "ACCEPTED", "PODS", "BUDGET", "SLO", "AGE"], "{text}");
        }

        match webhook_config {
            Some(config) => injection(client, ns, config, &revision).await,
            None => println!(
                "e2e: injection SKIPPED: set APIPOLICY_E2E_WEBHOOK_HOST to an address of this machine that the API \
                 server reaches (on kind it is found by itself)"
            ),
        }

        replicas_and_push(client, ns, operator_ns).await;

        // Deleting a policy deletes its ConfigMap.
        api.delete("products", &DeleteParams::default()).await.unwrap();
        eventually("the ConfigMap of products is gone", || async {
            config_maps.get_opt("apipolicy-products").await.ok()?.is_none().then_some(())
        })
        .await;
    }
}

/// Every manifest the chart renders (scripts/chart-checks.sh leaves them in
/// target/chart-checks/) parses into its k8s-openapi type and serializes back to the same
/// document, so no field is misspelt or misplaced (serde would drop it). Kinds from other
/// projects' CRDs (cert-manager, prometheus-operator) have no k8s-openapi type; the chart
/// checks look at those.
#[test]
fn rendered_chart_parses_into_kubernetes_types() {
    use k8s_openapi::{
        api::{
            admissionregistration::v1::MutatingWebhookConfiguration,
            apps::v1::Deployment,
            core::v1::{ConfigMap, Service, ServiceAccount},
            policy::v1::PodDisruptionBudget,
            rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
        },
        apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    };
    fn same<T: serde::de::DeserializeOwned + serde::Serialize>(
        doc: &serde_json::Value,
    ) -> Result<(), String> {
        let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
        let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
        if strip(doc.clone()) == strip(back.clone()) {
            Ok(())
        } else {
            Err(format!("round trip differs:\n{doc}\n{back}"))
        }
    }
    fn strip(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => serde_json::Value::Object(
                m.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip(v))).collect(),
            ),
            serde_json::Value::Array(a) => serde_json::Value::Array(a.into_iter().map(strip).collect()),
            serde_json::Value::Number(n) => serde_json::json!(n.as_f64()),
            other => other,
        }
    }
    let dir = std::path::Path::new(ROOT).join("target/chart-checks");
    let files: Vec<_> = ["default.yaml", "all-on.yaml", "custom-ports.yaml", "oldest-kube.yaml"]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .collect();
    if files.is_empty() {
        assert!(std::env::var_os("CI").is_none(), "scripts/chart-checks.sh must run before the tests in CI");
        eprintln!("SKIPPED: no rendered chart; run scripts/chart-checks.sh first");
        return;
    }
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let yaml = serde_yaml::Value::deserialize(doc).unwrap();
            if yaml.is_null() {
                continue;
            }
            let v: serde_json::Value = serde_json::to_value(yaml).unwrap();
            let kind = v["kind"].as_str().unwrap_or_default().to_owned();
            let result = match kind.as_str() {
                "Deployment" => same::<Deployment>(&v),
                "Service" => same::<Service>(&v),
                "ServiceAccount" => same::<ServiceAccount>(&v),
                "ConfigMap" => same::<ConfigMap>(&v),
                "PodDisruptionBudget" => same::<PodDisruptionBudget>(&v),
                "ClusterRole" => same::<ClusterRole>(&v),
                "ClusterRoleBinding" => same::<ClusterRoleBinding>(&v),
                "Role" => same::<Role>(&v),
                "RoleBinding" => same::<RoleBinding>(&v),
                "MutatingWebhookConfiguration" => same::<MutatingWebhookConfiguration>(&v),
                "CustomResourceDefinition" => same::<CustomResourceDefinition>(&v),
                "Certificate" | "Issuer" | "PodMonitor" | "ServiceMonitor" | "PrometheusRule" => continue,
                other => Err(format!("unexpected kind {other}")),
            };
            if let Err(e) = result {
                panic!("{}: {kind} {}: {e}", file.display(), v["metadata"]["name"]);
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} manifests checked");
}

/// The example app the README's cluster steps apply: every document is what its kind says, and
/// injecting the quickstart policy into the Deployment's pods moves the app's named port to the
/// sidecar, which the Service's `targetPort` names: the Service reaches the sidecar unchanged.
#[test]
fn the_example_app_is_injectable_as_the_readme_says() {
    use k8s_openapi::api::{
        apps::v1::Deployment,
        core::v1::{Namespace, Pod, Service},
    };

    let text = std::fs::read_to_string(format!("{ROOT}/deploy/example-app/products.yaml")).unwrap();
    let docs: Vec<Value> =
        serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).collect();
    let of =
        |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}")).clone();
    let ns: Namespace = serde_json::from_value(of("Namespace")).unwrap();
    assert_eq!(ns.metadata.labels.unwrap()["apipolicy.dev/injection"], "enabled");
    let deployment: Deployment = serde_json::from_value(of("Deployment")).unwrap();
    let service: Service = serde_json::from_value(of("Service")).unwrap();
    let policy: apipolicy_api::ApiPolicy =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{ROOT}/examples/quickstart.yaml")).unwrap())
            .unwrap();
    assert_eq!(policy.metadata.namespace.as_deref(), Some("shop"));

    let template = deployment.spec.unwrap().template;
    let labels = template.metadata.clone().unwrap().labels.unwrap();
    assert!(
        policy.spec.selector.match_labels.as_ref().unwrap().iter().all(|(k, v)| labels.get(k) == Some(v))
    );
    let pod = Pod { metadata: template.metadata.unwrap(), spec: template.spec, status: None };
    let cfg = apipolicy_operator::inject::InjectConfig::new("ghcr.io/apipolicy/apipolicy:0.1.0");
    let injection = apipolicy_operator::inject::inject(&pod, &policy, &cfg).unwrap().expect("injected");
    let mut doc = serde_json::to_value(&pod).unwrap();
    json_patch::patch(&mut doc, &injection.patch).unwrap();
    let injected: Pod = serde_json::from_value(doc).unwrap();
    let spec = injected.spec.unwrap();
    let named_http = |c: &k8s_openapi::api::core::v1::Container| {
        c.ports.iter().flatten().any(|p| p.name.as_deref() == Some("http"))
    };
    let sidecar = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| named_http(c))
        .expect("the sidecar took the name http");
    assert_eq!(sidecar.image.as_deref(), Some("ghcr.io/apipolicy/apipolicy:0.1.0"));
    assert!(!spec.containers.iter().any(named_http), "the app's port was renamed");
    let port = &service.spec.unwrap().ports.unwrap()[0];
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into()))
    );
}

/// One log schema for both binaries: a JSON object per line with `timestamp`, `level`,
/// `message` and `target` at the top level and the fields beside them (never nested under
/// `fields`), and no Rust debug formatting in values (`None`, `Some(…)`).
fn assert_log_schema(line: &str) {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let object = v.as_object().unwrap_or_else(|| panic!("not an object: {line}"));
    for key in ["timestamp", "level", "message", "target"] {
        assert!(object.get(key).is_some_and(Value::is_string), "no string {key}: {line}");
    }
    assert!(!object.contains_key("fields"), "fields are nested: {line}");
    for (key, value) in object {
        if let Some(text) = value.as_str() {
            assert!(text != "None" && !text.starts_with("Some("), "{key} is Rust debug text: {line}");
        }
    }
}

#[test]
fn the_operator_logs_in_the_shared_schema() {
    let out = Command::new(BIN)
        .args(["run", "--insecure-agent-api", "--metrics-addr", "127.0.0.1:0", "--agent-addr", "127.0.0.1:0"])
        .args(["--webhook-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(!out.status.success(), "no cluster: it stops");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() >= 2, "{stdout}");
    for line in &lines {
        assert_log_schema(line);
    }
    let stopped: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(stopped["message"], "the operator stopped");
    assert!(stopped["error"].as_str().unwrap().contains("/nonexistent/kubeconfig"), "{stopped}");
}
