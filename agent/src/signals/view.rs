//! The node's published state: per-pod histories plus the health of each
//! source. The collector publishes a fresh `NodeView` every tick; readers
//! (KEDA answers, HTTP) only ever look at a published snapshot.
use serde::Serialize;

use super::history::History;
use super::metric::{Metric, MetricSource};
use crate::gpu::DeviceSample;
use crate::pods::PodMeta;
use crate::probes::socket::SocketProbeStats;

/// Health of one source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum SourceStatus {
    /// Working; `detail` says what is serving (e.g. the GPU backend).
    Ok {
        /// What is serving.
        detail: String,
    },
    /// Wanted but failing; the agent keeps serving the other sources.
    Degraded {
        /// Why.
        reason: String,
    },
    /// Switched off by configuration.
    Disabled,
}

impl SourceStatus {
    /// Whether the source's signals can be served.
    pub fn is_ok(&self) -> bool {
        matches!(self, SourceStatus::Ok { .. })
    }
}

/// Health of the agent's sources.
#[derive(Clone, Debug, Serialize)]
pub struct Health {
    /// eBPF probes.
    pub probes: SourceStatus,
    /// GPU backend.
    pub gpu: SourceStatus,
    /// Counters the probes keep about themselves.
    pub probe_stats: SocketProbeStats,
    /// GPU polls that failed since start.
    pub gpu_poll_errors: u64,
    /// GPU updates dropped because the collector lagged.
    pub gpu_updates_dropped: u64,
}

/// One pod's signals.
#[derive(Clone, Debug)]
pub struct PodView {
    /// Identity and metadata.
    pub meta: PodMeta,
    /// Cumulative points of the recent past.
    pub history: History,
    /// Framebuffer bytes at the latest GPU poll.
    pub gpu_mem_used_bytes: u64,
}

impl PodView {
    /// The pod's value of `metric` over `window_s`, or `None` while the pod
    /// has too little history.
    pub fn value(&self, metric: Metric, window_s: f64) -> Option<f64> {
        match metric {
            Metric::GpuSmUtil => self.history.rate(window_s, |p| p.gpu_sm_util_integral),
            Metric::GpuMemUsedBytes => Some(self.gpu_mem_used_bytes as f64),
            Metric::SocketRecvBytesRate => self.history.rate(window_s, |p| p.recv_bytes as f64),
            Metric::SocketSendBytesRate => self.history.rate(window_s, |p| p.send_bytes as f64),
        }
    }
}

/// Everything the agent knows at one tick.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// Seconds since the collector started, at publication.
    pub at_s: f64,
    /// Pods with a cgroup on this node.
    pub pods: Vec<PodView>,
    /// GPUs at the latest successful poll.
    pub devices: Vec<DeviceSample>,
    /// Source health.
    pub health: Health,
}

impl NodeView {
    /// An empty view, before the first tick.
    pub fn empty() -> Self {
        Self {
            at_s: 0.0,
            pods: Vec::new(),
            devices: Vec::new(),
            health: Health {
                probes: SourceStatus::Degraded { reason: "starting".to_string() },
                gpu: SourceStatus::Degraded { reason: "starting".to_string() },
                probe_stats: SocketProbeStats::default(),
                gpu_poll_errors: 0,
                gpu_updates_dropped: 0,
            },
        }
    }

    /// The status of the source `metric` depends on.
    pub fn source_status(&self, metric: Metric) -> &SourceStatus {
        match metric.source() {
            MetricSource::Gpu => &self.health.gpu,
            MetricSource::Probes => &self.health.probes,
        }
    }
}
