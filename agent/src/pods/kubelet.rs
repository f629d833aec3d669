//! Which devices (GPU UUIDs, `UUID::n` time-slice replicas, `MIG-...`)
//! kubelet gave each container, from its pod-resources API (gRPC on a unix
//! socket, v1 `List`, and `Get` for single pods where kubelet has it).
//!
//! One task owns the connection: it lists every `interval`, answers
//! refresh hints (a new pod appeared) with `Get` (falling back to `List`
//! when kubelet answers Unimplemented), and reconnects with backoff when
//! kubelet restarts. The socket file is replaced on every kubelet restart,
//! which is why the chart mounts its directory, not the file. Assignments
//! are published whole on a watch channel; the last good ones are kept,
//! marked degraded, while kubelet is away.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use podgpu_proto::podresources::pod_resources_lister_client::PodResourcesListerClient;
use podgpu_proto::podresources::{GetPodResourcesRequest, ListPodResourcesRequest, PodResources};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::backoff::backoff;
use crate::status::SourceStatus;

/// The kubelet's default socket.
pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
/// One kubelet call's deadline: it answers from memory.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Device ids per container name, for one pod.
pub type ContainerDevices = HashMap<String, Vec<String>>;

/// What kubelet said, keyed by (namespace, pod name): pod-resources has no
/// pod UID.
#[derive(Clone, Debug)]
pub struct Assignments {
    /// Health of the kubelet connection.
    pub status: SourceStatus,
    /// Devices per container per pod; only pods with devices appear.
    pub pods: HashMap<(String, String), ContainerDevices>,
}

impl Default for Assignments {
    fn default() -> Self {
        Self { status: SourceStatus::Degraded { reason: "kubelet not asked yet".to_string() }, pods: HashMap::new() }
    }
}

/// Where and how often to ask.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// The pod-resources socket.
    pub socket: PathBuf,
    /// Time between full `List` calls.
    pub interval: Duration,
}

/// A request to refresh one pod's devices (namespace, name) now.
pub type RefreshHint = (String, String);

/// Starts the task; it ends at `shutdown`.
pub fn spawn(
    config: KubeletConfig,
    shutdown: CancellationToken,
) -> (watch::Receiver<Arc<Assignments>>, mpsc::Sender<RefreshHint>) {
    let (publish, assignments) = watch::channel(Arc::new(Assignments::default()));
    let (hint_tx, hint_rx) = mpsc::channel(64);
    tokio::spawn(run(config, publish, hint_rx, shutdown));
    (assignments, hint_tx)
}

/// Why a kubelet call failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// The socket could not be dialled.
    #[error("connecting to kubelet at {socket}: {source}")]
    Connect {
        /// The socket.
        socket: String,
        /// Transport error.
        source: tonic::transport::Error,
    },
    /// The call failed.
    #[error("kubelet {call}: {} ({:?})", status.message(), status.code())]
    Call {
        /// `List` or `Get`.
        call: &'static str,
        /// gRPC status.
        status: tonic::Status,
    },
    /// No answer within the deadline.
    #[error("kubelet {0}: no answer within {CALL_TIMEOUT:?}")]
    Timeout(&'static str),
}

/// A connected pod-resources client.
#[derive(Clone, Debug)]
pub struct KubeletClient {
    client: PodResourcesListerClient<Channel>,
    /// Cleared after kubelet answers `Get` with Unimplemented.
    get_supported: bool,
}

