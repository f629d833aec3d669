//! gRPC code generated from `proto/`: KEDA's ExternalScaler contract (the
//! agent's scaler serves it; tests and the demo speak it as KEDA does), and
//! podgpu's own node API (node agents serve it; the scaler role reads it);
//! the kubelet's pod-resources API (node agents read it).

/// KEDA's `externalscaler` package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}

/// podgpu's node API (`podgpu.node.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod node {
    tonic::include_proto!("podgpu.node.v1");
}

/// The kubelet's pod-resources API (`v1.PodResourcesLister`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod podresources {
    tonic::include_proto!("v1");
}
