//! The scaler role's view of every node agent: one task resolves the node
//! addresses (a static list or a headless Service's DNS name), polls each
//! node's API in parallel with a deadline, and publishes an immutable
//! `ClusterView` that KEDA calls are answered from.
//!
//! Nodes are known by the name their agent reports, not by address: a
//! restarted agent pod comes back on a new IP and is the same node. A
//! silent node's last good snapshot is used for the grace period; after it
//! the node is *lost* until it is forgotten (`forget`, 10 minutes by
//! default): a query that selects any pod it hosted is an error, never a
//! smaller sum. Likewise, an address that resolves but never answered, a
//! name that does not resolve, and the time before the first poll make
//! every answer an error (see `ClusterView::coverage_error`), so KEDA's
//! `fallback` holds the replicas instead of the scaler guessing.
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use podgpu_proto::node::node_signals_client::NodeSignalsClient;
use podgpu_proto::node::{PortValues, SnapshotRequest, WindowValues};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::tls::{ClientTls, FilesStamp};
use crate::pods::selector::LabelSelector;
use crate::signals::aggregate::{PodSignals, WorkloadValue};
use crate::signals::latency::decode_buckets_into;
use crate::signals::metric::{Metric, MetricSource};
use crate::signals::traffic_filter::TrafficFilter;

/// How the scaler reaches and judges node agents.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `host:port` entries; a name resolving to several addresses (headless
    /// Service) yields one node per address.
    pub nodes: Vec<String>,
    /// Time between polls.
    pub poll_interval: Duration,
    /// Deadline of one node's answer.
    pub deadline: Duration,
    /// How long a node's last good snapshot is used after it stops answering.
    pub grace: Duration,
    /// How long after its last snapshot a silent node is forgotten (until
    /// then, queries that select its pods are errors).
    pub forget: Duration,
    /// TLS towards node agents (files; plaintext when none are named).
    /// Re-read before a poll when they change, so rotation needs no restart.
    pub node_tls: ClientTls,
}

/// A pod from a node snapshot, decoded once per poll.
#[derive(Debug)]
pub struct RemotePod {
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    windows: Vec<WindowValues>,
    unavailable: HashMap<String, String>,
    metadata_pending: bool,
}

impl RemotePod {
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
    /// Windows every node snapshot carries.
    pub windows: Vec<f64>,
    /// Answers computed from this view, by query. KEDA asks GetMetrics then
    /// IsActive for the same trigger back to back; the second is free. The
    /// memo dies with the view, so it can never serve stale data.
    answers: std::sync::Mutex<HashMap<String, Result<WorkloadValue, String>>>,
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

    /// Why `metric` for the pods `selector` picks in `namespace` cannot be
    /// answered from this view: something that may host them is unseen
    /// (no poll yet, a name that does not resolve, an address that never
    /// answered, a node silent past its grace that hosted selected pods),
    /// or a node hosting pods of the namespace reports the metric's source
    /// down. `None`: the view covers the query.
    pub fn coverage_error(&self, metric: Metric, namespace: &str, selector: &LabelSelector) -> Option<String> {
        if !self.polled {
            return Some("the scaler has not heard from the node agents yet".to_string());
        }
        if let Some(error) = self.resolution_errors.first() {
            return Some(format!("node agents cannot all be found: {error}"));
        }
        if let Some((addr, error)) = self.silent_addresses.first() {
            return Some(format!("the node agent at {addr} has never answered ({error}): its pods are unknown"));
        }
        let selected = |pod: &RemotePod| pod.namespace == namespace && selector.matches(&pod.labels);
        if let Some(node) = self.lost_nodes.iter().find(|node| node.pods.iter().any(selected)) {
            return Some(format!(
                "node {} ({}) has not answered for {:.0} s and hosted pods this query selects: {}",
                node.name,
                node.addr,
                node.age_s,
                node.last_error.as_deref().unwrap_or("no answer")
            ));
        }
        let source = metric.source().name();
        self.nodes.iter().find_map(|node| {
            let reason = node.unavailable_sources.get(source)?;
            node.pods
                .iter()
                .any(|pod| pod.namespace == namespace)
                .then(|| format!("{metric} is unavailable on node {}: {reason}", node.name))
        })
    }

