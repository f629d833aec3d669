//! `/metrics`: the published view in the Prometheus text format (or
//! OpenMetrics, when the scraper asks), encoded by `prometheus-client` at
//! each scrape: per-pod signals with dcgm-exporter's identifying labels,
//! per-pod request-timing histograms, per-GPU device series, and the
//! agent's own counters.
use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, text, DescriptorEncoder, EncodeCounterValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::trigger::DEFAULT_WINDOW;
use crate::signals::buckets::ServingBuckets;
use crate::signals::metric::{Combine, Metric};
use crate::signals::traffic_filter::TrafficFilter;
use crate::signals::view::NodeView;

/// A sample's labels, in order.
type Labels = Vec<(&'static str, String)>;

/// The identifying labels of a pod's series: dcgm-exporter's `namespace`,
/// `pod` and `container` (so its series join podgpu's), the pod UID, and
/// `gpu`: the GPU UUIDs kubelet gave the pod, or else the GPUs NVML saw its
/// processes on, comma-separated, empty when neither is known. `container`
/// names the GPU-holding (or only) container; empty when that is
/// ambiguous, since the values are the whole pod's.
fn pod_labels(pod: &crate::signals::view::PodView, devices: &[crate::gpu::DeviceSample]) -> Labels {
    let assigned = pod.meta.gpus();
    let gpus = if assigned.is_empty() { pod.gpu.device_uuids(devices) } else { assigned };
    vec![
        ("namespace", pod.meta.namespace.clone().unwrap_or_default()),
        ("pod", pod.meta.name.clone().unwrap_or_default()),
        ("container", pod.meta.main_container().map_or(String::new(), |c| c.name.clone())),
        ("pod_uid", pod.meta.uid.clone()),
        ("gpu", gpus.join(",")),
    ]
}

/// `labels` and one more.
fn with(labels: &[(&'static str, String)], key: &'static str, value: &str) -> Labels {
    let mut all = labels.to_vec();
    all.push((key, value.to_string()));
    all
}

/// prometheus-client appends `_total` to counters itself; the names here
/// keep it, as they appear in queries.
fn counter_name(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

/// One gauge family: a sample per label set.
fn gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, f64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// One unlabelled gauge.
fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> fmt::Result {
    encoder.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&value)
}

/// One counter family: a sample per label set.
fn counters<V: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(counter_name(name), help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_counter::<NoLabelSet, V, f64>(&value, None)?;
    }
    Ok(())
}

/// One unlabelled counter.
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    encoder
        .encode_descriptor(counter_name(name), help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, u64, f64>(&value, None)
}

/// One histogram family: per label set, the buckets (cumulative `le`
/// counts on the wire), sum and count.
fn histograms(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, ServingBuckets)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, buckets) in samples {
        // The encoder sums per-bucket counts into cumulative ones.
        let per_bucket: Vec<(f64, u64)> = buckets.per_bucket().collect();
        family.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
            buckets.sum_s(),
            buckets.count(),
            &per_bucket,
            None,
        )?;
    }
    Ok(())
}

/// Every family of the published view, encoded at each scrape.
#[derive(Debug)]
struct ViewMetrics(Arc<NodeView>);

impl Collector for ViewMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let started = std::time::Instant::now();
        encode_view(&self.0, &mut encoder)?;
        // This scrape's own cost, so a node with many pods shows what
        // /metrics costs it (the family itself is the only part not timed).
        gauge(
            &mut encoder,
            "podgpu_agent_scrape_duration_seconds",
            "Time this /metrics answer took to render.",
            started.elapsed().as_secs_f64(),
        )
    }
}

