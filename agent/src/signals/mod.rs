//! Signals: per-pod histories built from the sources, windows over them, and
//! the aggregation of pods into workload values.
pub mod aggregate;
pub mod buckets;
pub mod collector;
pub mod engine_ttft;
pub mod fusion;
pub mod history;
pub mod latency;
pub mod metric;
pub mod request_state;
pub mod traffic_filter;
pub mod view;
