//! The scaler's published picture of the cluster: every node's last good
//! snapshot as pods the aggregation reads, and what the picture cannot
//! answer (`ClusterView::coverage_error`).
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use hdrhistogram::Histogram;
use podgpu_proto::node::{PortValues, WindowValues};

use super::interest::{Ask, Fetched};
use crate::signals::aggregate::{PodSignals, WorkloadValue};
use crate::signals::latency::decode_buckets_into;
use crate::signals::metric::{Metric, MetricSource};
use crate::signals::traffic_filter::TrafficFilter;

/// A pod from a node snapshot, decoded once per poll.
#[derive(Debug)]
pub struct RemotePod {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) windows: Vec<WindowValues>,
    pub(super) unavailable: HashMap<String, String>,
    pub(super) metadata_pending: bool,
    /// With a selection: the queries (by index in the request) that select it.
    pub(super) selected_by: Vec<u32>,
    /// The inference engine found in the pod, and whether its metrics
    /// fail to read.
    pub(super) engine: Option<String>,
    pub(super) engine_failing: bool,
}

impl RemotePod {
    /// Decodes a node's pod message.
    pub fn decode(pod: podgpu_proto::node::PodSignals) -> Self {
        RemotePod {
            namespace: pod.namespace,
            name: if pod.name.is_empty() { pod.uid } else { pod.name },
            labels: pod.labels.into_iter().collect(),
            windows: pod.windows,
            unavailable: pod.unavailable,
            metadata_pending: pod.metadata_pending,
            selected_by: pod.selected_by,
            engine: (!pod.engine.is_empty()).then_some(pod.engine),
            engine_failing: pod.engine_failing,
        }
    }

    /// For `/pods`: the engine found and whether it is read, in the node
    /// agent's shape (`engine`, `unavailable`), so `top` reads either.
    pub fn engine_json(&self) -> serde_json::Value {
        let unavailable = match (&self.engine, self.engine_failing) {
            (None, _) => Some("no inference engine found".to_string()),
            (Some(engine), true) => Some(format!("{engine} found, its metrics not read (the node's /pods says why)")),
            (Some(_), false) => None,
        };
        serde_json::json!({ "engine": self.engine, "unavailable": unavailable })
    }

    fn window(&self, window_s: f64) -> Option<&WindowValues> {
        self.windows.iter().find(|w| (w.window_s - window_s).abs() < 1e-6)
    }
}

/// The per-port values of `window` that `filter` admits.
fn selected_ports<'a>(window: &'a WindowValues, filter: &'a TrafficFilter<'_>) -> impl Iterator<Item = &'a PortValues> {
    window.ports.iter().filter(|p| u16::try_from(p.port).is_ok_and(|port| filter.admits(port, p.probe)))
}

impl PodSignals for RemotePod {
    fn namespace(&self) -> Option<&str> {
        (!self.namespace.is_empty()).then_some(self.namespace.as_str())
    }
    fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }
    fn display_name(&self) -> &str {
        &self.name
    }
    fn value(&self, metric: Metric, window_s: f64, filter: &TrafficFilter<'_>) -> Option<f64> {
        let window = self.window(window_s)?;
        if filter.is_pod_level() || metric.source() != MetricSource::Probes {
            return window.values.get(metric.name()).copied();
        }
        // A pod serving nothing on those ports contributes 0.
        Some(selected_ports(window, filter).filter_map(|p| p.values.get(metric.name())).sum())
    }
    fn merge_latencies(&self, metric: Metric, window_s: f64, filter: &TrafficFilter<'_>, into: &mut Histogram<u32>) {
        let Some(window) = self.window(window_s) else { return };
        if let Metric::EngineTtftMs(_) = metric {
            return decode_buckets_into(&window.engine_ttft_us, into);
        }
        let mut pick = |ttft: &[u64], latency: &[u64]| match metric {
            Metric::TtftMs(_) => decode_buckets_into(ttft, into),
            Metric::LatencyMs(_) => decode_buckets_into(latency, into),
            _ => {}
        };
        if filter.is_pod_level() {
            return pick(&window.ttft_us, &window.latency_us);
        }
        for port in selected_ports(window, filter) {
            pick(&port.ttft_us, &port.latency_us);
        }
    }
    fn unavailable_reason(&self, metric: Metric) -> Option<&str> {
        self.unavailable.get(metric.name()).map(String::as_str)
    }
    fn metadata_pending(&self) -> bool {
        self.metadata_pending
    }
}

