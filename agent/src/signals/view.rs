//! The node's published state: per-pod histories plus the health of each
//! source. The collector publishes a fresh `NodeView` every tick; readers
//! (KEDA answers, HTTP) only ever look at a published snapshot.
use std::sync::Arc;

use serde::Serialize;

use super::buckets::ServingBuckets;
use super::history::History;
use super::latency::{new_histogram, quantile_ms, LatencySnapshot};
use super::metric::{Metric, MetricSource};
use super::traffic_filter::TrafficFilter;
use crate::gpu::poller::PodGpu;
use crate::gpu::{DeviceSample, Sharing};
use crate::pods::PodMeta;
use crate::probes::requests::RequestProbeStats;
pub use crate::status::SourceStatus;

/// Health of the agent's sources.
#[derive(Clone, Debug, Serialize)]
pub struct Health {
    /// eBPF request probe (socket and request signals).
    pub probes: SourceStatus,
    /// GPU backend.
    pub gpu: SourceStatus,
    /// libcuda launch uprobes (`gpu_launch_rate`).
    pub launches: SourceStatus,
    /// libcuda files the launch uprobes are attached to.
    pub launch_libraries: usize,
    /// Part of the last second the launch probes were attached (1: exact).
    pub launch_duty: f64,
    /// Calibrated cost of one probed launch on this node, ns.
    pub launch_hit_cost_ns: u64,
    /// The driver path (`gpu_contexts`, `gpu_driver_*`).
    pub driver: SourceStatus,
    /// The driver reader's counters.
    pub driver_reader: crate::probes::driver::DriverReaderStats,
    /// Kubernetes API pod watch (names, labels, owners).
    pub kube_api: SourceStatus,
    /// Kubelet pod-resources (devices per container).
    pub kubelet: SourceStatus,
    /// Pods the Kubernetes API watch holds (this node's).
    pub api_pods: usize,
    /// The request probe's kernel-side counters.
    pub request_probe: RequestProbeStats,
    /// The request reader's counters.
    pub request_reader: ReaderCounters,
    /// Kernel run-time statistics of every loaded eBPF program.
    pub bpf_programs: Vec<crate::probes::BpfProgramStats>,
    /// GPU backend opens and polls that failed since start, by error kind.
    pub gpu_errors: std::collections::BTreeMap<&'static str, u64>,
    /// The engine scraper (`engine_*`, `kv_cache_usage`).
    pub engines: SourceStatus,
    /// Engine scrapes since start, and how many failed.
    pub engine_scrapes: u64,
    /// Engine scrapes that failed.
    pub engine_scrape_failures: u64,
    /// Seconds since the last successful GPU poll (`None` before the first).
    pub gpu_sample_age_s: Option<f64>,
    /// GPU updates dropped because the collector lagged.
    pub gpu_updates_dropped: u64,
}

impl Health {
    /// The status of one source.
    pub fn of(&self, source: MetricSource) -> &SourceStatus {
        match source {
            MetricSource::Gpu => &self.gpu,
            MetricSource::Probes => &self.probes,
            MetricSource::Launches => &self.launches,
            MetricSource::Driver => &self.driver,
            MetricSource::Engine => &self.engines,
        }
    }
}

/// What the request reader task has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReaderCounters {
    /// Ring-buffer events decoded.
    pub events: u64,
    /// Malformed ring records.
    pub malformed: u64,
    /// Request events dropped because the collector lagged.
    pub dropped: u64,
    /// Connections followed now.
    pub connections: u64,
    /// HTTP/2 connections recognised.
    pub http2_connections: u64,
    /// What the request tracker did on its own: connections ended because
    /// their ending was never seen (fd reuse, process exit, fd gone, kernel
    /// eviction, idle), resynchronisations, intra-pod hops left uncounted.
    pub tracker: crate::probes::requests::TrackerStats,
}

/// Cumulative request outcomes of one pod since it was first seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    /// Request lines seen.
    pub started: u64,
    /// Responses that ended.
    pub completed: u64,
    /// Requests given up (client gone, connection closed early).
    pub aborted: u64,
}

