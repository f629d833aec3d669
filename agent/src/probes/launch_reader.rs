//! The launch probe's reader: a thread that, every second, finds libcuda
//! in the pods' processes (attaching the uprobes to each new library file),
//! reads the per-CPU launch counts, books them on pods, and publishes a
//! `LaunchSnapshot` the collector reads every tick.
//!
//! Counts are kept cumulative per pod: a process that exits has its last
//! counts retired into its pod's total and its keys removed from the
//! kernel map, so the map holds live processes only and never fills with
//! the dead.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::launches::{entry_name, threads_per_launch, LaunchProbe, LaunchRow, LaunchSnapshot, LIBRARY_NAME};
use crate::pods::cgroup_tree;
use crate::pods::pid_cache::PidCache;
use crate::proc::ProcFs;

/// Time between reads.
const READ_INTERVAL: Duration = Duration::from_secs(1);
/// Time between looks for libcuda; a process without it is looked at
/// again after this long (CUDA is loaded lazily, at the first GPU call).
const RECHECK: Duration = Duration::from_secs(2);

/// What the reader needs.
pub struct LaunchReaderConfig {
    /// procfs of the host.
    pub proc: ProcFs,
    /// cgroup v2 root (pods' processes are found in its `cgroup.procs`).
    pub cgroup_root: PathBuf,
}

/// Starts the reader thread; it ends with `shutdown`.
pub fn spawn(
    probe: LaunchProbe,
    config: LaunchReaderConfig,
    publish: Arc<Mutex<LaunchSnapshot>>,
    shutdown: CancellationToken,
) -> thread::JoinHandle<()> {
    thread::Builder::new()
        .name("launch-reader".to_string())
        .spawn(move || run(probe, config, publish, shutdown))
        .expect("spawning the launch reader thread")
}

/// Per-process discovery state: start time, and whether libcuda was found.
struct Checked {
    start_time: u64,
    found: bool,
    at: Instant,
}

fn run(
    mut probe: LaunchProbe,
    config: LaunchReaderConfig,
    publish: Arc<Mutex<LaunchSnapshot>>,
    shutdown: CancellationToken,
) {
    let proc = &config.proc;
    let mut pids = PidCache::new(proc.clone(), Duration::from_secs(60));
    let mut checked: HashMap<u32, Checked> = HashMap::new();
    // Pod of each process seen launching, for booking it after it exits.
    let mut owners: HashMap<u32, Option<String>> = HashMap::new();
    let mut retired: HashMap<String, u64> = HashMap::new();
    let mut discovered_at: Option<Instant> = None;
    while !shutdown.is_cancelled() {
        let now = Instant::now();
        // The cgroup walk is the costly part: every RECHECK, not every read.
        if discovered_at.is_none_or(|at| now.duration_since(at) >= RECHECK) {
            discover(&mut probe, proc, &config.cgroup_root, &mut checked, now);
            discovered_at = Some(now);
        }
        let counts = match probe.counts() {
            Ok(counts) => counts,
            Err(err) => {
                // Publish nothing: the last snapshot ages and the collector
                // turns launch signals unavailable instead of reading 0.
                tracing::warn!(error = %err, "reading launch counts");
                thread::sleep(READ_INTERVAL.saturating_sub(now.elapsed()));
                continue;
            }
        };
        let mut snapshot =
            LaunchSnapshot { libraries: probe.libraries(), published: Some(now), ..LaunchSnapshot::default() };
        let mut gone = Vec::new();
        for (key, launches) in counts {
            if proc.start_time(key.tgid).is_none() {
                if let Some(Some(uid)) = owners.get(&key.tgid) {
                    *retired.entry(uid.clone()).or_default() += launches;
                }
                gone.push(key);
                continue;
            }
            let pod_uid = pids.resolve(key.tgid, now).map(|owner| owner.pod_uid.clone());
            owners.insert(key.tgid, pod_uid.clone());
            if let Some(uid) = &pod_uid {
                *snapshot.per_pod.entry(uid.clone()).or_default() += launches;
            }
            snapshot.rows.push(LaunchRow {
                pid: key.tgid,
                pod_uid,
                entry: entry_name(key.kind),
                function: format!("{:#x}", key.function),
                grid: key.grid,
                block: key.block,
                launches,
                threads: launches * threads_per_launch(&key),
            });
        }
        if !gone.is_empty() {
            if let Err(err) = probe.forget(&gone) {
                tracing::warn!(error = %err, "forgetting exited processes' launch counts");
            }
            owners.retain(|tgid, _| !gone.iter().any(|key| key.tgid == *tgid));
        }
        for (uid, launches) in &retired {
            *snapshot.per_pod.entry(uid.clone()).or_default() += launches;
        }
        snapshot.rows.sort_by(|a, b| (a.pid, &a.function, a.grid, a.block).cmp(&(b.pid, &b.function, b.grid, b.block)));
        pids.sweep(now);
        *publish.lock().expect("launch snapshot poisoned") = snapshot;
        let slept = now.elapsed();
        thread::sleep(READ_INTERVAL.saturating_sub(slept));
    }
}

/// Looks for libcuda in the pods' processes not yet known to have it
/// (re-checking each after `RECHECK`), attaching to every new file.
fn discover(
    probe: &mut LaunchProbe,
    proc: &ProcFs,
    cgroup_root: &std::path::Path,
    checked: &mut HashMap<u32, Checked>,
    now: Instant,
) {
    let mut alive = std::collections::HashSet::new();
    for cgroup in cgroup_tree::scan(cgroup_root).into_values() {
        let dir = cgroup_root.join(cgroup.path.trim_start_matches('/'));
        let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else { continue };
        alive.extend(procs.lines().filter_map(|line| line.trim().parse::<u32>().ok()));
    }
    checked.retain(|pid, _| alive.contains(pid));
    for pid in alive {
        let Some(start_time) = proc.start_time(pid) else { continue };
        if let Some(known) = checked.get(&pid) {
            let same_process = known.start_time == start_time;
            if same_process && (known.found || now.duration_since(known.at) < RECHECK) {
                continue;
            }
        }
        let libraries = proc.mapped_files(pid, LIBRARY_NAME);
        for library in &libraries {
            if let Err(err) = probe.attach(proc, pid, library) {
                tracing::warn!(pid, library = %library.path, error = %err, "attaching launch probes");
            }
        }
        checked.insert(pid, Checked { start_time, found: !libraries.is_empty(), at: now });
    }
}
