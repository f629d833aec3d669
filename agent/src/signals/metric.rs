//! The per-pod metrics podgpu serves, their units, their source, and how
//! they combine across pods.
use std::fmt;

/// A latency quantile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quantile {
    /// Median.
    P50,
    /// 90th percentile.
    P90,
    /// 99th percentile.
    P99,
}

impl Quantile {
    /// As a fraction.
    pub fn fraction(self) -> f64 {
        match self {
            Quantile::P50 => 0.5,
            Quantile::P90 => 0.9,
            Quantile::P99 => 0.99,
        }
    }
}

/// A metric a trigger can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    /// SM utilization, % of one GPU, summed over the pod's processes and
    /// GPUs, time-weighted over the window: the attribution estimator's
    /// share where the GPU has one (`gpu::attribution`), NVML's elsewhere.
    GpuSmUtil,
    /// How sure the attribution estimator is of the pod's `GpuSmUtil` split,
    /// 0 to 1, time-weighted over the window (no value while no GPU of the
    /// pod has an estimate). Not a load signal: triggers use it through
    /// `minConfidence`, dashboards beside `gpu_sm_util`.
    GpuAttributionConfidence,
    /// NVML's own per-process SM %, summed and time-weighted like
    /// `GpuSmUtil`: kept for comparison, not for scaling.
    GpuSmUtilNvml,
    /// Memory-bandwidth utilization, % of one GPU, summed and time-weighted
    /// like `GpuSmUtil`.
    GpuMemBwUtil,
    /// Framebuffer bytes held by the pod's processes (latest poll).
    GpuMemUsedBytes,
    /// Kernel launches per second over the window (libcuda uprobes).
    GpuLaunchRate,
    /// GPU contexts the pod's processes hold now: (process, GPU) pairs
    /// with a live channel group or compute object (driver path).
    GpuContexts,
    /// VRAM the pod's processes allocated through the driver (now).
    GpuDriverMemBytes,
    /// NVIDIA driver calls (ioctls) per second over the window.
    GpuDriverCallRate,
    /// Seconds blocked in driver calls per second over the window, summed
    /// over threads.
    GpuDriverBlockedRatio,
    /// Bytes/s the pod's server connections received (requests arriving).
    SocketRecvBytesRate,
    /// Bytes/s the pod's server connections sent (responses leaving).
    SocketSendBytesRate,
    /// Requests started and not yet answered or aborted (now).
    RequestsInFlight,
    /// Requests started per second over the window.
    RequestRate,
    /// Last request byte -> first response body byte, ms.
    TtftMs(Quantile),
    /// First request byte -> last response byte, ms.
    LatencyMs(Quantile),
    /// Requests the pod's inference engine has queued and not scheduled,
    /// by its own gauge (latest scrape).
    EngineRequestsWaiting,
    /// Requests in the engine's running batch, by its own gauge.
    EngineRequestsRunning,
    /// The engine's KV-cache use, % (its 0-1 fraction times 100).
    KvCacheUsage,
    /// The engine's own time to first token, ms, from the differences of
    /// its cumulative histogram over the window.
    EngineTtftMs(Quantile),
}

/// Where a metric comes from, which decides when it is unavailable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricSource {
    /// A GPU backend (NVML or simulator).
    Gpu,
    /// The eBPF request probe (socket bytes and requests).
    Probes,
    /// The libcuda launch uprobes.
    Launches,
    /// The driver ioctl path (decoded in the request probe's tracepoints).
    Driver,
    /// The inference engines' own metrics, scraped (`engines`).
    Engine,
}

impl MetricSource {
    /// Every source.
    pub const ALL: [MetricSource; 5] =
        [MetricSource::Gpu, MetricSource::Probes, MetricSource::Launches, MetricSource::Driver, MetricSource::Engine];

    /// Name in the node API's `unavailable_sources` and in errors.
    pub fn name(self) -> &'static str {
        match self {
            MetricSource::Gpu => "gpu",
            MetricSource::Probes => "probes",
            MetricSource::Launches => "launches",
            MetricSource::Driver => "driver",
            MetricSource::Engine => "engine",
        }
    }
}

/// How a workload value is formed from pod values (see `aggregate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    /// Pod values add up (sum by default, or max/avg when asked).
    Additive,
    /// Percentiles of the merged histograms of all selected pods, times the
    /// pod count, so HPA's AverageValue rule becomes the proportional one.
    Percentile(Quantile),
}

impl Metric {
    /// Every metric, in documentation order.
    pub const ALL: [Metric; 26] = [
        Metric::GpuSmUtil,
        Metric::GpuAttributionConfidence,
        Metric::GpuSmUtilNvml,
        Metric::GpuMemBwUtil,
        Metric::GpuMemUsedBytes,
        Metric::GpuLaunchRate,
        Metric::GpuContexts,
        Metric::GpuDriverMemBytes,
        Metric::GpuDriverCallRate,
        Metric::GpuDriverBlockedRatio,
        Metric::SocketRecvBytesRate,
        Metric::SocketSendBytesRate,
        Metric::RequestsInFlight,
        Metric::RequestRate,
        Metric::TtftMs(Quantile::P50),
        Metric::TtftMs(Quantile::P90),
        Metric::TtftMs(Quantile::P99),
        Metric::LatencyMs(Quantile::P50),
        Metric::LatencyMs(Quantile::P90),
        Metric::LatencyMs(Quantile::P99),
        Metric::EngineRequestsWaiting,
        Metric::EngineRequestsRunning,
        Metric::KvCacheUsage,
        Metric::EngineTtftMs(Quantile::P50),
        Metric::EngineTtftMs(Quantile::P90),
        Metric::EngineTtftMs(Quantile::P99),
    ];

