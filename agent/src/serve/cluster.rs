//! The scaler role's view of every node agent: one task resolves the node
//! addresses (a static list or a headless Service's DNS name), polls each
//! node's API in parallel with a deadline, keeps the last good snapshot of
//! an unreachable node for a grace period, then drops it, and publishes an
//! immutable `ClusterView` that KEDA calls are answered from.
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
use crate::signals::aggregate::{PodSignals, WorkloadValue};
use crate::signals::latency::decode_buckets_into;
use crate::signals::metric::{Metric, MetricSource};

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
}

impl RemotePod {
    fn window(&self, window_s: f64) -> Option<&WindowValues> {
        self.windows.iter().find(|w| (w.window_s - window_s).abs() < 1e-6)
    }
}

/// The per-port values of `window` for the given ports.
fn selected_ports<'a>(window: &'a WindowValues, ports: &'a [u16]) -> impl Iterator<Item = &'a PortValues> {
    window.ports.iter().filter(|p| u16::try_from(p.port).is_ok_and(|port| ports.contains(&port)))
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
    fn value(&self, metric: Metric, window_s: f64, ports: &[u16]) -> Option<f64> {
        let window = self.window(window_s)?;
        if ports.is_empty() || metric.source() != MetricSource::Probes {
            return window.values.get(metric.name()).copied();
        }
        // A pod serving nothing on those ports contributes 0.
        Some(selected_ports(window, ports).filter_map(|p| p.values.get(metric.name())).sum())
    }
    fn merge_latencies(&self, metric: Metric, window_s: f64, ports: &[u16], into: &mut Histogram<u32>) {
        let Some(window) = self.window(window_s) else { return };
        let mut pick = |ttft: &[u64], latency: &[u64]| match metric {
            Metric::TtftMs(_) => decode_buckets_into(ttft, into),
            Metric::LatencyMs(_) => decode_buckets_into(latency, into),
            _ => {}
        };
        if ports.is_empty() {
            return pick(&window.ttft_us, &window.latency_us);
        }
        for port in selected_ports(window, ports) {
            pick(&port.ttft_us, &port.latency_us);
        }
    }
    fn unavailable_reason(&self, metric: Metric) -> Option<&str> {
        self.unavailable.get(metric.name()).map(String::as_str)
    }
}

/// One node as the scaler sees it.
#[derive(Debug)]
pub struct NodeEntry {
    /// The agent's address.
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
    /// Nodes with a snapshot within the grace period.
    pub nodes: Vec<NodeEntry>,
    /// Node addresses resolved (covered or not).
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

    /// The reason `metric` cannot be served for pods of `namespace`: a node
    /// hosting them reports the metric's source down.
    pub fn unavailable(&self, metric: Metric, namespace: &str) -> Option<String> {
        let source = match metric.source() {
            MetricSource::Gpu => "gpu",
            MetricSource::Probes => "probes",
        };
        self.nodes.iter().find_map(|node| {
            let reason = node.unavailable_sources.get(source)?;
            node.pods
                .iter()
                .any(|pod| pod.namespace == namespace)
                .then(|| format!("{metric} is unavailable on node {}: {reason}", node.addr))
        })
    }
}

/// Handle to the cluster task: the published view and a way to ask for
/// another window.
#[derive(Clone)]
pub struct ClusterHandle {
    /// Latest view.
    pub view: watch::Receiver<Arc<ClusterView>>,
    windows: mpsc::Sender<f64>,
}

