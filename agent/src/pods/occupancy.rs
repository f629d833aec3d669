//! Which pod cgroups hold a tenant. A kubelet pod's cgroup is populated
//! from its start (the sandbox's pause process) until the pod is torn
//! down, so a pod cgroup with no process is a leftover: one that has never
//! held a process since the agent first saw it (a stale directory a crashed
//! kubelet or runtime left behind), or one emptied for longer than a grace
//! period (a pod whose teardown stopped half-way). Counted as pods, such
//! leftovers would hold KEDA's answers in "metadata pending" and add
//! unlabelled rows to every view; they are skipped instead.
//!
//! Read from `cgroup.events` (`populated 0|1`, which counts the whole
//! subtree) on the collector's rescan schedule, never per event. A pod
//! whose file cannot be read is kept, as it was before this check existed:
//! not knowing is not a reason to drop a tenant.
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use super::cgroup_tree::PodCgroup;

/// How long a pod that held processes may sit empty before it is dropped:
/// long enough for a pod whose sandbox restarts, far shorter than KEDA's
/// metadata wait.
pub const DEFAULT_EMPTY_GRACE: Duration = Duration::from_secs(30);

/// What the agent has seen of one pod's cgroup.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// It held a process at some rescan.
    populated_once: bool,
    /// When it was first seen empty after holding processes.
    empty_since: Option<Instant>,
}

/// Why a pod cgroup is not a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leftover {
    /// Not one process since the agent first saw it.
    NeverPopulated,
    /// Empty for longer than the grace period.
    EmptiedLongAgo,
}

/// The occupancy of every pod cgroup the rescans found.
#[derive(Debug)]
pub struct Occupancy {
    grace: Duration,
    pods: HashMap<String, Seen>,
}

impl Occupancy {
    /// Pods emptied for longer than `grace` stop being tenants.
    pub fn new(grace: Duration) -> Self {
        Self { grace, pods: HashMap::new() }
    }

    /// Keeps in `found` only the cgroups of pods that hold, or recently
    /// held, a process; returns the pods dropped and why. `root` is the
    /// cgroup v2 root the paths in `found` are relative to.
    pub fn retain_tenants(
        &mut self,
        root: &Path,
        found: &mut HashMap<u64, PodCgroup>,
        now: Instant,
    ) -> Vec<(String, Leftover)> {
        let populated = populated_pods(root, found);
        self.pods.retain(|uid, _| populated.contains_key(uid));
        let mut leftovers = Vec::new();
        for (uid, populated) in populated {
            let seen = self.pods.entry(uid.clone()).or_insert(Seen { populated_once: false, empty_since: None });
            match populated {
                // Unreadable: kept, and nothing learnt.
                None => {}
                Some(true) => {
                    seen.populated_once = true;
                    seen.empty_since = None;
                }
                Some(false) if !seen.populated_once => leftovers.push((uid, Leftover::NeverPopulated)),
                Some(false) => {
                    let since = *seen.empty_since.get_or_insert(now);
                    if now.duration_since(since) > self.grace {
                        leftovers.push((uid, Leftover::EmptiedLongAgo));
                    }
                }
            }
        }
        found.retain(|_, cgroup| !leftovers.iter().any(|(uid, _)| *uid == cgroup.owner.pod_uid));
        leftovers
    }
}

/// Per pod: whether its subtree holds a process, from its pod-level
/// directory (or, where the scan found none, any of its containers'), or
/// `None` when no `cgroup.events` could be read.
fn populated_pods(root: &Path, found: &HashMap<u64, PodCgroup>) -> HashMap<String, Option<bool>> {
    let mut pods: HashMap<String, (usize, &str)> = HashMap::new();
    for cgroup in found.values() {
        // The shallowest directory of a pod is its pod-level one.
        let depth = cgroup.path.matches('/').count();
        let entry = pods.entry(cgroup.owner.pod_uid.clone()).or_insert((depth, &cgroup.path));
        if depth < entry.0 {
            *entry = (depth, &cgroup.path);
        }
    }
    pods.into_iter()
        .map(|(uid, (_, path))| {
            let events = std::fs::read_to_string(root.join(path.trim_start_matches('/')).join("cgroup.events"));
            (uid, events.ok().and_then(|text| parse_populated(&text)))
        })
        .collect()
}