/// One pod's signals.
#[derive(Clone, Debug)]
pub struct PodView {
    /// Identity and metadata.
    pub meta: PodMeta,
    /// Cumulative points of the recent past.
    pub history: History,
    /// GPU use at the latest poll.
    pub gpu: PodGpu,
    /// What its processes hold in and ask of the NVIDIA driver.
    pub driver: crate::probes::driver::PodDriver,
    /// Requests started and not answered or aborted, all ports.
    pub requests_in_flight: u64,
    /// Cumulative request counts, all ports.
    pub requests: RequestCounts,
    /// Request signals per server port (0: port unknown); the pod's
    /// distributions are these merged.
    pub ports: Vec<PortView>,
    /// Found before its metadata arrived: selectors cannot be evaluated.
    pub metadata_pending: bool,
    /// A container cgroup of it could not be watched (the probe's map was
    /// full): its requests are not counted, so request metrics are
    /// unavailable rather than 0.
    pub requests_unwatched: bool,
    /// Its inference engine's own signals.
    pub engine: EngineView,
}

/// A pod's inference engine as the scraper last read it.
#[derive(Clone, Debug, Default)]
pub struct EngineView {
    /// What the scraper knows: engine, endpoint, latest reading, TTFT
    /// history, or what discovery tried.
    pub scrape: crate::engines::scraper::PodEngine,
    /// Why the engine signals cannot be given at this tick (nothing
    /// found, endpoint failing, reading stale); `None` when they can.
    pub unavailable: Option<String>,
}

impl EngineView {
    /// One line for `/healthz`: what was found where and how, or why
    /// nothing is read.
    pub fn summary(&self) -> String {
        let scrape = &self.scrape;
        match (&self.unavailable, scrape.engine, &scrape.endpoint) {
            (None, Some(engine), Some(endpoint)) => format!("{engine} at {endpoint} ({})", scrape.named_by),
            (Some(reason), _, _) => reason.clone(),
            _ => format!("not read ({})", scrape.named_by),
        }
    }

    /// The latest reading, where the signals can be given.
    pub fn reading(&self) -> Option<&crate::engines::exposition::EngineReading> {
        match self.unavailable {
            None => self.scrape.reading.as_ref().map(|(_, reading)| reading),
            Some(_) => None,
        }
    }
}

/// One server port of a pod: its request signals alone.
#[derive(Clone, Debug)]
pub struct PortView {
    /// Local port of the server socket.
    pub port: u16,
    /// Probe traffic (health checks, metrics scrapes) on that port; the
    /// pod's own values exclude it.
    pub probe: bool,
    /// Cumulative request-side points (GPU fields unused).
    pub history: History,
    /// Requests started and not answered or aborted.
    pub requests_in_flight: u64,
    /// Cumulative request counts.
    pub requests: RequestCounts,
    /// Time-to-first-byte distribution.
    pub ttft: LatencySnapshot,
    /// Request latency distribution.
    pub latency: LatencySnapshot,
    /// TTFT since the pod was first seen (Prometheus histogram).
    pub ttft_total: ServingBuckets,
    /// Request latency since the pod was first seen.
    pub latency_total: ServingBuckets,
}

/// An additive request-side metric (socket bytes, requests) from one set
/// of counters: a whole pod's or one port's. `None` for other metrics.
fn additive_request_value(metric: Metric, window_s: f64, history: &History, requests_in_flight: u64) -> Option<f64> {
    match metric {
        Metric::SocketRecvBytesRate => history.rate(window_s, |p| p.recv_bytes as f64),
        Metric::SocketSendBytesRate => history.rate(window_s, |p| p.send_bytes as f64),
        Metric::RequestsInFlight => Some(requests_in_flight as f64),
        Metric::RequestRate => history.rate(window_s, |p| p.requests_started as f64),
        _ => None,
    }
}

impl PortView {
    /// This port's (and class's) value of an additive request metric over
    /// `window_s` (`None` for other metrics).
    pub fn value(&self, metric: Metric, window_s: f64) -> Option<f64> {
        additive_request_value(metric, window_s, &self.history, self.requests_in_flight)
    }

