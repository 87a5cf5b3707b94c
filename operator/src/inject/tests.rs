use apipolicy_api::ApiPolicyStatus;
use k8s_openapi::api::core::v1::PodSpec;

use super::*;
use crate::fixtures::policy_at;

/// A pod of namespace `shop` as a user writes it in a Deployment's template.
fn pod(value: Value) -> Pod {
    let mut v =
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "web-", "namespace": "shop"}});
    merge(&mut v, value);
    serde_json::from_value(v).expect("a pod")
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

/// One app container `app` with the port `http` 8080 and a readiness probe on it.
fn web(extra: Value) -> Pod {
    let mut v = json!({
        "metadata": {"labels": {"app": "web"}},
        "spec": {"containers": [{
            "name": "app", "image": "web:1",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
            "livenessProbe": {"tcpSocket": {"port": 8080}},
        }]},
    });
    merge(&mut v, extra);
    pod(v)
}

fn cfg() -> InjectConfig {
    InjectConfig {
        operator_url: Some("https://apipolicy-operator.apipolicy-system.svc:8443".into()),
        ca: true,
        ..InjectConfig::new("ghcr.io/apipolicy/apipolicy:test")
    }
}

/// The pod the API server stores after applying the patch.
fn patched(pod: &Pod, patch: &Patch) -> Pod {
    let mut doc = serde_json::to_value(pod).unwrap();
    json_patch::patch(&mut doc, patch).expect("the patch applies");
    serde_json::from_value(doc).expect("the patched pod is a pod")
}

fn injected(outcome: Outcome) -> (String, Injection) {
    match outcome {
        Outcome::Injected { policy, injection } => (policy, injection),
        other => panic!("expected an injection, got {other:?}"),
    }
}

fn sidecar(pod: &Pod) -> &Container {
    all_containers(pod).find(|c| c.name == SIDECAR).expect("the sidecar")
}

fn env_of(c: &Container) -> BTreeMap<String, String> {
    c.env.iter().flatten().filter_map(|e| Some((e.name.clone(), e.value.clone()?))).collect()
}

