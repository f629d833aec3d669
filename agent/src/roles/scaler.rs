//! The scaler role (Deployment): no probes, GPU or pods of its own; it
//! polls every node agent's view and answers KEDA for the whole cluster.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use podgpu_proto::externalscaler::external_scaler_server::ExternalScalerServer;
use tokio_util::sync::CancellationToken;

use crate::serve;

use super::{bind, serve_grpc, Bound};

/// What the scaler role needs.
#[derive(Clone, Debug)]
pub struct ScalerConfig {
    /// KEDA ExternalScaler gRPC listen address.
    pub keda_listen: SocketAddr,
    /// HTTP listen address (/healthz, /metrics).
    pub http_listen: SocketAddr,
    /// How to reach and judge the node agents.
    pub cluster: crate::cluster::ClusterConfig,
    /// TLS (and mTLS) on the KEDA gRPC port.
    pub tls: crate::tls::ServerTls,
    /// How often TLS files are checked for rotation.
    pub tls_reload: Duration,
}

/// Runs the scaler role (no probes, no GPU: it merges the node agents'
/// views) until `shutdown`.
pub async fn run_scaler(
    config: ScalerConfig,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    let tls = crate::tls::ServerAcceptor::load(&config.tls).context("gRPC TLS")?;
    let (keda_listener, http_listener, bound) = bind(config.keda_listen, config.http_listen).await?;
    let cluster =
        crate::cluster::spawn(config.cluster.clone(), serve::trigger::DEFAULT_WINDOW.as_secs_f64(), shutdown.clone());
    let mut tasks = tokio::task::JoinSet::new();
    let answer_times = std::sync::Arc::new(serve::answer_times::AnswerTimes::default());
    let router = tonic::transport::Server::builder().add_service(ExternalScalerServer::new(
        serve::keda::KedaScaler::for_cluster(cluster.clone(), answer_times.clone()),
    ));
    tasks.spawn(serve_grpc(router, keda_listener, tls, config.tls_reload, shutdown.clone()));
    let http = axum::serve(http_listener, serve::scaler_http::router(cluster.view.clone(), answer_times))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tasks.spawn(async move { http.await.context("HTTP server") });
    tracing::info!(keda = %bound.keda, http = %bound.http, nodes = ?config.cluster.nodes, "podgpu scaler serving");
    on_ready(bound);
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        if let Err(err) = joined.context("scaler task panicked").and_then(|r| r) {
            shutdown.cancel();
            if result.is_ok() {
                result = Err(err);
            }
        }
    }
    result
}