    /// Adds this port's TTFT or latency distribution over the window to
    /// `into`; other metrics add nothing.
    pub fn merge_latencies(&self, metric: Metric, window_s: f64, into: &mut hdrhistogram::Histogram<u32>) {
        let now_s = self.history.latest().map_or(0.0, |p| p.at_s);
        match metric {
            Metric::TtftMs(_) => self.ttft.merge_into(now_s, window_s, into),
            Metric::LatencyMs(_) => self.latency.merge_into(now_s, window_s, into),
            _ => {}
        }
    }
}

impl PodView {
    /// Adds the TTFT or latency distribution over the window of the
    /// traffic `filter` admits to `into`; other metrics add nothing.
    pub fn merge_latencies(
        &self,
        metric: Metric,
        window_s: f64,
        filter: &TrafficFilter<'_>,
        into: &mut hdrhistogram::Histogram<u32>,
    ) {
        if let Metric::EngineTtftMs(_) = metric {
            if self.engine.reading().is_some() {
                self.engine.scrape.ttft.merge_window_into(std::time::Duration::from_secs_f64(window_s), into);
            }
            return;
        }
        for port in self.selected_ports(filter) {
            port.merge_latencies(metric, window_s, into);
        }
    }

    /// The pod's cumulative TTFT and latency histograms, its probe
    /// traffic (health checks, scrapes) left out as in its other values.
    pub fn serving_buckets(&self) -> (ServingBuckets, ServingBuckets) {
        let (mut ttft, mut latency) = (ServingBuckets::default(), ServingBuckets::default());
        for port in self.ports.iter().filter(|p| !p.probe) {
            ttft.add(&port.ttft_total);
            latency.add(&port.latency_total);
        }
        (ttft, latency)
    }

