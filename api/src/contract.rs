//! The names the operator, the sidecar and the cluster agree on, written once: labels and
//! annotations on namespaces, pods, ConfigMaps and the Lease; the sidecar's environment as the
//! injector sets it; the agent API's paths and token audience.

/// A namespace label: `enabled` has the webhook inject the pods of the namespace.
pub const INJECTION_LABEL: &str = "apipolicy.dev/injection";
/// A pod annotation: `"false"` keeps the sidecar out of the pod.
pub const INJECT_ANNOTATION: &str = "apipolicy.dev/inject";
/// A pod annotation: the port the sidecar listens on, when the default clashes.
pub const PROXY_PORT_ANNOTATION: &str = "apipolicy.dev/proxy-port";
/// Pod annotations overriding the sidecar's resources.
pub const CPU_REQUEST_ANNOTATION: &str = "apipolicy.dev/sidecar-cpu-request";
pub const MEMORY_REQUEST_ANNOTATION: &str = "apipolicy.dev/sidecar-memory-request";
pub const CPU_LIMIT_ANNOTATION: &str = "apipolicy.dev/sidecar-cpu-limit";
pub const MEMORY_LIMIT_ANNOTATION: &str = "apipolicy.dev/sidecar-memory-limit";
/// Written on an injected pod: the ApiPolicy that governs it.
pub const POLICY_ANNOTATION: &str = "apipolicy.dev/policy";
/// Written on an injected pod: the config revision it was injected with.
pub const INJECTED_REVISION_ANNOTATION: &str = "apipolicy.dev/injected-revision";
/// On a policy's ConfigMap: the policy it holds the config of.
pub const POLICY_LABEL: &str = "apipolicy.dev/policy";
/// On a policy's ConfigMap: the revision of the config it holds.
pub const CONFIG_REVISION_ANNOTATION: &str = "apipolicy.dev/revision";
/// On the leader-election Lease: the leader's agent API URL.
pub const AGENT_URL_ANNOTATION: &str = "apipolicy.dev/agent-url";

/// The audience of the projected service-account token sidecars call the agent API with.
pub const TOKEN_AUDIENCE: &str = "apipolicy.dev";

/// The agent API's path of a policy's config (`GET`, long-poll with `?revision=`).
pub fn config_path(namespace: &str, name: &str) -> String {
    format!("{AGENT_PREFIX}/{namespace}/{name}/{CONFIG_ENDPOINT}")
}

/// The agent API's path of a policy's SLO reports (`POST`).
pub fn reports_path(namespace: &str, name: &str) -> String {
    format!("{AGENT_PREFIX}/{namespace}/{name}/{REPORTS_ENDPOINT}")
}

/// `{AGENT_PREFIX}/{namespace}/{name}/{endpoint}`.
pub const AGENT_PREFIX: &str = "/v1/policies";
pub const CONFIG_ENDPOINT: &str = "config";
pub const REPORTS_ENDPOINT: &str = "reports";

/// The sidecar's environment (each a flag of `apipolicy-sidecar`), as the injector sets it.
pub mod env {
    pub const POLICY: &str = "APIPOLICY_POLICY";
    pub const UPSTREAM: &str = "APIPOLICY_UPSTREAM";
    pub const LISTEN: &str = "APIPOLICY_LISTEN";
    pub const ADMIN: &str = "APIPOLICY_ADMIN";
    pub const DRAIN_DELAY: &str = "APIPOLICY_DRAIN_DELAY";
    pub const THREADS: &str = "APIPOLICY_THREADS";
    pub const TOKEN_FILE: &str = "APIPOLICY_TOKEN_FILE";
    pub const OPERATOR: &str = "APIPOLICY_OPERATOR";
    pub const CA_FILE: &str = "APIPOLICY_CA_FILE";
    pub const REDIS: &str = "APIPOLICY_REDIS";
    /// Set from the downward API.
    pub const POD_NAME: &str = "POD_NAME";
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_paths() {
        assert_eq!(config_path("shop", "products"), "/v1/policies/shop/products/config");
        assert_eq!(reports_path("shop", "products"), "/v1/policies/shop/products/reports");
    }
}
