//! The scaler role's HTTP endpoints: `/healthz` (which node agents it covers
//! and why others are missing), `/pods` (the pods the scaler fetched from
//! covered nodes, in the node agents' `/pods` shape, for `podgpu-agent top`
//! over the cluster: with `--fetch selected` only the pods live triggers
//! select, with `--fetch all` every pod)
//! and `/metrics` (coverage self-metrics and KEDA answer times).
use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use super::answer_times::AnswerTimes;
use crate::cluster::ClusterView;
use crate::signals::aggregate::PodSignals;
use crate::signals::latency::{new_histogram, quantile_ms};
use crate::signals::metric::{Combine, Metric};
use crate::signals::traffic_filter::TrafficFilter;

type ViewRx = watch::Receiver<Arc<ClusterView>>;

/// The scaler's HTTP router; `/metrics` includes `answer_times`.
pub fn router(view: ViewRx, answer_times: Arc<AnswerTimes>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/pods", get(pods))
        .route("/metrics", get(move |State(view): State<ViewRx>| metrics(view, answer_times)))
        .with_state(view)
}

async fn healthz(State(view): State<ViewRx>) -> Response {
    let view = view.borrow().clone();
    let nodes: Vec<serde_json::Value> = view
        .nodes
        .iter()
        .map(|node| {
            serde_json::json!({
                "addr": node.addr.to_string(),
                "pods": node.pods.len(),
                "snapshot_age_s": node.age_s,
                "gpu_sample_age_s": node.gpu_sample_age_s,
                "last_error": node.last_error,
            })
        })
        .collect();
    let status = if view.nodes.len() == view.nodes_total && view.nodes_total > 0 { "ok" } else { "degraded" };
    Json(serde_json::json!({
        "status": status,
        "nodes_total": view.nodes_total,
        "nodes_covered": view.nodes.len(),
        "nodes": nodes,
    }))
    .into_response()
}

/// `/pods?window=SECONDS`: the pods of every covered node with their
/// values over a window the node snapshots carry (the default one when
/// none is asked for; asking for another is a 400 naming those carried).
async fn pods(State(view): State<ViewRx>, Query(query): Query<HashMap<String, String>>) -> Response {
    let view = view.borrow().clone();
    let window_s = match query.get("window").map(|w| w.parse::<f64>()) {
        None => view.windows.first().copied(),
        Some(Ok(w)) if view.has_window(w) => Some(w),
        Some(_) => {
            let carried: Vec<String> = view.windows.iter().map(|w| format!("{w}")).collect();
            return (StatusCode::BAD_REQUEST, format!("window: the node snapshots carry {}", carried.join(", ")))
                .into_response();
        }
    };
    let filter = TrafficFilter::default();
    let rows: Vec<serde_json::Value> = view
        .nodes
        .iter()
        .flat_map(|node| node.pods.iter().map(move |pod| (node, pod)))
        .map(|(node, pod)| {
            let values: serde_json::Map<String, serde_json::Value> = Metric::ALL
                .into_iter()
                .map(|metric| {
                    let value = window_s.and_then(|w| match metric.combine() {
                        Combine::Additive => pod.value(metric, w, &filter),
                        Combine::Percentile(q) => {
                            let mut merged = new_histogram();
                            pod.merge_latencies(metric, w, &filter, &mut merged);
                            quantile_ms(&merged, q.fraction())
                        }
                    });
                    (metric.name().to_string(), value.into())
                })
                .collect();
            serde_json::json!({
                "namespace": pod.namespace(),
                "name": pod.display_name(),
                "labels": pod.labels(),
                "node": node.name,
                "values": values,
                "engine": pod.engine_json(),
            })
        })
        .collect();
    let nodes: Vec<serde_json::Value> = view
        .nodes
        .iter()
        .map(|node| serde_json::json!({ "name": node.name, "pods": node.pods.len(), "snapshot_age_s": node.age_s }))
        .collect();
    Json(serde_json::json!({ "window_s": window_s, "pods": rows, "nodes": nodes, "devices": [] })).into_response()
}

async fn metrics(view: ViewRx, answer_times: Arc<AnswerTimes>) -> Response {
    let view = view.borrow().clone();
    let mut body = format!(
        "# HELP podgpu_scaler_nodes Node agents resolved.\n# TYPE podgpu_scaler_nodes gauge\npodgpu_scaler_nodes {}\n\
         # HELP podgpu_scaler_nodes_covered Node agents whose snapshot is within the grace period.\n\
         # TYPE podgpu_scaler_nodes_covered gauge\npodgpu_scaler_nodes_covered {}\n",
        view.nodes_total,
        view.nodes.len()
    );
    answer_times.render(&mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}
