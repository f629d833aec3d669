//! Runs a GPU backend on its own thread and schedule, attributes its
//! processes to pods, and hands the result to the collector.
//!
//! NVML calls block for milliseconds, so they never run on the async
//! runtime. Failures degrade instead of stopping: the poller re-opens the
//! backend with exponential backoff (a node may get its driver later, or
//! lose a GPU and get it back after a driver reload).
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::attribution::live::LiveAttribution;
use super::attribution::Attribution;
use super::{open, DeviceSample, GpuBackend, GpuError, GpuPoll, GpuSource, Sharing};
use crate::backoff::backoff;
use crate::pods::pid_cache::PidCache;

const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// GPU processes are long-lived; a pid unused this long is forgotten even
/// if it still runs (it re-resolves on its next sample).
const PID_IDLE_EXPIRY: Duration = Duration::from_secs(60);

/// GPU use of one pod at one poll.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PodGpu {
    /// Its processes' share of SM time, %, across GPUs: the attribution
    /// estimator's where a GPU has one (`gpu::attribution`), NVML's sum
    /// elsewhere.
    pub sm_util_percent: f64,
    /// Sum of its processes' SM % as NVML reports them (for comparison:
    /// it misses tenants on time-sliced GPUs and sees none under MPS).
    pub sm_util_nvml_percent: f64,
    /// Share-weighted confidence of its estimated share (0 to 1; `None`
    /// when no GPU of the pod has an attribution).
    pub attribution_confidence: Option<f64>,
    /// Whether `sm_util_percent` comes from the estimator: then it is
    /// known even under MPS, where NVML books everything on the server.
    /// Sum of its processes' memory-bandwidth %.
    pub mem_bw_util_percent: f64,
    /// Sum of its processes' framebuffer bytes.
    pub memory_used_bytes: u64,
    /// Processes of the pod NVML had no sample for in this interval (idle,
    /// or missed: NVML misses whole tenants on time-sliced GPUs).
    pub unsampled_processes: u32,
    /// Set when the pod runs on a MIG instance or an MPS-shared GPU, where
    /// NVML cannot give a per-process SM % (and under MPS not memory either).
    pub unattributable: Option<Sharing>,
    pub attributed: bool,
    /// Devices its processes were seen on: bit i is the poll's device i
    /// (a MIG instance counts as its parent GPU; GPUs past 64 are not
    /// recorded).
    pub devices_seen: u64,
}

impl PodGpu {
    /// UUIDs of the devices (of the same poll) the pod was seen on.
    pub fn device_uuids<'a>(&self, devices: &'a [DeviceSample]) -> Vec<&'a str> {
        devices
            .iter()
            .enumerate()
            .filter(|(index, _)| *index < 64 && self.devices_seen & (1 << index) != 0)
            .map(|(_, device)| device.uuid.as_str())
            .collect()
    }
}

impl PodGpu {
    fn add(&mut self, process: &super::ProcessSample) {
        match process.sharing {
            Sharing::TimeSliced => {}
            // MPS dominates MIG: neither SM % nor memory is per-pod there.
            sharing => {
                if self.unattributable != Some(Sharing::Mps) {
                    self.unattributable = Some(sharing);
                }
            }
        }
        match process.util {
            Some(util) => {
                self.sm_util_nvml_percent += util.sm_percent;
                self.mem_bw_util_percent += util.mem_bw_percent;
            }
            None => self.unsampled_processes += 1,
        }
        self.memory_used_bytes += process.memory_used_bytes;
    }
}

/// One GPU at one poll, per process: NVML's samples and the estimator's
/// shares (`/attribution`; `podgpu-agent record` writes traces from it).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GpuAttributionView {
    /// GPU UUID.
    pub uuid: String,
    /// Unix time of the poll.
    pub polled_at_unix: f64,
    /// Device utilization read at this poll, percent.
    pub device_util: Option<f64>,
    /// NVML's per-process SM % at this poll, `(pid, percent)`.
    pub nvml: Vec<(u32, f64)>,
    /// The estimator's latest split (`None`: no device utilization).
    pub attribution: Option<Attribution>,
}

