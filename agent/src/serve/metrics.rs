//! `/metrics`: the Prometheus text format of the published view: per-pod
//! signals with dcgm-exporter's identifying labels, per-GPU device series,
//! and the agent's own counters.
use std::fmt::Write as _;

use super::trigger::DEFAULT_WINDOW;
use crate::signals::buckets::ServingBuckets;
use crate::signals::metric::{Combine, Metric};
use crate::signals::traffic_filter::TrafficFilter;
use crate::signals::view::NodeView;

/// The identifying labels of a pod's series: dcgm-exporter's `namespace`,
/// `pod` and `container` (so its series join podgpu's), the pod UID, and
/// `gpu`: the GPU UUIDs kubelet gave the pod, or else the GPUs NVML saw its
/// processes on, comma-separated, empty when neither is known. `container`
/// names the GPU-holding (or only) container; empty when that is
/// ambiguous, since the values are the whole pod's.
fn pod_labels(pod: &crate::signals::view::PodView, devices: &[crate::gpu::DeviceSample]) -> String {
    let assigned = pod.meta.gpus();
    let gpus = if assigned.is_empty() { pod.gpu.device_uuids(devices) } else { assigned };
    format!(
        "namespace=\"{}\",pod=\"{}\",container=\"{}\",pod_uid=\"{}\",gpu=\"{}\"",
        escape(pod.meta.namespace.as_deref().unwrap_or("")),
        escape(pod.meta.name.as_deref().unwrap_or("")),
        escape(pod.meta.main_container().map_or("", |c| c.name.as_str())),
        escape(&pod.meta.uid),
        escape(&gpus.join(",")),
    )
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes one metric family: HELP and TYPE lines, then its samples.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: impl IntoIterator<Item = (String, f64)>) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// Writes one histogram family: `NAME_bucket{LABELS,le=...}` cumulative
/// counts, `NAME_sum` and `NAME_count`, per label set.
fn histogram_family(
    out: &mut String,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, ServingBuckets)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (labels, buckets) in samples {
        for (bound, count) in buckets.cumulative() {
            let le = if bound.is_infinite() { "+Inf".to_string() } else { bound.to_string() };
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", buckets.sum_s());
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", buckets.count());
    }
}

