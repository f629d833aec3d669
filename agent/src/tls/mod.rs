//! TLS for the gRPC ports (KEDA's ExternalScaler and the node API): server
//! certificates with optionally required client certificates (mTLS), and
//! the client side the scaler role uses to reach node agents.
//!
//! KEDA's `caCert` / `tlsClientCert` / `tlsClientKey` map onto this: the
//! agent's `--tls-client-ca` is the CA that signed KEDA's `tlsClientCert`,
//! and KEDA's `caCert` is the CA that signed the agent's `--tls-cert`.
//!
//! Certificates rotate without restarts: the server side (`acceptor`)
//! re-reads its files when they change, and the scaler re-reads its client
//! files before the next poll (`ClientTls::stamp`).
mod acceptor;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use acceptor::ServerAcceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A TLS file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading a file failed.
    #[error("reading {what} {path}: {source}")]
    Read {
        /// Which file (flag name).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not PEM of the expected kind.
    #[error("{what} {path} holds no PEM {expected}")]
    NotPem {
        /// Which file (flag name).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What it should hold.
        expected: &'static str,
    },
    /// Half of a key pair was given.
    #[error("{0}")]
    Incomplete(&'static str),
    /// The files parse but do not make a usable TLS setup.
    #[error("{what}: {reason}")]
    Invalid {
        /// Which flag(s).
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// Server side: the agent's certificate and, for mTLS, the CA client
/// certificates must chain to.
#[derive(Clone, Debug, Default)]
pub struct ServerTls {
    /// PEM certificate chain (`--tls-cert`).
    pub cert: Option<PathBuf>,
    /// PEM private key (`--tls-key`).
    pub key: Option<PathBuf>,
    /// PEM CA bundle; when set, clients without a certificate it signed are
    /// refused (`--tls-client-ca`).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// Whether TLS is configured at all; half a key pair is an error.
    pub fn paths(&self) -> Result<Option<(&Path, &Path)>, TlsError> {
        match (&self.cert, &self.key) {
            (None, None) if self.client_ca.is_none() => Ok(None),
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            (None, None) => Err(TlsError::Incomplete("--tls-client-ca needs --tls-cert and --tls-key")),
            _ => Err(TlsError::Incomplete("--tls-cert and --tls-key go together")),
        }
    }

    /// Modification stamps of the files, to notice rotation.
    fn stamp(&self) -> FilesStamp {
        FilesStamp::of([&self.cert, &self.key, &self.client_ca])
    }
}

/// (modified, length) of up to three files; a change means "re-read".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilesStamp(Vec<Option<(SystemTime, u64)>>);

impl FilesStamp {
    fn of<'a>(paths: impl IntoIterator<Item = &'a Option<PathBuf>>) -> Self {
        // metadata() follows symlinks, so a Kubernetes Secret volume's
        // atomic `..data` swap shows up as a change.
        Self(
            paths
                .into_iter()
                .map(|path| {
                    let meta = std::fs::metadata(path.as_ref()?).ok()?;
                    Some((meta.modified().ok()?, meta.len()))
                })
                .collect(),
        )
    }
}

/// Client side (scaler -> node agents).
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// CA that signed the node agents' certificates (`--node-tls-ca`).
    pub ca: Option<PathBuf>,
    /// Client certificate for node agents requiring mTLS (`--node-tls-cert`).
    pub cert: Option<PathBuf>,
    /// Its key (`--node-tls-key`).
    pub key: Option<PathBuf>,
    /// Name the node certificates are issued for; node agents are dialled
    /// by IP (headless Service), so the name to verify is given here.
    pub server_name: Option<String>,
}

impl ClientTls {
    /// The tonic config, or `None` for plaintext.
    pub fn config(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        if self.ca.is_none() && self.cert.is_none() && self.key.is_none() {
            return Ok(None);
        }
        let ca = self.ca.as_ref().ok_or(TlsError::Incomplete("--node-tls-cert/--node-tls-key need --node-tls-ca"))?;
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(ca, "--node-tls-ca", "CERTIFICATE")?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read_pem(cert, "--node-tls-cert", "CERTIFICATE")?,
                    read_pem(key, "--node-tls-key", "PRIVATE KEY")?,
                ));
            }
            (None, None) => {}
            _ => return Err(TlsError::Incomplete("--node-tls-cert and --node-tls-key go together")),
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(Some(config))
    }

    /// Modification stamps of the client files, to notice rotation.
    pub fn stamp(&self) -> FilesStamp {
        FilesStamp::of([&self.ca, &self.cert, &self.key])
    }
}

/// Reads a PEM file and checks it holds a block of the expected kind, so a
/// swapped cert/key fails at start with the flag's name, not at the first
/// handshake.
fn read_pem(path: &Path, what: &'static str, expected: &'static str) -> Result<Vec<u8>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })?;
    let text = String::from_utf8_lossy(&pem);
    // "PRIVATE KEY" also matches "RSA PRIVATE KEY" and "EC PRIVATE KEY".
    let found = text.lines().any(|line| line.starts_with("-----BEGIN ") && line.contains(expected));
    if !found {
        return Err(TlsError::NotPem { what, path: path.to_path_buf(), expected });
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plaintext when nothing is configured; half-configured pairs and
    /// wrong files are errors naming the flag.
    #[test]
    fn config_errors_name_the_flag() {
        assert!(ServerAcceptor::load(&ServerTls::default()).unwrap().is_none());
        assert!(ClientTls::default().config().unwrap().is_none());

        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let only_cert = ServerTls { cert: Some(cert.clone()), ..Default::default() };
        assert!(ServerAcceptor::load(&only_cert).unwrap_err().to_string().contains("--tls-key"));

        let swapped = ServerTls { cert: Some(cert.clone()), key: Some(cert.clone()), client_ca: None };
        let err = ServerAcceptor::load(&swapped).unwrap_err().to_string();
        assert!(err.contains("--tls-key") && err.contains("PRIVATE KEY"), "{err}");

        let missing = ServerTls { cert: Some(dir.path().join("nope")), key: Some(cert.clone()), client_ca: None };
        assert!(ServerAcceptor::load(&missing).unwrap_err().to_string().contains("reading --tls-cert"));

        let client_without_ca = ClientTls { cert: Some(cert.clone()), key: Some(cert), ..Default::default() };
        assert!(client_without_ca.config().unwrap_err().to_string().contains("--node-tls-ca"));
    }
}