    fn selected_ports<'a>(&'a self, filter: &'a TrafficFilter<'_>) -> impl Iterator<Item = &'a PortView> {
        self.ports.iter().filter(move |p| filter.admits(p.port, p.probe))
    }

    /// Why this pod cannot have a value for `metric` at all (as opposed to
    /// "not yet"): NVML has no per-process SM % under MIG, and under MPS it
    /// books everything on the MPS server.
    pub fn unavailable_reason(&self, metric: Metric) -> Option<&str> {
        if metric.source() == MetricSource::Engine {
            return self.engine_unavailable_reason(metric);
        }
        if self.requests_unwatched && metric.source() == MetricSource::Probes {
            return Some(
                "the request probe's map of watched cgroups is full, so this pod's requests are not counted \
                 (raise --max-watched-cgroups)",
            );
        }
        if matches!(metric, Metric::GpuContexts | Metric::GpuDriverMemBytes) && self.driver.joined_late > 0 {
            return Some(
                "some of the pod's processes held the GPU before the driver path watched (the agent started \
                 after them): their contexts and driver memory are unknown until they exit",
            );
        }
        match (metric, self.gpu.unattributable) {
            // The estimator splits the device's utilization from launches,
            // whatever NVML can or cannot say per process.
            (Metric::GpuSmUtil, _) if self.gpu.attributed => None,
            (Metric::GpuSmUtil | Metric::GpuSmUtilNvml | Metric::GpuMemBwUtil, Some(Sharing::Mig)) => {
                Some("the pod runs on a MIG instance, where NVML reports no per-process utilization")
            }
            (
                Metric::GpuSmUtil | Metric::GpuSmUtilNvml | Metric::GpuMemBwUtil | Metric::GpuMemUsedBytes,
                Some(Sharing::Mps),
            ) => Some("the pod is an MPS client, and NVML books all MPS work on the MPS server"),
            _ => None,
        }
    }

    /// Why an engine metric has no value: the engine is not read, or it
    /// does not export that signal.
    fn engine_unavailable_reason(&self, metric: Metric) -> Option<&str> {
        if let Some(reason) = &self.engine.unavailable {
            return Some(reason);
        }
        let reading = self.engine.reading()?;
        match metric {
            Metric::EngineRequestsWaiting if reading.requests_waiting.is_none() => {
                Some("the pod's engine exports no queue gauge")
            }
            Metric::EngineRequestsRunning if reading.requests_running.is_none() => {
                Some("the pod's engine exports no running-batch gauge (Triton without the TRT-LLM backend does not)")
            }
            Metric::KvCacheUsage if reading.kv_cache_fraction.is_none() => {
                Some("the pod's engine exports no KV-cache gauge (TGI and llama.cpp do not)")
            }
            Metric::EngineTtftMs(_) if reading.ttft.is_none() => Some(
                "the pod's engine exports no TTFT histogram (TGI and llama.cpp do not; Triton only with \
                 --metrics-config histogram_latencies=true)",
            ),
            _ => None,
        }
    }

    /// The pod's value of `metric` over `window_s`, counting only the
    /// request traffic `filter` admits (GPU metrics are per pod); `None`
    /// while the pod has too little history or when `unavailable_reason`
    /// says why.
    pub fn value(&self, metric: Metric, window_s: f64, filter: &TrafficFilter<'_>) -> Option<f64> {
        if self.unavailable_reason(metric).is_some() {
            return None;
        }
        match metric {
            Metric::GpuSmUtil => self.history.ratio(window_s, |p| p.gpu_sm_util_integral, |p| p.gpu_known_s),
            Metric::GpuAttributionConfidence => {
                self.history.ratio(window_s, |p| p.gpu_confidence_integral, |p| p.gpu_confidence_known_s)
            }
            Metric::GpuSmUtilNvml => self.history.ratio(window_s, |p| p.gpu_sm_util_nvml_integral, |p| p.gpu_known_s),
            Metric::GpuMemBwUtil => self.history.ratio(window_s, |p| p.gpu_mem_bw_util_integral, |p| p.gpu_known_s),
            Metric::GpuMemUsedBytes => Some(self.gpu.memory_used_bytes as f64),
            Metric::GpuLaunchRate => {
                self.history.rate_between_reads(window_s, |p| p.gpu_launches as f64, |p| p.gpu_launches_read_s)
            }
            Metric::GpuContexts => Some(f64::from(self.driver.contexts)),
            Metric::GpuDriverMemBytes => Some(self.driver.vram_bytes as f64),
            Metric::GpuDriverCallRate => {
                self.history.rate_between_reads(window_s, |p| p.gpu_driver_calls as f64, |p| p.gpu_driver_read_s)
            }
            Metric::GpuDriverBlockedRatio => {
                self.history.rate_between_reads(window_s, |p| p.gpu_driver_blocked_s, |p| p.gpu_driver_read_s)
            }
            Metric::TtftMs(q) | Metric::LatencyMs(q) => {
                let mut merged = new_histogram();
                self.merge_latencies(metric, window_s, filter, &mut merged);
                quantile_ms(&merged, q.fraction()).or(Some(0.0))
            }
            Metric::EngineRequestsWaiting => self.engine.reading()?.requests_waiting,
            Metric::EngineRequestsRunning => self.engine.reading()?.requests_running,
            Metric::KvCacheUsage => self.engine.reading()?.kv_cache_fraction.map(|fraction| fraction * 100.0),
            Metric::EngineTtftMs(q) => {
                let mut merged = new_histogram();
                // Two scrapes are needed for a difference; until then the
                // window has no value (not 0).
                let window = std::time::Duration::from_secs_f64(window_s);
                if !self.engine.scrape.ttft.merge_window_into(window, &mut merged) {
                    return None;
                }
                // No first token in the window: nothing waited, as for
                // the socket-side TTFT.
                quantile_ms(&merged, q.fraction()).or(Some(0.0))
            }
            _ if filter.is_pod_level() => {
                additive_request_value(metric, window_s, &self.history, self.requests_in_flight)
            }
            // A pod serving nothing on those ports contributes 0.
            _ => Some(self.selected_ports(filter).filter_map(|p| p.value(metric, window_s)).sum()),
        }
    }
}