    /// Name used in trigger metadata, /metrics and the node API.
    pub fn name(self) -> &'static str {
        match self {
            Metric::GpuSmUtil => "gpu_sm_util",
            Metric::GpuAttributionConfidence => "gpu_attribution_confidence",
            Metric::GpuSmUtilNvml => "gpu_sm_util_nvml",
            Metric::GpuMemBwUtil => "gpu_mem_bw_util",
            Metric::GpuMemUsedBytes => "gpu_mem_used_bytes",
            Metric::GpuLaunchRate => "gpu_launch_rate",
            Metric::GpuContexts => "gpu_contexts",
            Metric::GpuDriverMemBytes => "gpu_driver_mem_bytes",
            Metric::GpuDriverCallRate => "gpu_driver_call_rate",
            Metric::GpuDriverBlockedRatio => "gpu_driver_blocked_ratio",
            Metric::SocketRecvBytesRate => "socket_recv_bytes_rate",
            Metric::SocketSendBytesRate => "socket_send_bytes_rate",
            Metric::RequestsInFlight => "requests_in_flight",
            Metric::RequestRate => "request_rate",
            Metric::TtftMs(Quantile::P50) => "ttft_ms_p50",
            Metric::TtftMs(Quantile::P90) => "ttft_ms_p90",
            Metric::TtftMs(Quantile::P99) => "ttft_ms_p99",
            Metric::LatencyMs(Quantile::P50) => "latency_ms_p50",
            Metric::LatencyMs(Quantile::P90) => "latency_ms_p90",
            Metric::LatencyMs(Quantile::P99) => "latency_ms_p99",
            Metric::EngineRequestsWaiting => "engine_requests_waiting",
            Metric::EngineRequestsRunning => "engine_requests_running",
            Metric::KvCacheUsage => "kv_cache_usage",
            Metric::EngineTtftMs(Quantile::P50) => "engine_ttft_ms_p50",
            Metric::EngineTtftMs(Quantile::P90) => "engine_ttft_ms_p90",
            Metric::EngineTtftMs(Quantile::P99) => "engine_ttft_ms_p99",
        }
    }

    /// Looks a metric up by its name.
    pub fn from_name(name: &str) -> Option<Metric> {
        Self::ALL.into_iter().find(|metric| metric.name() == name)
    }

    /// The source that must be healthy for the metric to have a value.
    pub fn source(self) -> MetricSource {
        match self {
            Metric::GpuSmUtil
            | Metric::GpuAttributionConfidence
            | Metric::GpuSmUtilNvml
            | Metric::GpuMemBwUtil
            | Metric::GpuMemUsedBytes => MetricSource::Gpu,
            Metric::GpuLaunchRate => MetricSource::Launches,
            Metric::GpuContexts
            | Metric::GpuDriverMemBytes
            | Metric::GpuDriverCallRate
            | Metric::GpuDriverBlockedRatio => MetricSource::Driver,
            Metric::SocketRecvBytesRate
            | Metric::SocketSendBytesRate
            | Metric::RequestsInFlight
            | Metric::RequestRate
            | Metric::TtftMs(_)
            | Metric::LatencyMs(_) => MetricSource::Probes,
            Metric::EngineRequestsWaiting
            | Metric::EngineRequestsRunning
            | Metric::KvCacheUsage
            | Metric::EngineTtftMs(_) => MetricSource::Engine,
        }
    }

    /// Whether the value is a rate or mean over the window's history (as
    /// opposed to a level read at the latest tick or a distribution).
    pub fn is_rate(self) -> bool {
        !matches!(
            self,
            Metric::GpuMemUsedBytes
                | Metric::GpuContexts
                | Metric::GpuDriverMemBytes
                | Metric::RequestsInFlight
                | Metric::TtftMs(_)
                | Metric::LatencyMs(_)
                | Metric::EngineRequestsWaiting
                | Metric::EngineRequestsRunning
                | Metric::KvCacheUsage
                | Metric::EngineTtftMs(_)
        )
    }

    /// How pods combine into a workload value.
    pub fn combine(self) -> Combine {
        match self {
            Metric::TtftMs(q) | Metric::LatencyMs(q) | Metric::EngineTtftMs(q) => Combine::Percentile(q),
            _ => Combine::Additive,
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

    /// Names round-trip and are unique, so every metric is reachable from
    /// trigger metadata.
    #[test]
    fn names_round_trip() {
        for metric in Metric::ALL {
            assert_eq!(Metric::from_name(metric.name()), Some(metric));
        }
        assert_eq!(Metric::from_name("gpu_util"), None);
        assert_eq!(Metric::from_name("ttft_ms_p95"), None);
    }
}
