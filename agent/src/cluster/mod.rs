//! The scaler role's source: its view of every node agent. One task
//! resolves the node addresses (a static list or a headless Service's DNS
//! name), polls each node's API in parallel with a deadline, and publishes
//! an immutable `ClusterView` that KEDA calls are answered from.
//!
//! A poll asks each node only for what live triggers need (`interest`):
//! the pods their selectors pick, the metrics they name, the windows they
//! use. A trigger seen for the first time starts a poll at once and waits
//! for it; nodes never asked for it cannot answer it (`Fetched::covers`).
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
pub mod interest;
mod poll;
mod snapshot_call;
pub mod view;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::ClientTlsConfig;

pub use interest::{Ask, FetchMode};
pub use view::{ClusterView, NodeEntry, RemotePod};

use crate::tls::{ClientTls, FilesStamp};
use interest::Interest;
use poll::{resolve, Nodes};

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
    /// Only what triggers ask for, or every pod.
    pub fetch: FetchMode,
}

/// Handle to the cluster task: the published view and a way to ask for
/// what a trigger needs.
#[derive(Clone)]
pub struct ClusterHandle {
    /// Latest view.
    pub view: watch::Receiver<Arc<ClusterView>>,
    nudge: mpsc::Sender<()>,
    interest: Arc<Mutex<Interest>>,
}

impl ClusterHandle {
    /// Makes sure polls carry what `ask` needs; returns once a view covers
    /// it (or after `wait`; the caller checks `coverage_error`).
    pub async fn ensure(&self, ask: &Ask<'_>, wait: Duration) -> Arc<ClusterView> {
        let new = self.interest.lock().expect("interest poisoned").note(ask);
        let mut view = self.view.clone();
        if view.borrow().covers(ask) {
            return view.borrow().clone();
        }
        if new {
            // Poll now rather than at the next tick (a full channel means a
            // poll is already due).
            let _ = self.nudge.try_send(());
        }
        let _ = tokio::time::timeout(wait, async {
            while view.changed().await.is_ok() {
                if view.borrow_and_update().covers(ask) {
                    break;
                }
            }
        })
        .await;
        let latest = view.borrow().clone();
        latest
    }
}

/// Starts the cluster task; it stops with `shutdown`.
pub fn spawn(config: ClusterConfig, default_window_s: f64, shutdown: CancellationToken) -> ClusterHandle {
    let (view_tx, view_rx) = watch::channel(Arc::new(ClusterView::default()));
    let (nudge_tx, mut nudge_rx) = mpsc::channel::<()>(1);
    let interest: Arc<Mutex<Interest>> = Arc::default();
    let asked = interest.clone();
    // The poll runs on its own runtime: decoding a thousand snapshots is a
    // burst of CPU that must not queue in front of KEDA's calls on the
    // serving runtime's workers (it did: p99 121 ms at 1,000 nodes). The
    // kernel shares the cores between the two fairly.
    let poller = async move {
        let mut nodes = Nodes::default();
        let mut ticker = tokio::time::interval(config.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut covered_before = usize::MAX;
        let mut tls: Option<ClientTlsConfig> = None;
        let mut tls_stamp: Option<FilesStamp> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
                Some(()) = nudge_rx.recv() => {}
            }
            let (request, fetched) = asked.lock().expect("interest poisoned").request(default_window_s, config.fetch);
            let (resolved, resolution_errors) = resolve(&config.nodes).await;
            nodes.set_addresses(&resolved);
            let stamp = config.node_tls.stamp();
            if tls_stamp.as_ref() != Some(&stamp) {
                match config.node_tls.config() {
                    Ok(fresh) => {
                        if tls_stamp.is_some() {
                            tracing::info!("node TLS files changed: reloaded; reconnecting to node agents");
                        }
                        tls = fresh;
                        // Connections keep the identity they were made with.
                        nodes.disconnect();
                    }
                    Err(err) => tracing::warn!(error = %err, "node TLS files unusable; keeping the previous ones"),
                }
                tls_stamp = Some(stamp);
            }
            let windows = fetched.windows.clone();
            let request = snapshot_call::EncodedRequest::new(&request);
            // Spread the calls over what the interval leaves after the
            // deadline, so a round still fits in one interval.
            let spread = config.poll_interval.saturating_sub(config.deadline);
            nodes.poll(&request, &Arc::new(fetched), config.deadline, spread, tls.as_ref()).await;
            nodes.forget_silent(config.forget);
            let view = nodes.publish(&windows, config.grace, resolution_errors);
            if view.nodes.len() != covered_before {
                tracing::info!(covered = view.nodes.len(), total = view.nodes_total, "scaler node coverage changed");
                covered_before = view.nodes.len();
            }
            view_tx.send_replace(Arc::new(view));
        }
    };
    let started = std::thread::Builder::new().name("cluster-poll".into()).spawn(move || {
        yield_to_answers();
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("cluster-poll")
            .on_thread_start(yield_to_answers)
            .enable_all()
            .build();
        match runtime {
            Ok(runtime) => runtime.block_on(poller),
            Err(err) => tracing::error!(error = %err, "cannot start the node poll: every answer will be an error"),
        }
    });
    if let Err(err) = started {
        tracing::error!(error = %err, "cannot start the node poll thread: every answer will be an error");
    }
    ClusterHandle { view: view_rx, nudge: nudge_tx, interest }
}

/// Lowers the calling thread's CPU priority (nice +10, which needs no
/// privilege). The poll's threads run so: where the scaler's cores are
/// contended, a burst of snapshot decoding then waits for KEDA's answers
/// rather than the answers for it (`bench-scaler --scaler-cpus`, docs/scaler.md).
fn yield_to_answers() {
    // SAFETY: gettid and setpriority act on the calling thread only.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 10) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "poll thread keeps its priority");
    }
}

#[cfg(test)]
mod tests;