#[test]
fn a_named_port_moves_to_the_native_sidecar_with_everything_it_needs() {
    let policy = policy_at("web", "app", "web", 1);
    let before = web(json!({}));
    let (name, injection) = injected(admit(&before, "shop", [&policy], &cfg()));
    assert_eq!(name, "web");
    assert!(injection.warnings.is_empty(), "{:?}", injection.warnings);
    let after = patched(&before, &injection.patch);
    let spec = after.spec.as_ref().unwrap();

    // The app gave up its port's name, and its probe follows the new one.
    let app = &spec.containers[0];
    assert_eq!(app.ports.as_ref().unwrap()[0].name.as_deref(), Some("app-http"));
    assert_eq!(app.ports.as_ref().unwrap()[0].container_port, 8080);
    assert_eq!(
        app.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().port,
        IntOrString::String("app-http".into())
    );
    assert_eq!(app.liveness_probe, before.spec.as_ref().unwrap().containers[0].liveness_probe);
    assert_eq!(spec.containers.len(), 1, "nothing else among the containers");

    let s = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(s.name, SIDECAR);
    assert_eq!(s.restart_policy.as_deref(), Some("Always"));
    assert_eq!(s.image.as_deref(), Some("ghcr.io/apipolicy/apipolicy:test"));
    assert_eq!(s.command.as_deref(), Some(&["apipolicy-sidecar".to_owned()][..]));
    let ports: Vec<(Option<&str>, i32)> =
        s.ports.iter().flatten().map(|p| (p.name.as_deref(), p.container_port)).collect();
    assert_eq!(ports, [(Some("http"), 15080), (Some("apipolicy-admin"), 15090)]);
    let env = env_of(s);
    let expected = [
        ("APIPOLICY_POLICY", "/etc/apipolicy/config.json"),
        ("APIPOLICY_UPSTREAM", "http://127.0.0.1:8080"),
        ("APIPOLICY_LISTEN", "0.0.0.0:15080"),
        ("APIPOLICY_ADMIN", "0.0.0.0:15090"),
        ("APIPOLICY_OPERATOR", "https://apipolicy-operator.apipolicy-system.svc:8443"),
        ("APIPOLICY_TOKEN_FILE", "/var/run/secrets/apipolicy.dev/token"),
        ("APIPOLICY_CA_FILE", "/etc/apipolicy/ca.crt"),
        ("APIPOLICY_DRAIN_DELAY", "5s"),
        ("APIPOLICY_THREADS", "2"),
    ];
    for (k, v) in expected {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
    }
    let downward: Vec<(&str, &str)> = s
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            Some((e.name.as_str(), e.value_from.as_ref()?.field_ref.as_ref()?.field_path.as_str()))
        })
        .collect();
    assert_eq!(downward, [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")]);
    assert!(!env.contains_key("APIPOLICY_REDIS"));

    let ready = s.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(
        (ready.path.as_deref(), &ready.port),
        (Some("/readyz"), &IntOrString::String("apipolicy-admin".into()))
    );
    let live = s.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(live.path.as_deref(), Some("/healthz"));

    let resources = s.resources.as_ref().unwrap();
    let requests = resources.requests.as_ref().unwrap();
    assert_eq!((requests["cpu"].0.as_str(), requests["memory"].0.as_str()), ("50m", "32Mi"));
    let limits = resources.limits.as_ref().unwrap();
    assert_eq!(limits.len(), 1);
    assert_eq!(limits["memory"].0, "128Mi");

    let sc = s.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");

    let mounts: Vec<(&str, &str, Option<bool>)> = s
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
        .collect();
    assert_eq!(
        mounts,
        [
            ("apipolicy-config", "/etc/apipolicy", Some(true)),
            ("apipolicy-token", "/var/run/secrets/apipolicy.dev", Some(true))
        ]
    );
    let volumes = spec.volumes.as_ref().unwrap();
    assert_eq!(volumes[0].config_map.as_ref().unwrap().name, "apipolicy-web");
    let token = volumes[1].projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
        .service_account_token
        .as_ref()
        .unwrap();
    assert_eq!(
        (token.audience.as_deref(), token.expiration_seconds, token.path.as_str()),
        (Some("apipolicy.dev"), Some(3600), "token")
    );

    let annotations = after.annotations();
    assert_eq!(annotations[POLICY_ANNOTATION], "web");
    assert_eq!(annotations[INJECTED_REVISION_ANNOTATION], apipolicy_api::compile(&policy).unwrap().revision);

    // Reinvocation, or a second admission of the injected pod, changes nothing.
    assert_eq!(admit(&after, "shop", [&policy], &cfg()), Outcome::Skipped(Skip::AlreadyInjected));
    assert_eq!(inject(&after, &policy, &cfg()), Ok(None));
}

#[test]
fn the_patch_touches_only_what_it_must() {
    let policy = policy_at("web", "app", "web", 1);
    let (_, injection) = injected(admit(&web(json!({})), "shop", [&policy], &cfg()));
    let ops: Vec<(String, String)> = serde_json::to_value(&injection.patch)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|op| (op["op"].as_str().unwrap().to_owned(), op["path"].as_str().unwrap().to_owned()))
        .collect();
    let expected = [
        ("replace", "/spec/containers/0/ports/0/name"),
        ("replace", "/spec/containers/0/readinessProbe/httpGet/port"),
        ("add", "/spec/initContainers"),
        ("add", "/spec/volumes"),
        ("add", "/metadata/annotations"),
    ];
    assert_eq!(ops, expected.map(|(a, b)| (a.to_owned(), b.to_owned())));

    // With annotations and volumes already there: added one by one, keys escaped.
    let before = web(json!({
        "metadata": {"annotations": {"team": "shop"}},
        "spec": {"volumes": [{"name": "data", "emptyDir": {}}]},
    }));
    let (_, injection) = injected(admit(&before, "shop", [&policy], &cfg()));
    let paths: Vec<String> = injection.patch.iter().map(|op| op.path().to_string()).collect();
    assert!(paths.contains(&"/spec/volumes/-".to_owned()), "{paths:?}");
    assert!(paths.contains(&"/metadata/annotations/apipolicy.dev~1policy".to_owned()), "{paths:?}");
    assert!(
        paths.contains(&"/metadata/annotations/apipolicy.dev~1injected-revision".to_owned()),
        "{paths:?}"
    );
    let after = patched(&before, &injection.patch);
    assert_eq!(after.annotations()["team"], "shop");
    let names: Vec<&str> =
        after.spec.as_ref().unwrap().volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["data", CONFIG_VOLUME, TOKEN_VOLUME]);
}

