//! The NVIDIA driver path, user side: a thread drains the driver events the
//! request probe's syscall tracepoints decode (`agent-ebpf/src/driver.rs`),
//! checks fds the kernel does not know yet (`devices`), rebuilds what each
//! process holds in the driver (`objects`), and publishes per-pod contexts,
//! driver memory, calls and time blocked as a `DriverSnapshot` the
//! collector reads every tick.
//!
//! Calls are kept cumulative per pod (an exited process's calls are
//! retired into its pod's total); contexts and memory are levels of live
//! processes only. A process's state goes when it exits (or its pid is
//! reused): the driver frees everything it held then.
//!
//! A process that held an NVIDIA device before the reader started (the
//! agent restarted beside running pods) made calls nobody saw: what it
//! holds is unknown, not zero. The reader finds such processes when it
//! starts and counts them per pod (`PodDriver::joined_late`) until they
//! exit; their pods' contexts and driver memory are unavailable then.
pub mod devices;
pub mod libraries;
pub mod objects;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use podgpu_common::driver::{driver_event, fd_kind, DriverEvent};
use tokio_util::sync::CancellationToken;

use self::devices::DeviceMatcher;
use self::objects::{CallKind, ProcessDriver};
use crate::pods::pid_cache::PidCache;
use crate::proc::ProcFs;

/// Time between ring drains: CUDA init bursts ~1600 events, the ring holds
/// ~8,000.
const DRAIN_INTERVAL: Duration = Duration::from_millis(20);
/// Time between sweeps for exited processes and publications.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const PUBLISH_INTERVAL: Duration = Duration::from_millis(200);
/// How long a process must have held a device with no call seen before
/// it counts as missed (a CUDA process calls the driver within
/// microseconds of opening it; its first events may still be in the
/// ring).
const ADOPT_MIN_AGE: Duration = Duration::from_secs(2);
/// How long after a newly read library the sweeps look for missed
/// processes (long enough for its users to reach `ADOPT_MIN_AGE`).
const ADOPT_WINDOW: Duration = Duration::from_secs(5);

/// The kernel side the reader needs: the event ring and the fd map.
pub struct DriverMaps {
    /// `DRIVER_EVENTS`.
    pub ring: RingBuf<MapData>,
    /// `DRIVER_FDS`: (tgid << 32 | fd) -> `fd_kind`.
    pub fds: BpfHashMap<MapData, u64, u32>,
}

/// Driver state of one pod.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct PodDriver {
    /// GPU contexts its live processes hold: (process, GPU) pairs.
    pub contexts: u32,
    /// VRAM its live processes allocated through the driver, bytes.
    pub vram_bytes: u64,
    /// Driver calls since the agent started (exited processes included).
    pub calls: u64,
    /// Time blocked in driver calls, ns, likewise cumulative.
    pub blocked_ns: u64,
    /// Calls by kind, cumulative.
    pub calls_by_kind: BTreeMap<CallKind, u64>,
    /// Live processes that held an NVIDIA device before the driver path
    /// watched: their contexts and memory are unknown while they live.
    pub joined_late: u32,
}

/// One live process's driver state, as the node reports it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DriverRow {
    /// Process.
    pub pid: u32,
    /// Pod UID (`None`: a host process).
    pub pod_uid: Option<String>,
    /// GPU indexes it holds a context on (`u32::MAX`: a context whose GPU
    /// was allocated before the agent watched).
    pub context_devices: Vec<u32>,
    /// VRAM allocated through the driver, bytes.
    pub vram_bytes: u64,
    /// Driver calls.
    pub calls: u64,
    /// Time blocked in driver calls, ms.
    pub blocked_ms: f64,
    /// Calls by kind.
    pub calls_by_kind: BTreeMap<CallKind, u64>,
    /// When it first held a context (Unix ms): the moment the driver path
    /// saw it GPU-active.
    pub context_since_unix_ms: Option<u64>,
    /// It held an NVIDIA device before the driver path watched: its
    /// contexts and memory are what it did since (a lower bound).
    pub joined_late: bool,
}