/// One node as the scaler sees it.
#[derive(Debug)]
pub struct NodeEntry {
    /// The node's name, as its agent reports it.
    pub name: String,
    /// The address its agent last answered on.
    pub addr: SocketAddr,
    /// Its pods at the last good snapshot (shared with the poller).
    pub pods: Arc<Vec<RemotePod>>,
    /// What that snapshot was fetched with: it answers only what this covers.
    pub fetched: Arc<Fetched>,
    /// Sources the node reported down, by name ("gpu", "probes").
    pub unavailable_sources: HashMap<String, String>,
    /// Seconds since that snapshot.
    pub age_s: f64,
    /// The node's GPU sample age when the snapshot was taken (`None`: no
    /// GPU data on that node).
    pub gpu_sample_age_s: Option<f64>,
    /// Why the latest poll failed, if it did.
    pub last_error: Option<String>,
}

impl NodeEntry {
    /// The pods of this node that may be selected by the query at `index`
    /// of its selection: those the node said that query selects (and pods
    /// of unknown labels), or all of them when the snapshot carried every
    /// pod. The caller still applies the selector; this spares it
    /// evaluating every pod of the cluster.
    fn candidates(&self, index: Option<u32>) -> impl Iterator<Item = &RemotePod> {
        let everything = self.fetched.selection.is_none();
        self.pods.iter().filter(move |pod| {
            everything || pod.metadata_pending || index.is_some_and(|index| pod.selected_by.contains(&index))
        })
    }
}

/// Where one ask's query sits in each distinct fetch of a view (nodes
/// polled in the same round share one), found once per answer rather than
/// once per node.
struct AskPlan<'v> {
    indexes: Vec<(&'v Arc<Fetched>, Option<u32>)>,
}

impl<'v> AskPlan<'v> {
    fn index_for(&self, node: &NodeEntry) -> Option<u32> {
        self.indexes.iter().find(|(fetched, _)| Arc::ptr_eq(fetched, &node.fetched)).and_then(|(_, index)| *index)
    }
}

/// Everything the scaler knows, published after every poll.
#[derive(Debug, Default)]
pub struct ClusterView {
    /// Whether a poll has completed (before it, nothing is known).
    pub polled: bool,
    /// Nodes with a snapshot within the grace period.
    pub nodes: Vec<NodeEntry>,
    /// Nodes silent past the grace period and not yet forgotten, with the
    /// pods they hosted.
    pub lost_nodes: Vec<NodeEntry>,
    /// Resolved addresses that have never answered, with the last error.
    pub silent_addresses: Vec<(SocketAddr, String)>,
    /// Node entries that did not resolve, with the error.
    pub resolution_errors: Vec<String>,
    /// Nodes known (covered, lost or silent).
    pub nodes_total: usize,
    /// Windows the latest poll asked for.
    pub windows: Vec<f64>,
    /// The distinct ways the nodes' snapshots were fetched (usually one:
    /// the latest poll's).
    pub fetches: Vec<Arc<Fetched>>,
    /// Answers computed from this view, by query. KEDA asks GetMetrics then
    /// IsActive for the same trigger back to back; the second is free. The
    /// memo dies with the view, so it can never serve stale data.
    pub(super) answers: std::sync::Mutex<HashMap<String, Result<WorkloadValue, String>>>,
}