/// What the poller tells the collector.
#[derive(Clone, Debug, PartialEq)]
pub enum GpuUpdate {
    /// A successful poll, attributed to pods (keyed by pod UID).
    Polled {
        /// Backend description.
        backend: String,
        /// Device health.
        devices: Vec<DeviceSample>,
        /// Per-pod use.
        pods: HashMap<String, PodGpu>,
        /// Per GPU: what the split was made from, and the split.
        attribution: Vec<GpuAttributionView>,
    },
    /// The backend is wanted but not usable now.
    Unavailable {
        /// Error class, for self-metrics.
        kind: &'static str,
        /// Why.
        reason: String,
    },
    /// `--gpu none`: no GPU signals by choice.
    Disabled,
}

/// Where the poller looks and how often.
#[derive(Clone, Debug)]
pub struct PollerConfig {
    /// Backend to open.
    pub source: GpuSource,
    /// cgroup v2 root (the simulator resolves cgroup tenants under it).
    pub cgroup_root: PathBuf,
    /// procfs, for pid -> cgroup.
    pub proc: crate::proc::ProcFs,
    /// Time between polls.
    pub interval: Duration,
    /// Set by the driver path when a pod opens its first GPU context: the
    /// next poll runs at once, not at the end of the interval.
    pub poll_now: Arc<std::sync::atomic::AtomicBool>,
    /// The launch reader's snapshot: launch counts for the attribution
    /// estimator.
    pub launches: Arc<std::sync::Mutex<crate::probes::launches::LaunchSnapshot>>,
    /// Where learned kernel costs are kept across restarts (`None`: not kept).
    pub cost_catalog: Option<PathBuf>,
}

/// Starts the poller thread. It ends when the receiver is dropped.
pub fn spawn(
    config: PollerConfig,
    updates: mpsc::Sender<GpuUpdate>,
    dropped: Arc<AtomicU64>,
) -> thread::JoinHandle<()> {
    thread::Builder::new()
        .name("gpu-poller".to_string())
        .spawn(move || run(config, updates, dropped))
        .expect("spawning the GPU poller thread")
}

