//! The launch probe's reader: a thread that, every second, finds libcuda
//! in the pods' processes (adding each new library file to the probe),
//! keeps the probes attached for the part of the second the overhead
//! budget allows (`launch_sampler`), reads the per-CPU launch counts,
//! books them (scaled when sampled) on pods, and publishes a
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

use super::launch_sampler::{Estimates, Sampler, Window};
use super::launch_sites::SiteNames;
use super::launches::{
    entry_name, monotonic_now, threads_per_launch, LaunchProbe, LaunchRow, LaunchSnapshot, LIBRARY_NAME,
};
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
    /// Fraction of a launch-bound tenant's time the probes may cost it.
    pub overhead_budget: f64,
    /// Where the launch-site book is kept across restarts (`None`: not
    /// kept; `probes::site_book`).
    pub site_book: Option<PathBuf>,
}

/// Cost of one probed launch assumed when calibration fails (measured on
/// an H200 host: 1.4 µs).
const DEFAULT_HIT_COST: Duration = Duration::from_nanos(1_500);

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
    let hit_cost = probe.calibrate().unwrap_or_else(|err| {
        tracing::warn!(error = %err, assumed_ns = DEFAULT_HIT_COST.as_nanos() as u64, "calibrating the launch probe's cost");
        DEFAULT_HIT_COST
    });
    let sampler = Sampler { budget: config.overhead_budget, hit_cost_s: hit_cost.as_secs_f64() };
    tracing::info!(
        hit_cost_ns = hit_cost.as_nanos() as u64,
        budget = sampler.budget,
        "launch accounting cost calibrated"
    );
    let mut estimates = Estimates::default();
    let mut site_names = SiteNames::new(proc.clone(), config.site_book.clone());
    // Counts are exact until a read shows a load above the budget: a
    // tenant that is launch-bound from its start is probed in full for
    // its first interval (a second).
    let mut duty = 1.0;
    let mut period_start = Instant::now();
    while !shutdown.is_cancelled() {
        let now = Instant::now();
        // The cgroup walk is the costly part: every RECHECK, not every read.
        if discovered_at.is_none_or(|at| now.duration_since(at) >= RECHECK) {
            discover(&mut probe, proc, &config.cgroup_root, &mut checked, now);
            discovered_at = Some(now);
        }
        // The first read comes after a second whatever the duty: rates
        // are unknown until then.
        let interval = if estimates.is_empty() { READ_INTERVAL } else { interval_for(duty) };
        let attached = attach_for(&mut probe, duty, interval, now, &shutdown);
        let period = period_start.elapsed();
        period_start = Instant::now();
        let counts = match probe.counts() {
            Ok(counts) => counts,
            Err(err) => {
                // Publish nothing: the last snapshot ages and the collector
                // turns launch signals unavailable instead of reading 0.
                tracing::warn!(error = %err, "reading launch counts");
                continue;
            }
        };
        let spans = probe.spans(proc).unwrap_or_else(|err| {
            tracing::debug!(error = %err, "reading completion spans");
            Default::default()
        });
        let window =
            Window { attached_s: attached.as_secs_f64().min(period.as_secs_f64()), period_s: period.as_secs_f64() };
        let busiest_rate = estimates.book(&counts, &spans.waits_since_last_read, window);
        tracing::debug!(
            ?window,
            busiest_rate,
            raw = counts.iter().map(|(_, n)| n).sum::<u64>(),
            "launch counts booked"
        );
        let sampled_duty = duty;
        duty = sampler.duty(busiest_rate);
        let mut snapshot = LaunchSnapshot {
            libraries: probe.libraries(),
            library_files: probe.library_files().to_vec(),
            // Stamped when read: the counts are as of now, not of the
            // iteration's start (a whole interval earlier).
            published: Some(Instant::now()),
            duty: sampled_duty,
            hit_cost_ns: hit_cost.as_nanos() as u64,
            ..LaunchSnapshot::default()
        };
        snapshot.spans = spans;
        snapshot.programs = probe.program_stats();
        let identities = probe.identities().unwrap_or_else(|err| {
            tracing::debug!(error = %err, "reading kernel identities");
            Default::default()
        });
        let launched = counts.iter().map(|(key, _)| (key.tgid, key.function));
        let from_sites = site_names.name(
            launched,
            |handle| {
                probe.site(handle).unwrap_or_else(|err| {
                    tracing::debug!(error = %err, "reading a launch site");
                    None
                })
            },
            &identities,
        );
        let mut gone = Vec::new();
        for (key, _) in counts {
            let launches = estimates.launches(&key);
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
            let handle = (key.tgid, key.function);
            let identity = identities
                .get(&handle)
                .map(|identity| (*identity, "name"))
                .or_else(|| from_sites.get(&handle).map(|identity| (*identity, "site")));
            snapshot.rows.push(LaunchRow {
                pid: key.tgid,
                pod_uid,
                entry: entry_name(key.kind),
                function: format!("{:#x}", key.function),
                kernel: identity.map(|(identity, _)| format!("{identity:#x}")),
                kernel_from: identity.map(|(_, from)| from),
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
            estimates.forget(&gone);
            site_names.forget(&gone.iter().map(|key| key.tgid).collect());
            owners.retain(|tgid, _| !gone.iter().any(|key| key.tgid == *tgid));
        }
        for (uid, launches) in &retired {
            *snapshot.per_pod.entry(uid.clone()).or_default() += launches;
        }
        snapshot.rows.sort_by(|a, b| (a.pid, &a.function, a.grid, a.block).cmp(&(b.pid, &b.function, b.grid, b.block)));
        pids.sweep(now);
        *publish.lock().expect("launch snapshot poisoned") = snapshot;
    }
    site_names.save();
    probe.detach();
}

/// Shortest sampled window (a floor of 0.6% under the duty with
/// `MAX_INTERVAL`: at most 0.6% of a tenant's time even at the trap
/// rate's limit).
const MIN_WINDOW: Duration = Duration::from_millis(25);
/// Read interval while sampling: launch signals are at most this old.
pub const MAX_INTERVAL: Duration = Duration::from_secs(4);

/// The read interval for `duty`: a second while counting everything;
/// `MAX_INTERVAL` while sampling, because each sample has a fixed cost
/// besides its window's traps (installing and removing eight breakpoints
/// in every process mapping the library: measured ~25 ms of a tenant's
/// time on a 2-core VM), which a long interval spreads thin.
fn interval_for(duty: f64) -> Duration {
    if duty >= 1.0 {
        READ_INTERVAL
    } else {
        MAX_INTERVAL
    }
}

/// Keeps the probes attached for `duty` of the read interval that began at
/// `started` (all of it when `duty` is 1: no detach churn), then waits out
/// the interval; returns how long they counted. A sampled window is
/// counted by the kernel over an exact span (`LaunchProbe::set_window`)
/// opened once every entry point is attached.
fn attach_for(
    probe: &mut LaunchProbe,
    duty: f64,
    interval: Duration,
    started: Instant,
    shutdown: &CancellationToken,
) -> Duration {
    let sleep_until = |deadline: Instant| {
        while !shutdown.is_cancelled() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::sleep(left.min(Duration::from_millis(100)));
        }
    };
    let end = started + interval;
    let window = if duty >= 1.0 { None } else { Some(interval.mul_f64(duty).max(MIN_WINDOW)) };
    // Close the window before attaching so nothing counts while the
    // entry points go live one by one.
    let closed = monotonic_now();
    let closed_window = window.map(|_| (closed, closed));
    let ready = probe.set_window(closed_window).and_then(|()| probe.attach());
    if let Err(err) = ready {
        tracing::warn!(error = %err, "attaching the launch probes");
        probe.detach();
        sleep_until(end);
        return Duration::ZERO;
    }
    let Some(window) = window else {
        sleep_until(end);
        return started.elapsed();
    };
    let open = monotonic_now();
    if let Err(err) = probe.set_window(Some((open, open + window))) {
        tracing::warn!(error = %err, "opening the launch counting window");
        probe.detach();
        sleep_until(end);
        return Duration::ZERO;
    }
    sleep_until(Instant::now() + window);
    let detaching = Instant::now();
    probe.detach();
    tracing::debug!(
        window_ms = window.as_secs_f64() * 1e3,
        detach_ms = detaching.elapsed().as_secs_f64() * 1e3,
        interval_ms = interval.as_secs_f64() * 1e3,
        "launch probes sampled"
    );
    sleep_until(end);
    window
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
            if let Err(err) = probe.add_library(proc, pid, library) {
                tracing::warn!(pid, library = %library.path, error = %err, "adding a libcuda to launch accounting");
            }
        }
        checked.insert(pid, Checked { start_time, found: !libraries.is_empty(), at: now });
    }
}
