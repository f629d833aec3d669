//! The gRPC port's TLS acceptor: a rustls server config built from the PEM
//! files (with a client-certificate verifier for mTLS and ALPN `h2`, which
//! gRPC clients such as KEDA's require), rebuilt when the files change, and
//! the stream of handshaken connections tonic serves.
//!
//! Handshakes run in their own tasks with a deadline, so a slow or hostile
//! client cannot stall the accept loop; failed handshakes (no client
//! certificate, unknown CA, plaintext) are dropped and logged at debug.
use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{read_pem, FilesStamp, ServerTls, TlsError};

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS acceptor that follows certificate rotation.
#[derive(Clone)]
pub struct ServerAcceptor {
    files: ServerTls,
    current: Arc<RwLock<(TlsAcceptor, FilesStamp)>>,
}

impl std::fmt::Debug for ServerAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerAcceptor").field("files", &self.files).finish_non_exhaustive()
    }
}

impl ServerAcceptor {
    /// Builds the acceptor from `files`; `None` when TLS is not configured.
    /// Errors name the flag whose file is wrong.
    pub fn load(files: &ServerTls) -> Result<Option<Self>, TlsError> {
        if files.paths()?.is_none() {
            return Ok(None);
        }
        let stamp = files.stamp();
        let acceptor = TlsAcceptor::from(Arc::new(server_config(files)?));
        Ok(Some(Self { files: files.clone(), current: Arc::new(RwLock::new((acceptor, stamp))) }))
    }

    /// Re-reads the files if they changed since the last load. A broken new
    /// set keeps the old one serving (and says so).
    pub fn reload_if_changed(&self) {
        let stamp = self.files.stamp();
        if self.current.read().map(|current| current.1 == stamp).unwrap_or(true) {
            return;
        }
        match server_config(&self.files) {
            Ok(config) => {
                if let Ok(mut current) = self.current.write() {
                    *current = (TlsAcceptor::from(Arc::new(config)), stamp);
                    tracing::info!("TLS certificates changed on disk: reloaded");
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "TLS certificates changed but cannot be used; still serving the old ones");
                if let Ok(mut current) = self.current.write() {
                    // Not retried until the files change again.
                    current.1 = stamp;
                }
            }
        }
    }

    /// Accepts on `listener` until `shutdown`, yielding handshaken streams;
    /// checks the files for rotation every `reload_every`.
    pub fn incoming(
        self,
        listener: TcpListener,
        reload_every: Duration,
        shutdown: CancellationToken,
    ) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        let (ready, incoming) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut reload = tokio::time::interval(reload_every);
            reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = reload.tick() => {
                        self.reload_if_changed();
                        continue;
                    }
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(err) => {
                            // Out of fds and the like: pause instead of spinning.
                            tracing::warn!(error = %err, "accepting a gRPC connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                if let Err(err) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %err, "setting TCP_NODELAY");
                }
                let Ok(current) = self.current.read().map(|current| current.0.clone()) else { return };
                let ready = ready.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, current.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = ready.send(Ok(stream)).await;
                        }
                        Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake refused"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(incoming)
    }
}

fn certificates(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Invalid { what, reason: err.to_string() })
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    let invalid = |reason: String| TlsError::Invalid { what: "--tls-key", reason };
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|err| invalid(err.to_string()))?
        .ok_or_else(|| invalid("no private key found".to_string()))
}

/// The rustls server config for `files` (which must name cert and key).
fn server_config(files: &ServerTls) -> Result<ServerConfig, TlsError> {
    let Some((cert, key)) = files.paths()? else {
        return Err(TlsError::Incomplete("--tls-cert and --tls-key go together"));
    };
    let chain = certificates(&read_pem(cert, "--tls-cert", "CERTIFICATE")?, "--tls-cert")?;
    let key = private_key(&read_pem(key, "--tls-key", "PRIVATE KEY")?)?;
    let provider = Arc::new(default_provider());
    let invalid = |what: &'static str| {
        move |err: tokio_rustls::rustls::Error| TlsError::Invalid { what, reason: err.to_string() }
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(invalid("TLS protocol versions"))?;
    let builder = match &files.client_ca {
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, provider)?),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(invalid("--tls-cert/--tls-key"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn client_verifier(
    ca: &Path,
    provider: Arc<tokio_rustls::rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn tokio_rustls::rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(&read_pem(ca, "--tls-client-ca", "CERTIFICATE")?, "--tls-client-ca")? {
        roots.add(certificate).map_err(|err| TlsError::Invalid { what: "--tls-client-ca", reason: err.to_string() })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|err| TlsError::Invalid { what: "--tls-client-ca", reason: err.to_string() })
}
