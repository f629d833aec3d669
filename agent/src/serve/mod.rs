//! Serving: KEDA's ExternalScaler (gRPC), the node API (gRPC, for the
//! scaler role) and the agent's HTTP endpoints, all answering from the
//! latest published view (the scaler role's answers come from
//! `crate::cluster`). TLS (`crate::tls`) and the node API's selections
//! (`crate::selection`) sit below both this and `crate::cluster`.
pub mod answer_times;
pub mod http;
pub mod keda;
pub mod metrics;
pub mod node_api;
pub mod scaler_http;
pub mod trigger;