#[test]
fn other_containers_and_existing_sidecars_are_left_alone() {
    let policy = policy_at("web", "app", "web", 1);
    let before = web(json!({"spec": {
        "containers": [
            {"name": "log-shipper", "image": "fluent:1", "ports": [{"name": "metrics", "containerPort": 9100}]},
            {"name": "app", "image": "web:1", "ports": [
                {"name": "dns", "containerPort": 8080, "protocol": "UDP"},
                {"name": "http", "containerPort": 8080, "protocol": "TCP"},
            ], "livenessProbe": {"httpGet": {"path": "/", "port": "http"}},
               "lifecycle": {"preStop": {"httpGet": {"path": "/stop", "port": "http"}}}},
        ],
        "initContainers": [
            {"name": "migrate", "image": "web:1", "command": ["migrate"]},
            {"name": "mesh-proxy", "image": "proxy:1", "restartPolicy": "Always", "ports": [{"name": "mesh", "containerPort": 15001}]},
        ],
    }}));
    let (_, injection) = injected(admit(&before, "shop", [&policy], &cfg()));
    let after = patched(&before, &injection.patch);
    let (b, a) = (before.spec.as_ref().unwrap(), after.spec.as_ref().unwrap());
    assert_eq!(a.containers[0], b.containers[0], "the log shipper is untouched");
    let app = &a.containers[1];
    let ports: Vec<(Option<&str>, Option<&str>)> =
        app.ports.iter().flatten().map(|p| (p.name.as_deref(), p.protocol.as_deref())).collect();
    assert_eq!(
        ports,
        [(Some("dns"), Some("UDP")), (Some("app-http"), Some("TCP"))],
        "only the TCP port moves"
    );
    assert_eq!(
        app.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().port,
        IntOrString::String("app-http".into())
    );
    let pre_stop = app.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
    assert_eq!(pre_stop.http_get.as_ref().unwrap().port, IntOrString::String("app-http".into()));
    let init = a.init_containers.as_ref().unwrap();
    assert_eq!(
        &init[..2],
        &b.init_containers.as_ref().unwrap()[..],
        "existing init containers first, unchanged"
    );
    assert_eq!(init[2].name, SIDECAR);
    assert_eq!(init.len(), 3);
}

