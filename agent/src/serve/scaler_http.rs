//! The scaler role's HTTP endpoints: `/healthz` (which node agents it covers
//! and why others are missing) and `/metrics` (coverage self-metrics).
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use super::cluster::ClusterView;

type ViewRx = watch::Receiver<Arc<ClusterView>>;

/// The scaler's HTTP router.
pub fn router(view: ViewRx) -> Router {
    Router::new().route("/healthz", get(healthz)).route("/metrics", get(metrics)).with_state(view)
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

async fn metrics(State(view): State<ViewRx>) -> Response {
    let view = view.borrow().clone();
    let body = format!(
        "# HELP podgpu_scaler_nodes Node agents resolved.\n# TYPE podgpu_scaler_nodes gauge\npodgpu_scaler_nodes {}\n\
         # HELP podgpu_scaler_nodes_covered Node agents whose snapshot is within the grace period.\n\
         # TYPE podgpu_scaler_nodes_covered gauge\npodgpu_scaler_nodes_covered {}\n",
        view.nodes_total,
        view.nodes.len()
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}
