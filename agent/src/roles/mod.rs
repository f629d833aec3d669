//! What each role of `podgpu-agent` runs, one module per role, and the
//! listeners they share.
//!
//! - `node`: probes, GPU, pods and the collector, served for one node
//!   (`node`, `standalone`).
//! - `scaler`: the cluster view over the node agents, served to KEDA.
pub mod node;
pub mod scaler;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

/// Where the servers ended up listening (ports may have been 0).
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// KEDA gRPC address.
    pub keda: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
}

/// Binds the gRPC and HTTP listeners (ports may be 0) and reports where.
pub(crate) async fn bind(keda: SocketAddr, http: SocketAddr) -> anyhow::Result<(TcpListener, TcpListener, Bound)> {
    let keda_listener = TcpListener::bind(keda).await.with_context(|| format!("binding KEDA gRPC on {keda}"))?;
    let http_listener = TcpListener::bind(http).await.with_context(|| format!("binding HTTP on {http}"))?;
    let bound = Bound { keda: keda_listener.local_addr()?, http: http_listener.local_addr()? };
    Ok((keda_listener, http_listener, bound))
}

/// Serves the gRPC `router` on `listener` until `shutdown`, over TLS when
/// an acceptor is given (its certificates re-read every `tls_reload`).
pub(crate) async fn serve_grpc(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Option<crate::tls::ServerAcceptor>,
    tls_reload: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stopped = shutdown.clone().cancelled_owned();
    let served = match tls {
        Some(acceptor) => {
            tracing::info!("gRPC port serves TLS");
            let incoming = acceptor.incoming(listener, tls_reload, shutdown);
            router.serve_with_incoming_shutdown(incoming, stopped).await
        }
        None => router.serve_with_incoming_shutdown(incoming(listener), stopped).await,
    };
    served.context("gRPC server")
}

/// Accepted connections with Nagle off: small gRPC answers must not wait
/// for a delayed ACK (40 ms on Linux).
fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(error = %err, "setting TCP_NODELAY");
            }
        }
        accepted
    })
}