#[test]
fn pods_left_unchanged() {
    let web_policy = policy_at("web", "app", "web", 1);
    let policies = [&web_policy];
    let table: Vec<(&str, Pod, Skip)> = vec![
        (
            "opted out",
            web(json!({"metadata": {"annotations": {INJECT_ANNOTATION: "false"}}})),
            Skip::OptedOut,
        ),
        ("host network", web(json!({"spec": {"hostNetwork": true}})), Skip::HostNetwork),
        ("no policy selects it", web(json!({"metadata": {"labels": {"app": "db"}}})), Skip::NoPolicy),
        (
            "no labels",
            pod(
                json!({"spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]}}),
            ),
            Skip::NoPolicy,
        ),
        (
            "sidecar already there as a plain container",
            web(json!({"spec": {"containers": [{"name": SIDECAR}]}})),
            Skip::AlreadyInjected,
        ),
    ];
    for (case, pod, skip) in table {
        assert_eq!(admit(&pod, "shop", policies, &cfg()), Outcome::Skipped(skip), "{case}");
        assert_eq!(
            inject(&pod, &web_policy, &cfg()).map(|i| i.is_some()),
            Ok(skip == Skip::NoPolicy),
            "{case}"
        );
    }
    // A policy of another namespace does not count.
    assert_eq!(admit(&web(json!({})), "elsewhere", policies, &cfg()), Outcome::Skipped(Skip::NoPolicy));
    // Opting in explicitly is no opt-out.
    let opted_in = web(json!({"metadata": {"annotations": {INJECT_ANNOTATION: "true"}}}));
    assert!(matches!(admit(&opted_in, "shop", policies, &cfg()), Outcome::Injected { .. }));
}

#[test]
fn pods_that_cannot_take_the_sidecar_are_refused_with_what_to_change() {
    let policy = policy_at("web", "app", "web", 1);
    let mut broken = policy_at("web", "app", "web", 1);
    broken.spec.upstream.port = 0;
    let table: Vec<(&str, Pod, &ApiPolicy, Problem)> = vec![
        (
            "unnamed port",
            web(json!({"spec": {"containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]}})),
            &policy,
            Problem::PortUnnamed { container: "app".into(), port: 8080 },
        ),
        (
            "undeclared port",
            web(
                json!({"spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 9000}]}]}}),
            ),
            &policy,
            Problem::PortNotDeclared { port: 8080 },
        ),
        (
            "no ports at all",
            web(json!({"spec": {"containers": [{"name": "app", "ports": null, "readinessProbe": null}]}})),
            &policy,
            Problem::PortNotDeclared { port: 8080 },
        ),
        (
            "the admin port is taken",
            web(
                json!({"spec": {"initContainers": [{"name": "agent", "ports": [{"containerPort": 15090}]}]}}),
            ),
            &policy,
            Problem::PortTaken { container: "agent".into(), port: 15090 },
        ),
        (
            "a volume name is taken",
            web(json!({"spec": {"volumes": [{"name": TOKEN_VOLUME, "emptyDir": {}}]}})),
            &policy,
            Problem::VolumeTaken { volume: TOKEN_VOLUME.into() },
        ),
        (
            "the policy never compiled",
            web(
                json!({"spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 0}]}]}}),
            ),
            &broken,
            Problem::NoConfig,
        ),
    ];
    for (case, pod, policy, problem) in table {
        let outcome = admit(&pod, "shop", [policy], &cfg());
        assert_eq!(outcome, Outcome::Refused { policy: "web".into(), problem: problem.clone() }, "{case}");
        assert_eq!(inject(&pod, policy, &cfg()), Err(problem.clone()), "{case}");
        let message = problem.message("web");
        assert!(message.starts_with("ApiPolicy web"), "{case}: {message}");
        assert!(message.len() <= 256, "{case}: a warning the API server passes on whole: {message}");
    }
    let unnamed = Problem::PortUnnamed { container: "app".into(), port: 8080 }.message("web");
    assert!(unnamed.contains("targetPort"), "{unnamed}");

    // An invalid spec with a last valid revision still injects it: the ConfigMap holds it.
    broken.status =
        Some(ApiPolicyStatus { config_revision: Some("sha256:last".into()), ..Default::default() });
    let pod = web(
        json!({"spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 0}]}]}}),
    );
    let (_, injection) = injected(admit(&pod, "shop", [&broken], &cfg()));
    assert_eq!(patched(&pod, &injection.patch).annotations()[INJECTED_REVISION_ANNOTATION], "sha256:last");
}

#[test]
fn the_older_of_two_matching_policies_wins() {
    let newer = policy_at("newer", "app", "web", 200);
    let older = policy_at("older", "tier", "front", 100);
    let pod = web(json!({"metadata": {"labels": {"tier": "front"}}}));
    let (name, injection) = injected(admit(&pod, "shop", [&newer, &older], &cfg()));
    assert_eq!(name, "older");
    let after = patched(&pod, &injection.patch);
    assert_eq!(after.annotations()[POLICY_ANNOTATION], "older");
    assert_eq!(
        after.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0].config_map.as_ref().unwrap().name,
        "apipolicy-older"
    );
}

#[test]
fn annotations_tune_resources_and_the_proxy_port() {
    let policy = policy_at("web", "app", "web", 1);
    // (annotations, requests, limits, threads, warnings containing)
    type Row<'a> = (Value, [(&'a str, &'a str); 2], Vec<(&'a str, &'a str)>, &'a str, Vec<&'a str>);
    let table: Vec<Row> = vec![
        (json!({}), [("cpu", "50m"), ("memory", "32Mi")], vec![("memory", "128Mi")], "2", vec![]),
        (
            json!({CPU_REQUEST_ANNOTATION: "250m", CPU_LIMIT_ANNOTATION: "1500m", MEMORY_LIMIT_ANNOTATION: "256Mi"}),
            [("cpu", "250m"), ("memory", "32Mi")],
            vec![("cpu", "1500m"), ("memory", "256Mi")],
            "2",
            vec![],
        ),
        (
            json!({CPU_LIMIT_ANNOTATION: "4"}),
            [("cpu", "50m"), ("memory", "32Mi")],
            vec![("cpu", "4"), ("memory", "128Mi")],
            "4",
            vec![],
        ),
        (
            json!({MEMORY_REQUEST_ANNOTATION: "lots", MEMORY_LIMIT_ANNOTATION: ""}),
            [("cpu", "50m"), ("memory", "32Mi")],
            vec![],
            "2",
            vec!["\"lots\" is not a Kubernetes quantity; using 32Mi"],
        ),
        (
            json!({MEMORY_REQUEST_ANNOTATION: "256Mi"}),
            [("cpu", "50m"), ("memory", "256Mi")],
            vec![("memory", "256Mi")],
            "2",
            vec!["memory limit 128Mi is below its request 256Mi; raised to 256Mi"],
        ),
        (
            json!({MEMORY_LIMIT_ANNOTATION: "16Mi", CPU_LIMIT_ANNOTATION: "10m"}),
            [("cpu", "10m"), ("memory", "16Mi")],
            vec![("cpu", "10m"), ("memory", "16Mi")],
            "1",
            vec!["cpu request 50m is above its limit 10m; lowered to 10m", "memory request 32Mi is above"],
        ),
    ];
    for (annotations, requests, limits, threads, warned) in table {
        let pod = web(json!({"metadata": {"annotations": annotations.clone()}}));
        let (_, injection) = injected(admit(&pod, "shop", [&policy], &cfg()));
        for w in &warned {
            assert!(
                injection.warnings.iter().any(|x| x.contains(w)),
                "{annotations}: {:?} lacks {w}",
                injection.warnings
            );
        }
        assert_eq!(injection.warnings.len(), warned.len(), "{annotations}: {:?}", injection.warnings);
        let after = patched(&pod, &injection.patch);
        let r = sidecar(&after).resources.clone().unwrap();
        let got = |m: Option<BTreeMap<String, Quantity>>| -> Vec<(String, String)> {
            m.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect()
        };
        let want = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        assert_eq!(got(r.requests), want(&requests), "{annotations}");
        assert_eq!(got(r.limits), want(&limits), "{annotations}");
        assert_eq!(env_of(sidecar(&after))["APIPOLICY_THREADS"], threads, "{annotations}");
    }

    let moved = web(json!({"metadata": {"annotations": {PROXY_PORT_ANNOTATION: "8000"}}}));
    let (_, injection) = injected(admit(&moved, "shop", [&policy], &cfg()));
    let s = patched(&moved, &injection.patch);
    assert_eq!(sidecar(&s).ports.as_ref().unwrap()[0].container_port, 8000);
    assert_eq!(env_of(sidecar(&s))["APIPOLICY_LISTEN"], "0.0.0.0:8000");
    for bad in ["15090", "0", "http", "70000"] {
        let pod = web(json!({"metadata": {"annotations": {PROXY_PORT_ANNOTATION: bad}}}));
        let (_, injection) = injected(admit(&pod, "shop", [&policy], &cfg()));
        assert!(injection.warnings[0].contains("the sidecar listens on 15080"), "{bad}");
    }
    // The app listens on the proxy port it asked for: refused.
    let clash = web(json!({"metadata": {"annotations": {PROXY_PORT_ANNOTATION: "8080"}}}));
    assert_eq!(
        inject(&clash, &policy, &cfg()),
        Err(Problem::PortTaken { container: "app".into(), port: 8080 })
    );
}

#[test]
fn the_fallback_is_a_plain_container_and_redis_comes_from_the_secret() {
    let mut policy = policy_at("web", "app", "web", 1);
    policy.spec.redis = serde_json::from_value(json!({"secretRef": {"name": "redis"}})).unwrap();
    let plain = InjectConfig { native_sidecar: false, operator_url: None, ca: false, ..cfg() };
    let before = web(json!({}));
    let (_, injection) = injected(admit(&before, "shop", [&policy], &plain));
    let after = patched(&before, &injection.patch);
    let spec = after.spec.as_ref().unwrap();
    assert!(spec.init_containers.is_none());
    assert_eq!(spec.containers.len(), 2);
    assert_eq!(spec.containers[0].name, "app", "the app stays the default container");
    let s = &spec.containers[1];
    assert_eq!((s.name.as_str(), s.restart_policy.as_deref()), (SIDECAR, None));
    let env = env_of(s);
    assert!(!env.contains_key("APIPOLICY_OPERATOR") && !env.contains_key("APIPOLICY_CA_FILE"));
    let redis = s.env.iter().flatten().find(|e| e.name == "APIPOLICY_REDIS").unwrap();
    let secret = redis.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
    assert_eq!((secret.name.as_str(), secret.key.as_str()), ("redis", "url"));
}

#[test]
fn renamed_ports_stay_valid_and_unique() {
    let with_ports =
        |ports: Value| -> Pod { pod(json!({"spec": {"containers": [{"name": "app", "ports": ports}]}})) };
    let table = [
        (json!([{"name": "http", "containerPort": 8080}]), "http", "app-http"),
        (json!([{"name": "http-metrics-01", "containerPort": 8080}]), "http-metrics-01", "app-http-metric"),
        (
            json!([{"name": "http", "containerPort": 8080}, {"name": "app-http", "containerPort": 1}]),
            "http",
            "a-http",
        ),
        (
            json!([{"name": "http", "containerPort": 8080}, {"name": "app-http", "containerPort": 1}, {"name": "a-http", "containerPort": 2}]),
            "http",
            "app-8080",
        ),
    ];
    for (ports, name, expected) in table {
        let got = free_port_name(&with_ports(ports), name, 8080);
        assert_eq!(got, expected);
        assert!(got.len() <= MAX_PORT_NAME && !got.ends_with('-') && !got.contains("--"));
    }
}

#[test]
fn quantities() {
    let table = [
        ("50m", Some(0.05)),
        ("1", Some(1.0)),
        ("1.5", Some(1.5)),
        ("+2", Some(2.0)),
        ("128Mi", Some(134_217_728.0)),
        ("1k", Some(1000.0)),
        ("1e3", Some(1000.0)),
        ("2E-3", Some(0.002)),
        ("", None),
        ("-1", None),
        ("Mi", None),
        ("1.2.3", None),
        ("12 Mi", None),
        ("1MB", None),
    ];
    for (text, value) in table {
        assert_eq!(quantity_value(text), value, "{text}");
    }
}

#[test]
fn a_pod_without_a_spec_has_no_port_to_take() {
    let empty = Pod { spec: Some(PodSpec::default()), ..web(json!({})) };
    assert_eq!(upstream_port(&empty, 8080), Err(Problem::PortNotDeclared { port: 8080 }));
    assert_eq!(upstream_port(&web(json!({})), 8080), Ok((0, 0, "http".into())));
}
