//! Certificates from PEM files, for every TLS endpoint Relay has: the edge's HTTPS listener (a server
//! config that follows its files: a renewed certificate is picked up without a restart), and extra trust
//! anchors for outgoing connections (a private CA in front of a self-hosted upstream). One loader, so a
//! certificate that works in one place works in the other, and errors name the file and what is wrong.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// `[server.tls]`: serve the client-facing listener over HTTPS.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often the files are checked for a change (a renewed certificate is served from then on).
    #[serde(default = "default_reload_secs")]
    pub reload_secs: u64,
}

fn default_reload_secs() -> u64 {
    10
}

/// Every certificate in a PEM file (a chain or a CA bundle); an empty file is an error.
pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate file ({e:?})", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{}: no certificate in the file", path.display());
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: no usable private key ({e:?})", path.display()))
}

/// A server config for `files` (HTTP/2 and HTTP/1.1 offered by ALPN). Uses ring explicitly, so it works
/// whatever provider the process installed.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<ServerConfig> {
    let (certs, key) = (load_certs(&files.cert_file)?, load_key(&files.key_file)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            anyhow::anyhow!("{}: the key does not fit the certificate ({e})", files.key_file.display())
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A TLS acceptor whose certificate follows its files: [`ReloadingTls::watch`] reloads them when their
/// modification time or size changes. A file caught half-written, or a bad replacement, keeps the last
/// good certificate in service and logs why.
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<(Arc<ServerConfig>, Stamp)>,
}

type Stamp = [(Option<SystemTime>, u64); 2];

fn stamp(files: &TlsFiles) -> Stamp {
    let of = |p: &Path| std::fs::metadata(p).map_or((None, 0), |m| (m.modified().ok(), m.len()));
    [of(&files.cert_file), of(&files.key_file)]
}

impl ReloadingTls {
    pub fn load(files: &TlsFiles) -> anyhow::Result<Arc<Self>> {
        let cfg = Arc::new(server_config(files)?);
        Ok(Arc::new(Self { files: files.clone(), current: RwLock::new((cfg, stamp(files))) }))
    }

    /// The acceptor for the next connection (connections already open keep the config they began with).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let cfg = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).0.clone();
        tokio_rustls::TlsAcceptor::from(cfg)
    }

    /// Reloads the files if they changed since the last load. `Ok(true)`: a new certificate is in use.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let now = stamp(&self.files);
        if self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).1 == now {
            return Ok(false);
        }
        let cfg = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = (Arc::new(cfg), now);
        Ok(true)
    }

    /// Checks the files every `reload_secs` until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let every = Duration::from_secs(self.files.reload_secs.max(1));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.reload_if_changed() {
                Ok(true) => {
                    tracing::info!(cert = %self.files.cert_file.display(), "TLS certificate reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate not reloaded; the previous one stays in use")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_and_empty_files_are_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("relay-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = load_certs(&empty).unwrap_err().to_string();
        assert!(e.contains("empty.pem") && e.contains("no certificate"), "{e}");
        let missing = dir.join("missing.pem");
        assert!(load_key(&missing).unwrap_err().to_string().contains("missing.pem"));
        let files = TlsFiles { cert_file: empty.clone(), key_file: missing, reload_secs: 1 };
        assert!(ReloadingTls::load(&files).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
