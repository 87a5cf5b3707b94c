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
