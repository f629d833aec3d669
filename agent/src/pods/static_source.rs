//! Pod metadata from a file (YAML or JSON): for the demo, tests and nodes
//! where the agent has no Kubernetes API access.
//!
//! ```yaml
//! pods:
//!   - uid: 7d1c2a4e-0000-4000-8000-00000000000a
//!     namespace: demo
//!     name: llm-a-0
//!     labels: { app: llm-a }
//!     owner: { kind: Deployment, name: llm-a }          # optional
//!     annotations: { podgpu.io/metrics-port: "8000" }   # optional
//!     pod_ip: 10.0.0.7                                   # optional
//!     containers:                                        # optional
//!       - { name: vllm, devices: [GPU-8f6c...] }
//! ```
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use serde::Deserialize;

use super::{ContainerMeta, Owner, PodMeta};

/// Failure to read the metadata file.
#[derive(Debug, thiserror::Error)]
#[error("pod metadata file {path}: {reason}")]
pub struct StaticSourceError {
    path: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    pods: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    uid: String,
    namespace: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    owner: Option<Owner>,
    #[serde(default)]
    containers: Vec<ContainerMeta>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    pod_ip: Option<String>,
}

/// Reads `path` into metadata keyed by pod UID.
pub fn load(path: &Path) -> Result<HashMap<String, PodMeta>, StaticSourceError> {
    let error = |reason: String| StaticSourceError { path: path.display().to_string(), reason };
    let text = fs::read_to_string(path).map_err(|err| error(err.to_string()))?;
    // YAML is a superset of JSON, so one parser reads both.
    let file: File = serde_yaml::from_str(&text).map_err(|err| error(err.to_string()))?;
    let mut pods = HashMap::new();
    for entry in file.pods {
        let uid = entry.uid.to_ascii_lowercase();
        let meta = PodMeta {
            uid: uid.clone(),
            namespace: Some(entry.namespace),
            name: Some(entry.name),
            labels: entry.labels,
            owner: entry.owner,
            containers: entry.containers,
            annotations: entry.annotations,
            pod_ip: entry.pod_ip,
        };
        if pods.insert(uid.clone(), meta).is_some() {
            return Err(error(format!("pod uid {uid} listed twice")));
        }
    }
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// YAML and JSON both load; labels are kept; UIDs are normalised.
    #[test]
    fn loads_yaml_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("pods.yaml");
        fs::write(&yaml, "pods:\n  - uid: AAAAAAAA-0000-4000-8000-000000000001\n    namespace: ns\n    name: p\n    labels: {app: x}\n").unwrap();
        let pods = load(&yaml).unwrap();
        let pod = &pods["aaaaaaaa-0000-4000-8000-000000000001"];
        assert_eq!(pod.name.as_deref(), Some("p"));
        assert_eq!(pod.labels["app"], "x");

        let json = dir.path().join("pods.json");
        fs::write(&json, r#"{"pods":[{"uid":"u1","namespace":"n","name":"a"}]}"#).unwrap();
        assert_eq!(load(&json).unwrap()["u1"].namespace.as_deref(), Some("n"));
    }

    /// Duplicates and unknown fields are errors that name the file.
    #[test]
    fn rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        fs::write(&path, "pods:\n  - {uid: u, namespace: n, name: a}\n  - {uid: u, namespace: n, name: b}\n").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("listed twice") && err.contains("bad.yaml"), "{err}");
        fs::write(&path, "pods:\n  - {uid: u, namespace: n, name: a, nodeName: x}\n").unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("unknown field"));
    }
}
