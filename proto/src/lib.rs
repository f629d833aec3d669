//! gRPC code generated from `proto/`: KEDA's ExternalScaler contract, used by
//! the agent's scaler (server side) and by tests and the demo (client side,
//! speaking exactly as KEDA does).

/// KEDA's `externalscaler` package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}
