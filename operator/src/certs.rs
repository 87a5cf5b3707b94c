//! The operator's own certificates: a CA, and a serving certificate it signs for the operator's
//! Service (the injection webhook and the agent API), kept in the Secret
//! `apipolicy-operator-tls` so that every replica and every restart share one CA. The webhook
//! configuration's `caBundle` and each policy's ConfigMap (`ca.crt`, for the sidecars) carry
//! the CA; the serving certificate is renewed well before it expires and swapped in while
//! serving.
//!
//! [`plan`] decides from the stored certificates and the time, purely; [`CertStore`] reads and
//! writes the Secret.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Api, Client, ResourceExt, api::PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{
    client::{WebPkiServerVerifier, danger::ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};

use crate::{
    error::{Error, Result},
    render::{MANAGED_BY_LABEL, MANAGER},
    tls::certified_key,
};

/// The Secret that holds the CA and the serving certificate.
pub const SECRET: &str = "apipolicy-operator-tls";
const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const SECRET_TYPE: &str = "kubernetes.io/tls";

const DAY_MS: u64 = 86_400_000;
pub const CA_VALIDITY_MS: u64 = 3650 * DAY_MS;
pub const SERVING_VALIDITY_MS: u64 = 365 * DAY_MS;
/// A certificate with less left than this is replaced.
pub const RENEW_BEFORE_MS: u64 = 30 * DAY_MS;
/// Certificates start an hour in the past: other machines' clocks may be behind.
const BACKDATE_MS: u64 = 3_600_000;
/// How often the Secret is looked at: renewals, and certificates another replica renewed.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// Writes lost to another replica are retried this often before giving up until the next check.
const WRITE_ATTEMPTS: usize = 3;

/// A CA and the serving certificate it signed, all PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

impl Bundle {
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| String::from_utf8(data.get(key)?.0.clone()).ok();
        Some(Self {
            ca_cert: text(CA_CERT)?,
            ca_key: text(CA_KEY)?,
            cert: text(TLS_CERT)?,
            key: text(TLS_KEY)?,
        })
    }

    pub fn to_secret(&self, namespace: &str) -> Secret {
        let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
        Secret {
            metadata: ObjectMeta {
                name: Some(SECRET.into()),
                namespace: Some(namespace.into()),
                labels: Some([(MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned())].into()),
                ..ObjectMeta::default()
            },
            type_: Some(SECRET_TYPE.into()),
            data: Some(
                [
                    (CA_CERT.to_owned(), bytes(&self.ca_cert)),
                    (CA_KEY.to_owned(), bytes(&self.ca_key)),
                    (TLS_CERT.to_owned(), bytes(&self.cert)),
                    (TLS_KEY.to_owned(), bytes(&self.key)),
                ]
                .into(),
            ),
            ..Secret::default()
        }
    }
}

/// Why new certificates were made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// There were none.
    First,
    /// The CA was unusable or about to expire: everything is new, the CA included.
    Ca,
    /// The serving certificate was unusable, for other names, or about to expire.
    Serving,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Keep,
    Issue(Bundle, Renewal),
}

/// When a PEM certificate stops being valid, in milliseconds since the epoch.
pub fn not_after_ms(pem: &str) -> Option<u64> {
    der_not_after_ms(&CertificateDer::from_pem_slice(pem.as_bytes()).ok()?)
}

/// When a DER certificate stops being valid, in milliseconds since the epoch.
pub fn der_not_after_ms(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok().map(|s| s * 1000)
}

fn set_validity(params: &mut CertificateParams, from_ms: u64, until_ms: u64) {
    let at = |ms: u64| rcgen::date_time_ymd(1970, 1, 1) + Duration::from_millis(ms);
    params.not_before = at(from_ms);
    params.not_after = at(until_ms);
}

/// A new CA valid for ten years from `now_ms`: (certificate, key).
pub fn new_ca(now_ms: u64) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "apipolicy-operator CA");
    // It signs serving certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, now_ms.saturating_sub(BACKDATE_MS), now_ms + CA_VALIDITY_MS);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate for `names` signed by the CA, valid a year from `now_ms` but never