fn run(config: PollerConfig, updates: mpsc::Sender<GpuUpdate>, dropped: Arc<AtomicU64>) {
    let send = |update: GpuUpdate| {
        if updates.try_send(update).is_err() {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    };
    let epoch = Instant::now();
    let mut backend: Option<Box<dyn GpuBackend>> = None;
    // Consecutive failures (open or poll): they drive the backoff and keep
    // a long outage to one warning instead of one per attempt.
    let mut failures: u32 = 0;
    let mut pids = PidCache::new(config.proc.clone(), PID_IDLE_EXPIRY);
    let mut estimators = LiveAttribution::new(config.launches.clone(), config.cost_catalog.clone());
    while !updates.is_closed() {
        let started = Instant::now();
        let outcome = match backend.as_mut() {
            Some(active) => active.poll().map(|poll| {
                let attributions = estimators.update(&poll).clone();
                let update = attribute(active.describe(), poll, &attributions, &mut pids);
                pids.sweep(Instant::now());
                update
            }),
            None => match open(&config.source, &config.cgroup_root, epoch) {
                Ok(Some(opened)) => {
                    tracing::info!(backend = %opened.describe(), "GPU backend ready");
                    backend = Some(opened);
                    continue;
                }
                Ok(None) => {
                    send(GpuUpdate::Disabled);
                    return;
                }
                Err(err) => Err(err),
            },
        };
        let pause = match outcome {
            Ok(update) => {
                if failures > 0 {
                    tracing::info!(failures, "GPU backend recovered");
                    failures = 0;
                }
                send(update);
                config.interval.saturating_sub(started.elapsed())
            }
            Err(err) => {
                // Any failure may leave NVML in a bad state: start over.
                backend = None;
                let pause = backoff(config.interval, failures, MAX_BACKOFF);
                report_failure(&err, failures, pause);
                failures = failures.saturating_add(1);
                send(GpuUpdate::Unavailable { kind: err.kind(), reason: err.to_string() });
                pause
            }
        };
        sleep_unless_closed(&updates, pause, &config.poll_now);
    }
    // Shutting down: what was learned since the last save is kept.
    estimators.save_catalog(Instant::now(), true);
}

fn report_failure(err: &GpuError, failures: u32, retry_in: Duration) {
    let retry_in_s = retry_in.as_secs_f64();
    match (err, failures) {
        (GpuError::LibraryMissing { .. }, 0) => {
            tracing::info!(error = %err, retry_in_s, "no GPU library: GPU signals absent")
        }
        (_, 0) => tracing::warn!(error = %err, retry_in_s, "GPU backend unavailable; retrying with backoff"),
        _ => tracing::debug!(error = %err, retry_in_s, failures, "GPU backend still unavailable"),
    }
}

/// Sleeps in short steps so shutdown and a poll-now request are noticed
/// promptly.
fn sleep_unless_closed(updates: &mpsc::Sender<GpuUpdate>, total: Duration, poll_now: &std::sync::atomic::AtomicBool) {
    let deadline = Instant::now() + total;
    while !updates.is_closed() {
        if poll_now.swap(false, Ordering::Relaxed) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Maps each process to its pod through `/proc/PID/cgroup` and sums per pod.
/// Processes outside pods (host daemons) are not pods' load, and neither is
/// the MPS server's: NVML books every client's work on it, so wherever it
/// runs (often a device-plugin pod) its samples belong to no single pod.
/// A pod's SM share comes from its GPUs' attributions (which also cover
/// MPS clients NVML does not list); on a GPU without one, from NVML.
fn attribute(
    backend: String,
    mut poll: GpuPoll,
    attributions: &HashMap<String, Attribution>,
    pids: &mut PidCache,
) -> GpuUpdate {
    let now = Instant::now();
    let mut pods: HashMap<String, PodGpu> = HashMap::new();
    let device_index = |uuid: &str, devices: &[DeviceSample]| {
        devices.iter().position(|device| device.uuid == uuid || device.mig_devices.iter().any(|mig| mig.uuid == uuid))
    };
    for process in &poll.processes {
        if process.sharing == Sharing::Mps && process.util.is_some() {
            continue;
        }
        let Some(owner) = pids.resolve(process.pid, now) else {
            continue;
        };
        let pod = pods.entry(owner.pod_uid.clone()).or_default();
        pod.add(process);
        let device = device_index(&process.gpu_uuid, &poll.devices);
        let estimated = device.is_some_and(|index| attributions.contains_key(&poll.devices[index].uuid));
        if !estimated {
            pod.sm_util_percent += process.util.map_or(0.0, |util| util.sm_percent);
        }
        if let Some(index) = device.filter(|index| *index < 64) {
            pod.devices_seen |= 1 << index;
        }
    }
    let polled_at_unix =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let attribution = poll
        .devices
        .iter()
        .map(|device| GpuAttributionView {
            uuid: device.uuid.clone(),
            polled_at_unix,
            device_util: device.util_percent,
            nvml: poll
                .processes
                .iter()
                .filter(|p| {
                    device_index(&p.gpu_uuid, &poll.devices).is_some_and(|i| poll.devices[i].uuid == device.uuid)
                })
                .filter_map(|p| Some((p.pid, p.util?.sm_percent)))
                .collect(),
            attribution: attributions.get(&device.uuid).cloned(),
        })
        .collect();
    let mut confidence_weights: HashMap<String, (f64, f64)> = HashMap::new();
    for (index, device) in poll.devices.iter_mut().enumerate() {
        let Some(attribution) = attributions.get(&device.uuid) else { continue };
        device.attribution_confidence = Some(attribution.confidence);
        device.sharing_overhead_percent = Some(attribution.sharing_overhead_percent);
        for share in &attribution.processes {
            let Some(owner) = pids.resolve(share.pid, now) else { continue };
            let pod = pods.entry(owner.pod_uid.clone()).or_default();
            pod.sm_util_percent += share.util_percent;
            pod.attributed = true;
            if index < 64 {
                pod.devices_seen |= 1 << index;
            }
            let weights = confidence_weights.entry(owner.pod_uid.clone()).or_default();
            // Weighted by share, so an idle process's doubt does not drown a busy one's.
            weights.0 += share.util_percent.max(1e-6) * share.confidence;
            weights.1 += share.util_percent.max(1e-6);
        }
    }
    for (uid, (weighted, total)) in confidence_weights {
        if let Some(pod) = pods.get_mut(&uid) {
            pod.attribution_confidence = Some(weighted / total);
        }
    }
    GpuUpdate::Polled { backend, devices: poll.devices, pods, attribution }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{ProcessSample, ProcessUtil};
    use crate::proc::{write_fake_process, ProcFs};

    const UID_A: &str = "7d1c2a4e-0000-4000-8000-00000000000a";
    const UID_B: &str = "7d1c2a4e-0000-4000-8000-00000000000b";

    /// A fake /proc where each pid sits in the given cgroup.
    fn proc_root(pids: &[(u32, String)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (pid, cgroup) in pids {
            write_fake_process(root.path(), *pid, 100, &format!("0::{cgroup}\n")).unwrap();
        }
        root
    }

    fn sample(pid: u32, sm: Option<f64>, memory: u64, sharing: Sharing) -> ProcessSample {
        ProcessSample {
            pid,
            gpu_uuid: "G".into(),
            util: sm.map(|sm_percent| ProcessUtil {
                sm_percent,
                mem_bw_percent: sm_percent / 2.0,
                samples: 6,
                ..Default::default()
            }),
            memory_used_bytes: memory,
            sharing,
        }
    }

    fn pods_of(poll: GpuPoll, proc_root: &std::path::Path) -> HashMap<String, PodGpu> {
        pods_with(poll, &HashMap::new(), proc_root).0
    }

    fn pods_with(
        poll: GpuPoll,
        attributions: &HashMap<String, Attribution>,
        proc_root: &std::path::Path,
    ) -> (HashMap<String, PodGpu>, Vec<DeviceSample>) {
        let mut pids = PidCache::new(ProcFs::new(proc_root), PID_IDLE_EXPIRY);
        match attribute("test".into(), poll, attributions, &mut pids) {
            GpuUpdate::Polled { pods, devices, .. } => (pods, devices),
            other => panic!("expected a poll, got {other:?}"),
        }
    }

    /// Processes are summed into their pods; host processes and pids that
    /// have exited are left out; unsampled processes are counted.
    #[test]
    fn attributes_processes_to_pods() {
        let root = proc_root(&[
            (10, format!("/kubepods/pod{UID_A}/{}", "a".repeat(64))),
            (11, format!("/kubepods/pod{UID_A}/{}", "b".repeat(64))),
            (12, "/system.slice/nvidia-persistenced.service".to_string()),
        ]);
        let processes = vec![
            sample(10, Some(30.0), 5, Sharing::TimeSliced),
            sample(11, None, 7, Sharing::TimeSliced),
            sample(12, Some(50.0), 9, Sharing::TimeSliced),
            sample(13, Some(1.0), 1, Sharing::TimeSliced),
        ];
        // Sample processes run on device "G", the second of the poll.
        let devices = vec![
            DeviceSample { uuid: "GPU-other".into(), ..DeviceSample::default() },
            DeviceSample { uuid: "G".into(), ..DeviceSample::default() },
        ];
        let pods = pods_of(GpuPoll { devices: devices.clone(), processes }, root.path());
        assert_eq!(pods.len(), 1);
        let expected = PodGpu {
            sm_util_percent: 30.0,
            sm_util_nvml_percent: 30.0,
            mem_bw_util_percent: 15.0,
            memory_used_bytes: 12,
            unsampled_processes: 1,
            unattributable: None,
            attribution_confidence: None,
            attributed: false,
            devices_seen: 0b10,
        };
        assert_eq!(pods[UID_A], expected);
        assert_eq!(pods[UID_A].device_uuids(&devices), vec!["G"]);
    }

    /// The MPS server's samples (all clients' work) are booked on no pod,
    /// even when the server itself runs in a pod; clients are flagged as
    /// unattributable, and so are MIG tenants.
    #[test]
    fn mps_server_is_nobodys_load_and_mig_is_flagged() {
        let server_pod = "7d1c2a4e-0000-4000-8000-0000000000ff";
        let root = proc_root(&[
            (20, format!("/kubepods/pod{UID_A}/{}", "a".repeat(64))),
            (21, format!("/kubepods/pod{UID_B}/{}", "b".repeat(64))),
            (500, format!("/kubepods/pod{server_pod}/{}", "c".repeat(64))),
        ]);
        let processes = vec![
            sample(20, None, 0, Sharing::Mps),
            sample(500, Some(80.0), 1000, Sharing::Mps),
            sample(21, None, 64, Sharing::Mig),
        ];
        let pods = pods_of(GpuPoll { devices: vec![], processes }, root.path());
        assert_eq!(pods[UID_A].unattributable, Some(Sharing::Mps));
        assert_eq!(pods[UID_B].unattributable, Some(Sharing::Mig));
        assert_eq!(pods[UID_B].memory_used_bytes, 64);
        assert!(!pods.contains_key(server_pod), "the MPS server's load was booked on its pod");
    }

    /// Where a GPU has an attribution, a pod's SM share is the
    /// estimator's, MPS clients NVML does not list included, and NVML's
    /// own number stays beside it for comparison; the device carries the
    /// split's confidence and the sharing overhead.
    #[test]
    fn estimated_shares_replace_nvml_where_a_gpu_has_them() {
        use crate::gpu::attribution::{Basis, ProcessShare};
        let root = proc_root(&[
            (30, format!("/kubepods/pod{UID_A}/{}", "a".repeat(64))),
            (31, format!("/kubepods/pod{UID_B}/{}", "b".repeat(64))),
        ]);
        let share = |pid, util_percent, confidence| ProcessShare {
            pid,
            util_percent,
            uncertainty_points: Some(3.0),
            confidence,
            basis: Basis::Measured,
        };
        let attribution = Attribution {
            device_util: 70.0,
            sharing_overhead_percent: 4.0,
            confidence: 0.8,
            processes: vec![share(30, 41.0, 0.9), share(31, 25.0, 0.6)],
        };
        let poll = GpuPoll {
            devices: vec![DeviceSample { uuid: "G".into(), util_percent: Some(70.0), ..DeviceSample::default() }],
            // NVML books 69 % on pid 30 and never samples pid 31.
            processes: vec![sample(30, Some(69.0), 5, Sharing::TimeSliced), sample(31, None, 6, Sharing::TimeSliced)],
        };
        let (pods, devices) = pods_with(poll, &[("G".to_string(), attribution)].into(), root.path());
        assert_eq!(pods[UID_A].sm_util_percent, 41.0);
        assert_eq!(pods[UID_A].sm_util_nvml_percent, 69.0);
        assert_eq!(pods[UID_B].sm_util_percent, 25.0);
        assert!(pods[UID_A].attributed && pods[UID_B].attributed);
        assert_eq!(pods[UID_B].attribution_confidence, Some(0.6));
        assert_eq!(devices[0].attribution_confidence, Some(0.8));
        assert_eq!(devices[0].sharing_overhead_percent, Some(4.0));
    }
}