/// The reader's own counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DriverReaderStats {
    /// Driver events read from the ring.
    pub events: u64,
    /// fds the kernel did not know, checked through `/proc`.
    pub fds_checked: u64,
    /// Of those, not NVIDIA devices (their ioctls are ignored from then).
    pub fds_not_nvidia: u64,
    /// Events whose fd was gone before it could be checked (not booked).
    pub unverifiable: u64,
    /// Ring entries of the wrong size (never expected).
    pub malformed: u64,
}

/// What the reader publishes.
#[derive(Clone, Debug, Default)]
pub struct DriverSnapshot {
    /// Per pod UID.
    pub per_pod: HashMap<String, PodDriver>,
    /// Live processes that called the driver, by pid.
    pub rows: Vec<DriverRow>,
    /// Reader counters.
    pub stats: DriverReaderStats,
    /// When the reader published this (`None`: not yet).
    pub published: Option<Instant>,
}

/// What the reader needs besides the maps.
pub struct DriverReaderConfig {
    /// procfs of the host.
    pub proc: ProcFs,
    /// Tells NVIDIA fds from others.
    pub matcher: DeviceMatcher,
    /// Set when a pod opens its first GPU context: the GPU poller polls at
    /// once instead of at its next interval.
    pub poll_gpu_now: Arc<AtomicBool>,
    /// Set when the driver path starts reading a library some processes
    /// already used: the reader looks for the ones it has not seen.
    pub adopt_now: Arc<AtomicBool>,
}

/// Starts the reader thread; it ends with `shutdown`.
pub fn spawn(
    maps: DriverMaps,
    config: DriverReaderConfig,
    publish: Arc<Mutex<DriverSnapshot>>,
    shutdown: CancellationToken,
) -> thread::JoinHandle<()> {
    thread::Builder::new()
        .name("driver-reader".to_string())
        .spawn(move || {
            let mut reader = DriverReader::new(config, maps.fds);
            reader.run(maps.ring, &publish, &shutdown)
        })
        .expect("spawning the driver reader thread")
}

/// One process as the reader tracks it.
struct Tracked {
    start_time: u64,
    pod_uid: Option<String>,
    driver: ProcessDriver,
    context_since: Option<SystemTime>,
    joined_late: bool,
}

/// The reader's state (separate from the thread for tests).
pub struct DriverReader {
    config: DriverReaderConfig,
    fds: FdMap,
    pids: PidCache,
    processes: HashMap<u32, Tracked>,
    /// Checked fds, (tgid << 32 | fd) -> kind, mirrored into the kernel.
    known_fds: HashMap<u64, u32>,
    retired: HashMap<String, PodDriver>,
    stats: DriverReaderStats,
}

/// Where checked fds are written for the kernel (a map, or nothing in
/// unit tests).
pub trait FdSink: Send {
    /// Records `kind` for `key`.
    fn insert(&mut self, key: u64, kind: u32);
    /// Forgets `key`.
    fn remove(&mut self, key: u64);
}

impl FdSink for BpfHashMap<MapData, u64, u32> {
    fn insert(&mut self, key: u64, kind: u32) {
        if let Err(err) = BpfHashMap::insert(self, key, kind, 0) {
            tracing::debug!(error = %err, "recording a checked driver fd");
        }
    }

    fn remove(&mut self, key: u64) {
        let _ = BpfHashMap::remove(self, &key);
    }
}

type FdMap = Box<dyn FdSink>;

impl DriverReader {
    /// A reader writing checked fds to `fds`.
    pub fn new(config: DriverReaderConfig, fds: impl FdSink + 'static) -> Self {
        let pids = PidCache::new(config.proc.clone(), Duration::from_secs(60));
        Self {
            config,
            fds: Box::new(fds),
            pids,
            processes: HashMap::new(),
            known_fds: HashMap::new(),
            retired: HashMap::new(),
            stats: DriverReaderStats::default(),
        }
    }

