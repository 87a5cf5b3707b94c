//! Reading ApiPolicy manifests as users write them: several YAML documents per file, checked
//! against the CRD's own schema (types, unknown fields, enums, patterns, ranges) the way the
//! API server does, then by [`crate::validate`]. Every problem is reported, not only the first.

use std::sync::LazyLock;

use kube::CustomResourceExt;
use serde::Deserialize;
use serde_json::Value;

use crate::{ApiPolicy, SidecarConfig, compile};

/// A problem found in one document of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The document's `metadata.name`, or `document N` (1-based) when it has none.
    pub document: String,
    /// The field path, such as `spec.routes[2].rateLimit.per`; `(yaml)` for syntax errors.
    pub path: String,
    pub message: String,
    /// Where the field is in the text (or its nearest enclosing field), when known.
    pub position: Option<crate::locate::Position>,
}

/// The outcome of reading one manifest text.
#[derive(Debug, Default)]
pub struct Checked {
    /// Valid ApiPolicies, in document order.
    pub policies: Vec<ApiPolicy>,
    pub problems: Vec<Problem>,
    /// Documents of other kinds, left alone.
    pub skipped: usize,
    /// ApiPolicy documents, valid or not.
    pub documents: usize,
}

static SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    let crd = ApiPolicy::crd();
    let version = crd.spec.versions.into_iter().next().expect("the CRD has one version");
    let schema = version.schema.and_then(|s| s.open_api_v3_schema).expect("the CRD has a schema");
    serde_json::to_value(schema).expect("a schema serializes")
});

/// Reads every document of `text` and checks each ApiPolicy in it.
pub fn check_manifest(text: &str) -> Checked {
    let mut out = Checked::default();
    let positions = crate::locate::positions(text);
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let fallback = format!("document {}", i + 1);
        let yaml = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                out.problems.push(Problem {
                    document: fallback,
                    path: "(yaml)".into(),
                    message: e.to_string(),
                    position: e
                        .location()
                        .map(|l| crate::locate::Position { line: l.line(), column: l.column() }),
                });
                // After a syntax error the YAML stream cannot be trusted any further.
                break;
            }
        };
        if yaml.is_null() {
            continue;
        }
        let value: Value = match serde_json::to_value(&yaml) {
            Ok(v) => v,
            Err(e) => {
                out.problems.push(Problem {
                    document: fallback,
                    path: "(yaml)".into(),
                    message: format!("not a JSON-compatible document: {e}"),
                    position: None,
                });
                continue;
            }
        };
        if value.get("kind").and_then(Value::as_str) == Some("ApiPolicy") || is_misspelt_kind(&value) {
            out.documents += 1;
        }
        match check_value(&value) {
            Ok(Some(policy)) => out.policies.push(policy),
            Ok(None) => out.skipped += 1,
            Err(problems) => {
                let document =
                    value.pointer("/metadata/name").and_then(Value::as_str).map_or(fallback, str::to_owned);
                // One problem per line, whatever a message from below holds.
                out.problems.extend(problems.into_iter().map(|(path, message)| Problem {
                    document: document.clone(),
                    position: positions.get(i).and_then(|p| p.find(&path)),
                    path,
                    message: message.split_whitespace().collect::<Vec<_>>().join(" "),
                }));
            }
        }
    }
    out
}

/// Checks one document; `Ok(None)` when it is not an ApiPolicy.
pub fn check_value(value: &Value) -> Result<Option<ApiPolicy>, Vec<(String, String)>> {
    let Some(obj) = value.as_object() else {
        return Err(vec![(
            "(document)".into(),
            "a manifest must be a mapping with apiVersion, kind, metadata and spec".into(),
        )]);
    };
    if is_misspelt_kind(value) {
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        return Err(vec![("kind".into(), format!("{kind:?} is not a kind of apipolicy.dev: use ApiPolicy"))]);
    }
    if obj.get("kind").and_then(Value::as_str) != Some("ApiPolicy") {
        return Ok(None);
    }
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    if api_version != "apipolicy.dev/v1alpha1" {
        return Err(vec![(
            "apiVersion".into(),
            format!("{api_version:?} is not served: use apipolicy.dev/v1alpha1"),
        )]);
    }
    let mut problems = Vec::new();
    schema_check(value, &SCHEMA, "", &mut problems);
    if !problems.is_empty() {
        // The rule checks too, in the same run, on the document without the fields of the wrong
        // type (when what is left still reads as an ApiPolicy).
        let mut rest = value.clone();
        for (path, _) in &problems {
            remove_at(&mut rest, path);
        }
        if let Ok(policy) = serde_json::from_value::<ApiPolicy>(rest)
            && let Err(errs) = crate::validate(&policy)
        {
            let hidden = |path: &str| {
                problems.iter().any(|(p, _)| {
                    path == p || path.starts_with(&format!("{p}.")) || path.starts_with(&format!("{p}["))
                })
            };
            let more: Vec<(String, String)> =
                errs.into_iter().filter(|e| !hidden(&e.path)).map(|e| (e.path, e.message)).collect();
            problems.extend(more);
        }
        return Err(problems);
    }
    let policy: ApiPolicy = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        vec![(if path == "." { "(document)".into() } else { path }, e.inner().to_string())]
    })?;
    crate::validate(&policy)
        .map_err(|errs| errs.into_iter().map(|e| (e.path, e.message)).collect::<Vec<_>>())?;
    Ok(Some(policy))
}