impl ClusterHandle {
    /// Makes sure snapshots carry `window_s`; returns once a view has it
    /// (or after `wait`).
    pub async fn ensure_window(&self, window_s: f64, wait: Duration) -> Arc<ClusterView> {
        let mut view = self.view.clone();
        let has = |v: &ClusterView| v.windows.iter().any(|w| (w - window_s).abs() < 1e-6);
        if has(&view.borrow()) {
            return view.borrow().clone();
        }
        let _ = self.windows.send(window_s).await;
        let _ = tokio::time::timeout(wait, async {
            while view.changed().await.is_ok() {
                if has(&view.borrow_and_update()) {
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

struct NodeState {
    client: Option<NodeSignalsClient<Channel>>,
    snapshot: Option<GoodSnapshot>,
    last_error: Option<String>,
}

/// Windows kept in the poll set: the default plus recently requested ones.
const MAX_POLLED_WINDOWS: usize = 8;

/// Starts the cluster task; it stops with `shutdown`.
pub fn spawn(config: ClusterConfig, default_window_s: f64, shutdown: CancellationToken) -> ClusterHandle {
    let (view_tx, view_rx) = watch::channel(Arc::new(ClusterView::default()));
    let (window_tx, mut window_rx) = mpsc::channel::<f64>(16);
    tokio::spawn(async move {
        let mut windows = vec![default_window_s];
        let mut nodes: HashMap<SocketAddr, NodeState> = HashMap::new();
        let mut ticker = tokio::time::interval(config.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut covered_before = usize::MAX;
        let mut tls: Option<ClientTlsConfig> = None;
        let mut tls_stamp: Option<FilesStamp> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
                Some(window) = window_rx.recv() => {
                    if !windows.iter().any(|w| (w - window).abs() < 1e-6) {
                        if windows.len() >= MAX_POLLED_WINDOWS {
                            windows.remove(1);
                        }
                        windows.push(window);
                    }
                }
            }
            let addresses = resolve(&config.nodes).await;
            nodes.retain(|addr, _| addresses.contains(addr));
            for addr in &addresses {
                nodes.entry(*addr).or_insert(NodeState { client: None, snapshot: None, last_error: None });
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
                        for state in nodes.values_mut() {
                            state.client = None;
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "node TLS files unusable; keeping the previous ones"),
                }
                tls_stamp = Some(stamp);
            }
            poll_all(&mut nodes, &windows, config.deadline, tls.as_ref()).await;
            let view = publish(&nodes, &windows, config.grace);
            if view.nodes.len() != covered_before {
                tracing::info!(covered = view.nodes.len(), total = view.nodes_total, "scaler node coverage changed");
                covered_before = view.nodes.len();
            }
            view_tx.send_replace(Arc::new(view));
        }
    });
    ClusterHandle { view: view_rx, windows: window_tx }
}

async fn resolve(entries: &[String]) -> Vec<SocketAddr> {
    let mut addresses = Vec::new();
    for entry in entries {
        match tokio::net::lookup_host(entry.as_str()).await {
            Ok(found) => addresses.extend(found),
            Err(err) => tracing::debug!(node = %entry, error = %err, "resolving node agent address"),
        }
    }
    addresses.sort_unstable();
    addresses.dedup();
    addresses
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
    nodes: &mut HashMap<SocketAddr, NodeState>,
    windows: &[f64],
    deadline: Duration,
    tls: Option<&ClientTlsConfig>,
) {
    let mut polls = tokio::task::JoinSet::new();
    for (addr, state) in nodes.iter_mut() {
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
        let Some(state) = nodes.get_mut(&addr) else { continue };
        match result {
            Ok((client, snapshot)) => {
                // Decoding thousands of pods is CPU work: keep it off the
                // async workers that answer KEDA.
                let pods = tokio::task::spawn_blocking(move || decode(snapshot.pods)).await.unwrap_or_default();
                state.client = Some(client);
                state.snapshot = Some(GoodSnapshot {
                    at: Instant::now(),
                    pods: Arc::new(pods),
                    unavailable_sources: snapshot.unavailable_sources,
                    gpu_sample_age_s: (snapshot.gpu_sample_age_s >= 0.0).then_some(snapshot.gpu_sample_age_s),
                });
                state.last_error = None;
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
        })
        .collect()
}

fn publish(nodes: &HashMap<SocketAddr, NodeState>, windows: &[f64], grace: Duration) -> ClusterView {
    let mut view = ClusterView { nodes_total: nodes.len(), windows: windows.to_vec(), ..ClusterView::default() };
    for (addr, state) in nodes {
        let Some(good) = &state.snapshot else { continue };
        if good.at.elapsed() > grace {
            continue;
        }
        view.nodes.push(NodeEntry {
            addr: *addr,
            pods: good.pods.clone(),
            unavailable_sources: good.unavailable_sources.clone(),
            age_s: good.at.elapsed().as_secs_f64(),
            gpu_sample_age_s: good.gpu_sample_age_s,
            last_error: state.last_error.clone(),
        });
    }
    view.nodes.sort_by_key(|node| node.addr);
    view
}
