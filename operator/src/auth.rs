//! Who calls the agent API, and whether they may: a pod's projected service-account token
//! (audience `apipolicy.dev`) is checked by a TokenReview, cached briefly, and a pod may read
//! or report only for the ApiPolicy that governs it.

use apipolicy_api::contract::{POLICY_ANNOTATION, TOKEN_AUDIENCE};
use std::{collections::HashMap, sync::Mutex};

use apipolicy_api::ApiPolicy;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::{Api, Client, ResourceExt, api::PostParams};
use sha2::{Digest, Sha256};

use crate::{
    conflict::governing,
    error::{Error, Result},
    metrics::Metrics,
};

const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// An accepted token is trusted this long without asking again; the pod's existence is still
/// checked on every call.
const ACCEPTED_TTL_MS: u64 = 60_000;
const REJECTED_TTL_MS: u64 = 10_000;
const MAX_CACHED: usize = 10_000;

/// The pod behind a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: Option<String>,
}

/// Why a call is refused: 401 or 403.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    Unauthenticated(String),
    Forbidden(String),
}

/// Reads a TokenReview's answer.
pub fn judge(status: Option<TokenReviewStatus>) -> Result<Caller, Denial> {
    let s = status.unwrap_or_default();
    if s.authenticated != Some(true) {
        let why = s.error.map(|e| format!(": {e}")).unwrap_or_default();
        return Err(Denial::Unauthenticated(format!("the token was not accepted{why}")));
    }
    if s.audiences.as_ref().is_some_and(|a| !a.iter().any(|a| a == TOKEN_AUDIENCE)) {
        return Err(Denial::Unauthenticated(format!(
            "the token is not meant for the audience {TOKEN_AUDIENCE}"
        )));
    }
    let user = s.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some((namespace, _account)) =
        username.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'))
    else {
        return Err(Denial::Forbidden(format!(
            "{username:?} is not a service account; only sidecars may call"
        )));
    };
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let Some(pod) = first(POD_NAME_EXTRA) else {
        return Err(Denial::Forbidden(
            "the token is not bound to a pod: use the projected service-account token the injector mounts"
                .into(),
        ));
    };
    Ok(Caller { namespace: namespace.to_owned(), pod, pod_uid: first(POD_UID_EXTRA) })
}

/// A token's SHA-256 → when the verdict expires, and the verdict.
type Verdicts = HashMap<[u8; 32], (u64, Result<Caller, Denial>)>;

#[derive(Default)]
pub struct TokenReviews {
    cache: Mutex<Verdicts>,
}

impl TokenReviews {
    /// The pod behind `token`, from the cache or a TokenReview.
    pub async fn review(
        &self,
        client: &Client,
        token: &str,
        now_ms: u64,
        metrics: &Metrics,
    ) -> Result<Result<Caller, Denial>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((_, verdict)) =
            self.cache.lock().expect("token cache lock").get(&digest).filter(|(expires, _)| *expires > now_ms)
        {
            metrics.token_reviews.with_label_values(&["cached"]).inc();
            return Ok(verdict.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let answer = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(Error::TokenReview)?;
        let verdict = judge(answer.status);
        let (ttl, result) =
            if verdict.is_ok() { (ACCEPTED_TTL_MS, "authenticated") } else { (REJECTED_TTL_MS, "rejected") };
        metrics.token_reviews.with_label_values(&[result]).inc();
        let mut cache = self.cache.lock().expect("token cache lock");
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (expires, _)| *expires > now_ms);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(digest, (now_ms + ttl, verdict.clone()));
        Ok(verdict)
    }
}

/// The ApiPolicy a pod belongs to: the one the injector named on it, or else the one that
/// governs it by the conflict rule.
pub fn governor_of(pod: &Pod, policies: &[std::sync::Arc<ApiPolicy>]) -> Option<String> {
    if let Some(name) = pod.annotations().get(POLICY_ANNOTATION) {
        return Some(name.clone());
    }
    let namespace = pod.namespace()?;
    governing(&namespace, pod.labels(), policies.iter().map(|p| &**p)).map(|p| p.name_any())
}