/// A document of this API group whose kind is not ApiPolicy (`APIPolicy`, `Apipolicy`…).
fn is_misspelt_kind(value: &Value) -> bool {
    let group =
        value.get("apiVersion").and_then(Value::as_str).is_some_and(|v| v.starts_with("apipolicy.dev/"));
    group && value.get("kind").and_then(Value::as_str) != Some("ApiPolicy")
}

/// Removes the value at a field path as problems name it (`spec.routes[1].rateLimit.per`).
fn remove_at(doc: &mut Value, path: &str) {
    let mut steps: Vec<Result<usize, &str>> = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            steps.push(Err(key));
        }
        while let Some((index, after)) = rest.split_once(']') {
            match index.parse() {
                Ok(i) => steps.push(Ok(i)),
                Err(_) => return,
            }
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    let Some((last, parents)) = steps.split_last() else { return };
    let mut at = doc;
    for step in parents {
        let next = match step {
            Ok(i) => at.get_mut(*i),
            Err(key) => at.get_mut(*key),
        };
        match next {
            Some(v) => at = v,
            None => return,
        }
    }
    match (last, at) {
        (Err(key), Value::Object(map)) => {
            map.remove(*key);
        }
        // A list item of the wrong type: its place stays, empty, so later indexes keep theirs.
        (Ok(i), Value::Array(items)) if *i < items.len() => items[*i] = Value::Null,
        _ => {}
    }
}

/// Reads a sidecar's policy file: an ApiPolicy manifest (one ApiPolicy document) or a compiled
/// SidecarConfig as the operator writes it (JSON or YAML).
pub fn load_sidecar_config(text: &str) -> Result<SidecarConfig, Vec<Problem>> {
    let value: Result<serde_yaml::Value, _> = serde_yaml::from_str(text);
    if let Ok(v) = &value
        && v.get("revision").is_some()
        && v.get("spec").is_some()
        && v.get("kind").is_none()
    {
        let problem = |path: String, message: String| {
            vec![Problem { document: "SidecarConfig".into(), path, message, position: None }]
        };
        // Through JSON, whose enums are plain mappings (serde_yaml wants YAML tags for them).
        let json = serde_json::to_value(v).map_err(|e| problem("(document)".into(), e.to_string()))?;
        let config: SidecarConfig = serde_path_to_error::deserialize(json)
            .map_err(|e| problem(e.path().to_string(), e.inner().to_string()))?;
        let expected = SidecarConfig::revision_of(&config.spec);
        if config.revision != expected {
            return Err(problem(
                "revision".into(),
                format!(
                    "{} does not match the content ({expected}); the file was edited or damaged",
                    config.revision
                ),
            ));
        }
        return Ok(config);
    }
    let checked = check_manifest(text);
    if !checked.problems.is_empty() {
        return Err(checked.problems);
    }
    let mut policies = checked.policies.into_iter();
    match (policies.next(), policies.next()) {
        (Some(policy), None) => compile(&policy).map_err(|errs| {
            let document = policy.metadata.name.clone().unwrap_or_default();
            errs.into_iter()
                .map(|e| Problem {
                    document: document.clone(),
                    path: e.path,
                    message: e.message,
                    position: None,
                })
                .collect()
        }),
        (None, _) => Err(vec![Problem {
            document: "document 1".into(),
            path: "kind".into(),
            message: "the file holds no ApiPolicy".into(),
            position: None,
        }]),
        (Some(_), Some(_)) => Err(vec![Problem {
            document: "document 2".into(),
            path: "kind".into(),
            message: "the sidecar runs one ApiPolicy: put one per file".into(),
            position: None,
        }]),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// A structural-schema check as the API server does it, for the subset of OpenAPI the CRD uses.
fn schema_check(v: &Value, schema: &Value, path: &str, out: &mut Vec<(String, String)>) {
    let at = || if path.is_empty() { "(document)".to_owned() } else { path.to_owned() };
    if v.is_null() {
        // The API server drops nulls of fields that are not nullable; so do we.
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        match v {
            Value::String(s) => check_string(s, schema, &at(), out),
            Value::Number(n) if n.is_u64() => {}
            _ => out.push((at(), format!("expected an integer or a string, found {}", type_name(v)))),
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str);
    match (ty, v) {
        (Some("object"), Value::Object(map)) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let preserve = schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            for req in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if map.get(req).is_none_or(Value::is_null) {
                    out.push((join(path, req), "this field is required".into()));
                }
            }
            for (key, child) in map {
                // The API server adds these to every CRD's root itself.
                if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let sub = join(path, key);
                if let Some(s) = props.and_then(|p| p.get(key)) {
                    schema_check(child, s, &sub, out);
                } else if let Some(s) = additional.filter(|a| a.is_object()) {
                    schema_check(child, s, &sub, out);
                } else if !preserve && props.is_some() {
                    let known: Vec<&str> =
                        props.map(|p| p.keys().map(String::as_str).collect()).unwrap_or_default();
                    let hint =
                        closest(key, &known).map(|k| format!("; did you mean {k:?}?")).unwrap_or_default();
                    out.push((sub, format!("unknown field {key:?}{hint}")));
                }
            }
        }
        (Some("array"), Value::Array(items)) => {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                out.push((at(), format!("at most {max} items are allowed, found {}", items.len())));
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                out.push((at(), format!("at least {min} items are needed")));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    schema_check(item, item_schema, &format!("{path}[{i}]"), out);
                }
            }
        }
        (Some("string"), Value::String(s)) => check_string(s, schema, &at(), out),
        (Some("integer"), Value::Number(n)) if n.is_i64() || n.is_u64() => {
            check_number(n.as_f64().unwrap_or_default(), schema, &at(), out)
        }
        (Some("number"), Value::Number(n)) => {
            check_number(n.as_f64().unwrap_or_default(), schema, &at(), out)
        }
        (Some("boolean"), Value::Bool(_)) => {}
        (Some(expected), _) => {
            let want = match expected {
                "object" => "a mapping",
                "array" => "a list",
                "integer" => "an integer",
                "number" => "a number",
                "boolean" => "true or false",
                _ => "a string",
            };
            out.push((at(), format!("expected {want}, found {}", type_name(v))));
        }
        (None, _) => {}
    }
}