/// `populated` from a `cgroup.events` file (`populated 1\nfrozen 0\n`).
fn parse_populated(events: &str) -> Option<bool> {
    events.lines().find_map(|line| match line.split_once(' ')? {
        ("populated", "1") => Some(true),
        ("populated", "0") => Some(false),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::cgroup_path::parse;

    fn pod(root: &Path, id: u64, uid: &str, populated: Option<bool>) -> (u64, PodCgroup) {
        let path = format!("/kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_"));
        let dir = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(populated) = populated {
            std::fs::write(dir.join("cgroup.events"), format!("populated {}\nfrozen 0\n", u8::from(populated)))
                .unwrap();
        }
        let owner = parse(&path).expect("a pod path");
        (id, PodCgroup { path, owner })
    }

    fn set(root: &Path, uid: &str, populated: bool) {
        let dir = root.join(format!("kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_")));
        std::fs::write(dir.join("cgroup.events"), format!("populated {}\nfrozen 0\n", u8::from(populated))).unwrap();
    }

    const LIVE: &str = "00000001-0000-4000-8000-000000000001";
    const STALE: &str = "00000002-0000-4000-8000-000000000002";
    const UNKNOWN: &str = "00000003-0000-4000-8000-000000000003";

    /// A pod that never held a process is skipped from the first scan; a
    /// populated one and one whose events cannot be read are kept.
    #[test]
    fn never_populated_pods_are_not_tenants() {
        let root = tempfile::tempdir().unwrap();
        let mut found: HashMap<u64, PodCgroup> = [
            pod(root.path(), 1, LIVE, Some(true)),
            pod(root.path(), 2, STALE, Some(false)),
            pod(root.path(), 3, UNKNOWN, None),
        ]
        .into_iter()
        .collect();
        let mut occupancy = Occupancy::new(Duration::from_secs(30));
        let dropped = occupancy.retain_tenants(root.path(), &mut found, Instant::now());
        assert_eq!(dropped, vec![(STALE.to_string(), Leftover::NeverPopulated)]);
        let mut kept: Vec<&str> = found.values().map(|c| c.owner.pod_uid.as_str()).collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![LIVE, UNKNOWN]);
    }

    /// A pod that held processes stays a tenant through the grace period
    /// once emptied, is dropped after it, and is a tenant again at once
    /// when a process comes back.
    #[test]
    fn emptied_pods_leave_after_the_grace_period() {
        let root = tempfile::tempdir().unwrap();
        let grace = Duration::from_secs(30);
        let mut occupancy = Occupancy::new(grace);
        let scan = |occupancy: &mut Occupancy, at: Instant| {
            let mut found: HashMap<u64, PodCgroup> = [pod(root.path(), 1, LIVE, None)].into_iter().collect();
            let dropped = occupancy.retain_tenants(root.path(), &mut found, at);
            (found.len(), dropped)
        };
        let start = Instant::now();
        pod(root.path(), 1, LIVE, Some(true));
        assert_eq!(scan(&mut occupancy, start), (1, vec![]));
        set(root.path(), LIVE, false);
        assert_eq!(scan(&mut occupancy, start + Duration::from_secs(1)), (1, vec![]));
        assert_eq!(scan(&mut occupancy, start + Duration::from_secs(31)), (1, vec![]), "within the grace period");
        assert_eq!(
            scan(&mut occupancy, start + Duration::from_secs(32)),
            (0, vec![(LIVE.to_string(), Leftover::EmptiedLongAgo)])
        );
        set(root.path(), LIVE, true);
        assert_eq!(scan(&mut occupancy, start + Duration::from_secs(33)), (1, vec![]));
    }

    /// The pod's whole subtree decides: a pod directory with containers is
    /// read at the pod level, and garbage in the file reads as unknown.
    #[test]
    fn reads_the_pod_level_events() {
        assert_eq!(parse_populated("populated 1\nfrozen 0\n"), Some(true));
        assert_eq!(parse_populated("frozen 0\npopulated 0\n"), Some(false));
        assert_eq!(parse_populated("populated x\n"), None);
        assert_eq!(parse_populated(""), None);
        let root = tempfile::tempdir().unwrap();
        let (id, pod_level) = pod(root.path(), 1, LIVE, Some(false));
        let container_path = format!("{}/cri-containerd-{}.scope", pod_level.path, "ab".repeat(32));
        let container_dir = root.path().join(container_path.trim_start_matches('/'));
        std::fs::create_dir_all(&container_dir).unwrap();
        std::fs::write(container_dir.join("cgroup.events"), "populated 1\n").unwrap();
        let container = PodCgroup { owner: parse(&container_path).unwrap(), path: container_path };
        let found: HashMap<u64, PodCgroup> = [(id, pod_level), (id + 1, container)].into_iter().collect();
        assert_eq!(populated_pods(root.path(), &found)[LIVE], Some(false), "read at the pod level");
    }
}
