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
        let (mut swept, mut published) = (Instant::now(), None::<Instant>);
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            while let Some(item) = ring.next() {
                match read_event(&item) {
                    Some(event) => self.handle(event),
                    None => self.stats.malformed += 1,
                }
            }
            if started.duration_since(swept) >= SWEEP_INTERVAL {
                self.sweep();
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
                    Tracked { start_time, pod_uid, driver: ProcessDriver::default(), context_since: None },
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