/// past the CA: (certificate, key).
pub fn serving(ca_cert: &str, ca_key: &str, names: &[String], now_ms: u64) -> Result<(String, String)> {
    let ca_until = not_after_ms(ca_cert)
        .ok_or_else(|| Error::Tls { what: "the CA".into(), reason: "its validity cannot be read".into() })?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert, KeyPair::from_pem(ca_key)?)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(
        &mut params,
        now_ms.saturating_sub(BACKDATE_MS),
        (now_ms + SERVING_VALIDITY_MS).min(ca_until),
    );
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A new CA and a serving certificate for `names`.
pub fn issue(names: &[String], now_ms: u64) -> Result<Bundle> {
    let (ca_cert, ca_key) = new_ca(now_ms)?;
    let (cert, key) = serving(&ca_cert, &ca_key, names, now_ms)?;
    Ok(Bundle { ca_cert, ca_key, cert, key })
}

/// Valid now, and long enough from now.
fn lasts(pem: &str, now_ms: u64) -> bool {
    not_after_ms(pem).is_some_and(|until| until > now_ms + RENEW_BEFORE_MS)
}

fn ca_usable(b: &Bundle, now_ms: u64) -> bool {
    certified_key(b.ca_cert.as_bytes(), b.ca_key.as_bytes(), "the CA").is_ok() && lasts(&b.ca_cert, now_ms)
}

/// Whether a client trusting the CA accepts the serving certificate for every name, now.
fn serving_usable(b: &Bundle, names: &[String], now_ms: u64) -> bool {
    if certified_key(b.cert.as_bytes(), b.key.as_bytes(), "the serving certificate").is_err()
        || !lasts(&b.cert, now_ms)
    {
        return false;
    }
    let (Ok(ca), Ok(leaf)) = (
        CertificateDer::from_pem_slice(b.ca_cert.as_bytes()),
        CertificateDer::from_pem_slice(b.cert.as_bytes()),
    ) else {
        return false;
    };
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(ca).is_err() {
        return false;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(verifier) = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build() else {
        return false;
    };
    let now = UnixTime::since_unix_epoch(Duration::from_millis(now_ms));
    names.iter().all(|name| {
        ServerName::try_from(name.as_str())
            .is_ok_and(|server| verifier.verify_server_cert(&leaf, &[], &server, &[], now).is_ok())
    })
}

/// What to do with the stored certificates at `now_ms`: keep them, or serve new ones (with the
/// same CA while it is good).
pub fn plan(stored: Option<&Bundle>, names: &[String], now_ms: u64) -> Result<Plan> {
    match stored {
        None => Ok(Plan::Issue(issue(names, now_ms)?, Renewal::First)),
        Some(b) if !ca_usable(b, now_ms) => Ok(Plan::Issue(issue(names, now_ms)?, Renewal::Ca)),
        Some(b) if serving_usable(b, names, now_ms) => Ok(Plan::Keep),
        Some(b) => {
            let (cert, key) = serving(&b.ca_cert, &b.ca_key, names, now_ms)?;
            Ok(Plan::Issue(Bundle { cert, key, ..b.clone() }, Renewal::Serving))
        }
    }
}

/// The names the serving certificate is for: the Service's DNS names, the loopback, and the
/// hosts of URLs the operator is reached at from outside the cluster.
pub fn names(service: &str, namespace: &str, urls: &[&str]) -> Vec<String> {
    let mut names = vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_owned(),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ];
    for url in urls {
        if let Some(host) = url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_owned()))
            && !names.contains(&host)
        {
            names.push(host);
        }
    }
    names
}

/// The Secret, read and written with optimistic concurrency, so that replicas starting or
/// renewing together end up serving the same certificates.
pub struct CertStore {
    api: Api<Secret>,
    namespace: String,
    names: Vec<String>,
}

impl CertStore {
    pub fn new(client: Client, namespace: &str, names: Vec<String>) -> Self {
        Self { api: Api::namespaced(client, namespace), namespace: namespace.to_owned(), names }
    }

    fn secret_error(&self, source: kube::Error) -> Error {
        Error::CertificateSecret { namespace: self.namespace.clone(), name: SECRET.into(), source }
    }