/// The exposition formats `/metrics` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4 (the default).
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text`, else the Prometheus text format.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The answer's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The /metrics body in `format`.
pub fn render_metrics(view: Arc<NodeView>, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ViewMetrics(view)));
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in
    // a label or name, and the partial body still parses up to it.
    let encoded = match format {
        Format::Prometheus => prometheus_text::encode(&mut out, &registry),
        Format::OpenMetrics => text::encode(&mut out, &registry),
    };
    if let Err(err) = encoded {
        tracing::warn!(error = %err, "encoding /metrics");
    }
    out
}

fn encode_view(view: &NodeView, encoder: &mut DescriptorEncoder) -> fmt::Result {
    let window_s = DEFAULT_WINDOW.as_secs_f64();
    // Each pod's label set, built once per scrape for all its families.
    let labelled: Vec<(Labels, &crate::signals::view::PodView)> =
        view.pods.iter().map(|pod| (pod_labels(pod, &view.devices), pod)).collect();
    for metric in Metric::ALL.into_iter().filter(|m| m.combine() == Combine::Additive) {
        if !view.source_status(metric).is_ok() {
            continue;
        }
        let samples = labelled.iter().filter_map(|(labels, pod)| {
            Some((labels.clone(), pod.value(metric, window_s, &TrafficFilter::default())?))
        });
        let name = format!("podgpu_pod_{}", metric.name());
        gauges(encoder, &name, &format!("Per-pod {} over {window_s}s.", metric.name()), samples)?;
    }
    // Latency percentiles in base units (seconds), one gauge per quantile
    // (Prometheus reserves the `quantile` label for summaries); triggers
    // keep the `_ms_pNN` names.
    for metric in Metric::ALL {
        let (what, quantile) = match metric {
            Metric::TtftMs(q) => ("ttft", q),
            Metric::LatencyMs(q) => ("latency", q),
            Metric::EngineTtftMs(q) => ("engine_ttft", q),
            _ => continue,
        };
        if !view.source_status(metric).is_ok() {
            continue;
        }
        let name = format!("podgpu_pod_{what}_p{}_seconds", (quantile.fraction() * 100.0).round());
        let samples = labelled.iter().filter_map(|(labels, pod)| {
            Some((labels.clone(), pod.value(metric, window_s, &TrafficFilter::default())? / 1000.0))
        });
        gauges(encoder, &name, &format!("Per-pod {} over {window_s}s, in seconds.", metric.name()), samples)?;
    }
    if view.health.engines.is_ok() {
        // Which engine each pod runs and where it is read, for joins and
        // for finding pods whose engine was not found.
        let samples = labelled.iter().filter_map(|(labels, pod)| {
            let scrape = &pod.engine.scrape;
            let mut labels = with(labels, "engine", scrape.engine?.name());
            labels.push(("endpoint", scrape.endpoint.clone().unwrap_or_default()));
            Some((labels, if pod.engine.unavailable.is_none() { 1.0 } else { 0.0 }))
        });
        let fused: Vec<(Labels, crate::signals::fusion::Fusion)> = labelled
            .iter()
            .filter(|(_, pod)| pod.engine.unavailable.is_none())
            .map(|(labels, pod)| (labels.clone(), crate::signals::fusion::fusion(pod, window_s)))
            .collect();
        gauges(
            encoder,
            "podgpu_pod_engine_requests_gap",
            "Engine requests (waiting + running) minus the socket probe's requests in flight (docs/engines.md, Fusion).",
            fused.iter().filter_map(|(labels, fusion)| Some((labels.clone(), fusion.requests_gap?))),
        )?;
        gauges(
            encoder,
            "podgpu_pod_ttft_gap_p50_seconds",
            "Socket-side p50 TTFT minus the engine's own, over the default window: time before the engine's clock starts.",
            fused.iter().filter_map(|(labels, fusion)| Some((labels.clone(), fusion.ttft_gap_ms_p50? / 1000.0))),
        )?;
        gauges(
            encoder,
            "podgpu_pod_engine_up",
            "Whether the pod's inference engine's own metrics are read (1) or failing (0), by engine and endpoint.",
            samples,
        )?;
    }
    if view.health.probes.is_ok() {
        let samples = labelled.iter().flat_map(|(labels, pod)| {
            [
                ("started", pod.requests.started),
                ("completed", pod.requests.completed),
                ("aborted", pod.requests.aborted),
            ]
            .map(|(outcome, count)| (with(labels, "outcome", outcome), count))
        });
        counters(encoder, "podgpu_pod_requests_total", "Requests seen by the request probe, by outcome.", samples)?;
        // Histograms Prometheus can add across pods (percentiles cannot):
        // a Deployment's p90 is histogram_quantile over the summed rates.
        let buckets: Vec<(Labels, (ServingBuckets, ServingBuckets))> =
            labelled.iter().map(|(labels, pod)| (labels.clone(), pod.serving_buckets())).collect();
        histograms(
            encoder,
            "podgpu_pod_ttft_seconds",
            "Time from a request's first byte in to the answer's first byte out (socket side), per completed request.",
            buckets.iter().map(|(labels, (ttft, _))| (labels.clone(), *ttft)),
        )?;
        histograms(
            encoder,
            "podgpu_pod_request_latency_seconds",
            "Time from a request's first byte in to the answer's last byte out (socket side), per completed request.",
            buckets.iter().map(|(labels, (_, latency))| (labels.clone(), *latency)),
        )?;
    }
    if view.health.launches.is_ok() {
        let samples =
            labelled.iter().filter_map(|(labels, pod)| Some((labels.clone(), pod.history.latest()?.gpu_launches)));
        counters(
            encoder,
            "podgpu_pod_gpu_launches_total",
            "Kernel launches of the pod's processes (libcuda uprobes; scaled from the probed part of each second while sampling).",
            samples,
        )?;
        // How much of the attribution runs on shared kernel costs: a
        // replica whose launches have no identity is split on its own.
        let by_source = crate::probes::launches::launches_by_identity_source(&view.launches);
        let total: u64 = by_source.iter().map(|(_, launches)| launches).sum();
        if total > 0 {
            gauges(
                encoder,
                "podgpu_gpu_launch_identity_share",
                "Share of live processes' launches by where their kernel identity came from: name (seen created), site (named by its launch site), none (per-process costs).",
                by_source.iter().map(|(source, launches)| (vec![("source", source.to_string())], *launches as f64 / total as f64)),
            )?;
        }
    }
    if view.health.driver.is_ok() {
        let samples = labelled.iter().flat_map(|(labels, pod)| {
            pod.driver.calls_by_kind.iter().map(move |(kind, calls)| (with(labels, "kind", kind.name()), *calls))
        });
        counters(
            encoder,
            "podgpu_pod_gpu_driver_calls_total",
            "NVIDIA driver calls (ioctls) of the pod's processes, by kind.",
            samples,
        )?;
    }
    let gpu_label =
        |device: &crate::gpu::DeviceSample| vec![("gpu", device.uuid.clone()), ("model", device.name.clone())];
    let devices = &view.devices;
    if !devices.is_empty() {
        let per_device = |value: &dyn Fn(&crate::gpu::DeviceSample) -> Option<f64>| -> Vec<(Labels, f64)> {
            devices.iter().filter_map(|d| Some((gpu_label(d), value(d)?))).collect()
        };
        gauges(
            encoder,
            "podgpu_gpu_utilization_percent",
            "Device SM utilization (NVML).",
            per_device(&|d| d.util_percent),
        )?;
        gauges(
            encoder,
            "podgpu_gpu_memory_bandwidth_percent",
            "Device memory-bandwidth utilization (NVML).",
            per_device(&|d| d.mem_bw_util_percent),
        )?;
        gauges(
            encoder,
            "podgpu_gpu_memory_used_bytes",
            "Device framebuffer in use.",
            per_device(&|d| Some(d.memory_used_bytes as f64)),
        )?;
        gauges(
            encoder,
            "podgpu_gpu_memory_total_bytes",
            "Device framebuffer size.",
            per_device(&|d| Some(d.memory_total_bytes as f64)),
        )?;
        gauges(
            encoder,
            "podgpu_gpu_attribution_confidence",
            "How sure the per-pod split of the GPU's utilization is, 0 to 1 (share-weighted).",
            per_device(&|d| d.attribution_confidence),
        )?;
        gauges(
            encoder,
            "podgpu_gpu_sharing_overhead_percent",
            "GPU time lost to switching between time-sliced processes (not in any pod's share).",
            per_device(&|d| d.sharing_overhead_percent),
        )?;
        gauges(encoder, "podgpu_gpu_power_watts", "Board power draw.", per_device(&|d| d.power_watts))?;
        gauges(
            encoder,
            "podgpu_gpu_temperature_celsius",
            "GPU core temperature.",
            per_device(&|d| d.temperature_c.map(f64::from)),
        )?;
    }

    let health = &view.health;
    let up = |ok: bool| if ok { 1.0 } else { 0.0 };
    gauges(
        encoder,
        "podgpu_agent_source_up",
        "Whether a signal source is serving (1) or degraded/disabled (0).",
        [
            (vec![("source", "probes".to_string())], up(health.probes.is_ok())),
            (vec![("source", "gpu".to_string())], up(health.gpu.is_ok())),
            (vec![("source", "launches".to_string())], up(health.launches.is_ok())),
            (vec![("source", "driver".to_string())], up(health.driver.is_ok())),
            (vec![("source", "engine".to_string())], up(health.engines.is_ok())),
            (vec![("source", "kube_api".to_string())], up(health.kube_api.is_ok())),
            (vec![("source", "kubelet".to_string())], up(health.kubelet.is_ok())),
        ],
    )?;
    counter(
        encoder,
        "podgpu_agent_engine_scrapes_total",
        "Scrapes of inference engines' metrics endpoints (discovery tries included).",
        health.engine_scrapes,
    )?;
    counter(
        encoder,
        "podgpu_agent_engine_scrape_failures_total",
        "Engine scrapes that failed (refused, timed out, unauthorized, too large, not an engine's metrics).",
        health.engine_scrape_failures,
    )?;
    counter(
        encoder,
        "podgpu_agent_gpu_updates_dropped_total",
        "GPU updates dropped because the collector lagged.",
        health.gpu_updates_dropped,
    )?;
    counters(
        encoder,
        "podgpu_agent_gpu_errors_total",
        "GPU backend opens and polls that failed, by kind.",
        crate::gpu::GpuError::KINDS
            .iter()
            .map(|kind| (with(&[], "kind", kind), health.gpu_errors.get(kind).copied().unwrap_or(0))),
    )?;
    if let Some(age) = health.gpu_sample_age_s {
        gauge(encoder, "podgpu_agent_gpu_sample_age_seconds", "Seconds since the last successful GPU poll.", age)?;
    }
    let probe = &health.request_probe;
    counter(
        encoder,
        "podgpu_agent_request_events_total",
        "Request-probe events written to the ring buffer.",
        probe.emitted,
    )?;
    counter(
        encoder,
        "podgpu_agent_request_ring_drops_total",
        "Request-probe events lost to a full ring buffer.",
        probe.ring_full_drops,
    )?;
    counter(
        encoder,
        "podgpu_agent_request_connection_map_full_total",
        "Connections not tracked: map full.",
        probe.connection_map_full,
    )?;
    counter(
        encoder,
        "podgpu_agent_request_capture_failures_total",
        "Payload captures that failed.",
        probe.capture_failed,
    )?;
    counter(
        encoder,
        "podgpu_agent_request_events_dropped_total",
        "Request events dropped: collector lagged.",
        health.request_reader.dropped,
    )?;
    counter(
        encoder,
        "podgpu_agent_http2_connections_total",
        "HTTP/2 connections followed.",
        health.request_reader.http2_connections,
    )?;
    counter(
        encoder,
        "podgpu_agent_http2_lost_sync_total",
        "HTTP/2 frame boundaries lost (then resynchronised).",
        probe.http2_lost_sync,
    )?;
    counters(
        encoder,
        "podgpu_agent_http2_lost_sync_by_cause_total",
        "HTTP/2 frame boundaries lost, by cause: an invalid header, more frames in one syscall than the walker follows, unreadable memory.",
        [
            ("implausible", probe.http2_lost_implausible),
            ("budget", probe.http2_lost_budget),
            ("fault", probe.http2_lost_fault),
        ]
        .map(|(cause, count)| (with(&[], "cause", cause), count)),
    )?;
    counter(
        encoder,
        "podgpu_agent_http2_headers_joined_total",
        "HTTP/2 frame headers split across iovecs or syscalls, joined by the walker.",
        probe.http2_headers_joined,
    )?;
    counter(
        encoder,
        "podgpu_agent_undecoded_socket_calls_total",
        "Reads and writes of server-side sockets by calls that name no user buffer (sendfile, splice, io_uring): not followed.",
        probe.undecoded_socket_calls,
    )?;
    let missed = &health.request_reader.tracker;
    counters(
        encoder,
        "podgpu_agent_missed_connection_endings_total",
        "Connections whose end the probe never reported, ended by the tracker (their open requests aborted), by reason.",
        [
            ("fd_reused", missed.fd_reuses),
            ("process_exited", missed.process_exits),
            ("fd_gone", missed.fds_gone),
            ("kernel_evicted", missed.kernel_evictions),
            ("idle", missed.idle_evictions),
        ]
        .map(|(reason, count)| (with(&[], "reason", reason), count)),
    )?;
    counter(
        encoder,
        "podgpu_agent_intra_pod_connections_total",
        "Connections from another container of the same pod (a sidecar's hop to the app), not counted as requests.",
        missed.intra_pod_connections,
    )?;
    counter(
        encoder,
        "podgpu_agent_http2_streams_expired_total",
        "HTTP/2 streams ended (aborted) after nothing of them was seen for 30 s following a lost frame boundary.",
        missed.http2_streams_expired,
    )?;
    counter(
        encoder,
        "podgpu_agent_request_resyncs_total",
        "HTTP/1.1 connections resynchronised at a request line after the kernel lost events.",
        missed.resyncs,
    )?;
    counter(
        encoder,
        "podgpu_agent_open_request_corrections_total",
        "Sweeps that found the open-request level out of step with the parsers (healed).",
        missed.open_request_corrections,
    )?;
    gauge(
        encoder,
        "podgpu_agent_tracked_connections",
        "Server connections followed now.",
        health.request_reader.connections as f64,
    )?;
    counters(
        encoder,
        "podgpu_agent_bpf_run_seconds_total",
        "Kernel time spent in each eBPF program (needs kernel.bpf_stats_enabled=1).",
        health.bpf_programs.iter().map(|p| (with(&[], "program", &p.name), p.run_time_ns as f64 / 1e9)),
    )?;
    counters(
        encoder,
        "podgpu_agent_bpf_runs_total",
        "Runs of each eBPF program (needs kernel.bpf_stats_enabled=1).",
        health.bpf_programs.iter().map(|p| (with(&[], "program", &p.name), p.run_count)),
    )?;
    gauge(encoder, "podgpu_agent_tracked_pods", "Pods with a cgroup on this node.", view.pods.len() as f64)?;
    Ok(())
}

#[cfg(test)]
mod tests;