impl ClusterView {
    /// The answer for `key`, computed once per view.
    pub fn memoized(
        &self,
        key: String,
        compute: impl FnOnce() -> Result<WorkloadValue, String>,
    ) -> Result<WorkloadValue, String> {
        if let Some(answer) = self.answers.lock().expect("answer memo poisoned").get(&key) {
            return answer.clone();
        }
        // Computed outside the lock: concurrent first calls may both compute.
        let answer = compute();
        self.answers.lock().expect("answer memo poisoned").insert(key, answer.clone());
        answer
    }

    /// All pods of covered nodes.
    pub fn pods(&self) -> impl Iterator<Item = &RemotePod> {
        self.nodes.iter().flat_map(|node| node.pods.iter())
    }

    /// The pods of covered nodes that `ask` may select (see
    /// `NodeEntry::candidates`).
    pub fn candidates<'a>(&'a self, ask: &Ask<'_>) -> impl Iterator<Item = &'a RemotePod> + 'a {
        let plan = self.plan(ask);
        self.nodes.iter().flat_map(move |node| node.candidates(plan.index_for(node)))
    }

    fn plan(&self, ask: &Ask<'_>) -> AskPlan<'_> {
        AskPlan { indexes: self.fetches.iter().map(|fetched| (fetched, fetched.query_index(ask))).collect() }
    }

    /// Whether every node's snapshot holds what `ask` needs (a trigger
    /// seen for the first time is in none until the next poll).
    pub fn covers(&self, ask: &Ask<'_>) -> bool {
        self.polled && self.fetches.iter().all(|fetched| fetched.covers(ask))
    }

    /// Why `ask` cannot be answered from this view: something that may
    /// host its pods is unseen (no poll yet, a name that does not resolve,
    /// an address that never answered, a node whose snapshot was not
    /// fetched for this ask, a node silent past its grace that hosted
    /// selected pods), or a node hosting pods of the namespace reports the
    /// metric's source down. `None`: the view covers the query.
    pub fn coverage_error(&self, ask: &Ask<'_>) -> Option<String> {
        if !self.polled {
            return Some("the scaler has not heard from the node agents yet".to_string());
        }
        if let Some(error) = self.resolution_errors.first() {
            return Some(format!("node agents cannot all be found: {error}"));
        }
        if let Some((addr, error)) = self.silent_addresses.first() {
            return Some(format!("the node agent at {addr} has never answered ({error}): its pods are unknown"));
        }
        let uncovered: Vec<&Arc<Fetched>> = self.fetches.iter().filter(|fetched| !fetched.covers(ask)).collect();
        let not_fetched = |node: &&NodeEntry| uncovered.iter().any(|fetched| Arc::ptr_eq(fetched, &node.fetched));
        if let Some(node) = self.nodes.iter().chain(&self.lost_nodes).find(not_fetched) {
            return Some(match &node.last_error {
                None => {
                    format!("node {} has not been polled for this trigger yet; it will be within a poll", node.name)
                }
                Some(error) => format!(
                    "node {} has not answered since this trigger was first asked ({error}): its pods are unknown",
                    node.name
                ),
            });
        }
        let plan = self.plan(ask);
        let selected = |pod: &RemotePod| pod.namespace == ask.namespace && ask.selector.matches(&pod.labels);
        if let Some(node) = self.lost_nodes.iter().find(|node| node.candidates(plan.index_for(node)).any(selected)) {
            return Some(format!(
                "node {} ({}) has not answered for {:.0} s and hosted pods this query selects: {}",
                node.name,
                node.addr,
                node.age_s,
                node.last_error.as_deref().unwrap_or("no answer")
            ));
        }
        let source = ask.metric.source().name();
        self.nodes.iter().find_map(|node| {
            let reason = node.unavailable_sources.get(source)?;
            node.candidates(plan.index_for(node))
                .any(|pod| pod.namespace == ask.namespace)
                .then(|| format!("{} is unavailable on node {}: {reason}", ask.metric, node.name))
        })
    }

    /// Whether the latest poll asked for `window_s`.
    pub fn has_window(&self, window_s: f64) -> bool {
        self.windows.iter().any(|w| (w - window_s).abs() < 1e-6)
    }
}