    fn run(&mut self, mut ring: RingBuf<MapData>, publish: &Mutex<DriverSnapshot>, shutdown: &CancellationToken) {
        self.adopt_existing();
        let (mut swept, mut published) = (Instant::now(), None::<Instant>);
        let mut adopt_until: Option<Instant> = None;
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            while let Some(item) = ring.next() {
                match read_event(&item) {
                    Some(event) => self.handle(event),
                    None => self.stats.malformed += 1,
                }
            }
            // Looked for again at every sweep for a while: a process must
            // be `ADOPT_MIN_AGE` old to count.
            if self.config.adopt_now.swap(false, Ordering::Relaxed) {
                adopt_until = Some(started + ADOPT_WINDOW);
            }
            if started.duration_since(swept) >= SWEEP_INTERVAL {
                self.sweep();
                if adopt_until.is_some_and(|until| started < until) {
                    self.adopt_unseen(ADOPT_MIN_AGE);
                }
                swept = started;
            }
            if published.is_none_or(|at| started.duration_since(at) >= PUBLISH_INTERVAL) {
                *publish.lock().expect("driver snapshot poisoned") = self.snapshot(started);
                published = Some(started);
            }
            thread::sleep(DRAIN_INTERVAL.saturating_sub(started.elapsed()));
        }
    }

    /// Books one event.
    pub fn handle(&mut self, mut event: DriverEvent) {
        self.stats.events += 1;
        let key = u64::from(event.tgid) << 32 | u64::from(event.fd);
        if event.event == driver_event::CLOSE {
            self.known_fds.remove(&key);
            return;
        }
        if event.fd_kind == fd_kind::UNVERIFIED {
            let Some(kind) = self.check_fd(key, event.tgid, event.fd) else {
                self.stats.unverifiable += 1;
                return;
            };
            event.fd_kind = kind;
        }
        if event.fd_kind == fd_kind::NOT_NVIDIA {
            return;
        }
        let Some(start_time) = self.config.proc.start_time(event.tgid) else {
            // Gone already: whatever it allocated is freed with it.
            return;
        };
        let now = Instant::now();
        let tracked = match self.processes.get(&event.tgid) {
            Some(known) if known.start_time == start_time => self.processes.get_mut(&event.tgid),
            _ => {
                self.retire(event.tgid);
                let pod_uid = self.pids.resolve(event.tgid, now).map(|owner| owner.pod_uid.clone());
                self.processes.insert(
                    event.tgid,
                    Tracked {
                        start_time,
                        pod_uid,
                        driver: ProcessDriver::default(),
                        context_since: None,
                        joined_late: false,
                    },
                );
                self.processes.get_mut(&event.tgid)
            }
        };
        let Some(tracked) = tracked else { return };
        let kind = tracked.driver.apply(&event);
        if kind == CallKind::Context && tracked.context_since.is_none() && !tracked.driver.context_devices().is_empty()
        {
            tracked.context_since = Some(SystemTime::now());
            self.config.poll_gpu_now.store(true, Ordering::Relaxed);
        }
    }

    /// Finds the processes that held an NVIDIA device before now (the
    /// driver path attached just before the reader starts) and tracks
    /// them as joined late. Returns how many.
    pub fn adopt_existing(&mut self) -> usize {
        self.adopt_unseen(Duration::ZERO)
    }

    /// Tracks as joined late every process that holds an NVIDIA device,
    /// started at least `min_age` ago, and made no call the reader saw:
    /// its calls went by unseen (it is older than the reader, or it used a
    /// libcuda the driver path did not read yet). A CUDA process calls the
    /// driver as soon as it opens it, so a process seen for `min_age`
    /// with a device open and no call is one whose calls were missed.
    /// Returns how many.
    pub fn adopt_unseen(&mut self, min_age: Duration) -> usize {
        let proc = self.config.proc.clone();
        let Some(now_ticks) = proc.uptime_ticks() else {
            tracing::warn!("no uptime in procfs: processes whose driver calls were missed cannot be told apart");
            return 0;
        };
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let started_before = now_ticks.saturating_sub((min_age.as_secs_f64() * ticks_per_second) as u64);
        let now = Instant::now();
        let mut adopted = 0;
        for pid in proc.pids() {
            if self.processes.contains_key(&pid) {
                continue;
            }
            let Some(start_time) = proc.start_time(pid) else { continue };
            if start_time >= started_before || !self.config.matcher.holds_nvidia_fd(pid) {
                continue;
            }
            let pod_uid = self.pids.resolve(pid, now).map(|owner| owner.pod_uid.clone());
            self.processes.insert(
                pid,
                Tracked {
                    start_time,
                    pod_uid,
                    driver: ProcessDriver::default(),
                    context_since: None,
                    joined_late: true,
                },
            );
            adopted += 1;
        }
        if adopted > 0 {
            tracing::warn!(
                processes = adopted,
                "processes held an NVIDIA device with driver calls the driver path did not see: their pods' contexts and driver memory are unknown until they exit"
            );
        }
        adopted
    }

    /// The kind of an fd the kernel did not know; recorded for the kernel.
    fn check_fd(&mut self, key: u64, tgid: u32, fd: u32) -> Option<u32> {
        if let Some(kind) = self.known_fds.get(&key) {
            return Some(*kind);
        }
        let kind = self.config.matcher.classify(tgid, fd)?;
        self.stats.fds_checked += 1;
        if kind == fd_kind::NOT_NVIDIA {
            self.stats.fds_not_nvidia += 1;
        }
        self.known_fds.insert(key, kind);
        self.fds.insert(key, kind);
        Some(kind)
    }

    /// Drops exited processes (their calls go to their pod's total) and
    /// their fds.
    pub fn sweep(&mut self) {
        let proc = self.config.proc.clone();
        let gone: Vec<u32> = self
            .processes
            .iter()
            .filter(|(pid, tracked)| proc.start_time(**pid) != Some(tracked.start_time))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            self.retire(pid);
        }
        let dead_keys: Vec<u64> =
            self.known_fds.keys().copied().filter(|key| proc.start_time((key >> 32) as u32).is_none()).collect();
        for key in dead_keys {
            self.known_fds.remove(&key);
            self.fds.remove(key);
        }
        self.pids.sweep(Instant::now());
    }

    fn retire(&mut self, pid: u32) {
        let Some(tracked) = self.processes.remove(&pid) else { return };
        if let Some(uid) = tracked.pod_uid {
            let pod = self.retired.entry(uid).or_default();
            pod.calls += tracked.driver.total_calls();
            pod.blocked_ns = pod.blocked_ns.saturating_add(tracked.driver.blocked_ns);
            for (kind, calls) in &tracked.driver.calls {
                *pod.calls_by_kind.entry(*kind).or_default() += calls;
            }
        }
    }

    /// Per-pod totals and per-process rows now.
    pub fn snapshot(&self, now: Instant) -> DriverSnapshot {
        let mut per_pod = self.retired.clone();
        let mut rows = Vec::with_capacity(self.processes.len());
        for (pid, tracked) in &self.processes {
            let devices = tracked.driver.context_devices();
            let vram_bytes = tracked.driver.vram_bytes();
            if let Some(uid) = &tracked.pod_uid {
                let pod = per_pod.entry(uid.clone()).or_default();
                pod.contexts += devices.len() as u32;
                pod.joined_late += u32::from(tracked.joined_late);
                // Sizes and durations come from processes' ioctls: saturate.
                pod.vram_bytes = pod.vram_bytes.saturating_add(vram_bytes);
                pod.calls += tracked.driver.total_calls();
                pod.blocked_ns = pod.blocked_ns.saturating_add(tracked.driver.blocked_ns);
                for (kind, calls) in &tracked.driver.calls {
                    *pod.calls_by_kind.entry(*kind).or_default() += calls;
                }
            }
            rows.push(DriverRow {
                pid: *pid,
                pod_uid: tracked.pod_uid.clone(),
                context_devices: devices,
                vram_bytes,
                calls: tracked.driver.total_calls(),
                blocked_ms: tracked.driver.blocked_ns as f64 / 1e6,
                calls_by_kind: tracked.driver.calls.iter().map(|(kind, calls)| (*kind, *calls)).collect(),
                context_since_unix_ms: tracked.context_since.and_then(|at| {
                    at.duration_since(SystemTime::UNIX_EPOCH).ok().map(|since| since.as_millis() as u64)
                }),
                joined_late: tracked.joined_late,
            });
        }
        rows.sort_by_key(|row| row.pid);
        DriverSnapshot { per_pod, rows, stats: self.stats, published: Some(now) }
    }

    /// fds checked and still known (tests).
    pub fn known_fds(&self) -> HashSet<u64> {
        self.known_fds.keys().copied().collect()
    }
}

