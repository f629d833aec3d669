//! The collector's pod set: which cgroups are pods (the rescan, with the
//! leftovers that hold no process dropped) and what is known about them
//! (metadata re-stamped when a source changes).
use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use super::{Collector, PodState};
use crate::pods::cgroup_tree;
use crate::probes::driver::PodDriver;
use crate::signals::history::History;

impl Collector {
    /// Walks the cgroup tree: new pod cgroups are watched by the request
    /// probe and get a pod state, gone ones are released; leftovers with no
    /// process are not pods.
    pub(super) fn rescan(&mut self) {
        self.last_rescan = Some(Instant::now());
        let mut found = cgroup_tree::scan(&self.config.cgroup_root);
        // The agent's own pod (its cgroup namespace root, in the DaemonSet)
        // is not a tenant: its scrapes and API calls are not inference.
        if let Some(own) = crate::pods::cgroup_path::parse(self.config.proc.cgroup_ns_root()) {
            found.retain(|_, cgroup| cgroup.owner.pod_uid != own.pod_uid);
        }
        for (uid, why) in self.occupancy.retain_tenants(&self.config.cgroup_root, &mut found, Instant::now()) {
            if self.pods.contains_key(&uid) {
                tracing::info!(pod_uid = %uid, reason = ?why, "pod cgroup holds no process: no longer a pod");
            }
        }
        let gone: Vec<u64> = self.cgroups.keys().filter(|id| !found.contains_key(id)).copied().collect();
        let new: Vec<u64> = found.keys().filter(|id| !self.cgroups.contains_key(id)).copied().collect();
        for id in &gone {
            if let Some(probe) = self.probes.requests.as_mut() {
                if let Err(err) = probe.unwatch(*id) {
                    tracing::warn!(cgroup_id = id, error = %err, "unwatching cgroup");
                }
            }
        }
        // Cgroups refused before are retried: a pod that went away may have
        // made room.
        self.unwatched.retain(|id| found.contains_key(id));
        let retried: Vec<u64> = self.unwatched.iter().copied().collect();
        for id in new.iter().chain(&retried) {
            if let (Some(probe), Some(cgroup)) = (self.probes.requests.as_mut(), found.get(id)) {
                let dir = self.config.cgroup_root.join(cgroup.path.trim_start_matches('/'));
                match probe.watch_with_existing(*id, &dir, &self.config.proc) {
                    Ok(()) => {
                        if self.unwatched.remove(id) {
                            tracing::info!(cgroup_id = id, pod_uid = %cgroup.owner.pod_uid, "watching a cgroup refused before");
                        }
                    }
                    Err(err) => {
                        if self.unwatched.insert(*id) {
                            tracing::warn!(cgroup_id = id, pod_uid = %cgroup.owner.pod_uid, error = %err,
                                "cannot watch the cgroup (map of watched cgroups full? see --max-watched-cgroups): \
                                 its pod's request metrics are unavailable until it can");
                        }
                    }
                }
            }
        }
        self.cgroups = found.into_iter().collect();
        let live: HashSet<&str> = self.cgroups.values().map(|c| c.owner.pod_uid.as_str()).collect();
        self.pods.retain(|uid, _| live.contains(uid.as_str()));
        for uid in live {
            if !self.pods.contains_key(uid) {
                let meta = self.directory.meta(uid);
                self.directory.request_devices(&meta);
                tracing::info!(pod_uid = uid, namespace = ?meta.namespace, name = ?meta.name, "tracking pod");
                self.pods.insert(
                    uid.to_string(),
                    PodState {
                        meta,
                        first_seen: Instant::now(),
                        history: History::for_interval(
                            self.config.retention.as_secs_f64(),
                            self.config.tick.as_secs_f64(),
                        ),
                        gpu_sm_util_integral: 0.0,
                        gpu_sm_util_nvml_integral: 0.0,
                        gpu_mem_bw_util_integral: 0.0,
                        gpu_known_s: 0.0,
                        gpu_confidence_integral: 0.0,
                        gpu_confidence_known_s: 0.0,
                        gpu: self.gpu_latest.get(uid).copied().unwrap_or_default(),
                        launches: 0,
                        driver: PodDriver::default(),
                        ports: BTreeMap::new(),
                    },
                );
            }
        }
        if !gone.is_empty() || !new.is_empty() {
            tracing::debug!(added = new.len(), removed = gone.len(), pods = self.pods.len(), "cgroup rescan");
        }
    }

    /// A metadata source changed: re-stamp every pod.
    pub(super) fn refresh_metadata(&mut self) {
        for (uid, pod) in &mut self.pods {
            let meta = self.directory.meta(uid);
            if meta != pod.meta {
                if meta.name != pod.meta.name || meta.namespace != pod.meta.namespace {
                    tracing::info!(pod_uid = %uid, namespace = ?meta.namespace, name = ?meta.name, "pod metadata updated");
                }
                pod.meta = meta;
            }
        }
    }
}