    /// Whether every node snapshot carries `window_s`.
    pub fn has_window(&self, window_s: f64) -> bool {
        self.windows.iter().any(|w| (w - window_s).abs() < 1e-6)
    }
}

/// Windows asked for, by their bits, with when they were last asked for.
type WindowRequests = std::sync::Mutex<HashMap<u64, (f64, Instant)>>;

/// Handle to the cluster task: the published view and a way to ask for
/// another window.
#[derive(Clone)]
pub struct ClusterHandle {
    /// Latest view.
    pub view: watch::Receiver<Arc<ClusterView>>,
    windows: mpsc::Sender<f64>,
    requested: Arc<WindowRequests>,
}

impl ClusterHandle {
    /// Makes sure snapshots carry `window_s`; returns once a view has it
    /// (or after `wait`; the caller checks `has_window`).
    pub async fn ensure_window(&self, window_s: f64, wait: Duration) -> Arc<ClusterView> {
        self.requested.lock().expect("window requests poisoned").insert(window_s.to_bits(), (window_s, Instant::now()));
        let mut view = self.view.clone();
        if view.borrow().has_window(window_s) {
            return view.borrow().clone();
        }
        let _ = self.windows.send(window_s).await;
        let _ = tokio::time::timeout(wait, async {
            while view.changed().await.is_ok() {
                if view.borrow_and_update().has_window(window_s) {
                    break;
                }
            }
        })
        .await;
        let latest = view.borrow().clone();
        latest
    }
}

/// A node's last good snapshot, decoded.
struct GoodSnapshot {
    at: Instant,
    pods: Arc<Vec<RemotePod>>,
    unavailable_sources: HashMap<String, String>,
    gpu_sample_age_s: Option<f64>,
}

/// One resolved address of a node agent.
struct AddressState {
    client: Option<NodeSignalsClient<Channel>>,
    /// The node that last answered here.
    node: Option<String>,
    last_error: Option<String>,
}

/// One node, by name.
struct NodeState {
    addr: SocketAddr,
    snapshot: GoodSnapshot,
}

/// Windows kept in the poll set besides the default: every trigger's
/// window (1-60 s), up to this many, the least recently asked dropped.
const MAX_POLLED_WINDOWS: usize = 64;
/// A window no KEDA call asked for in this long leaves the poll set.
const WINDOW_IDLE_EXPIRY: Duration = Duration::from_secs(600);

/// The windows to poll: the default, then those asked for recently.
fn polled_windows(default_window_s: f64, requested: &WindowRequests) -> Vec<f64> {
    let mut requested = requested.lock().expect("window requests poisoned");
    requested.retain(|_, (_, at)| at.elapsed() < WINDOW_IDLE_EXPIRY);
    let mut recent: Vec<(f64, Instant)> = requested.values().copied().collect();
    recent.sort_by_key(|entry| std::cmp::Reverse(entry.1));
    let mut windows = vec![default_window_s];
    for (window, _) in recent {
        if windows.len() > MAX_POLLED_WINDOWS {
            break;
        }
        if !windows.iter().any(|w| (w - window).abs() < 1e-6) {
            windows.push(window);
        }
    }
    windows
}