impl KubeletClient {
    /// Dials the unix socket.
    pub async fn connect(socket: PathBuf) -> Result<Self, KubeletError> {
        let display = socket.display().to_string();
        // The URI is required by tonic but unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://kubelet.local")
            .connect_timeout(CALL_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { UnixStream::connect(socket).await.map(TokioIo::new) }
            }))
            .await
            .map_err(|source| KubeletError::Connect { socket: display, source })?;
        Ok(Self { client: PodResourcesListerClient::new(channel), get_supported: true })
    }

    /// Every pod's devices.
    pub async fn list(&mut self) -> Result<HashMap<(String, String), ContainerDevices>, KubeletError> {
        let call = self.client.list(ListPodResourcesRequest {});
        let response = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| KubeletError::Timeout("List"))?
            .map_err(|status| KubeletError::Call { call: "List", status })?;
        Ok(response.into_inner().pod_resources.into_iter().filter_map(devices_of).collect())
    }

    /// One pod's devices; `Ok(None)` when kubelet does not implement `Get`
    /// (before Kubernetes 1.27, or with the feature gate off).
    pub async fn get(&mut self, namespace: &str, name: &str) -> Result<Option<ContainerDevices>, KubeletError> {
        if !self.get_supported {
            return Ok(None);
        }
        let request = GetPodResourcesRequest { pod_name: name.to_string(), pod_namespace: namespace.to_string() };
        let answer = tokio::time::timeout(CALL_TIMEOUT, self.client.get(request))
            .await
            .map_err(|_| KubeletError::Timeout("Get"))?;
        match answer {
            Ok(response) => Ok(Some(
                response
                    .into_inner()
                    .pod_resources
                    .and_then(devices_of)
                    .map(|(_, devices)| devices)
                    .unwrap_or_default(),
            )),
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                tracing::info!("kubelet does not implement pod-resources Get; using List for new pods");
                self.get_supported = false;
                Ok(None)
            }
            Err(status) => Err(KubeletError::Call { call: "Get", status }),
        }
    }
}

/// GPU-like devices of one pod; `None` when it holds none. CPU and memory
/// assignments (also in pod-resources) are not podgpu's business.
fn devices_of(pod: PodResources) -> Option<((String, String), ContainerDevices)> {
    let mut containers = ContainerDevices::new();
    for container in pod.containers {
        let ids: Vec<String> = container
            .devices
            .into_iter()
            .filter(|d| is_gpu_resource(&d.resource_name))
            .flat_map(|d| d.device_ids)
            .collect();
        if !ids.is_empty() {
            containers.insert(container.name, ids);
        }
    }
    (!containers.is_empty()).then_some(((pod.namespace, pod.name), containers))
}

/// `nvidia.com/gpu`, `nvidia.com/mig-1g.10gb`, `nvidia.com/gpu.shared`,
/// and other vendors' `<vendor>/gpu`.
fn is_gpu_resource(name: &str) -> bool {
    name.starts_with("nvidia.com/") || name.ends_with("/gpu")
}

async fn run(
    config: KubeletConfig,
    publish: watch::Sender<Arc<Assignments>>,
    mut hints: mpsc::Receiver<RefreshHint>,
    shutdown: CancellationToken,
) {
    let mut client: Option<KubeletClient> = None;
    let mut failures: u32 = 0;
    let mut pods: HashMap<(String, String), ContainerDevices> = HashMap::new();
    let mut next_list = tokio::time::Instant::now();
    loop {
        let hint = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next_list) => None,
            Some(hint) = hints.recv() => {
                // While kubelet is away, hints wait for the backoff's next try.
                if failures > 0 {
                    continue;
                }
                Some(hint)
            }
        };
        let outcome = async {
            if client.is_none() {
                client = Some(KubeletClient::connect(config.socket.clone()).await?);
            }
            let connected = client.as_mut().expect("connected above");
            if let Some((namespace, name)) = &hint {
                if let Some(devices) = connected.get(namespace, name).await? {
                    let key = (namespace.clone(), name.clone());
                    if devices.is_empty() {
                        pods.remove(&key);
                    } else {
                        pods.insert(key, devices);
                    }
                    return Ok::<_, KubeletError>(());
                }
            }
            pods = connected.list().await?;
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => {
                if failures > 0 || !publish.borrow().status.is_ok() {
                    tracing::info!(socket = %config.socket.display(), pods = pods.len(), "kubelet pod-resources connected");
                }
                failures = 0;
                if hint.is_none() {
                    next_list = tokio::time::Instant::now() + config.interval;
                }
                let status =
                    SourceStatus::Ok { detail: format!("kubelet pod-resources at {}", config.socket.display()) };
                publish.send_replace(Arc::new(Assignments { status, pods: pods.clone() }));
            }
            Err(err) => {
                // Kubelet restarted or is gone: redial next time.
                client = None;
                let retry_in = backoff(config.interval, failures, MAX_BACKOFF);
                if failures == 0 {
                    tracing::warn!(error = %err, retry_in_s = retry_in.as_secs_f64(), "kubelet pod-resources unavailable: GPU devices per container keep their last known values");
                }
                failures = failures.saturating_add(1);
                next_list = tokio::time::Instant::now() + retry_in;
                let status = SourceStatus::Degraded { reason: err.to_string() };
                publish.send_replace(Arc::new(Assignments { status, pods: pods.clone() }));
            }
        }
    }
}