    /// The certificates to serve at `now_ms`, and why they are new if they are.
    pub async fn ensure(&self, now_ms: u64) -> Result<(Bundle, Option<Renewal>)> {
        for _ in 0..WRITE_ATTEMPTS {
            let stored = self.api.get_opt(SECRET).await.map_err(|e| self.secret_error(e))?;
            let current = stored.as_ref().and_then(Bundle::from_secret);
            let (bundle, why) = match plan(current.as_ref(), &self.names, now_ms)? {
                Plan::Keep => return Ok((current.expect("kept certificates exist"), None)),
                Plan::Issue(bundle, why) => (bundle, why),
            };
            let mut secret = bundle.to_secret(&self.namespace);
            let written = match &stored {
                None => self.api.create(&PostParams::default(), &secret).await,
                Some(old) => {
                    secret.metadata.resource_version = old.resource_version();
                    // The type of a Secret cannot change.
                    secret.type_ = old.type_.clone();
                    self.api.replace(SECRET, &PostParams::default(), &secret).await
                }
            };
            match written {
                Ok(_) => return Ok((bundle, Some(why))),
                // Another replica wrote first: judge what it wrote.
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(self.secret_error(e)),
            }
        }
        Err(Error::Tls {
            what: format!("Secret {}/{SECRET}", self.namespace),
            reason: "it kept changing while the certificates were renewed".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::json;

    use super::*;
    use crate::{fixtures::TEST_NOW_MS, tls::ServerTls};

    fn names() -> Vec<String> {
        super::names("apipolicy-operator", "apipolicy-system", &["https://172.18.0.1:9443/mutate"])
    }

    #[test]
    fn names_cover_the_service_the_loopback_and_outside_urls() {
        let n = names();
        assert_eq!(n[0], "apipolicy-operator.apipolicy-system.svc");
        for expected in
            ["apipolicy-operator.apipolicy-system.svc.cluster.local", "localhost", "127.0.0.1", "172.18.0.1"]
        {
            assert!(n.contains(&expected.to_owned()), "{expected} in {n:?}");
        }
        let v6 = super::names("s", "ns", &["https://[fd00::1]:9443/mutate", "https://localhost:1/"]);
        assert_eq!(v6.iter().filter(|h| *h == "localhost").count(), 1);
        assert!(v6.contains(&"fd00::1".to_owned()), "{v6:?}");
    }

    #[test]
    fn renewal_follows_the_clock() {
        let t0 = TEST_NOW_MS;
        let Plan::Issue(first, Renewal::First) = plan(None, &names(), t0).unwrap() else {
            panic!("a first issue")
        };
        assert!(serving_usable(&first, &names(), t0));
        assert_eq!(not_after_ms(&first.cert).unwrap() / 1000, (t0 + SERVING_VALIDITY_MS) / 1000);
        assert_eq!(not_after_ms(&first.ca_cert).unwrap() / 1000, (t0 + CA_VALIDITY_MS) / 1000);

        // (days after t0, what happens)
        let table: [(u64, Option<Renewal>); 5] = [
            (0, None),
            (200, None),
            (334, None),                   // 31 days left
            (336, Some(Renewal::Serving)), // 29 days left
            (400, Some(Renewal::Serving)), // expired
        ];
        for (days, expected) in table {
            let now = t0 + days * DAY_MS;
            match (plan(Some(&first), &names(), now).unwrap(), expected) {
                (Plan::Keep, None) => {}
                (Plan::Issue(renewed, why), Some(expected)) => {
                    assert_eq!(why, expected, "day {days}");
                    assert_eq!(
                        (&renewed.ca_cert, &renewed.ca_key),
                        (&first.ca_cert, &first.ca_key),
                        "the CA stays"
                    );
                    assert_ne!(renewed.cert, first.cert);
                    assert!(serving_usable(&renewed, &names(), now), "day {days}");
                    assert_eq!(plan(Some(&renewed), &names(), now).unwrap(), Plan::Keep, "day {days}");
                }
                (got, _) => panic!("day {days}: expected {expected:?}, got {got:?}"),
            }
        }

        // Near the CA's end the serving certificate ends with it; past that the CA is renewed.
        let late = t0 + CA_VALIDITY_MS - 100 * DAY_MS;
        let Plan::Issue(last, Renewal::Serving) = plan(Some(&first), &names(), late).unwrap() else {
            panic!()
        };
        assert_eq!(not_after_ms(&last.cert), not_after_ms(&first.ca_cert));
        let Plan::Issue(fresh, Renewal::Ca) =
            plan(Some(&last), &names(), t0 + CA_VALIDITY_MS - 29 * DAY_MS).unwrap()
        else {
            panic!("a new CA")
        };
        assert_ne!(fresh.ca_cert, first.ca_cert);
    }

    #[test]
    fn unusable_certificates_are_replaced() {
        let t0 = TEST_NOW_MS;
        let good = issue(&names(), t0).unwrap();
        let other = issue(&names(), t0).unwrap();
        let table = [
            (
                "other names",
                Bundle { ..good.clone() },
                vec!["elsewhere.example".to_owned()],
                Renewal::Serving,
            ),
            (
                "a key of another certificate",
                Bundle { key: other.key.clone(), ..good.clone() },
                names(),
                Renewal::Serving,
            ),
            (
                "signed by another CA",
                Bundle { cert: other.cert.clone(), key: other.key.clone(), ..good.clone() },
                names(),
                Renewal::Serving,
            ),
            (
                "garbage serving certificate",
                Bundle { cert: "garbage".into(), ..good.clone() },
                names(),
                Renewal::Serving,
            ),
            (
                "a CA key of another CA",
                Bundle { ca_key: other.ca_key.clone(), ..good.clone() },
                names(),
                Renewal::Ca,
            ),
            ("garbage CA", Bundle { ca_cert: "garbage".into(), ..good.clone() }, names(), Renewal::Ca),
        ];
        for (case, bundle, names, expected) in table {
            match plan(Some(&bundle), &names, t0).unwrap() {
                Plan::Issue(b, why) => {
                    assert_eq!(why, expected, "{case}");
                    assert!(serving_usable(&b, &names, t0), "{case}");
                }
                Plan::Keep => panic!("{case}: kept"),
            }
        }
        assert_eq!(Bundle::from_secret(&good.to_secret("ns")), Some(good.clone()));
        let mut partial = good.to_secret("ns");
        partial.data.as_mut().unwrap().remove(TLS_KEY);
        assert_eq!(Bundle::from_secret(&partial), None);
    }

    #[derive(Default)]
    struct Fake {
        stored: Option<Secret>,
        calls: Vec<&'static str>,
        /// Written by another replica just before this one's next write.
        rival: Option<Secret>,
    }

    /// Plays the API server for the Secret: GET, POST and PUT with resourceVersion checks.
    fn fake_secrets(mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>) -> Arc<Mutex<Fake>> {
        let state: Arc<Mutex<Fake>> = Arc::default();
        let shared = state.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                assert_eq!(
                    request.uri().path().trim_end_matches(&format!("/{SECRET}")),
                    "/api/v1/namespaces/ns/secrets"
                );
                let method = request.method().clone();
                let body = request.into_body().collect_bytes().await.unwrap();
                let mut state = shared.lock().unwrap();
                let reply = |code: StatusCode, value: serde_json::Value| {
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&value).unwrap()))
                        .unwrap()
                };
                let status = |code: u16, reason: &str| json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code});
                let response = match method {
                    Method::GET => {
                        state.calls.push("get");
                        match &state.stored {
                            Some(s) => reply(StatusCode::OK, serde_json::to_value(s).unwrap()),
                            None => reply(StatusCode::NOT_FOUND, status(404, "NotFound")),
                        }
                    }
                    Method::POST | Method::PUT => {
                        state.calls.push(if method == Method::POST { "create" } else { "replace" });
                        if let Some(rival) = state.rival.take() {
                            state.stored = Some(rival);
                        }
                        let mut secret: Secret = serde_json::from_slice(&body).unwrap();
                        let current = state.stored.as_ref().and_then(|s| s.metadata.resource_version.clone());
                        if secret.metadata.resource_version != current {
                            reply(StatusCode::CONFLICT, status(409, "Conflict"))
                        } else {
                            let next = current.map_or(1, |v| v.parse::<u64>().unwrap() + 1);
                            secret.metadata.resource_version = Some(next.to_string());
                            state.stored = Some(secret.clone());
                            reply(StatusCode::OK, serde_json::to_value(secret).unwrap())
                        }
                    }
                    other => panic!("unexpected {other}"),
                };
                send.send_response(response);
            }
        });
        state
    }

    /// The certificate a client sees when it connects at `now_ms`, trusting `ca`.
    async fn handshake(tls: &ServerTls, ca: &str, now_ms: u64) -> CertificateDer<'static> {
        #[derive(Debug)]
        struct At(u64);
        impl rustls::time_provider::TimeProvider for At {
            fn current_time(&self) -> Option<UnixTime> {
                Some(UnixTime::since_unix_epoch(Duration::from_millis(self.0)))
            }
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
        let config = rustls::ClientConfig::builder_with_details(
            Arc::new(rustls::crypto::ring::default_provider()),
            Arc::new(At(now_ms)),
        )
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let (client, server) = tokio::io::duplex(64 * 1024);
        let acceptor = tls.acceptor();
        let accepted = tokio::spawn(async move { acceptor.accept(server).await.map(|_| ()) });
        let name = ServerName::try_from("apipolicy-operator.ns.svc").unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, client)
            .await
            .expect("the client trusts the served certificate");
        accepted.await.unwrap().unwrap();
        stream.get_ref().1.peer_certificates().unwrap()[0].clone()
    }

    #[tokio::test]
    async fn the_served_certificate_is_renewed_in_place_as_the_clock_moves() {
        let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let state = fake_secrets(handle);
        let store =
            CertStore::new(Client::new(mock, "default"), "ns", super::names("apipolicy-operator", "ns", &[]));
        let t0 = TEST_NOW_MS;

        let (first, why) = store.ensure(t0).await.unwrap();
        assert_eq!(why, Some(Renewal::First));
        let tls = ServerTls::from_pem(&first.cert, &first.key).unwrap();
        assert_eq!(
            handshake(&tls, &first.ca_cert, t0).await,
            CertificateDer::from_pem_slice(first.cert.as_bytes()).unwrap()
        );

        // A restart (or another replica) finds and keeps what is stored.
        let (again, why) = store.ensure(t0 + 100 * DAY_MS).await.unwrap();
        assert_eq!((again == first, why), (true, None));
        assert!(!tls.serve_pem(&again.cert, &again.key).unwrap(), "nothing to swap");

        // 29 days before expiry: renewed, stored, and served by the same server.
        let later = t0 + 336 * DAY_MS;
        let (renewed, why) = store.ensure(later).await.unwrap();
        assert_eq!(why, Some(Renewal::Serving));
        assert_eq!(renewed.ca_cert, first.ca_cert);
        assert!(tls.serve_pem(&renewed.cert, &renewed.key).unwrap());
        let seen = handshake(&tls, &first.ca_cert, later).await;
        assert_eq!(seen, CertificateDer::from_pem_slice(renewed.cert.as_bytes()).unwrap());
        let stored = Bundle::from_secret(state.lock().unwrap().stored.as_ref().unwrap()).unwrap();
        assert_eq!(stored, renewed);
        assert_eq!(state.lock().unwrap().calls, ["get", "create", "get", "get", "replace"]);
    }

    #[tokio::test]
    async fn a_replica_that_loses_the_race_serves_the_winners_certificates() {
        let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let state = fake_secrets(handle);
        let store =
            CertStore::new(Client::new(mock, "default"), "ns", super::names("apipolicy-operator", "ns", &[]));
        // Another replica creates the Secret between this one's read and its create.
        let winner = issue(&super::names("apipolicy-operator", "ns", &[]), TEST_NOW_MS).unwrap();
        let mut secret = winner.to_secret("ns");
        secret.metadata.resource_version = Some("7".into());
        state.lock().unwrap().rival = Some(secret);
        let (got, why) = store.ensure(TEST_NOW_MS).await.unwrap();
        assert_eq!((got, why), (winner, None));
        assert_eq!(state.lock().unwrap().calls, ["get", "create", "get"]);
    }
}