/// Starts the cluster task; it stops with `shutdown`.
pub fn spawn(config: ClusterConfig, default_window_s: f64, shutdown: CancellationToken) -> ClusterHandle {
    let (view_tx, view_rx) = watch::channel(Arc::new(ClusterView::default()));
    let (window_tx, mut window_rx) = mpsc::channel::<f64>(16);
    let requested: Arc<WindowRequests> = Arc::default();
    let window_requests = requested.clone();
    tokio::spawn(async move {
        let mut addresses: HashMap<SocketAddr, AddressState> = HashMap::new();
        let mut nodes: HashMap<String, NodeState> = HashMap::new();
        let mut ticker = tokio::time::interval(config.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut covered_before = usize::MAX;
        let mut tls: Option<ClientTlsConfig> = None;
        let mut tls_stamp: Option<FilesStamp> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
                // A new window: poll now rather than at the next tick.
                Some(_) = window_rx.recv() => {}
            }
            let windows = polled_windows(default_window_s, &window_requests);
            let (resolved, resolution_errors) = resolve(&config.nodes).await;
            addresses.retain(|addr, _| resolved.contains(addr));
            for addr in &resolved {
                addresses.entry(*addr).or_insert(AddressState { client: None, node: None, last_error: None });
            }
            let stamp = config.node_tls.stamp();
            if tls_stamp.as_ref() != Some(&stamp) {
                match config.node_tls.config() {
                    Ok(fresh) => {
                        if tls_stamp.is_some() {
                            tracing::info!("node TLS files changed: reloaded; reconnecting to node agents");
                        }
                        tls = fresh;
                        // Connections keep the identity they were made with.
                        for state in addresses.values_mut() {
                            state.client = None;
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "node TLS files unusable; keeping the previous ones"),
                }
                tls_stamp = Some(stamp);
            }
            poll_all(&mut addresses, &mut nodes, &windows, config.deadline, tls.as_ref()).await;
            nodes.retain(|name, node| {
                let keep = node.snapshot.at.elapsed() <= config.forget;
                if !keep {
                    tracing::warn!(node = %name, "node agent silent past the forget period: its pods no longer hold answers back");
                }
                keep
            });
            let view = publish(&addresses, &nodes, &windows, config.grace, resolution_errors);
            if view.nodes.len() != covered_before {
                tracing::info!(covered = view.nodes.len(), total = view.nodes_total, "scaler node coverage changed");
                covered_before = view.nodes.len();
            }
            view_tx.send_replace(Arc::new(view));
        }
    });
    ClusterHandle { view: view_rx, windows: window_tx, requested }
}

/// Resolves every entry; entries that fail are returned as errors (a DNS
/// blip must not make nodes disappear silently).
async fn resolve(entries: &[String]) -> (Vec<SocketAddr>, Vec<String>) {
    let mut addresses = Vec::new();
    let mut errors = Vec::new();
    for entry in entries {
        match tokio::net::lookup_host(entry.as_str()).await {
            Ok(found) => {
                let before = addresses.len();
                addresses.extend(found);
                if addresses.len() == before {
                    errors.push(format!("{entry} resolves to no address"));
                }
            }
            Err(err) => {
                tracing::debug!(node = %entry, error = %err, "resolving node agent address");
                errors.push(format!("resolving {entry}: {err}"));
            }
        }
    }
    addresses.sort_unstable();
    addresses.dedup();
    (addresses, errors)
}

/// tonic's transport errors say only "transport error"; the cause (refused,
/// TLS handshake, unknown CA) is in the source chain.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How one node agent is dialled.
fn node_endpoint(addr: SocketAddr, tls: Option<&ClientTlsConfig>, deadline: Duration) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint =
        Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| e.to_string())?.connect_timeout(deadline);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone()).map_err(|e| format!("TLS: {e}"))?;
    }
    Ok(endpoint)
}

