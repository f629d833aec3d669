//! The node agent's HTTP endpoints: `/healthz` (liveness: what works and
//! what is degraded; 503 when the collector has stopped publishing),
//! `/readyz` (readiness: a fresh view is being served), `/pods` (the
//! per-pod view as JSON, used by the demo's live view), `/launches`
//! (kernel launches per process, function and size) and `/metrics`
//! (Prometheus text format).
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use crate::signals::traffic_filter::TrafficFilter;
use crate::status::SourceStatus;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::watch;

use super::trigger::{DEFAULT_WINDOW, MAX_WINDOW};
use crate::signals::metric::{Combine, Metric};
use crate::signals::view::{Health, NodeView};

type ViewRx = watch::Receiver<Arc<NodeView>>;

/// The HTTP router over the published view.
pub fn router(view: ViewRx, tick: Duration) -> Router {
    let freshness = Freshness {
        ready_within: (tick * 3).max(Duration::from_secs(1)),
        live_within: (tick * 10).max(Duration::from_secs(5)),
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/pods", get(pods))
        .route("/launches", get(launches))
        .route("/driver", get(driver))
        .route("/metrics", get(metrics))
        .with_state(AppState { view, freshness })
}

/// How old the published view may be: a collector that stopped ticking
/// (a deadlock, a stuck source call on its task) must fail its probes
/// rather than serve its last view as if current.
#[derive(Clone, Copy, Debug)]
struct Freshness {
    /// `/readyz` answers 503 beyond this (3 ticks, at least 1 s).
    ready_within: Duration,
    /// `/healthz` answers 503 beyond this (10 ticks, at least 5 s).
    live_within: Duration,
}

#[derive(Clone)]
struct AppState {
    view: ViewRx,
    freshness: Freshness,
}

/// Age of the published view (`None`: nothing published yet).
fn view_age(view: &NodeView) -> Option<Duration> {
    view.built.map(|built| built.elapsed())
}

async fn readyz(State(state): State<AppState>) -> Response {
    let view = state.view.borrow().clone();
    match view_age(&view) {
        Some(age) if age <= state.freshness.ready_within => {
            Json(serde_json::json!({"status": "ready", "view_age_s": age.as_secs_f64()})).into_response()
        }
        age => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready", "view_age_s": age.map(|a| a.as_secs_f64())})),
        )
            .into_response(),
    }
}

#[derive(Serialize)]
struct HealthBody<'a> {
    status: &'static str,
    #[serde(flatten)]
    health: &'a Health,
}

/// Always 200 while the agent serves (a missing GPU must not restart the
/// pod); the body says which sources are degraded and why.
async fn healthz(State(state): State<AppState>) -> Response {
    let view = state.view.borrow().clone();
    let age = view_age(&view);
    if age.is_none_or(|age| age > state.freshness.live_within) {
        let body = serde_json::json!({
            "status": "stalled",
            "reason": "the collector has not published a view within the liveness limit",
            "view_age_s": age.map(|a| a.as_secs_f64()),
            "limit_s": state.freshness.live_within.as_secs_f64(),
        });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let health = &view.health;
    // Metadata sources are optional: only a wanted-but-failing one degrades.
    let metadata_failing =
        [&health.kube_api, &health.kubelet].iter().any(|s| matches!(s, SourceStatus::Degraded { .. }));
    let degraded = !health.probes.is_ok() || !health.gpu.is_ok() || metadata_failing;
    let status = if degraded { "degraded" } else { "ok" };
    Json(HealthBody { status, health: &view.health }).into_response()
}

#[derive(Serialize)]
struct PodRow<'a> {
    uid: &'a str,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    labels: &'a std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<&'a crate::pods::Owner>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    containers: &'a [crate::pods::ContainerMeta],
    /// GPUs NVML saw the pod's processes on at the latest poll.
    gpus_seen: Vec<&'a str>,
    values: HashMap<&'static str, Option<f64>>,
    requests: crate::signals::view::RequestCounts,
    /// Kernel launches since the agent started (exited processes included).
    gpu_launches: u64,
    /// Contexts, driver memory, driver calls by kind.
    gpu_driver: &'a crate::probes::driver::PodDriver,
}

#[derive(Serialize)]
struct PodsBody<'a> {
    at_s: f64,
    window_s: f64,
    pods: Vec<PodRow<'a>>,
    devices: &'a [crate::gpu::DeviceSample],
    health: &'a Health,
}