/// Everything the agent knows at one tick.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// Seconds since the collector started, at publication.
    pub at_s: f64,
    /// Launches per (process, function, size), live processes only.
    pub launches: Arc<Vec<crate::probes::launches::LaunchRow>>,
    /// Completion spans per live process, read with `launches`.
    pub launch_spans: Arc<crate::probes::spans::SpanTotals>,
    /// Unix time the launch reader read `launches`.
    pub launches_read_unix: Option<f64>,
    /// Per GPU at the latest poll: NVML's per-process samples and the
    /// estimator's split.
    pub attribution: Arc<Vec<crate::gpu::poller::GpuAttributionView>>,
    /// Driver state per live process that called the driver.
    pub driver: Arc<Vec<crate::probes::driver::DriverRow>>,
    /// When the collector built this view (`None`: the empty view before
    /// the first tick). Liveness and readiness judge its age.
    pub built: Option<std::time::Instant>,
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
            launches: Arc::default(),
            launch_spans: Arc::default(),
            launches_read_unix: None,
            attribution: Arc::default(),
            driver: Arc::default(),
            built: None,
            pods: Vec::new(),
            devices: Vec::new(),
            health: Health {
                probes: SourceStatus::Degraded { reason: "starting".to_string() },
                gpu: SourceStatus::Degraded { reason: "starting".to_string() },
                launches: SourceStatus::Degraded { reason: "starting".to_string() },
                launch_libraries: 0,
                launch_duty: 0.0,
                launch_hit_cost_ns: 0,
                driver: SourceStatus::Degraded { reason: "starting".to_string() },
                driver_reader: Default::default(),
                kube_api: SourceStatus::Disabled,
                kubelet: SourceStatus::Disabled,
                api_pods: 0,
                request_probe: RequestProbeStats::default(),
                request_reader: ReaderCounters::default(),
                bpf_programs: Vec::new(),
                gpu_errors: Default::default(),
                engines: SourceStatus::Degraded { reason: "starting".to_string() },
                engine_scrapes: 0,
                engine_scrape_failures: 0,
                gpu_sample_age_s: None,
                gpu_updates_dropped: 0,
            },
        }
    }

    /// The status of the source `metric` depends on.
    pub fn source_status(&self, metric: Metric) -> &SourceStatus {
        self.health.of(metric.source())
    }

    /// Whether the agent is too young for `metric`: in its first half
    /// second its rates cover a tick or two, while connections that were
    /// open before it started are still being joined (a restarted agent
    /// measured 0 requests/s under 100). Such a rate is not given out.
    pub fn warming_up(&self, metric: Metric) -> bool {
        metric.is_rate() && self.at_s < WARM_UP_S
    }
}

/// How long after the agent starts its rates are withheld.
pub const WARM_UP_S: f64 = 0.5;

/// Small views for unit tests elsewhere in the crate.
#[cfg(test)]
mod fixtures {
    use super::*;
    use crate::signals::history::Point;

    /// Ten seconds of `recv_rate` bytes/s, with GPU data (idle) throughout.
    fn history(recv_rate: u64) -> History {
        let mut history = History::new(60.0);
        history.push(Point { at_s: 0.0, ..Point::default() });
        history.push(Point { at_s: 10.0, recv_bytes: recv_rate * 10, gpu_known_s: 10.0, ..Point::default() });
        history
    }

    impl PodView {
        /// A pod `app` in `namespace` (label `app`) that received
        /// `recv_rate` bytes/s over the last 10 s.
        pub(crate) fn fixture(namespace: &str, app: &str, recv_rate: u64) -> Self {
            PodView {
                meta: PodMeta {
                    uid: format!("{namespace}-{app}-{recv_rate}"),
                    namespace: Some(namespace.to_string()),
                    name: Some(app.to_string()),
                    labels: [("app".to_string(), app.to_string())].into(),
                    ..PodMeta::default()
                },
                history: history(recv_rate),
                gpu: Default::default(),
                driver: Default::default(),
                requests_in_flight: 0,
                requests: Default::default(),
                ports: Vec::new(),
                metadata_pending: false,
                requests_unwatched: false,
                engine: EngineView::default(),
            }
        }
    }

    impl PortView {
        /// Server port `port` with `in_flight` open requests that received
        /// `recv_rate` bytes/s over the last 10 s.
        pub(crate) fn fixture(port: u16, in_flight: u64, recv_rate: u64) -> Self {
            PortView {
                probe: false,
                port,
                history: history(recv_rate),
                requests_in_flight: in_flight,
                requests: Default::default(),
                ttft: Default::default(),
                latency: Default::default(),
                ttft_total: Default::default(),
                latency_total: Default::default(),
            }
        }
    }
}
