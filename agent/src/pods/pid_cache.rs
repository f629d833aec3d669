//! pid -> container -> pod for host pids (NVML reports host pids), from
//! `/proc/PID/cgroup`, cached on (pid, process start time): a reused pid
//! has a new start time, so it is never given its predecessor's pod.
//! Entries expire once their process is gone or unused for a while.
//!
//! cgroup v2 (`0::` line) is preferred; on v1 or hybrid hosts the first
//! controller line naming a pod is used (systemd and cgroupfs drivers,
//! every runtime `cgroup_path` knows). Processes outside pods resolve to
//! `None` and are cached as such.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::cgroup_path::{self, CgroupOwner};
use crate::proc::{CgroupLine, ProcFs};

/// How the cache has been used (self-metrics and the benchmark).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PidCacheStats {
    /// Lookups answered from the cache (start time matched).
    pub hits: u64,
    /// Lookups that read `/proc/PID/cgroup`.
    pub misses: u64,
    /// Cached pids found reused by a new process.
    pub reused: u64,
    /// Entries dropped because the process exited or went unused.
    pub expired: u64,
}

#[derive(Debug)]
struct Entry {
    start_time: u64,
    owner: Option<CgroupOwner>,
    last_used: Instant,
}

/// The cache; one per thread that resolves pids (the GPU poller).
#[derive(Debug)]
pub struct PidCache {
    proc: ProcFs,
    entries: HashMap<u32, Entry>,
    idle_expiry: Duration,
    stats: PidCacheStats,
}

impl PidCache {
    /// A cache over `proc_root` (the host's /proc); entries unused for
    /// `idle_expiry` are dropped by `sweep` even if the process lives.
    pub fn new(proc: ProcFs, idle_expiry: Duration) -> Self {
        Self { proc, entries: HashMap::new(), idle_expiry, stats: Default::default() }
    }

    /// The pod (and container) `pid` belongs to; `None` for host processes
    /// and processes that are gone.
    pub fn resolve(&mut self, pid: u32, now: Instant) -> Option<&CgroupOwner> {
        let Some(start_time) = self.proc.start_time(pid) else {
            self.forget(pid);
            return None;
        };
        let cached = self.entries.get(&pid).map(|entry| entry.start_time);
        match cached {
            Some(cached_start) if cached_start == start_time => self.stats.hits += 1,
            _ => {
                if cached.is_some() {
                    self.stats.reused += 1;
                }
                self.stats.misses += 1;
                let owner = self.proc.cgroups(pid).map(|lines| owner_of(&lines));
                let Some(owner) = owner else {
                    self.forget(pid);
                    return None;
                };
                self.entries.insert(pid, Entry { start_time, owner, last_used: now });
            }
        }
        let entry = self.entries.get_mut(&pid)?;
        entry.last_used = now;
        entry.owner.as_ref()
    }

    /// Drops entries whose process exited (or was replaced) and entries
    /// unused for the idle expiry. Call once per poll.
    pub fn sweep(&mut self, now: Instant) {
        let before = self.entries.len();
        let proc = &self.proc;
        let idle_expiry = self.idle_expiry;
        self.entries
            .retain(|pid, entry| now.saturating_duration_since(entry.last_used) < idle_expiry && proc.exists(*pid));
        self.stats.expired += (before - self.entries.len()) as u64;
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Usage counters.
    pub fn stats(&self) -> PidCacheStats {
        self.stats
    }

    fn forget(&mut self, pid: u32) {
        if self.entries.remove(&pid).is_some() {
            self.stats.expired += 1;
        }
    }
}

/// The owner from the cgroup lines of a process: `None` for a host process.
fn owner_of(lines: &[CgroupLine]) -> Option<CgroupOwner> {
    let mut v1_owner = None;
    for line in lines {
        let owner = cgroup_path::parse(&line.path);
        if line.hierarchy == 0 && owner.is_some() {
            return owner;
        }
        if v1_owner.is_none() {
            v1_owner = owner;
        }
    }
    v1_owner
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::write_fake_process;

    const UID_A: &str = "7d1c2a4e-0000-4000-8000-00000000000a";
    const UID_B: &str = "7d1c2a4e-0000-4000-8000-00000000000b";
    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn v2(uid: &str) -> String {
        format!("0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope\n", uid.replace('-', "_"))
    }

    /// A reused pid (new start time) resolves to the new pod, never the old.
    #[test]
    fn pid_reuse_is_detected() {
        let proc_root = tempfile::tempdir().unwrap();
        let mut cache = PidCache::new(ProcFs::new(proc_root.path()), Duration::from_secs(60));
        let now = Instant::now();
        write_fake_process(proc_root.path(), 42, 1000, &v2(UID_A)).unwrap();
        assert_eq!(cache.resolve(42, now).unwrap().pod_uid, UID_A);
        assert_eq!(cache.resolve(42, now).unwrap().pod_uid, UID_A);
        assert_eq!((cache.stats().hits, cache.stats().misses), (1, 1));

        write_fake_process(proc_root.path(), 42, 2000, &v2(UID_B)).unwrap();
        assert_eq!(cache.resolve(42, now).unwrap().pod_uid, UID_B);
        assert_eq!(cache.stats().reused, 1);
    }

    /// v1 controller lines resolve when there is no v2 pod line; a host
    /// process resolves to no pod; a vanished process to nothing.
    #[test]
    fn v1_host_and_gone() {
        let proc_root = tempfile::tempdir().unwrap();
        let mut cache = PidCache::new(ProcFs::new(proc_root.path()), Duration::from_secs(60));
        let now = Instant::now();
        let v1 = format!(
            "12:memory:/kubepods/burstable/pod{UID_A}/{ID}\n1:name=systemd:/kubepods/burstable/pod{UID_A}/{ID}\n0::/\n"
        );
        write_fake_process(proc_root.path(), 7, 5, &v1).unwrap();
        let owner = cache.resolve(7, now).unwrap();
        assert_eq!((owner.pod_uid.as_str(), owner.container_id.as_deref()), (UID_A, Some(ID)));

        write_fake_process(proc_root.path(), 8, 5, "0::/system.slice/sshd.service\n").unwrap();
        assert!(cache.resolve(8, now).is_none());
        assert_eq!(cache.len(), 2, "host processes are cached too");
        assert!(cache.resolve(9, now).is_none());
        assert_eq!(cache.len(), 2);
    }

    /// Exited processes and idle entries are swept.
    #[test]
    fn sweep_expires_exited_and_idle() {
        let proc_root = tempfile::tempdir().unwrap();
        let mut cache = PidCache::new(ProcFs::new(proc_root.path()), Duration::from_secs(30));
        let start = Instant::now();
        for pid in [1, 2, 3] {
            write_fake_process(proc_root.path(), pid, 1, &v2(UID_A)).unwrap();
            cache.resolve(pid, start);
        }
        std::fs::remove_dir_all(proc_root.path().join("2")).unwrap();
        cache.sweep(start);
        assert_eq!(cache.len(), 2);
        cache.resolve(3, start + Duration::from_secs(20));
        cache.sweep(start + Duration::from_secs(40));
        assert_eq!(cache.len(), 1, "pid 1 idle for 40 s, pid 3 used 20 s ago");
        assert_eq!(cache.stats().expired, 2);
    }
}
