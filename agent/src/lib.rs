//! podgpu's node agent: per-pod GPU load and request signals, served to KEDA.
//!
//! # Layout
//! Data flows from sources through signals to serving:
//!
//! ```text
//!  probes/ (eBPF request probe, parsers) -----+
//!  gpu/    (NVML or simulator, own thread) ----+--> signals/collector --> NodeView --+--> serve/keda  (ExternalScaler gRPC)
//!  pods/   (cgroup tree, pid -> pod, metadata) +    (one task owns       (watch     +--> serve/http  (/healthz /pods /metrics)
//!  engines/ (engines' own /metrics, scraped) --+     all pod state)       channel)
//! ```
//!
//! - `probes`: loads and attaches the programs of `agent-ebpf`, drains their
//!   ring buffer, and tracks requests (HTTP/1.1, HTTP/2/gRPC) per connection.
//! - `gpu`: the `GpuBackend` trait, NVML and simulated backends, the poller.
//! - `engines`: inference engines' own gauges (queue, batch, KV cache,
//!   TTFT): found per pod with no configuration, scraped over HTTP.
//! - `pods`: cgroup path parsing, the cgroup v2 tree, label selectors,
//!   static pod metadata.
//! - `cluster` (scaler role): the node agents as a source; polls each for
//!   the pods and metrics live triggers ask for, publishes a `ClusterView`.
//! - `signals`: per-pod histories, windows, aggregation, the collector.
//! - `serve`: KEDA scaler, trigger validation, HTTP endpoints.
//! - `roles`: what each role runs (`node`, `scaler`) on top of the rest.
//! - `top`: the live terminal view (`podgpu-agent top`), a client of
//!   `/pods`; `agent_http`: the small GET client it and `record` share.
//!
//! Readers never touch the sources: every KEDA call and scrape reads the
//! latest `NodeView` the collector published.
pub mod agent_http;
pub mod backoff;
pub mod cluster;
pub mod engines;
pub mod files;
pub mod gpu;
pub mod pods;
pub mod probes;
pub mod proc;
pub mod roles;
pub mod selection;
pub mod serve;
pub mod signals;
pub mod status;
pub mod tls;
pub mod top;

pub use roles::node::{run, Config};
pub use roles::scaler::{run_scaler, ScalerConfig};
pub use roles::Bound;
