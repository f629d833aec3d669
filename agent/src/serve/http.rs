//! The node agent's HTTP endpoints: `/healthz` (what works and what is
//! degraded), `/pods` (the per-pod view as JSON, used by the demo's live
//! view) and `/metrics` (Prometheus text format).
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::watch;

use super::trigger::{DEFAULT_WINDOW, MAX_WINDOW};
use crate::signals::metric::Metric;
use crate::signals::view::{Health, NodeView};

type ViewRx = watch::Receiver<Arc<NodeView>>;

/// The HTTP router over the published view.
pub fn router(view: ViewRx) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/pods", get(pods))
        .route("/metrics", get(metrics))
        .with_state(view)
}

#[derive(Serialize)]
struct HealthBody<'a> {
    status: &'static str,
    #[serde(flatten)]
    health: &'a Health,
}

/// Always 200 while the agent serves (a missing GPU must not restart the
/// pod); the body says which sources are degraded and why.
async fn healthz(State(view): State<ViewRx>) -> Response {
    let view = view.borrow().clone();
    let degraded = !view.health.probes.is_ok() || !view.health.gpu.is_ok();
    let status = if degraded { "degraded" } else { "ok" };
    Json(HealthBody { status, health: &view.health }).into_response()
}

#[derive(Serialize)]
struct PodRow<'a> {
    uid: &'a str,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    labels: &'a std::collections::BTreeMap<String, String>,
    values: HashMap<&'static str, Option<f64>>,
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
async fn pods(State(view): State<ViewRx>, Query(query): Query<HashMap<String, String>>) -> Response {
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
            values: Metric::ALL
                .into_iter()
                .map(|metric| {
                    let value = view.source_status(metric).is_ok().then(|| pod.value(metric, window_s)).flatten();
                    (metric.name(), value)
                })
                .collect(),
        })
        .collect();
    Json(PodsBody { at_s: view.at_s, window_s, pods: rows, devices: &view.devices, health: &view.health })
        .into_response()
}

/// Prometheus exposition of per-pod signals (default window) and the
/// agent's self-metrics.
async fn metrics(State(view): State<ViewRx>) -> Response {
    let view = view.borrow().clone();
    let body = render_metrics(&view);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The /metrics body.
pub fn render_metrics(view: &NodeView) -> String {
    let window_s = DEFAULT_WINDOW.as_secs_f64();
    let mut out = String::new();
    for metric in Metric::ALL {
        if !view.source_status(metric).is_ok() {
            continue;
        }
        let _ = writeln!(out, "# HELP podgpu_pod_{0} Per-pod {0} over {1}s.", metric.name(), window_s);
        let _ = writeln!(out, "# TYPE podgpu_pod_{} gauge", metric.name());
        for pod in &view.pods {
            let Some(value) = pod.value(metric, window_s) else {
                continue;
            };
            let _ = writeln!(
                out,
                "podgpu_pod_{}{{namespace=\"{}\",pod=\"{}\",pod_uid=\"{}\"}} {}",
                metric.name(),
                escape(pod.meta.namespace.as_deref().unwrap_or("")),
                escape(pod.meta.name.as_deref().unwrap_or("")),
                escape(&pod.meta.uid),
                value
            );
        }
    }
    let health = &view.health;
    let up = |ok: bool| if ok { 1 } else { 0 };
    let _ =
        writeln!(out, "# HELP podgpu_agent_source_up Whether a signal source is serving (1) or degraded/disabled (0).");
    let _ = writeln!(out, "# TYPE podgpu_agent_source_up gauge");
    let _ = writeln!(out, "podgpu_agent_source_up{{source=\"probes\"}} {}", up(health.probes.is_ok()));
    let _ = writeln!(out, "podgpu_agent_source_up{{source=\"gpu\"}} {}", up(health.gpu.is_ok()));
    let counters = [
        ("podgpu_agent_probe_events_total", "Socket events counted by the probes.", health.probe_stats.counted),
        (
            "podgpu_agent_probe_map_full_drops_total",
            "Socket events lost to a full probe map.",
            health.probe_stats.map_full_drops,
        ),
        ("podgpu_agent_gpu_poll_errors_total", "GPU backend opens or polls that failed.", health.gpu_poll_errors),
        (
            "podgpu_agent_gpu_updates_dropped_total",
            "GPU updates dropped because the collector lagged.",
            health.gpu_updates_dropped,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {value}");
    }
    let _ = writeln!(out, "# HELP podgpu_agent_tracked_pods Pods with a cgroup on this node.");
    let _ = writeln!(out, "# TYPE podgpu_agent_tracked_pods gauge");
    let _ = writeln!(out, "podgpu_agent_tracked_pods {}", view.pods.len());
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
                labels: Default::default(),
            },
            history,
            gpu_mem_used_bytes: 0,
        });
        let text = render_metrics(&view);
        assert!(
            text.contains("podgpu_pod_socket_recv_bytes_rate{namespace=\"ns\",pod=\"we\\\"ird\",pod_uid=\"u1\"} 500\n"),
            "{text}"
        );
        assert!(!text.contains("podgpu_pod_gpu_sm_util{"), "{text}");
        assert!(text.contains("podgpu_agent_source_up{source=\"gpu\"} 0"));
        assert!(text.contains("podgpu_agent_tracked_pods 1"));
    }
}
