//! Serving: KEDA's ExternalScaler (gRPC) and the agent's HTTP endpoints,
//! both answering from the collector's latest published view.
pub mod http;
pub mod keda;
pub mod trigger;
