//! Merges the pod metadata sources into one `PodMeta` per pod UID, for the
//! collector to stamp on every pod it tracks.
//!
//! Precedence: the Kubernetes API (live) over the static file (demo,
//! clusters without API access) over nothing (UID only). Devices come from
//! kubelet pod-resources, joined by (namespace, name) since pod-resources
//! carries no UID, and replace the devices a static file lists for the
//! same container.
use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::kube_api::KubePods;
use super::kubelet::{Assignments, RefreshHint};
use super::{ContainerMeta, PodMeta};
use crate::status::SourceStatus;

/// The metadata sources the agent was started with.
#[derive(Debug, Default)]
pub struct Directory {
    static_pods: HashMap<String, PodMeta>,
    kube: Option<watch::Receiver<Arc<KubePods>>>,
    kubelet: Option<watch::Receiver<Arc<Assignments>>>,
    kubelet_hints: Option<mpsc::Sender<RefreshHint>>,
}

impl Directory {
    /// A directory over the given sources; any may be absent.
    pub fn new(
        static_pods: HashMap<String, PodMeta>,
        kube: Option<watch::Receiver<Arc<KubePods>>>,
        kubelet: Option<(watch::Receiver<Arc<Assignments>>, mpsc::Sender<RefreshHint>)>,
    ) -> Self {
        let (kubelet, kubelet_hints) = kubelet.map_or((None, None), |(rx, hints)| (Some(rx), Some(hints)));
        Self { static_pods, kube, kubelet, kubelet_hints }
    }

    /// Whether a live source published since the last call.
    pub fn refresh(&mut self) -> bool {
        let mut changed = false;
        if let Some(kube) = self.kube.as_mut() {
            changed |= kube.has_changed().unwrap_or(false);
            kube.mark_unchanged();
        }
        if let Some(kubelet) = self.kubelet.as_mut() {
            changed |= kubelet.has_changed().unwrap_or(false);
            kubelet.mark_unchanged();
        }
        changed
    }

    /// Everything known about pod `uid`.
    pub fn meta(&self, uid: &str) -> PodMeta {
        let from_api = self.kube.as_ref().and_then(|kube| kube.borrow().pods.get(uid).cloned());
        let mut meta = from_api.or_else(|| self.static_pods.get(uid).cloned()).unwrap_or_else(|| PodMeta::unknown(uid));
        if let (Some(kubelet), Some(namespace), Some(name)) = (&self.kubelet, &meta.namespace, &meta.name) {
            let key = (namespace.clone(), name.clone());
            if let Some(devices) = kubelet.borrow().pods.get(&key) {
                for (container, ids) in devices {
                    match meta.containers.iter_mut().find(|c| &c.name == container) {
                        Some(known) => known.devices = ids.clone(),
                        None => meta.containers.push(ContainerMeta {
                            name: container.clone(),
                            id: None,
                            devices: ids.clone(),
                        }),
                    }
                }
                meta.containers.sort_by(|a, b| a.name.cmp(&b.name));
            }
        }
        meta
    }

    /// Asks kubelet for a new pod's devices now instead of at the next list.
    pub fn request_devices(&self, meta: &PodMeta) {
        if let (Some(hints), Some(namespace), Some(name)) = (&self.kubelet_hints, &meta.namespace, &meta.name) {
            // A full hint queue means a list is due anyway.
            let _ = hints.try_send((namespace.clone(), name.clone()));
        }
    }

    /// Health of the Kubernetes API and kubelet sources.
    pub fn health(&self) -> (SourceStatus, SourceStatus) {
        let kube = self.kube.as_ref().map_or(SourceStatus::Disabled, |kube| kube.borrow().status.clone());
        let kubelet = self.kubelet.as_ref().map_or(SourceStatus::Disabled, |kubelet| kubelet.borrow().status.clone());
        (kube, kubelet)
    }

    /// Whether pod names and labels come from the Kubernetes API (so a
    /// pod found without them is waiting for the watch, not unknown).
    pub fn watches_api(&self) -> bool {
        self.kube.is_some()
    }

    /// Pods the API watch knows (for the churn check: none may linger).
    pub fn api_pods(&self) -> usize {
        self.kube.as_ref().map_or(0, |kube| kube.borrow().pods.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::kubelet::ContainerDevices;

    fn pod(uid: &str, name: &str, label: &str) -> PodMeta {
        PodMeta {
            uid: uid.into(),
            namespace: Some("ml".into()),
            name: Some(name.into()),
            labels: [("app".to_string(), label.to_string())].into(),
            ..PodMeta::default()
        }
    }

    /// The API wins over the static file, kubelet devices join by name,
    /// unknown pods carry their UID, and changes are noticed once.
    #[test]
    fn merges_sources_by_precedence() {
        let static_pods = HashMap::from([
            ("a".to_string(), pod("a", "llm-a", "static")),
            ("b".to_string(), pod("b", "llm-b", "static")),
        ]);
        let (kube_tx, kube_rx) = watch::channel(Arc::new(KubePods {
            status: SourceStatus::Ok { detail: "api".into() },
            pods: HashMap::from([("a".to_string(), pod("a", "llm-a", "api"))]),
        }));
        let devices: ContainerDevices = HashMap::from([("vllm".to_string(), vec!["GPU-1::0".to_string()])]);
        let (kubelet_tx, kubelet_rx) = watch::channel(Arc::new(Assignments {
            status: SourceStatus::Ok { detail: "kubelet".into() },
            pods: HashMap::from([(("ml".to_string(), "llm-b".to_string()), devices)]),
        }));
        let (hints, mut hint_rx) = mpsc::channel(4);
        let mut directory = Directory::new(static_pods, Some(kube_rx), Some((kubelet_rx, hints)));

        assert_eq!(directory.meta("a").labels["app"], "api");
        let b = directory.meta("b");
        assert_eq!(b.labels["app"], "static");
        assert_eq!(b.containers[0].devices, vec!["GPU-1::0"]);
        assert_eq!(directory.meta("c"), PodMeta::unknown("c"));

        assert!(!directory.refresh(), "nothing published yet");
        kube_tx.send_replace(Arc::new(KubePods { status: SourceStatus::Disabled, pods: HashMap::new() }));
        assert!(directory.refresh());
        assert!(!directory.refresh());
        assert_eq!(directory.meta("a").labels["app"], "static", "API pod deleted: static metadata again");
        drop(kubelet_tx);

        directory.request_devices(&b);
        assert_eq!(hint_rx.try_recv().unwrap(), ("ml".to_string(), "llm-b".to_string()));
        assert_eq!(directory.health().0, SourceStatus::Disabled);
    }
}