/// `/pods?window=SECONDS`: every pod and every metric over the window.
async fn pods(State(AppState { view, .. }): State<AppState>, Query(query): Query<HashMap<String, String>>) -> Response {
    let window_s = match query.get("window").map(|w| w.parse::<f64>()) {
        None => DEFAULT_WINDOW.as_secs_f64(),
        Some(Ok(w)) if w > 0.0 && w <= MAX_WINDOW.as_secs_f64() => w,
        Some(_) => {
            return (StatusCode::BAD_REQUEST, format!("window must be seconds in (0, {}]", MAX_WINDOW.as_secs()))
                .into_response()
        }
    };
    let view = view.borrow().clone();
    let rows = view
        .pods
        .iter()
        .map(|pod| PodRow {
            uid: &pod.meta.uid,
            namespace: pod.meta.namespace.as_deref(),
            name: pod.meta.name.as_deref(),
            labels: &pod.meta.labels,
            owner: pod.meta.owner.as_ref(),
            containers: &pod.meta.containers,
            gpus_seen: pod.gpu.device_uuids(&view.devices),
            values: Metric::ALL
                .into_iter()
                .map(|metric| {
                    let value = view
                        .source_status(metric)
                        .is_ok()
                        .then(|| pod.value(metric, window_s, &TrafficFilter::default()))
                        .flatten();
                    (metric.name(), value)
                })
                .collect(),
            requests: pod.requests,
            gpu_launches: pod.history.latest().map_or(0, |point| point.gpu_launches),
            gpu_driver: &pod.driver,
        })
        .collect();
    Json(PodsBody { at_s: view.at_s, window_s, pods: rows, devices: &view.devices, health: &view.health })
        .into_response()
}

/// Prometheus exposition of per-pod signals (default window) and the
/// agent's self-metrics.
/// `/launches`: kernel launches per live process, kernel function (or
/// graph) and launch size, cumulative (the attribution estimator's input).
async fn launches(State(AppState { view, .. }): State<AppState>) -> Response {
    let view = view.borrow().clone();
    Json(serde_json::json!({ "status": view.health.launches, "rows": view.launches.as_slice() })).into_response()
}

/// `/driver`: what each live process holds in the NVIDIA driver (contexts
/// and their GPUs, VRAM) and its driver calls by kind.
async fn driver(State(AppState { view, .. }): State<AppState>) -> Response {
    let view = view.borrow().clone();
    Json(serde_json::json!({
        "status": view.health.driver,
        "reader": view.health.driver_reader,
        "rows": view.driver.as_slice(),
    }))
    .into_response()
}

async fn metrics(State(AppState { view, .. }): State<AppState>) -> Response {
    let view = view.borrow().clone();
    let started = std::time::Instant::now();
    let mut body = render_metrics(&view);
    // This scrape's own cost, so a node with many pods shows what /metrics
    // costs it (the family itself is the only part not timed).
    family(
        &mut body,
        "podgpu_agent_scrape_duration_seconds",
        "gauge",
        "Time this /metrics answer took to render.",
        [(String::new(), started.elapsed().as_secs_f64())],
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

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
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: impl IntoIterator<Item = (String, f64)>) {
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
        health.gpu_errors.iter().map(|(kind, count)| (format!("kind=\"{kind}\""), *count as f64)),
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

    /// Liveness and readiness judge the age of the published view: fresh
    /// passes both, a few ticks old fails readiness only, a stalled
    /// collector fails both, and nothing published yet is not alive.
    #[tokio::test]
    async fn probes_fail_when_the_view_is_stale() {
        let status = |age: Option<Duration>| async move {
            let mut view = NodeView::empty();
            view.built = age.map(|age| std::time::Instant::now() - age);
            let (_tx, rx) = watch::channel(Arc::new(view));
            let state = AppState {
                view: rx,
                freshness: Freshness { ready_within: Duration::from_secs(1), live_within: Duration::from_secs(5) },
            };
            (healthz(State(state.clone())).await.status(), readyz(State(state)).await.status())
        };
        assert_eq!(status(Some(Duration::ZERO)).await, (StatusCode::OK, StatusCode::OK));
        assert_eq!(status(Some(Duration::from_secs(2))).await, (StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE));
        let stalled = (StatusCode::SERVICE_UNAVAILABLE, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(Some(Duration::from_secs(6))).await, stalled);
        assert_eq!(status(None).await, stalled);
    }
}
