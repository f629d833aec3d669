//! Pod metadata from the Kubernetes API: a kube-rs watcher on pods with
//! `spec.nodeName=<this node>`, so each agent holds only its node's pods
//! (a field selector the API server evaluates; the RBAC needed is `get`,
//! `list`, `watch` on pods). Name, namespace, labels, the owning workload
//! and container names with their runtime ids come from here.
//!
//! The watcher relists after a broken watch (kube-rs backoff); the pod set
//! is replaced atomically when a relist completes, so pods deleted while
//! the watch was down do not linger. Published whole on a watch channel.
use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::{ContainerMeta, Owner, PodMeta};
use crate::status::SourceStatus;

/// How the agent reaches the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KubeAccess {
    /// In-cluster (service account) when `KUBERNETES_SERVICE_HOST` is set,
    /// otherwise off.
    Auto,
    /// No API access: pods carry what the static file and kubelet say.
    Off,
    /// A kubeconfig file (development, tests).
    Kubeconfig(PathBuf),
}

impl FromStr for KubeAccess {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            _ => match text.strip_prefix("kubeconfig:") {
                Some(path) if !path.is_empty() => Ok(Self::Kubeconfig(PathBuf::from(path))),
                _ => Err(format!("{text:?}: expected auto, off or kubeconfig:PATH")),
            },
        }
    }
}

/// The node's pods as the API server sees them, by UID.
#[derive(Clone, Debug)]
pub struct KubePods {
    /// Health of the watch.
    pub status: SourceStatus,
    /// Pods of this node.
    pub pods: HashMap<String, PodMeta>,
}

/// Starts the watcher for `node`; `None` when access is off (and says so).
pub async fn spawn(
    access: &KubeAccess,
    node: &str,
    shutdown: CancellationToken,
) -> Option<watch::Receiver<Arc<KubePods>>> {
    let config = match access {
        KubeAccess::Off => return None,
        KubeAccess::Auto if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() => {
            tracing::info!("not in a cluster (no KUBERNETES_SERVICE_HOST): no Kubernetes API metadata");
            return None;
        }
        KubeAccess::Auto => kube::Config::incluster().map_err(|err| err.to_string()),
        KubeAccess::Kubeconfig(path) => match kube::config::Kubeconfig::read_from(path) {
            Ok(kubeconfig) => kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|err| err.to_string()),
            Err(err) => Err(format!("{}: {err}", path.display())),
        },
    };
    let initial =
        |reason: String| Arc::new(KubePods { status: SourceStatus::Degraded { reason }, pods: HashMap::new() });
    let client = match config.and_then(|config| Client::try_from(config).map_err(|err| err.to_string())) {
        Ok(client) => client,
        Err(reason) => {
            tracing::warn!(error = %reason, "Kubernetes API unusable: pods carry static and kubelet metadata only");
            let (_, receiver) = watch::channel(initial(format!("Kubernetes API client: {reason}")));
            return Some(receiver);
        }
    };
    let (publish, receiver) = watch::channel(initial("listing pods".to_string()));
    tokio::spawn(run(client, node.to_string(), publish, shutdown));
    Some(receiver)
}

async fn run(client: Client, node: String, publish: watch::Sender<Arc<KubePods>>, shutdown: CancellationToken) {
    let pods_api: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let mut events = std::pin::pin!(watcher(pods_api, watcher::Config::default().fields(&selector)).default_backoff());
    let mut pods: HashMap<String, PodMeta> = HashMap::new();
    let mut relisting: Option<HashMap<String, PodMeta>> = None;
    let mut failing = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => match event {
                Some(event) => event,
                None => return,
            },
        };
        let status = match event {
            Ok(Event::Init) => {
                relisting = Some(HashMap::new());
                continue;
            }
            Ok(Event::InitApply(pod)) => {
                if let (Some(buffer), Some(meta)) = (relisting.as_mut(), pod_meta(&pod)) {
                    buffer.insert(meta.uid.clone(), meta);
                }
                continue;
            }
            Ok(Event::InitDone) => {
                pods = relisting.take().unwrap_or_default();
                if std::mem::take(&mut failing) {
                    tracing::info!(pods = pods.len(), "Kubernetes API watch recovered");
                } else {
                    tracing::info!(pods = pods.len(), node = %node, "watching this node's pods in the Kubernetes API");
                }
                SourceStatus::Ok { detail: format!("Kubernetes API, {selector}") }
            }
            Ok(Event::Apply(pod)) => {
                if let Some(meta) = pod_meta(&pod) {
                    pods.insert(meta.uid.clone(), meta);
                }
                SourceStatus::Ok { detail: format!("Kubernetes API, {selector}") }
            }
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    pods.remove(uid);
                }
                SourceStatus::Ok { detail: format!("Kubernetes API, {selector}") }
            }
            Err(err) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %err, "Kubernetes API watch failing; retrying with backoff, keeping known pods");
                }
                SourceStatus::Degraded { reason: format!("Kubernetes API watch: {err}") }
            }
        };
        publish.send_replace(Arc::new(KubePods { status, pods: pods.clone() }));
    }
}