/// Whether `pod` (the caller's, already looked up) may use policy `namespace/name`.
pub fn authorize(
    caller: &Caller,
    pod: Option<&Pod>,
    namespace: &str,
    name: &str,
    policies: &[std::sync::Arc<ApiPolicy>],
) -> Result<(), Denial> {
    if caller.namespace != namespace {
        return Err(Denial::Forbidden(format!(
            "pod {}/{} may not use ApiPolicies of namespace {namespace}",
            caller.namespace, caller.pod
        )));
    }
    let Some(pod) = pod else {
        return Err(Denial::Forbidden(format!("pod {}/{} does not exist", caller.namespace, caller.pod)));
    };
    if caller.pod_uid.is_some() && pod.metadata.uid != caller.pod_uid {
        return Err(Denial::Forbidden(format!(
            "the token belongs to an earlier pod named {}/{}",
            caller.namespace, caller.pod
        )));
    }
    match governor_of(pod, policies) {
        Some(g) if g == name => Ok(()),
        Some(g) => Err(Denial::Forbidden(format!(
            "pod {}/{} is governed by ApiPolicy {g}, not {name}",
            caller.namespace, caller.pod
        ))),
        None => Err(Denial::Forbidden(format!(
            "pod {}/{} is governed by no ApiPolicy",
            caller.namespace, caller.pod
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;
    use crate::fixtures::{pod, policy_at};

    fn status(
        authenticated: bool,
        user: &str,
        extra: &[(&str, &str)],
        audiences: Option<&[&str]>,
    ) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: audiences.map(|a| a.iter().map(|s| (*s).to_owned()).collect()),
            error: (!authenticated).then(|| "token expired".to_owned()),
            user: Some(UserInfo {
                username: Some(user.to_owned()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..UserInfo::default()
            }),
        }
    }

    #[test]
    fn token_reviews_are_read_strictly() {
        let sa = "system:serviceaccount:shop:default";
        let bound = [(POD_NAME_EXTRA, "web-1"), (POD_UID_EXTRA, "uid-1")];
        let caller = Caller { namespace: "shop".into(), pod: "web-1".into(), pod_uid: Some("uid-1".into()) };
        let table: Vec<(Option<TokenReviewStatus>, Result<Caller, &str>)> = vec![
            (Some(status(true, sa, &bound, Some(&[TOKEN_AUDIENCE]))), Ok(caller.clone())),
            (Some(status(true, sa, &bound, None)), Ok(caller.clone())),
            (Some(status(false, sa, &bound, None)), Err("the token was not accepted: token expired")),
            (None, Err("the token was not accepted")),
            (
                Some(status(true, sa, &bound, Some(&["other"]))),
                Err("the token is not meant for the audience"),
            ),
            (Some(status(true, "alice", &bound, None)), Err("\"alice\" is not a service account")),
            (Some(status(true, sa, &[], None)), Err("the token is not bound to a pod")),
        ];
        for (input, expected) in table {
            match (judge(input.clone()), expected) {
                (Ok(c), Ok(e)) => assert_eq!(c, e),
                (Err(Denial::Unauthenticated(m) | Denial::Forbidden(m)), Err(e)) => {
                    assert!(m.starts_with(e), "{m:?} should start with {e:?}")
                }
                (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_pod_may_use_only_the_policy_that_governs_it() {
        let policies =
            vec![Arc::new(policy_at("web", "app", "web", 1)), Arc::new(policy_at("db", "app", "db", 2))];
        let caller = |ns: &str, pod: &str| Caller {
            namespace: ns.into(),
            pod: pod.into(),
            pod_uid: Some(format!("uid-{pod}")),
        };
        let annotated = pod("w1", &[("app", "other")], Some("web"), None);
        let by_labels = pod("w2", &[("app", "web")], None, None);
        let orphan = pod("o", &[("app", "none")], None, None);
        let forbidden = |r: Result<(), Denial>, part: &str| match r {
            Err(Denial::Forbidden(m)) => assert!(m.contains(part), "{m:?} lacks {part:?}"),
            other => panic!("expected 403 with {part:?}, got {other:?}"),
        };
        assert_eq!(authorize(&caller("shop", "w1"), Some(&annotated), "shop", "web", &policies), Ok(()));
        assert_eq!(authorize(&caller("shop", "w2"), Some(&by_labels), "shop", "web", &policies), Ok(()));
        forbidden(
            authorize(&caller("shop", "w1"), Some(&annotated), "shop", "db", &policies),
            "governed by ApiPolicy web, not db",
        );
        forbidden(
            authorize(&caller("other", "w1"), Some(&annotated), "shop", "web", &policies),
            "may not use ApiPolicies of namespace shop",
        );
        forbidden(authorize(&caller("shop", "w1"), None, "shop", "web", &policies), "does not exist");
        forbidden(
            authorize(&caller("shop", "o"), Some(&orphan), "shop", "web", &policies),
            "governed by no ApiPolicy",
        );
        let mut stale = caller("shop", "w1");
        stale.pod_uid = Some("uid-old".into());
        forbidden(authorize(&stale, Some(&annotated), "shop", "web", &policies), "earlier pod");
    }
}