/// The /metrics body.
pub fn render_metrics(view: &NodeView) -> String {
    let window_s = DEFAULT_WINDOW.as_secs_f64();
    let mut out = String::new();
    // Each pod's label set, built once per scrape for all its families.
    let labelled: Vec<(String, &crate::signals::view::PodView)> =
        view.pods.iter().map(|pod| (pod_labels(pod, &view.devices), pod)).collect();
    for metric in Metric::ALL.into_iter().filter(|m| m.combine() == Combine::Additive) {
        if !view.source_status(metric).is_ok() {
            continue;
        }
        let samples = labelled.iter().filter_map(|(labels, pod)| {
            Some((labels.clone(), pod.value(metric, window_s, &TrafficFilter::default())?))
        });
        let name = format!("podgpu_pod_{}", metric.name());
        family(&mut out, &name, "gauge", &format!("Per-pod {} over {window_s}s.", metric.name()), samples);
    }
    // Latency percentiles in base units (seconds), one gauge per quantile
    // (Prometheus reserves the `quantile` label for summaries); triggers
    // keep the `_ms_pNN` names.
    if view.health.probes.is_ok() {
        for metric in Metric::ALL {
            let (what, quantile) = match metric {
                Metric::TtftMs(q) => ("ttft", q),
                Metric::LatencyMs(q) => ("latency", q),
                _ => continue,
            };
            let name = format!("podgpu_pod_{what}_p{}_seconds", (quantile.fraction() * 100.0).round());
            let samples = labelled.iter().filter_map(|(labels, pod)| {
                Some((labels.clone(), pod.value(metric, window_s, &TrafficFilter::default())? / 1000.0))
            });
            family(
                &mut out,
                &name,
                "gauge",
                &format!("Per-pod {} over {window_s}s, in seconds.", metric.name()),
                samples,
            );
        }
        let samples = labelled.iter().flat_map(|(labels, pod)| {
            [
                ("started", pod.requests.started),
                ("completed", pod.requests.completed),
                ("aborted", pod.requests.aborted),
            ]
            .map(|(outcome, count)| (format!("{labels},outcome=\"{outcome}\""), count as f64))
        });
        family(
            &mut out,
            "podgpu_pod_requests_total",
            "counter",
            "Requests seen by the request probe, by outcome.",
            samples,
        );
        // Histograms Prometheus can add across pods (percentiles cannot):
        // a Deployment's p90 is histogram_quantile over the summed rates.
        let buckets: Vec<(String, (ServingBuckets, ServingBuckets))> =
            labelled.iter().map(|(labels, pod)| (labels.clone(), pod.serving_buckets())).collect();
        histogram_family(
            &mut out,
            "podgpu_pod_ttft_seconds",
            "Time from a request's first byte in to the answer's first byte out (socket side), per completed request.",
            buckets.iter().map(|(labels, (ttft, _))| (labels.clone(), *ttft)),
        );
        histogram_family(
            &mut out,
            "podgpu_pod_request_latency_seconds",
            "Time from a request's first byte in to the answer's last byte out (socket side), per completed request.",
            buckets.iter().map(|(labels, (_, latency))| (labels.clone(), *latency)),
        );
    }
    if view.health.driver.is_ok() {
        let samples = labelled.iter().flat_map(|(labels, pod)| {
            pod.driver
                .calls_by_kind
                .iter()
                .map(move |(kind, calls)| (format!("{labels},kind=\"{}\"", kind.name()), *calls as f64))
        });
        family(
            &mut out,
            "podgpu_pod_gpu_driver_calls_total",
            "counter",
            "NVIDIA driver calls (ioctls) of the pod's processes, by kind.",
            samples,
        );
    }
    let gpu_label = |device: &crate::gpu::DeviceSample| {
        format!("gpu=\"{}\",model=\"{}\"", escape(&device.uuid), escape(&device.name))
    };
    let devices = &view.devices;
    if !devices.is_empty() {
        let per_device = |value: &dyn Fn(&crate::gpu::DeviceSample) -> Option<f64>| -> Vec<(String, f64)> {
            devices.iter().filter_map(|d| Some((gpu_label(d), value(d)?))).collect()
        };
        family(
            &mut out,
            "podgpu_gpu_utilization_percent",
            "gauge",
            "Device SM utilization (NVML).",
            per_device(&|d| d.util_percent),
        );
        family(
            &mut out,
            "podgpu_gpu_memory_bandwidth_percent",
            "gauge",
            "Device memory-bandwidth utilization (NVML).",
            per_device(&|d| d.mem_bw_util_percent),
        );
        family(
            &mut out,
            "podgpu_gpu_memory_used_bytes",
            "gauge",
            "Device framebuffer in use.",
            per_device(&|d| Some(d.memory_used_bytes as f64)),
        );
        family(
            &mut out,
            "podgpu_gpu_memory_total_bytes",
            "gauge",
            "Device framebuffer size.",
            per_device(&|d| Some(d.memory_total_bytes as f64)),
        );
        family(
            &mut out,
            "podgpu_gpu_attribution_confidence",
            "gauge",
            "How sure the per-pod split of the GPU's utilization is, 0 to 1 (share-weighted).",
            per_device(&|d| d.attribution_confidence),
        );
        family(
            &mut out,
            "podgpu_gpu_sharing_overhead_percent",
            "gauge",
            "GPU time lost to switching between time-sliced processes (not in any pod's share).",
            per_device(&|d| d.sharing_overhead_percent),
        );
        family(&mut out, "podgpu_gpu_power_watts", "gauge", "Board power draw.", per_device(&|d| d.power_watts));
        family(
            &mut out,
            "podgpu_gpu_temperature_celsius",
            "gauge",
            "GPU core temperature.",
            per_device(&|d| d.temperature_c.map(f64::from)),
        );
    }

    let health = &view.health;
    let up = |ok: bool| if ok { 1.0 } else { 0.0 };
    family(
        &mut out,
        "podgpu_agent_source_up",
        "gauge",
        "Whether a signal source is serving (1) or degraded/disabled (0).",
        [
            ("source=\"probes\"".to_string(), up(health.probes.is_ok())),
            ("source=\"gpu\"".to_string(), up(health.gpu.is_ok())),
            ("source=\"launches\"".to_string(), up(health.launches.is_ok())),
            ("source=\"driver\"".to_string(), up(health.driver.is_ok())),
            ("source=\"kube_api\"".to_string(), up(health.kube_api.is_ok())),
            ("source=\"kubelet\"".to_string(), up(health.kubelet.is_ok())),
        ],
    );
    let counter = |out: &mut String, name: &str, help: &str, value: u64| {
        family(out, name, "counter", help, [(String::new(), value as f64)]);
    };
    counter(
        &mut out,
        "podgpu_agent_gpu_updates_dropped_total",
        "GPU updates dropped because the collector lagged.",
        health.gpu_updates_dropped,
    );
    family(
        &mut out,
        "podgpu_agent_gpu_errors_total",
        "counter",
        "GPU backend opens and polls that failed, by kind.",
        crate::gpu::GpuError::KINDS
            .iter()
            .map(|kind| (format!("kind=\"{kind}\""), health.gpu_errors.get(kind).copied().unwrap_or(0) as f64)),
    );
    if let Some(age) = health.gpu_sample_age_s {
        family(
            &mut out,
            "podgpu_agent_gpu_sample_age_seconds",
            "gauge",
            "Seconds since the last successful GPU poll.",
            [(String::new(), age)],
        );
    }
    let probe = &health.request_probe;
    counter(
        &mut out,
        "podgpu_agent_request_events_total",
        "Request-probe events written to the ring buffer.",
        probe.emitted,
    );
    counter(
        &mut out,
        "podgpu_agent_request_ring_drops_total",
        "Request-probe events lost to a full ring buffer.",
        probe.ring_full_drops,
    );
    counter(
        &mut out,
        "podgpu_agent_request_connection_map_full_total",
        "Connections not tracked: map full.",
        probe.connection_map_full,
    );
    counter(
        &mut out,
        "podgpu_agent_request_capture_failures_total",
        "Payload captures that failed.",
        probe.capture_failed,
    );
    counter(
        &mut out,
        "podgpu_agent_request_events_dropped_total",
        "Request events dropped: collector lagged.",
        health.request_reader.dropped,
    );
    counter(
        &mut out,
        "podgpu_agent_http2_connections_total",
        "HTTP/2 connections followed.",
        health.request_reader.http2_connections,
    );
    counter(
        &mut out,
        "podgpu_agent_http2_lost_sync_total",
        "HTTP/2 frame boundaries lost (then resynchronised).",
        probe.http2_lost_sync,
    );
    family(
        &mut out,
        "podgpu_agent_http2_lost_sync_by_cause_total",
        "counter",
        "HTTP/2 frame boundaries lost, by cause: an invalid header, more frames in one syscall than the walker follows, unreadable memory.",
        [
            ("implausible", probe.http2_lost_implausible),
            ("budget", probe.http2_lost_budget),
            ("fault", probe.http2_lost_fault),
        ]
        .map(|(cause, count)| (format!("cause=\"{cause}\""), count as f64)),
    );
    counter(
        &mut out,
        "podgpu_agent_http2_headers_joined_total",
        "HTTP/2 frame headers split across iovecs or syscalls, joined by the walker.",
        probe.http2_headers_joined,
    );
    counter(
        &mut out,
        "podgpu_agent_undecoded_socket_calls_total",
        "Reads and writes of server-side sockets by calls that name no user buffer (sendfile, splice, io_uring): not followed.",
        probe.undecoded_socket_calls,
    );
    let missed = &health.request_reader.tracker;
    family(
        &mut out,
        "podgpu_agent_missed_connection_endings_total",
        "counter",
        "Connections whose end the probe never reported, ended by the tracker (their open requests aborted), by reason.",
        [
            ("fd_reused", missed.fd_reuses),
            ("process_exited", missed.process_exits),
            ("fd_gone", missed.fds_gone),
            ("kernel_evicted", missed.kernel_evictions),
            ("idle", missed.idle_evictions),
        ]
        .map(|(reason, count)| (format!("reason=\"{reason}\""), count as f64)),
    );
    counter(
        &mut out,
        "podgpu_agent_intra_pod_connections_total",
        "Connections from another container of the same pod (a sidecar's hop to the app), not counted as requests.",
        missed.intra_pod_connections,
    );
    counter(
        &mut out,
        "podgpu_agent_http2_streams_expired_total",
        "HTTP/2 streams ended (aborted) after nothing of them was seen for 30 s following a lost frame boundary.",
        missed.http2_streams_expired,
    );
    counter(
        &mut out,
        "podgpu_agent_request_resyncs_total",
        "HTTP/1.1 connections resynchronised at a request line after the kernel lost events.",
        missed.resyncs,
    );
    counter(
        &mut out,
        "podgpu_agent_open_request_corrections_total",
        "Sweeps that found the open-request level out of step with the parsers (healed).",
        missed.open_request_corrections,
    );
    family(
        &mut out,
        "podgpu_agent_tracked_connections",
        "gauge",
        "Server connections followed now.",
        [(String::new(), health.request_reader.connections as f64)],
    );
    family(
        &mut out,
        "podgpu_agent_bpf_run_seconds_total",
        "counter",
        "Kernel time spent in each eBPF program (needs kernel.bpf_stats_enabled=1).",
        health.bpf_programs.iter().map(|p| (format!("program=\"{}\"", escape(&p.name)), p.run_time_ns as f64 / 1e9)),
    );
    family(
        &mut out,
        "podgpu_agent_bpf_runs_total",
        "counter",
        "Runs of each eBPF program (needs kernel.bpf_stats_enabled=1).",
        health.bpf_programs.iter().map(|p| (format!("program=\"{}\"", escape(&p.name)), p.run_count as f64)),
    );
    family(
        &mut out,
        "podgpu_agent_tracked_pods",
        "gauge",
        "Pods with a cgroup on this node.",
        [(String::new(), view.pods.len() as f64)],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::PodMeta;
    use crate::signals::history::{History, Point};
    use crate::signals::view::{PodView, SourceStatus};

    /// Per-pod lines carry escaped labels; degraded sources emit no pod
    /// series but do show as down.
    #[test]
    fn renders_pods_and_self_metrics() {
        let mut view = NodeView::empty();
        view.health.probes = SourceStatus::Ok { detail: "ebpf".into() };
        let mut history = History::new(60.0);
        history.push(Point { at_s: 0.0, ..Point::default() });
        history.push(Point { at_s: 10.0, recv_bytes: 5000, ..Point::default() });
        view.pods.push(PodView {
            meta: PodMeta {
                uid: "u1".into(),
                namespace: Some("ns".into()),
                name: Some("we\"ird".into()),
                containers: vec![crate::pods::ContainerMeta {
                    name: "vllm".into(),
                    id: None,
                    devices: vec!["GPU-1234::2".into()],
                }],
                ..PodMeta::default()
            },
            history,
            gpu: Default::default(),
            driver: crate::probes::driver::PodDriver {
                contexts: 2,
                vram_bytes: 1 << 30,
                calls_by_kind: [(crate::probes::driver::objects::CallKind::Context, 6)].into(),
                ..Default::default()
            },
            requests_in_flight: 0,
            requests: Default::default(),
            ports: Vec::new(),
            metadata_pending: false,
            requests_unwatched: false,
        });
        let text = render_metrics(&view);
        // Driver signals only while the driver path serves.
        assert!(!text.contains("podgpu_pod_gpu_contexts{"), "{text}");
        view.health.driver = SourceStatus::Ok { detail: "ioctls".into() };
        let text = render_metrics(&view);
        let labels = "namespace=\"ns\",pod=\"we\\\"ird\",container=\"vllm\",pod_uid=\"u1\",gpu=\"GPU-1234\"";
        assert!(text.contains(&format!("podgpu_pod_gpu_contexts{{{labels}}} 2\n")), "{text}");
        assert!(text.contains(&format!("podgpu_pod_gpu_driver_mem_bytes{{{labels}}} 1073741824\n")), "{text}");
        assert!(
            text.contains(&format!("podgpu_pod_gpu_driver_calls_total{{{labels},kind=\"context\"}} 6\n")),
            "{text}"
        );
        assert!(
            text.contains(
                "podgpu_pod_socket_recv_bytes_rate{namespace=\"ns\",pod=\"we\\\"ird\",container=\"vllm\",pod_uid=\"u1\",gpu=\"GPU-1234\"} 500\n"
            ),
            "{text}"
        );
        assert!(!text.contains("podgpu_pod_gpu_sm_util{"), "{text}");
        assert!(text.contains("podgpu_agent_source_up{source=\"gpu\"} 0"));
        assert!(text.contains("podgpu_agent_tracked_pods 1"));
    }

    /// TTFT and latency are histograms over the pod's ports, its probe
    /// traffic left out: cumulative `le` buckets ending at `+Inf`, with sum
    /// and count.
    #[test]
    fn request_timings_are_prometheus_histograms() {
        let mut view = NodeView::empty();
        view.health.probes = SourceStatus::Ok { detail: "ebpf".into() };
        let mut served = crate::signals::view::PortView::fixture(8000, 0, 0);
        for ms in [40, 80, 90] {
            served.ttft_total.record(ms * 1_000_000);
            served.latency_total.record(ms * 10_000_000);
        }
        let mut health_checks = crate::signals::view::PortView::fixture(8081, 0, 0);
        health_checks.probe = true;
        health_checks.ttft_total.record(1_000_000);
        view.pods.push(PodView {
            meta: PodMeta {
                uid: "u1".into(),
                namespace: Some("ns".into()),
                name: Some("p".into()),
                ..PodMeta::default()
            },
            history: History::new(60.0),
            gpu: Default::default(),
            driver: Default::default(),
            requests_in_flight: 0,
            requests: Default::default(),
            ports: vec![served, health_checks],
            metadata_pending: false,
            requests_unwatched: false,
        });
        let text = render_metrics(&view);
        let labels = "namespace=\"ns\",pod=\"p\",container=\"\",pod_uid=\"u1\",gpu=\"\"";
        assert!(text.contains("# TYPE podgpu_pod_ttft_seconds histogram\n"), "{text}");
        for (le, count) in [("0.005", 0), ("0.05", 1), ("0.075", 1), ("0.1", 3), ("+Inf", 3)] {
            let line = format!("podgpu_pod_ttft_seconds_bucket{{{labels},le=\"{le}\"}} {count}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains(&format!("podgpu_pod_ttft_seconds_count{{{labels}}} 3\n")), "{text}");
        assert!(text.contains(&format!("podgpu_pod_ttft_seconds_sum{{{labels}}} 0.21")), "{text}");
        // Latencies of 0.4, 0.8 and 0.9 s.
        for (le, count) in [("0.5", 1), ("0.75", 1), ("1", 3)] {
            let line = format!("podgpu_pod_request_latency_seconds_bucket{{{labels},le=\"{le}\"}} {count}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
    }
}
