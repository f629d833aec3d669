//! One round of the scaler's poll: resolve the node entries, ask every
//! node agent for its snapshot in parallel with a deadline, keep each
//! node's last good snapshot by name, and publish a `ClusterView`.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::{ClientTlsConfig, Endpoint};

use super::interest::Fetched;
use super::snapshot_call::{EncodedRequest, SnapshotClient};
use super::view::{ClusterView, NodeEntry, RemotePod};

/// Snapshots with at most this many pods are decoded on the poll task.
const INLINE_DECODE_PODS: usize = 32;

/// A node's last good snapshot, decoded.
pub(super) struct GoodSnapshot {
    pub(super) at: Instant,
    pub(super) pods: Arc<Vec<RemotePod>>,
    pub(super) fetched: Arc<Fetched>,
    pub(super) unavailable_sources: HashMap<String, String>,
    pub(super) gpu_sample_age_s: Option<f64>,
}

/// One resolved address of a node agent.
#[derive(Default)]
pub(super) struct AddressState {
    pub(super) client: Option<SnapshotClient>,
    /// The node that last answered here.
    pub(super) node: Option<String>,
    pub(super) last_error: Option<String>,
}

/// One node, by name.
pub(super) struct NodeState {
    pub(super) addr: SocketAddr,
    pub(super) snapshot: GoodSnapshot,
}

/// Every node agent the scaler knows of, by address and by name.
#[derive(Default)]
pub(super) struct Nodes {
    pub(super) addresses: HashMap<SocketAddr, AddressState>,
    pub(super) by_name: HashMap<String, NodeState>,
}

impl Nodes {
    /// Makes the address set what resolution found.
    pub(super) fn set_addresses(&mut self, resolved: &[SocketAddr]) {
        self.addresses.retain(|addr, _| resolved.contains(addr));
        for addr in resolved {
            self.addresses.entry(*addr).or_default();
        }
    }

    /// Drops every connection (new TLS identity).
    pub(super) fn disconnect(&mut self) {
        for state in self.addresses.values_mut() {
            state.client = None;
        }
    }

    /// Polls every address once, in parallel, each within `deadline`; the
    /// calls start spread over `spread` so a thousand answers do not land
    /// (and need decoding) in the same millisecond.
    pub(super) async fn poll(
        &mut self,
        request: &EncodedRequest,
        fetched: &Arc<Fetched>,
        deadline: Duration,
        spread: Duration,
        tls: Option<&ClientTlsConfig>,
    ) {
        let mut polls = tokio::task::JoinSet::new();
        let count = self.addresses.len().max(1);
        for (position, (addr, state)) in self.addresses.iter().enumerate() {
            let addr = *addr;
            let client = state.client.clone();
            let request = request.clone();
            let tls = tls.cloned();
            let start_after = spread.mul_f64(position as f64 / count as f64);
            polls.spawn(async move {
                tokio::time::sleep(start_after).await;
                let result = tokio::time::timeout(deadline, async {
                    let mut client = match client {
                        Some(client) => client,
                        None => {
                            let endpoint = node_endpoint(addr, tls.as_ref(), deadline)?;
                            SnapshotClient::new(endpoint.connect().await.map_err(|e| error_chain(&e))?)
                        }
                    };
                    let snapshot = client.snapshot(&request).await.map_err(|status| status.message().to_string())?;
                    Ok::<_, String>((client, snapshot))
                })
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {deadline:?}")));
                (addr, result)
            });
        }
        while let Some(joined) = polls.join_next().await {
            let Ok((addr, result)) = joined else { continue };
            let Some(state) = self.addresses.get_mut(&addr) else { continue };
            match result {
                Ok((client, snapshot)) => {
                    let name = if snapshot.node.is_empty() { addr.to_string() } else { snapshot.node.clone() };
                    let decode = |pods: Vec<podgpu_proto::node::PodSignals>| {
                        pods.into_iter().map(RemotePod::decode).collect::<Vec<_>>()
                    };
                    // Decoding thousands of pods is CPU work: keep it off the
                    // async workers that answer KEDA. A handful (what a
                    // selection usually brings) is cheaper than the hand-off.
                    let pods = if snapshot.pods.len() <= INLINE_DECODE_PODS {
                        decode(snapshot.pods)
                    } else {
                        tokio::task::spawn_blocking(move || decode(snapshot.pods)).await.unwrap_or_default()
                    };
                    state.client = Some(client);
                    state.last_error = None;
                    if let Some(previous) = self.by_name.get(&name).filter(|node| node.addr != addr) {
                        tracing::info!(node = %name, old = %previous.addr, new = %addr, "node agent answers on a new address");
                    }
                    state.node = Some(name.clone());
                    let snapshot = GoodSnapshot {
                        at: Instant::now(),
                        pods: Arc::new(pods),
                        fetched: fetched.clone(),
                        unavailable_sources: snapshot.unavailable_sources,
                        gpu_sample_age_s: (snapshot.gpu_sample_age_s >= 0.0).then_some(snapshot.gpu_sample_age_s),
                    };
                    self.by_name.insert(name, NodeState { addr, snapshot });
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

    /// Forgets nodes silent for longer than `forget`.
    pub(super) fn forget_silent(&mut self, forget: Duration) {
        self.by_name.retain(|name, node| {
            let keep = node.snapshot.at.elapsed() <= forget;
            if !keep {
                tracing::warn!(node = %name, "node agent silent past the forget period: its pods no longer hold answers back");
            }
            keep
        });
    }

    /// The view of what the last polls found.
    pub(super) fn publish(&self, windows: &[f64], grace: Duration, resolution_errors: Vec<String>) -> ClusterView {
        let mut view =
            ClusterView { polled: true, windows: windows.to_vec(), resolution_errors, ..ClusterView::default() };
        for (name, node) in &self.by_name {
            let good = &node.snapshot;
            let entry = NodeEntry {
                name: name.clone(),
                addr: node.addr,
                pods: good.pods.clone(),
                fetched: good.fetched.clone(),
                unavailable_sources: good.unavailable_sources.clone(),
                age_s: good.at.elapsed().as_secs_f64(),
                gpu_sample_age_s: good.gpu_sample_age_s,
                last_error: match self.addresses.get(&node.addr) {
                    Some(address) => address.last_error.clone(),
                    None => Some("its address no longer resolves".to_string()),
                },
            };
            if good.at.elapsed() > grace {
                view.lost_nodes.push(entry);
            } else {
                view.nodes.push(entry);
            }
        }
        for entry in view.nodes.iter().chain(&view.lost_nodes) {
            if !view.fetches.iter().any(|fetched| Arc::ptr_eq(fetched, &entry.fetched)) {
                view.fetches.push(entry.fetched.clone());
            }
        }
        view.silent_addresses = self
            .addresses
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
}

/// Resolves every entry; entries that fail are returned as errors (a DNS
/// blip must not make nodes disappear silently).
pub(super) async fn resolve(entries: &[String]) -> (Vec<SocketAddr>, Vec<String>) {
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
