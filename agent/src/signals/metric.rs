//! The per-pod metrics podgpu serves, their units and how they combine
//! across pods.
use std::fmt;

/// A metric a trigger can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    /// SM utilization, % of one GPU, summed over the pod's processes and
    /// GPUs, time-weighted over the window.
    GpuSmUtil,
    /// Memory-bandwidth utilization, % of one GPU, summed and time-weighted
    /// like `GpuSmUtil`.
    GpuMemBwUtil,
    /// Framebuffer bytes held by the pod's processes (latest poll).
    GpuMemUsedBytes,
    /// Bytes/s the pod's TCP sockets received (requests arriving).
    SocketRecvBytesRate,
    /// Bytes/s the pod's TCP sockets sent (responses leaving).
    SocketSendBytesRate,
}

/// Where a metric comes from, which decides when it is unavailable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricSource {
    /// A GPU backend (NVML or simulator).
    Gpu,
    /// The eBPF socket probes.
    Probes,
}

impl Metric {
    /// Every metric, in documentation order.
    pub const ALL: [Metric; 5] = [
        Metric::GpuSmUtil,
        Metric::GpuMemBwUtil,
        Metric::GpuMemUsedBytes,
        Metric::SocketRecvBytesRate,
        Metric::SocketSendBytesRate,
    ];

    /// Name used in trigger metadata, /metrics and the node API.
    pub fn name(self) -> &'static str {
        match self {
            Metric::GpuSmUtil => "gpu_sm_util",
            Metric::GpuMemBwUtil => "gpu_mem_bw_util",
            Metric::GpuMemUsedBytes => "gpu_mem_used_bytes",
            Metric::SocketRecvBytesRate => "socket_recv_bytes_rate",
            Metric::SocketSendBytesRate => "socket_send_bytes_rate",
        }
    }

    /// Looks a metric up by its name.
    pub fn from_name(name: &str) -> Option<Metric> {
        Self::ALL.into_iter().find(|metric| metric.name() == name)
    }

    /// The source that must be healthy for the metric to have a value.
    pub fn source(self) -> MetricSource {
        match self {
            Metric::GpuSmUtil | Metric::GpuMemBwUtil | Metric::GpuMemUsedBytes => MetricSource::Gpu,
            Metric::SocketRecvBytesRate | Metric::SocketSendBytesRate => MetricSource::Probes,
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names round-trip, so every metric is reachable from trigger metadata.
    #[test]
    fn names_round_trip() {
        for metric in Metric::ALL {
            assert_eq!(Metric::from_name(metric.name()), Some(metric));
        }
        assert_eq!(Metric::from_name("gpu_util"), None);
    }
}
