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

use super::{open, DeviceSample, GpuBackend, GpuError, GpuPoll, GpuSource};
use crate::pods::{cgroup_path, cgroup_tree};

const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// GPU use of one pod at one poll.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PodGpu {
    /// Sum of its processes' SM %, across GPUs.
    pub sm_util_percent: f64,
    /// Sum of its processes' framebuffer bytes.
    pub memory_used_bytes: u64,
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
    },
    /// The backend is wanted but not usable now.
    Unavailable {
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
    /// procfs root, for pid -> cgroup.
    pub proc_root: PathBuf,
    /// Time between polls.
    pub interval: Duration,
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
    let mut backend: Option<Box<dyn GpuBackend>> = None;
    let mut backoff = config.interval;
    while !updates.is_closed() {
        if backend.is_none() {
            match open(&config.source, &config.cgroup_root) {
                Ok(Some(opened)) => {
                    tracing::info!(backend = %opened.describe(), "GPU backend ready");
                    backend = Some(opened);
                    backoff = config.interval;
                }
                Ok(None) => {
                    send(GpuUpdate::Disabled);
                    return;
                }
                Err(err) => {
                    log_unavailable(&err, backoff);
                    send(GpuUpdate::Unavailable { reason: err.to_string() });
                    sleep_unless_closed(&updates, backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        let Some(active) = backend.as_mut() else {
            continue;
        };
        let started = Instant::now();
        match active.poll() {
            Ok(poll) => send(attribute(active.describe(), poll, &config)),
            Err(err) => {
                tracing::warn!(error = %err, "GPU poll failed; re-opening the backend");
                send(GpuUpdate::Unavailable { reason: err.to_string() });
                backend = None;
            }
        }
        sleep_unless_closed(&updates, config.interval.saturating_sub(started.elapsed()));
    }
}

fn log_unavailable(err: &GpuError, retry_in: Duration) {
    match err {
        GpuError::LibraryMissing { .. } => {
            tracing::info!(error = %err, retry_in_s = retry_in.as_secs_f64(), "no GPU library: GPU signals absent")
        }
        _ => {
            tracing::warn!(error = %err, retry_in_s = retry_in.as_secs_f64(), "GPU backend unavailable")
        }
    }
}

/// Sleeps in short steps so shutdown is noticed promptly.
fn sleep_unless_closed(updates: &mpsc::Sender<GpuUpdate>, total: Duration) {
    let deadline = Instant::now() + total;
    while !updates.is_closed() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// Maps each process to its pod through `/proc/PID/cgroup` and sums per pod.
/// Processes outside pods (host daemons, the MPS server) are not pods' load.
fn attribute(backend: String, poll: GpuPoll, config: &PollerConfig) -> GpuUpdate {
    let mut pods: HashMap<String, PodGpu> = HashMap::new();
    for process in &poll.processes {
        let Some(owner) =
            cgroup_tree::process_cgroup(&config.proc_root, process.pid).and_then(|p| cgroup_path::parse(&p))
        else {
            continue;
        };
        let pod = pods.entry(owner.pod_uid).or_default();
        pod.sm_util_percent += process.sm_util_percent.unwrap_or(0.0);
        pod.memory_used_bytes += process.memory_used_bytes;
    }
    GpuUpdate::Polled { backend, devices: poll.devices, pods }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ProcessSample;

    /// Processes are summed into their pods; host processes are left out.
    #[test]
    fn attributes_processes_to_pods() {
        let proc_root = tempfile::tempdir().unwrap();
        let uid = "7d1c2a4e-0000-4000-8000-00000000000a";
        for (pid, cgroup) in [
            (10, format!("/kubepods/pod{uid}/{}", "a".repeat(64))),
            (11, format!("/kubepods/pod{uid}/{}", "b".repeat(64))),
            (12, "/system.slice/nvidia-persistenced.service".to_string()),
        ] {
            std::fs::create_dir_all(proc_root.path().join(pid.to_string())).unwrap();
            std::fs::write(proc_root.path().join(format!("{pid}/cgroup")), format!("0::{cgroup}\n")).unwrap();
        }
        let sample = |pid, util: Option<f64>, mem| ProcessSample {
            pid,
            gpu_uuid: "G".into(),
            sm_util_percent: util,
            memory_used_bytes: mem,
        };
        let poll = GpuPoll {
            devices: vec![],
            processes: vec![
                sample(10, Some(30.0), 5),
                sample(11, None, 7),
                sample(12, Some(50.0), 9),
                sample(13, Some(1.0), 1),
            ],
        };
        let config = PollerConfig {
            source: GpuSource::None,
            cgroup_root: PathBuf::from("/nonexistent"),
            proc_root: proc_root.path().to_path_buf(),
            interval: Duration::from_secs(1),
        };
        let GpuUpdate::Polled { pods, .. } = attribute("test".into(), poll, &config) else { panic!() };
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[uid], PodGpu { sm_util_percent: 30.0, memory_used_bytes: 12 });
    }
}
