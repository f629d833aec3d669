//! Parses a cgroup path into the pod (and container) it belongs to.
//!
//! Kubelet names pod cgroups after the pod UID and the runtime names the
//! container's cgroup after the container id. Both cgroup drivers are
//! handled: systemd (`kubepods-burstable-pod<uid_with_underscores>.slice`,
//! `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`,
//! `libpod-<id>.scope`) and cgroupfs (`/kubepods/burstable/pod<uid>/<id>`).

/// Kubernetes QoS class, from the cgroup the pod sits under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    /// Directly under kubepods.
    Guaranteed,
    /// Under kubepods/burstable.
    Burstable,
    /// Under kubepods/besteffort.
    BestEffort,
}

/// The pod (and container, when the path goes that deep) a cgroup belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupOwner {
    /// Pod UID with dashes (`7d1c2a4e-0000-4000-8000-00000000000a`).
    pub pod_uid: String,
    /// Container id (64 hex digits) when the path names a container.
    pub container_id: Option<String>,
    /// QoS class of the pod.
    pub qos: QosClass,
}

const CONTAINER_PREFIXES: [&str; 5] = ["cri-containerd-", "crio-", "docker-", "libpod-", "containerd-"];

/// Returns the owner of `path` (absolute or relative to the cgroup v2
/// root), or `None` for cgroups outside any pod (host processes).
pub fn parse(path: &str) -> Option<CgroupOwner> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let kubepods = components.iter().position(|c| *c == "kubepods" || *c == "kubepods.slice")?;
    let mut qos = QosClass::Guaranteed;
    for (index, component) in components.iter().enumerate().skip(kubepods + 1) {
        match *component {
            "burstable" | "kubepods-burstable.slice" => qos = QosClass::Burstable,
            "besteffort" | "kubepods-besteffort.slice" => qos = QosClass::BestEffort,
            _ => {
                if let Some(pod_uid) = pod_uid_of(component) {
                    let container_id = components.get(index + 1).and_then(|c| container_id_of(c));
                    return Some(CgroupOwner { pod_uid, container_id, qos });
                }
            }
        }
    }
    None
}

/// `kubepods-burstable-pod<uid_>.slice` (systemd) or `pod<uid>` (cgroupfs).
fn pod_uid_of(component: &str) -> Option<String> {
    let raw = match component.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1,
        None => component.strip_prefix("pod")?,
    };
    let uid = raw.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

fn is_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, ... or a bare `<id>`.
fn container_id_of(component: &str) -> Option<String> {
    let name = component.strip_suffix(".scope").unwrap_or(component);
    let id = CONTAINER_PREFIXES.iter().find_map(|prefix| name.strip_prefix(prefix)).unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "7d1c2a4e-0000-4000-8000-00000000000a";
    const UID_: &str = "7d1c2a4e_0000_4000_8000_00000000000a";
    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Real-world path shapes of both drivers and the common runtimes map to
    /// the right pod, container and QoS class.
    #[test]
    fn known_layouts() {
        let cases = [
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                Some(ID),
                QosClass::Guaranteed,
            ),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope"),
                Some(ID),
                QosClass::Burstable,
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{ID}.scope"
                ),
                Some(ID),
                QosClass::BestEffort,
            ),
            (format!("kubepods.slice/kubepods-pod{UID_}.slice/libpod-{ID}.scope"), Some(ID), QosClass::Guaranteed),
            (format!("/kubepods/burstable/pod{UID}/{ID}"), Some(ID), QosClass::Burstable),
            (format!("/kubepods/pod{UID}/{ID}"), Some(ID), QosClass::Guaranteed),
            (format!("/kubepods/besteffort/pod{UID}"), None, QosClass::BestEffort),
            (format!("/kubepods.slice/kubepods-pod{UID_}.slice"), None, QosClass::Guaranteed),
        ];
        for (path, container, qos) in cases {
            let owner = parse(&path).unwrap_or_else(|| panic!("no pod in {path}"));
            assert_eq!(owner.pod_uid, UID, "{path}");
            assert_eq!(owner.container_id.as_deref(), container, "{path}");
            assert_eq!(owner.qos, qos, "{path}");
        }
    }

    /// Host processes and malformed names are not pods.
    #[test]
    fn non_pod_paths() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/podnot-a-uid/abc",
            "/kubepods.slice/kubepods-pod1234.slice/cri-containerd-x.scope",
        ] {
            assert_eq!(parse(path), None, "{path}");
        }
    }

    /// A container segment that is not a 64-hex id leaves the container unknown
    /// but keeps the pod.
    #[test]
    fn odd_container_segment_keeps_pod() {
        let owner = parse(&format!("/kubepods/pod{UID}/sandbox")).unwrap();
        assert_eq!(owner.container_id, None);
        assert_eq!(owner.pod_uid, UID);
    }
}
