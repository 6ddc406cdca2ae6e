//! TLS termination (`[server.tls]`): rustls with ring, TLS 1.2 and 1.3 only, ALPN `h2` and
//! `http/1.1`. The certificate sits behind a resolver, so [`TlsReloader::reload`] (SIGHUP in the
//! binary) swaps it for new handshakes while open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Why the certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls.cert: cannot read certificates from {path}: {detail}")]
    Cert { path: PathBuf, detail: String },
    #[error("server.tls.key: cannot read a private key from {path}: {detail}")]
    Key { path: PathBuf, detail: String },
    #[error("server.tls: {0}")]
    Mismatch(String),
}

/// Reads and checks a PEM certificate chain and its private key.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_error = |detail: String| TlsError::Cert {
        path: cert.to_owned(),
        detail,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("the file holds no CERTIFICATE block".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        detail: e.to_string(),
    })?;
    let signing = ring::default_provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| TlsError::Key {
            path: key.to_owned(),
            detail: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        TlsError::Mismatch(format!(
            "the key in {} does not belong to the first certificate in {}: {e}",
            key.display(),
            cert.display()
        ))
    })?;
    Ok(Arc::new(certified))
}

/// The current certificate, swapped on reload.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Reloads the certificate from its files; cheap to clone.
#[derive(Clone, Debug)]
pub struct TlsReloader {
    current: Arc<Current>,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsReloader {
    /// Reads the files again; on any error the current certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = load(&self.cert, &self.key)?;
        *self.current.0.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

/// The acceptor of the main listener and its reloader.
pub fn acceptor(cert: &Path, key: &Path) -> Result<(TlsAcceptor, TlsReloader), TlsError> {
    crate::wechat::client::install_crypto_provider();
    let current = Arc::new(Current(RwLock::new(load(cert, key)?)));
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Mismatch(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let reloader = TlsReloader {
        current,
        cert: cert.to_owned(),
        key: key.to_owned(),
    };
    Ok((TlsAcceptor::from(Arc::new(config)), reloader))
}
