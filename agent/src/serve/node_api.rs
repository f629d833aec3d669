//! The node API (`podgpu.node.v1.NodeSignals`): a node agent's pods with
//! their values over the windows the caller asks for, and latency
//! histograms as mergeable buckets, once (`Snapshot`) or on every published
//! change (`Watch`). The scaler role polls `Snapshot` on every node: a poll
//! with a deadline tells a hung node from a quiet one without keepalives.
use std::sync::Arc;

use podgpu_proto::node::node_signals_server::NodeSignals;
use podgpu_proto::node::{
    Container, NodeSnapshot, PodSignals as PodMessage, PortValues, SnapshotRequest, WatchRequest, WindowValues,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::trigger::{DEFAULT_WINDOW, MAX_WINDOW};
use crate::signals::latency::{encode_buckets, new_histogram};
use crate::signals::metric::{Combine, Metric, MetricSource, Quantile};
use crate::signals::traffic_filter::TrafficFilter;
use crate::signals::view::{NodeView, PodView};

/// Most windows one request may ask for.
const MAX_WINDOWS: usize = 8;

/// The node API over this agent's published view.
pub struct NodeApi {
    node: String,
    view: watch::Receiver<Arc<NodeView>>,
}

impl NodeApi {
    /// Serves `view` under the name `node`.
    pub fn new(node: String, view: watch::Receiver<Arc<NodeView>>) -> Self {
        Self { node, view }
    }
}

/// The snapshot of `view` for `windows`.
pub fn snapshot(node: &str, view: &NodeView, windows: &[f64]) -> NodeSnapshot {
    let unavailable_sources = MetricSource::ALL
        .into_iter()
        .map(|source| (source.name(), view.health.of(source)))
        .filter(|(_, status)| !status.is_ok())
        .map(|(name, status)| (name.to_string(), format!("{status:?}")))
        .collect();
    let serving = |metric: Metric| view.source_status(metric).is_ok();
    let pods = view
        .pods
        .iter()
        .map(|pod| PodMessage {
            uid: pod.meta.uid.clone(),
            namespace: pod.meta.namespace.clone().unwrap_or_default(),
            name: pod.meta.name.clone().unwrap_or_default(),
            labels: pod.meta.labels.clone().into_iter().collect(),
            owner: pod.meta.owner.as_ref().map(|o| format!("{}/{}", o.kind, o.name)).unwrap_or_default(),
            containers: pod
                .meta
                .containers
                .iter()
                .map(|c| Container {
                    name: c.name.clone(),
                    id: c.id.clone().unwrap_or_default(),
                    devices: c.devices.clone(),
                })
                .collect(),
            windows: windows.iter().map(|&window_s| window_values(pod, window_s, &serving)).collect(),
            unavailable: Metric::ALL
                .into_iter()
                .filter_map(|m| Some((m.name().to_string(), pod.unavailable_reason(m)?.to_string())))
                .collect(),
            metadata_pending: pod.metadata_pending,
        })
        .collect();
    NodeSnapshot {
        node: node.to_string(),
        pods,
        unavailable_sources,
        at_s: view.at_s,
        gpu_sample_age_s: view.health.gpu_sample_age_s.unwrap_or(-1.0),
    }
}

/// One pod's values over one window: additive metrics of the whole pod,
/// histograms as buckets, and the same per server port.
fn window_values(pod: &PodView, window_s: f64, serving: &impl Fn(Metric) -> bool) -> WindowValues {
    let additive = || Metric::ALL.into_iter().filter(|m| m.combine() == Combine::Additive && serving(*m));
    let buckets = |merge: &dyn Fn(&mut hdrhistogram::Histogram<u32>), metric: Metric| {
        if !serving(metric) {
            return Vec::new();
        }
        let mut merged = new_histogram();
        merge(&mut merged);
        encode_buckets(&merged)
    };
    let ttft = Metric::TtftMs(Quantile::P50);
    let latency = Metric::LatencyMs(Quantile::P50);
    let pod_level = TrafficFilter::default();
    WindowValues {
        window_s,
        values: additive().filter_map(|m| Some((m.name().to_string(), pod.value(m, window_s, &pod_level)?))).collect(),
        ttft_us: buckets(&|into| pod.merge_latencies(ttft, window_s, &pod_level, into), ttft),
        latency_us: buckets(&|into| pod.merge_latencies(latency, window_s, &pod_level, into), latency),
        // Each port and class on its own, so the scaler can filter exactly
        // as a node does.
        ports: pod
            .ports
            .iter()
            .map(|port| PortValues {
                port: port.port.into(),
                values: additive()
                    .filter(|m| m.source() == MetricSource::Probes)
                    .filter_map(|m| Some((m.name().to_string(), port.value(m, window_s)?)))
                    .collect(),
                ttft_us: buckets(&|into| port.merge_latencies(ttft, window_s, into), ttft),
                latency_us: buckets(&|into| port.merge_latencies(latency, window_s, into), latency),
                probe: port.probe,
            })
            .collect(),
    }
}

/// Defaults and bounds for the requested windows; the error becomes an
/// InvalidArgument.
fn checked_windows(mut windows: Vec<f64>) -> Result<Vec<f64>, String> {
    if windows.is_empty() {
        windows.push(DEFAULT_WINDOW.as_secs_f64());
    }
    if windows.len() > MAX_WINDOWS {
        return Err(format!("windows_s: at most {MAX_WINDOWS} windows"));
    }
    if let Some(bad) = windows.iter().find(|w| !(w.is_finite() && **w > 0.0 && **w <= MAX_WINDOW.as_secs_f64())) {
        return Err(format!("windows_s: {bad} is not in (0, {}]", MAX_WINDOW.as_secs()));
    }
    Ok(windows)
}

#[tonic::async_trait]
impl NodeSignals for NodeApi {
    async fn snapshot(&self, request: Request<SnapshotRequest>) -> Result<Response<NodeSnapshot>, Status> {
        let windows = checked_windows(request.into_inner().windows_s).map_err(Status::invalid_argument)?;
        let view = self.view.borrow().clone();
        Ok(Response::new(snapshot(&self.node, &view, &windows)))
    }

    type WatchStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<NodeSnapshot, Status>> + Send>>;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let windows = checked_windows(request.windows_s).map_err(Status::invalid_argument)?;
        let min_interval = std::time::Duration::from_millis(request.min_interval_ms.into());
        let mut view = self.view.clone();
        let node = self.node.clone();
        // One snapshot in flight at most: a slow reader gets the latest
        // state when it catches up, not a backlog.
        let (sender, receiver) = mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                let current = view.borrow_and_update().clone();
                let message = snapshot(&node, &current, &windows);
                if sender.send(Ok(message)).await.is_err() {
                    return;
                }
                tokio::time::sleep(min_interval).await;
                tokio::select! {
                    changed = view.changed() => if changed.is_err() { return },
                    _ = sender.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