/// The metadata podgpu keeps of one API pod; `None` without a UID.
pub fn pod_meta(pod: &Pod) -> Option<PodMeta> {
    let metadata = &pod.metadata;
    let uid = metadata.uid.as_ref()?.to_ascii_lowercase();
    let labels = metadata.labels.clone().unwrap_or_default();
    let owner = metadata
        .owner_references
        .as_ref()
        .and_then(|owners| owners.iter().find(|o| o.controller == Some(true)))
        .map(|controller| workload_of(&controller.kind, &controller.name, labels.get("pod-template-hash")));
    let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref());
    let container_id =
        |name: &str| statuses?.iter().find(|s| s.name == name)?.container_id.as_deref().map(strip_runtime_scheme);
    let containers = pod
        .spec
        .as_ref()
        .map(|spec| {
            spec.containers
                .iter()
                .map(|c| ContainerMeta { name: c.name.clone(), id: container_id(&c.name), devices: Vec::new() })
                .collect()
        })
        .unwrap_or_default();
    let annotations = metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(key, _)| crate::engines::discovery::is_hint_key(key))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    // A hostNetwork pod's IP is its node's, which reaches it as well.
    let pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
    Some(PodMeta {
        uid,
        namespace: metadata.namespace.clone(),
        name: metadata.name.clone(),
        labels,
        owner,
        containers,
        annotations,
        pod_ip,
    })
}

/// A ReplicaSet named `<deployment>-<pod-template-hash>` stands for its
/// Deployment: that is the workload a ScaledObject targets.
fn workload_of(kind: &str, name: &str, template_hash: Option<&String>) -> Owner {
    if kind == "ReplicaSet" {
        if let Some(deployment) = template_hash.and_then(|hash| name.strip_suffix(&format!("-{hash}"))) {
            return Owner { kind: "Deployment".to_string(), name: deployment.to_string() };
        }
    }
    Owner { kind: kind.to_string(), name: name.to_string() }
}

/// `containerd://<id>` -> `<id>` (also `cri-o://`, `docker://`).
fn strip_runtime_scheme(id: &str) -> String {
    id.split_once("://").map_or(id, |(_, bare)| bare).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An API pod becomes metadata with its workload and container ids.
    #[test]
    fn pod_meta_from_api_object() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "uid": "7D1C2A4E-0000-4000-8000-00000000000A", "namespace": "ml", "name": "vllm-7d9f-abcde",
                "labels": {"app": "vllm", "pod-template-hash": "7d9f"},
                "annotations": {"podgpu.io/metrics-port": "9090", "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "vllm-7d9f", "uid": "x", "controller": true}
                ]
            },
            "spec": {"containers": [{"name": "server"}, {"name": "sidecar"}]},
            "status": {"podIP": "10.4.0.17", "containerStatuses": [{
                "name": "server", "containerID": "containerd://abc123", "image": "i", "imageID": "",
                "ready": true, "restartCount": 0
            }]}
        }))
        .unwrap();
        let meta = pod_meta(&pod).unwrap();
        assert_eq!(meta.uid, "7d1c2a4e-0000-4000-8000-00000000000a");
        assert_eq!(meta.owner, Some(Owner { kind: "Deployment".into(), name: "vllm".into() }));
        assert_eq!(meta.containers[0].id.as_deref(), Some("abc123"));
        assert_eq!(meta.containers[1].id, None);
        assert_eq!(meta.pod_ip.as_deref(), Some("10.4.0.17"));
        let kept: Vec<&str> = meta.annotations.keys().map(String::as_str).collect();
        assert_eq!(kept, ["podgpu.io/metrics-port"], "only the annotations discovery reads are kept");
        assert_eq!(workload_of("StatefulSet", "db", None), Owner { kind: "StatefulSet".into(), name: "db".into() });
        assert_eq!(workload_of("ReplicaSet", "odd", Some(&"zz".to_string())).kind, "ReplicaSet");
    }

    /// The access flag parses its three forms and rejects others.
    #[test]
    fn access_parses() {
        assert_eq!("auto".parse(), Ok(KubeAccess::Auto));
        assert_eq!("off".parse(), Ok(KubeAccess::Off));
        assert_eq!("kubeconfig:/k".parse(), Ok(KubeAccess::Kubeconfig("/k".into())));
        assert!("kubeconfig:".parse::<KubeAccess>().is_err());
        assert!("yes".parse::<KubeAccess>().is_err());
    }
}
