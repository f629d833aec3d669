//! The node API (`podgpu.node.v1.NodeSignals`): a node agent's pods with
//! their values over the windows the caller asks for, and latency
//! histograms as mergeable buckets, once (`Snapshot`) or on every published
//! change (`Watch`). The scaler role polls `Snapshot` on every node: a poll
//! with a deadline tells a hung node from a quiet one without keepalives.
//! A request may carry a `Selection`: then only the pods its queries
//! select are sent, with only the metrics it names, which is what keeps a
//! scaler over 1,000 nodes cheap (docs/reliability.md, scale).
use std::sync::Arc;

use podgpu_proto::node::node_signals_server::NodeSignals;
use podgpu_proto::node::{
    Container, NodeSnapshot, PodSignals as PodMessage, PortValues, SnapshotRequest, WatchRequest, WindowValues,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::trigger::{DEFAULT_WINDOW, MAX_WINDOW};
use crate::selection::{PodSelection, MAX_WINDOWS};
use crate::signals::latency::{encode_buckets, new_histogram};
use crate::signals::metric::{Combine, Metric, MetricSource, Quantile};
use crate::signals::traffic_filter::TrafficFilter;
use crate::signals::view::{NodeView, PodView};

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

/// The snapshot of `view` for `windows`: every pod and metric, or what
/// `selection` asks for.
pub fn snapshot(node: &str, view: &NodeView, windows: &[f64], selection: Option<&PodSelection>) -> NodeSnapshot {
    let unavailable_sources = MetricSource::ALL
        .into_iter()
        .map(|source| (source.name(), view.health.of(source)))
        .filter(|(_, status)| !status.is_ok())
        .map(|(name, status)| (name.to_string(), format!("{status:?}")))
        .collect();
    // A selecting caller (the scaler) has no use for owners and container
    // ids: they are left out rather than shipped across the cluster.
    let full = selection.is_none();
    let pods = view
        .pods
        .iter()
        .filter_map(|pod| match selection {
            None => Some((pod, None)),
            Some(selection) => selection
                .pick(pod.meta.namespace.as_deref().unwrap_or_default(), &pod.meta.labels, pod.metadata_pending)
                .map(|pick| (pod, Some(pick))),
        })
        .map(|(pod, pick)| {
            let wanted = |metric: Metric| match (selection, &pick) {
                (Some(selection), Some(pick)) => selection.wants(pick, metric),
                _ => true,
            };
            let serving =
                |metric: Metric| wanted(metric) && view.source_status(metric).is_ok() && !view.warming_up(metric);
            let ports = match (selection, &pick) {
                (Some(selection), Some(pick)) => selection.ports(pick),
                _ => true,
            };
            PodMessage {
                uid: pod.meta.uid.clone(),
                namespace: pod.meta.namespace.clone().unwrap_or_default(),
                name: pod.meta.name.clone().unwrap_or_default(),
                labels: pod.meta.labels.clone().into_iter().collect(),
                owner: pod
                    .meta
                    .owner
                    .as_ref()
                    .filter(|_| full)
                    .map(|o| format!("{}/{}", o.kind, o.name))
                    .unwrap_or_default(),
                containers: pod
                    .meta
                    .containers
                    .iter()
                    .filter(|_| full)
                    .map(|c| Container {
                        name: c.name.clone(),
                        id: c.id.clone().unwrap_or_default(),
                        devices: c.devices.clone(),
                    })
                    .collect(),
                windows: windows.iter().map(|&window_s| window_values(pod, window_s, &serving, ports)).collect(),
                unavailable: Metric::ALL
                    .into_iter()
                    .filter(|m| wanted(*m))
                    .filter_map(|m| Some((m.name().to_string(), pod.unavailable_reason(m)?.to_string())))
                    .collect(),
                metadata_pending: pod.metadata_pending,
                selected_by: pick.map(|p| p.selected_by).unwrap_or_default(),
                engine: pod.engine.scrape.engine.map(|engine| engine.name().to_string()).unwrap_or_default(),
                engine_failing: pod.engine.scrape.engine.is_some() && pod.engine.unavailable.is_some(),
            }
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
fn window_values(pod: &PodView, window_s: f64, serving: &impl Fn(Metric) -> bool, ports: bool) -> WindowValues {
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
    let engine_ttft = Metric::EngineTtftMs(Quantile::P50);
    let pod_level = TrafficFilter::default();
    WindowValues {
        window_s,
        values: additive().filter_map(|m| Some((m.name().to_string(), pod.value(m, window_s, &pod_level)?))).collect(),
        ttft_us: buckets(&|into| pod.merge_latencies(ttft, window_s, &pod_level, into), ttft),
        latency_us: buckets(&|into| pod.merge_latencies(latency, window_s, &pod_level, into), latency),
        engine_ttft_us: buckets(&|into| pod.merge_latencies(engine_ttft, window_s, &pod_level, into), engine_ttft),
        // Each port and class on its own, so the scaler can filter exactly
        // as a node does.
        ports: pod
            .ports
            .iter()
            .filter(|_| ports)
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
        let request = request.into_inner();
        let windows = checked_windows(request.windows_s).map_err(Status::invalid_argument)?;
        let selection = request.selection.map(PodSelection::decode).transpose().map_err(Status::invalid_argument)?;
        let view = self.view.borrow().clone();
        Ok(Response::new(snapshot(&self.node, &view, &windows, selection.as_ref())))
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
                let message = snapshot(&node, &current, &windows, None);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::selector::LabelSelector;
    use crate::selection::tests::selection;
    use crate::signals::view::{PortView, SourceStatus};

    fn view() -> NodeView {
        let mut view = NodeView::empty();
        view.at_s = 60.0;
        view.health.probes = SourceStatus::Ok { detail: "test".into() };
        let mut llm = PodView::fixture("ns", "llm", 100);
        llm.ports = vec![PortView::fixture(8000, 2, 100)];
        llm.meta.containers =
            vec![crate::pods::ContainerMeta { name: "vllm".into(), id: Some("c0ffee".into()), devices: vec![] }];
        let mut pending = PodView::fixture("", "unknown", 1);
        pending.meta.namespace = None;
        pending.meta.labels.clear();
        pending.metadata_pending = true;
        view.pods = vec![llm, PodView::fixture("ns", "other", 200), PodView::fixture("x", "llm", 300), pending];
        view
    }

    /// A selection sends the pods its queries pick (and pods whose labels
    /// are not known yet), only the metrics it names, per-port values only
    /// when asked, and no container ids; no selection sends everything.
    #[test]
    fn a_selection_sends_only_what_it_names() {
        let view = view();
        let everything = snapshot("n", &view, &[10.0], None);
        assert_eq!(everything.pods.len(), 4);
        assert!(everything.pods[0].windows[0].values.len() > 2);
        assert_eq!(everything.pods[0].windows[0].ports.len(), 1);
        assert_eq!(everything.pods[0].containers.len(), 1);

        let chosen = PodSelection::decode(selection(&[("ns", "app=llm")], &["socket_recv_bytes_rate"], false)).unwrap();
        let selected = snapshot("n", &view, &[10.0], Some(&chosen));
        let names: Vec<(&str, &str)> = selected.pods.iter().map(|p| (p.namespace.as_str(), p.name.as_str())).collect();
        assert_eq!(names, [("ns", "llm"), ("", "unknown")], "the llm pod of ns, and the pending pod");
        let window = &selected.pods[0].windows[0];
        assert_eq!(window.values.keys().collect::<Vec<_>>(), ["socket_recv_bytes_rate"]);
        assert!((window.values["socket_recv_bytes_rate"] - 100.0).abs() < 1e-6);
        assert!(window.ttft_us.is_empty() && window.latency_us.is_empty() && window.ports.is_empty());
        assert!(selected.pods[0].containers.is_empty());

        let with_ports = PodSelection::decode(selection(&[("ns", "app=llm")], &["requests_in_flight"], true)).unwrap();
        let ports = &snapshot("n", &view, &[10.0], Some(&with_ports)).pods[0].windows[0].ports;
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].values.get("requests_in_flight"), Some(&2.0));
        assert!(!ports[0].values.contains_key("socket_recv_bytes_rate"));

        let nothing = PodSelection::decode(selection(&[], &[], false)).unwrap();
        let pods = snapshot("n", &view, &[10.0], Some(&nothing)).pods;
        assert_eq!(pods.len(), 1, "only the pending pod: {pods:?}");
        assert!(pods[0].windows[0].values.is_empty(), "a pending pod is sent without values");

        // Two queries: each pod says which select it, and carries the
        // metrics of those queries only.
        let mut two = selection(&[("ns", "app=llm")], &["gpu_sm_util"], false);
        two.queries.extend(selection(&[("ns", "app in (llm,other)")], &["ttft_ms_p99"], false).queries);
        let two = PodSelection::decode(two).unwrap();
        let pods = snapshot("n", &view, &[10.0], Some(&two)).pods;
        let by: Vec<(&str, Vec<u32>)> = pods.iter().map(|p| (p.name.as_str(), p.selected_by.clone())).collect();
        assert_eq!(by, [("llm", vec![0, 1]), ("other", vec![1]), ("unknown", vec![])]);
        assert_eq!(two.query_index("ns", &LabelSelector::parse("app=llm").unwrap(), Metric::GpuSmUtil, false), Some(0));
        assert_eq!(two.query_index("ns", &LabelSelector::parse("app=llm").unwrap(), Metric::RequestRate, false), None);
        assert_eq!(two.query_index("ns", &LabelSelector::parse("app=llm").unwrap(), Metric::GpuSmUtil, true), None);
    }
}
