//! The node agent's HTTP endpoints: `/healthz` (liveness: what works and
//! what is degraded; 503 when the collector has stopped publishing),
//! `/readyz` (readiness: a fresh view is being served), `/pods` (the
//! per-pod view as JSON, used by the demo's live view), `/launches`
//! (kernel launches per process, function and size) and `/metrics`
//! (Prometheus text format).
use std::collections::HashMap;
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

use super::metrics::{render_metrics, Format};
use super::trigger::{DEFAULT_WINDOW, MAX_WINDOW};
use crate::signals::metric::Metric;
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
        .route("/attribution", get(attribution))
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
    /// Per pod (namespace/name, or UID): which engine was found where and
    /// how, or why none is read. Built here, when asked, not every tick.
    engine_pods: std::collections::BTreeMap<String, String>,
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
    let engine_pods = view
        .pods
        .iter()
        .map(|pod| {
            let name = match (&pod.meta.namespace, &pod.meta.name) {
                (Some(namespace), Some(name)) => format!("{namespace}/{name}"),
                _ => pod.meta.uid.clone(),
            };
            (name, pod.engine.summary())
        })
        .collect();
    Json(HealthBody { status, health: &view.health, engine_pods }).into_response()
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
    /// How sure its `gpu_sm_util` split is, 0 to 1 (`None`: NVML's value).
    gpu_attribution_confidence: Option<f64>,
    /// Its inference engine: what discovery found and why.
    engine: EngineRow<'a>,
}

/// A pod's engine in `/pods`.
#[derive(Serialize)]
struct EngineRow<'a> {
    /// The engine, once named or recognised.
    engine: Option<crate::engines::catalog::EngineKind>,
    /// How discovery named it, or why nothing did.
    named_by: &'a str,
    /// The endpoint scraped.
    endpoint: Option<&'a str>,
    /// What discovery tried, where nothing was found.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tried: &'a [String],
    /// Why its signals cannot be given now.
    unavailable: Option<&'a str>,
    /// The families read (renamed families show their version's name).
    families_read: Vec<&'static str>,
    /// Seconds since the latest good scrape.
    read_s_ago: Option<f64>,
    /// The engine's figures beside the socket probe's, and the gaps.
    fusion: crate::signals::fusion::Fusion,
}

impl<'a> EngineRow<'a> {
    fn of(pod: &'a crate::signals::view::PodView, window_s: f64) -> Self {
        let engine = &pod.engine;
        let scrape = &engine.scrape;
        EngineRow {
            engine: scrape.engine,
            named_by: &scrape.named_by,
            endpoint: scrape.endpoint.as_deref(),
            tried: &scrape.tried,
            unavailable: engine.unavailable.as_deref(),
            families_read: scrape.reading.as_ref().map(|(_, r)| r.families_read.clone()).unwrap_or_default(),
            read_s_ago: scrape.reading.as_ref().map(|(at, _)| at.elapsed().as_secs_f64()),
            fusion: crate::signals::fusion::fusion(pod, window_s),
        }
    }
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
            gpu_attribution_confidence: pod.gpu.attribution_confidence,
            engine: EngineRow::of(pod, window_s),
        })
        .collect();
    Json(PodsBody { at_s: view.at_s, window_s, pods: rows, devices: &view.devices, health: &view.health })
        .into_response()
}

/// Prometheus exposition of per-pod signals (default window) and the
/// agent's self-metrics.
/// `/launches`: kernel launches per live process, kernel function (or
/// graph) and launch size, and each process's completion spans, all
/// cumulative (the attribution estimator's input).
async fn launches(State(AppState { view, .. }): State<AppState>) -> Response {
    let view = view.borrow().clone();
    Json(serde_json::json!({
        "status": view.health.launches,
        "read_at_unix": view.launches_read_unix,
        "rows": view.launches.as_slice(),
        "identity_sources": crate::probes::launches::launches_by_identity_source(&view.launches)
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        "spans": view.launch_spans.rows.as_slice(),
        "spans_lost": view.launch_spans.lost,
    }))
    .into_response()
}

/// `/attribution`: per GPU, the device utilization and NVML's per-process
/// samples of the latest poll, and the estimator's split with each
/// process's confidence and basis.
async fn attribution(State(AppState { view, .. }): State<AppState>) -> Response {
    let view = view.borrow().clone();
    Json(serde_json::json!({ "status": view.health.gpu, "gpus": view.attribution.as_slice() })).into_response()
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

/// `/metrics`, in OpenMetrics when the scraper's `Accept` asks for it.
async fn metrics(State(AppState { view, .. }): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let view = view.borrow().clone();
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|value| value.to_str().ok()));
    let body = render_metrics(view, format);
    ([(header::CONTENT_TYPE, format.content_type())], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

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