/// A ring entry as a `DriverEvent` (`None` if its size is wrong).
fn read_event(bytes: &[u8]) -> Option<DriverEvent> {
    if bytes.len() < std::mem::size_of::<DriverEvent>() {
        return None;
    }
    // SAFETY: long enough; `DriverEvent` is plain data valid for any bits,
    // read unaligned because the ring gives no alignment promise.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const DriverEvent) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::write_fake_process;

    /// The fd map in the kernel, for tests without one.
    struct NoKernel;

    impl FdSink for NoKernel {
        fn insert(&mut self, _key: u64, _kind: u32) {}
        fn remove(&mut self, _key: u64) {}
    }

    const POD: &str = "11111111-2222-3333-4444-555555555555";

    /// A process that held an NVIDIA device before the reader started
    /// counts against its pod as joined late (its contexts unknown, not
    /// zero) until it exits; a younger one, and one holding no device,
    /// do not.
    #[test]
    fn processes_older_than_the_reader_are_unknown_not_zero() {
        let root = tempfile::tempdir().unwrap();
        let proc_root = root.path().join("proc");
        std::fs::create_dir_all(&proc_root).unwrap();
        std::fs::write(proc_root.join("uptime"), "100.00 50.00\n").unwrap();
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let device = root.path().join("nvidia0");
        let other = root.path().join("log.txt");
        std::fs::write(&device, b"").unwrap();
        std::fs::write(&other, b"").unwrap();
        let cgroup = format!("0::/kubepods/burstable/pod{POD}/0123456789abcdef\n");
        for (pid, started_s, opened) in [(10, 5, &device), (11, 6, &other), (12, 200, &device)] {
            write_fake_process(&proc_root, pid, started_s * ticks, &cgroup).unwrap();
            let fds = proc_root.join(pid.to_string()).join("fd");
            std::fs::create_dir_all(&fds).unwrap();
            std::os::unix::fs::symlink(opened, fds.join("3")).unwrap();
        }
        let proc = ProcFs::new(&proc_root);
        let stand_in = devices::StandIn { kind: fd_kind::GPU, path: device.clone() };
        let matcher = DeviceMatcher::new(proc.clone(), &root.path().join("devices"), &[stand_in]);
        let config = DriverReaderConfig { proc, matcher, poll_gpu_now: Arc::default(), adopt_now: Arc::default() };
        let mut reader = DriverReader::new(config, NoKernel);
        assert_eq!(reader.adopt_existing(), 1, "only the process that held the device before now");
        let snapshot = reader.snapshot(Instant::now());
        assert_eq!(snapshot.per_pod[POD].joined_late, 1);
        let row = snapshot.rows.iter().find(|row| row.pid == 10).expect("the old process is listed");
        assert!(row.joined_late);
        assert!(snapshot.rows.iter().all(|row| row.pid == 10));

        std::fs::remove_dir_all(proc_root.join("10")).unwrap();
        reader.sweep();
        let snapshot = reader.snapshot(Instant::now());
        assert_eq!(snapshot.per_pod.get(POD).map_or(0, |pod| pod.joined_late), 0, "known again once it exited");
    }
}
