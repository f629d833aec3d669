//! Pod identity: which pod (and container) a cgroup or a host pid belongs to,
//! and what we know about that pod (namespace, name, labels).
//!
//! Sources: the cgroup v2 tree (always), `/proc/PID/cgroup` for GPU
//! processes, and pod metadata from a static file. Pods found only in the
//! cgroup tree carry their UID and nothing else.
pub mod cgroup_path;
pub mod cgroup_tree;
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
}