async fn poll_all(
    addresses: &mut HashMap<SocketAddr, AddressState>,
    nodes: &mut HashMap<String, NodeState>,
    windows: &[f64],
    deadline: Duration,
    tls: Option<&ClientTlsConfig>,
) {
    let mut polls = tokio::task::JoinSet::new();
    for (addr, state) in addresses.iter_mut() {
        let addr = *addr;
        let client = state.client.clone();
        let request = SnapshotRequest { windows_s: windows.to_vec() };
        let tls = tls.cloned();
        polls.spawn(async move {
            let result = tokio::time::timeout(deadline, async {
                let mut client = match client {
                    Some(client) => client,
                    None => {
                        let endpoint = node_endpoint(addr, tls.as_ref(), deadline)?;
                        NodeSignalsClient::new(endpoint.connect().await.map_err(|e| error_chain(&e))?)
                    }
                };
                let snapshot = client.snapshot(request).await.map_err(|status| status.message().to_string())?;
                Ok::<_, String>((client, snapshot.into_inner()))
            })
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {deadline:?}")));
            (addr, result)
        });
    }
    while let Some(joined) = polls.join_next().await {
        let Ok((addr, result)) = joined else { continue };
        let Some(state) = addresses.get_mut(&addr) else { continue };
        match result {
            Ok((client, snapshot)) => {
                let name = if snapshot.node.is_empty() { addr.to_string() } else { snapshot.node.clone() };
                // Decoding thousands of pods is CPU work: keep it off the
                // async workers that answer KEDA.
                let pods = tokio::task::spawn_blocking(move || decode(snapshot.pods)).await.unwrap_or_default();
                state.client = Some(client);
                state.last_error = None;
                if let Some(previous) = nodes.get(&name).filter(|node| node.addr != addr) {
                    tracing::info!(node = %name, old = %previous.addr, new = %addr, "node agent answers on a new address");
                }
                state.node = Some(name.clone());
                let snapshot = GoodSnapshot {
                    at: Instant::now(),
                    pods: Arc::new(pods),
                    unavailable_sources: snapshot.unavailable_sources,
                    gpu_sample_age_s: (snapshot.gpu_sample_age_s >= 0.0).then_some(snapshot.gpu_sample_age_s),
                };
                nodes.insert(name, NodeState { addr, snapshot });
            }
            Err(error) => {
                if state.last_error.is_none() {
                    tracing::warn!(node = %addr, %error, "node agent did not answer");
                }
                // A broken channel is rebuilt on the next poll.
                state.client = None;
                state.last_error = Some(error);
            }
        }
    }
}

fn decode(pods: Vec<podgpu_proto::node::PodSignals>) -> Vec<RemotePod> {
    pods.into_iter()
        .map(|pod| RemotePod {
            namespace: pod.namespace,
            name: if pod.name.is_empty() { pod.uid } else { pod.name },
            labels: pod.labels.into_iter().collect(),
            windows: pod.windows,
            unavailable: pod.unavailable,
            metadata_pending: pod.metadata_pending,
        })
        .collect()
}

fn publish(
    addresses: &HashMap<SocketAddr, AddressState>,
    nodes: &HashMap<String, NodeState>,
    windows: &[f64],
    grace: Duration,
    resolution_errors: Vec<String>,
) -> ClusterView {
    let mut view = ClusterView { polled: true, windows: windows.to_vec(), resolution_errors, ..ClusterView::default() };
    for (name, node) in nodes {
        let good = &node.snapshot;
        let entry = NodeEntry {
            name: name.clone(),
            addr: node.addr,
            pods: good.pods.clone(),
            unavailable_sources: good.unavailable_sources.clone(),
            age_s: good.at.elapsed().as_secs_f64(),
            gpu_sample_age_s: good.gpu_sample_age_s,
            last_error: addresses.get(&node.addr).and_then(|a| a.last_error.clone()),
        };
        if good.at.elapsed() > grace {
            view.lost_nodes.push(entry);
        } else {
            view.nodes.push(entry);
        }
    }
    view.silent_addresses = addresses
        .iter()
        .filter(|(_, state)| state.node.is_none())
        .map(|(addr, state)| (*addr, state.last_error.clone().unwrap_or_else(|| "not polled yet".to_string())))
        .collect();
    view.silent_addresses.sort();
    view.nodes_total = view.nodes.len() + view.lost_nodes.len() + view.silent_addresses.len();
    view.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    view.lost_nodes.sort_by(|a, b| a.name.cmp(&b.name));
    view
}

#[cfg(test)]
mod tests;
