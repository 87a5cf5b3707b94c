//! TLS for the operator's HTTPS servers (the injection webhook and the agent API): one server
//! config whose certificate can be swapped while serving, loaded from PEM files and reloaded when
//! they change (cert-manager rotates them), or handed over by the operator's own certificate
//! rotation (`certs`).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio_rustls::TlsAcceptor;

use crate::error::{Error, Result};

/// The certificate to serve, replaceable at any time.
#[derive(Debug)]
struct Swappable(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Swappable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

#[derive(Clone)]
pub struct ServerTls {
    key: Arc<Swappable>,
    config: Arc<ServerConfig>,
    files: Option<Arc<Files>>,
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
    modified: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A certified key from PEM: the certificate chain (leaf first) and its private key.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8], what: &str) -> Result<CertifiedKey> {
    let tls = |reason: String| Error::Tls { what: what.to_owned(), reason };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| tls(format!("the certificate is not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(tls("no certificate found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| tls(format!("the private key is not PEM: {e}")))?;
    let signing = ring::sign::any_supported_type(&key).map_err(|e| tls(format!("the private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| tls(format!("the key does not belong to the certificate: {e}")))?;
    Ok(certified)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::ReadFile { path: path.to_owned(), source })
}

impl ServerTls {
    fn new(key: CertifiedKey, files: Option<Files>) -> Result<Self> {
        let key = Arc::new(Swappable(ArcSwap::from_pointee(key)));
        let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls { what: "the server config".into(), reason: e.to_string() })?
            .with_no_client_auth()
            .with_cert_resolver(key.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self { key, config: Arc::new(config), files: files.map(Arc::new) })
    }

    /// Serves the PEM certificate chain and key in these files; [`ServerTls::reload`] picks up
    /// new ones.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self> {
        let certified = certified_key(&read(cert)?, &read(key)?, &cert.display().to_string())?;
        let files = Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
            modified: Mutex::new((modified(cert), modified(key))),
        };
        Self::new(certified, Some(files))
    }

    /// Serves a PEM certificate chain and key; [`ServerTls::serve_pem`] replaces them.
    pub fn from_pem(cert: &str, key: &str) -> Result<Self> {
        Self::new(certified_key(cert.as_bytes(), key.as_bytes(), "the serving certificate")?, None)
    }

    /// Serves this certificate from the next handshake on, unless it is already served. Returns
    /// whether it was swapped in.
    pub fn serve_pem(&self, cert: &str, key: &str) -> Result<bool> {
        let certified = certified_key(cert.as_bytes(), key.as_bytes(), "the serving certificate")?;
        if self.key.0.load().cert == certified.cert {
            return Ok(false);
        }
        self.key.0.store(Arc::new(certified));
        Ok(true)
    }

    /// Swaps in the files' certificate when they changed; a bad new pair keeps the old one.
    /// Returns whether a new certificate is served.
    pub fn reload(&self) -> Result<bool> {
        let Some(files) = &self.files else { return Ok(false) };
        let now = (modified(&files.cert), modified(&files.key));
        let mut seen = files.modified.lock().expect("tls lock");
        if *seen == now {
            return Ok(false);
        }
        let certified =
            certified_key(&read(&files.cert)?, &read(&files.key)?, &files.cert.display().to_string())?;
        self.key.0.store(Arc::new(certified));
        *seen = now;
        Ok(true)
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }

    /// The leaf certificate being served (DER).
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.key.0.load().cert[0].clone()
    }
}

/// A TLS client connection to another replica, verified against `ca_pem` for `name`.
pub async fn connect(
    ca_pem: &str,
    name: &str,
    tcp: tokio::net::TcpStream,
) -> std::result::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("the CA is not valid PEM: {e}"))?;
        roots.add(cert).map_err(|e| format!("the CA is not a valid certificate: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| format!("{name:?} is not a server name: {e}"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS with {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{certs, fixtures::TEST_NOW_MS};

    fn issue(name: &str) -> (String, String, String) {
        let b = certs::issue(&[name.to_owned()], TEST_NOW_MS).unwrap();
        (b.ca_cert, b.cert, b.key)
    }

    #[test]
    fn files_load_reload_and_bad_files_keep_the_old_certificate() {
        let dir =
            std::env::temp_dir().join(format!("apipolicy-tls-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let (_, c1, k1) = issue("one.example");
        std::fs::write(&cert, &c1).unwrap();
        std::fs::write(&key, &k1).unwrap();
        let tls = ServerTls::from_files(&cert, &key).unwrap();
        let first = tls.leaf();
        assert!(!tls.reload().unwrap(), "unchanged files");

        let (_, c2, k2) = issue("two.example");
        std::fs::write(&cert, &c2).unwrap();
        std::fs::write(&key, &k2).unwrap();
        // Make the change visible even on filesystems with coarse timestamps.
        *tls.files.as_ref().unwrap().modified.lock().unwrap() = (None, None);
        assert!(tls.reload().unwrap());
        assert_ne!(tls.leaf(), first);

        // A key that does not belong to the certificate is refused; the served one stays.
        std::fs::write(&key, &k1).unwrap();
        *tls.files.as_ref().unwrap().modified.lock().unwrap() = (None, None);
        let err = tls.reload().unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");
        assert_ne!(tls.leaf(), first);

        // A pair handed over in memory is swapped in the same way.
        let (_, c3, k3) = issue("three.example");
        assert!(tls.serve_pem(&c3, &k3).unwrap());
        assert!(!tls.serve_pem(&c3, &k3).unwrap(), "already served");
        assert!(tls.serve_pem(&c3, &k1).is_err());
        assert_eq!(ServerTls::from_pem(&c3, &k3).unwrap().leaf(), tls.leaf());

        std::fs::write(&cert, "garbage").unwrap();
        assert!(ServerTls::from_files(&cert, &key).is_err());
        assert!(matches!(ServerTls::from_files(&dir.join("missing"), &key), Err(Error::ReadFile { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