fn check_string(s: &str, schema: &Value, at: &str, out: &mut Vec<(String, String)>) {
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.iter().any(|a| a.as_str() == Some(s))
    {
        let names: Vec<&str> = allowed.iter().filter_map(Value::as_str).collect();
        out.push((at.to_owned(), format!("{s:?} is not one of {}", names.join(", "))));
        return;
    }
    let chars = s.chars().count() as u64;
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && chars > max
    {
        out.push((at.to_owned(), format!("is {chars} characters long; at most {max} are allowed")));
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && chars < min
    {
        out.push((at.to_owned(), format!("must be at least {min} characters long")));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        let re = regex::Regex::new(pattern).expect("the CRD's patterns compile");
        if !re.is_match(s) {
            out.push((at.to_owned(), pattern_message(s, pattern)));
        }
    }
}

fn pattern_message(s: &str, pattern: &str) -> String {
    if pattern == crate::duration::DURATION_PATTERN {
        match s.parse::<crate::Duration>() {
            Err(e) => e.to_string(),
            Ok(_) => format!("{s:?} is not a duration"),
        }
    } else if pattern == crate::quantity::QUANTITY_PATTERN {
        match s.parse::<crate::ByteSize>() {
            Err(e) => e.to_string(),
            Ok(_) => format!("{s:?} is not a size"),
        }
    } else {
        format!("{s:?} does not match the pattern {pattern}")
    }
}

fn check_number(n: f64, schema: &Value, at: &str, out: &mut Vec<(String, String)>) {
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        let exclusive = schema.get("exclusiveMinimum") == Some(&Value::Bool(true));
        if n < min || (exclusive && n == min) {
            out.push((
                at.to_owned(),
                format!(
                    "{n} is too small: it must be {} {min}",
                    if exclusive { "greater than" } else { "at least" }
                ),
            ));
        }
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
        let exclusive = schema.get("exclusiveMaximum") == Some(&Value::Bool(true));
        if n > max || (exclusive && n == max) {
            out.push((
                at.to_owned(),
                format!(
                    "{n} is too large: it must be {} {max}",
                    if exclusive { "less than" } else { "at most" }
                ),
            ));
        }
    }
}

/// The known name closest to a misspelt one, if any is close enough to be a likely typo.
fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let lower = key.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&lower, &k.to_ascii_lowercase()), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
