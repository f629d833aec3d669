//! Pod identity: which pod (and container) a cgroup or a host pid belongs to,
//! and what we know about that pod (namespace, name, labels, owner,
//! containers and the GPUs they were given).
//!
//! Identity sources: the cgroup v2 tree (cgroup id -> pod, for the eBPF
//! side) and `/proc/PID/cgroup` through a (pid, start time) cache (pid ->
//! pod, for NVML's host pids). Metadata sources, each optional: the
//! Kubernetes API (`kube_api`), kubelet pod-resources (`kubelet`) and a
//! static file (`static_source`), merged per pod by `directory`. Pods no
//! source knows carry their UID (and cgroup) only.
pub mod cgroup_path;
pub mod cgroup_tree;
pub mod directory;
pub mod kube_api;
pub mod kubelet;
pub mod occupancy;
pub mod pid_cache;
pub mod selector;
pub mod static_source;

use std::collections::BTreeMap;

/// What is known about one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PodMeta {
    /// Pod UID (lowercase, dashed).
    pub uid: String,
    /// Namespace, when a metadata source knows the pod.
    pub namespace: Option<String>,
    /// Pod name, when a metadata source knows the pod.
    pub name: Option<String>,
    /// Pod labels (empty when unknown).
    pub labels: BTreeMap<String, String>,
    /// The workload that owns the pod (Deployment, StatefulSet, Job, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// Containers, with their runtime ids and devices where known.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<ContainerMeta>,
    /// The annotations engine discovery reads (`engines::discovery`);
    /// others are not kept.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The pod's IP, where a metadata source knows it (a `hostNetwork`
    /// pod's is its node's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
}

/// A pod's controlling owner, resolved to the workload where the chain is
/// known (a ReplicaSet made by a Deployment becomes the Deployment).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `ReplicaSet`, ...
    pub kind: String,
    /// Its name.
    pub name: String,
}

/// One container of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerMeta {
    /// Container name from the pod spec.
    pub name: String,
    /// Runtime container id (64 hex digits, no `containerd://` prefix), as
    /// the container's cgroup is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Device ids kubelet gave it (GPU UUIDs, `UUID::n` time-slice
    /// replicas, `MIG-...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

impl PodMeta {
    /// Metadata of a pod nothing is known about but its UID.
    pub fn unknown(uid: &str) -> Self {
        Self { uid: uid.to_string(), ..Self::default() }
    }

    /// The container whose signals a pod-level series stands for: the one
    /// holding GPUs when exactly one does, else the only container.
    pub fn main_container(&self) -> Option<&ContainerMeta> {
        let mut with_devices = self.containers.iter().filter(|c| !c.devices.is_empty());
        match (with_devices.next(), with_devices.next()) {
            (Some(only), None) => Some(only),
            (Some(_), Some(_)) => None,
            (None, _) => match self.containers.as_slice() {
                [only] => Some(only),
                _ => None,
            },
        }
    }

    /// Every device the pod's containers were given, sorted, without the
    /// `::n` time-slicing replica suffix (replicas of one GPU are one GPU).
    pub fn gpus(&self) -> Vec<&str> {
        let mut gpus: Vec<&str> = self
            .containers
            .iter()
            .flat_map(|c| c.devices.iter())
            .map(|id| id.split_once("::").map_or(id.as_str(), |(uuid, _)| uuid))
            .collect();
        gpus.sort_unstable();
        gpus.dedup();
        gpus
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, devices: &[&str]) -> ContainerMeta {
        ContainerMeta { name: name.into(), id: None, devices: devices.iter().map(|d| d.to_string()).collect() }
    }

    /// The main container is the GPU holder, else the only container;
    /// replica suffixes fold into one GPU.
    #[test]
    fn main_container_and_gpus() {
        let mut pod = PodMeta::unknown("u");
        assert!(pod.main_container().is_none());
        pod.containers = vec![container("server", &[])];
        assert_eq!(pod.main_container().unwrap().name, "server");
        pod.containers = vec![container("proxy", &[]), container("vllm", &["GPU-a::1", "GPU-a::3", "MIG-b"])];
        assert_eq!(pod.main_container().unwrap().name, "vllm");
        assert_eq!(pod.gpus(), vec!["GPU-a", "MIG-b"]);
        pod.containers.push(container("other", &["GPU-c"]));
        assert!(pod.main_container().is_none(), "two GPU containers: no single main one");
        assert_eq!(pod.gpus(), vec!["GPU-a", "GPU-c", "MIG-b"]);
    }
}
