//! The request probe (`agent-ebpf/src/requests.rs`): loads and attaches its
//! socket-layer tracepoints (and, where the node has an NVIDIA driver, the
//! driver path's syscall tracepoints that share its object), manages the
//! watched cgroups and tracked connections, and runs the reader task that
//! drains the ring buffer through the per-connection parsers.
mod driver_hooks;
pub mod http1;
pub mod http2;
pub mod sockets;
pub mod tracker;
pub mod traffic;

pub use driver_hooks::{DriverHooks, DriverHooksUsed, DriverLibrary};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::{Ebpf, EbpfLoader};
use podgpu_common::{
    conn_mode, tgid_slot, ConnState, H2Event, H2Frame, IoEvent, IoKind, RequestStat, H2_EVENT_HEADER, IO_EVENT_HEADER,
    WATCH_TCP,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ProbeError;
use crate::proc::ProcFs;
pub use tracker::{OpenRequests, RequestEvent, TrackerStats};

/// What the reader hands the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeUpdate {
    /// A request started, completed or was aborted.
    Request(RequestEvent),
    /// Bytes moved on a cgroup's tracked connections since the last update.
    Bytes {
        /// cgroup v2 id.
        cgroup_id: u64,
        /// Server port (0: unknown).
        port: u16,
        /// Probe traffic (health checks, metrics scrapes).
        probe: bool,
        /// Bytes the server read (requests arriving).
        received: u64,
        /// Bytes the server wrote (responses leaving).
        sent: u64,
    },
}

/// (program, raw tracepoint it attaches to): the request path, off the
/// syscall path. The process filter's two invalidations come first, so
/// that no socket program remembers a process before they run.
const SOCKET_PROGRAMS: [(&str, &str); 6] = [
    ("cgroup_migrated", "cgroup_attach_task"),
    ("process_exited", "sched_process_exit"),
    ("socket_state", "inet_sock_set_state"),
    ("socket_destroyed", "tcp_destroy_sock"),
    ("socket_received", "sock_recv_length"),
    ("socket_sent", "sock_send_length"),
];
/// The driver path: every syscall on the node runs these.
const WATCHED: &str = "WATCHED_CGROUPS";
const WALKER: &str = "h2_walk";
const DRIVER_DECODE: &str = "driver_decode";
const TAIL_CALLS: &str = "TAIL_CALLS";
const DRIVER_EVENTS: &str = "DRIVER_EVENTS";
const DRIVER_FDS: &str = "DRIVER_FDS";
const CONNECTIONS: &str = "CONNECTIONS";
const EVENTS: &str = "EVENTS";
const STATS: &str = "REQUEST_STATS";
const SEEDED_TGIDS: &str = "SEEDED_TGIDS";
const WATCH_GENERATION: &str = "WATCH_GENERATION";

/// The kernel side's own counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RequestProbeStats {
    /// Events written to the ring buffer.
    pub emitted: u64,
    /// Events lost to a full ring buffer.
    pub ring_full_drops: u64,
    /// Connections not tracked because the map was full.
    pub connection_map_full: u64,
    /// Syscalls not followed because the argument map was full.
    pub args_map_full: u64,
    /// Payload captures that failed.
    pub capture_failed: u64,
    /// HTTP/2 frame boundaries lost (and resynchronised later).
    pub http2_lost_sync: u64,
    /// Of those: a header that was not a valid frame header.
    pub http2_lost_implausible: u64,
    /// Of those: more frames in one syscall than the walker follows.
    pub http2_lost_budget: u64,
    /// Of those: user memory the walker could not read.
    pub http2_lost_fault: u64,
    /// Frame headers split across iovecs or syscalls, joined.
    pub http2_headers_joined: u64,
    /// Reads or writes of server-side sockets by calls that name no user
    /// buffer (`sendfile`, `splice`, io_uring): not followed.
    pub undecoded_socket_calls: u64,
    /// Driver events lost to a full driver ring.
    pub driver_ring_full_drops: u64,
}

/// Sizes of the request probe's kernel maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Pod and container cgroups watched at once; a pod beyond it has no
    /// request metrics (an error, not a 0) until room frees.
    pub watched_cgroups: u32,
    /// Connections tracked at once. The map is an LRU: a new connection
    /// evicts the least recently used, and the tracker ends an evicted one
    /// that had requests open (`reason="kernel_evicted"`).
    pub connections: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            watched_cgroups: podgpu_common::MAX_WATCHED_CGROUPS,
            connections: podgpu_common::MAX_TRACKED_CONNECTIONS,
        }
    }
}

/// Loaded and attached request probe. Dropping it detaches the programs.
pub struct RequestProbe {
    ebpf: Ebpf,
    log: Option<super::ebpf_log::ProgramLog>,
    /// The driver libraries the driver path probes (library hooks only).
    driver_libraries: Vec<DriverLibrary>,
    /// Which hooks carry the driver path (`None`: not attached).
    driver_hooks: Option<DriverHooksUsed>,
}

impl RequestProbe {
    /// Loads the embedded object with its maps sized by `sizes`, and
    /// attaches the request path's raw tracepoints (the driver path is
    /// attached on its own, `attach_driver_path`).
    pub fn load(sizes: MapSizes) -> Result<Self, ProbeError> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(WATCHED, sizes.watched_cgroups.max(1))
            .map_max_entries(CONNECTIONS, sizes.connections.max(1));
        super::ebpf_log::set_level(&mut loader);
        let mut ebpf = loader.load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podgpu-requests")))?;
        let log = super::ebpf_log::take(&mut ebpf);
        // The frame walker and the driver decoder are not attached: the
        // socket programs and `syscall_exit` tail-call them (slots 0, 1).
        for (slot, name) in [(0, WALKER), (1, DRIVER_DECODE)] {
            super::load_raw_tracepoint(&mut ebpf, name)?;
            super::set_tail_call(&mut ebpf, TAIL_CALLS, slot, name)?;
        }
        super::attach_raw_tracepoints(&mut ebpf, &SOCKET_PROGRAMS)?;
        Ok(Self { ebpf, log, driver_libraries: Vec::new(), driver_hooks: None })
    }

    /// Starts tracking connections accepted in `cgroup_id`.
    pub fn watch(&mut self, cgroup_id: u64) -> Result<(), ProbeError> {
        let map = self.ebpf.map_mut(WATCHED).ok_or(ProbeError::MissingMap(WATCHED))?;
        let mut watched: HashMap<_, u64, u32> =
            HashMap::try_from(map).map_err(|source| ProbeError::Map { name: WATCHED, source })?;
        watched.insert(cgroup_id, WATCH_TCP, 0).map_err(|source| ProbeError::Map { name: WATCHED, source })?;
        // The kernel remembers processes it found in no watched cgroup;
        // a new generation makes it look again (after the insert, so that
        // no look in between can be remembered as current).
        let map = self.ebpf.map_mut(WATCH_GENERATION).ok_or(ProbeError::MissingMap(WATCH_GENERATION))?;
        let mut generation: Array<_, u64> =
            Array::try_from(map).map_err(|source| ProbeError::Map { name: WATCH_GENERATION, source })?;
        let current = generation.get(&0, 0).map_err(|source| ProbeError::Map { name: WATCH_GENERATION, source })?;
        generation
            .set(0, current.wrapping_add(1), 0)
            .map_err(|source| ProbeError::Map { name: WATCH_GENERATION, source })
    }

    /// Starts tracking new connections of `cgroup_id` (the cgroup at
    /// `cgroup_dir`), and the connections its processes accepted before;
    /// an error when the map of watched cgroups refuses it.
    pub fn watch_with_existing(
        &mut self,
        cgroup_id: u64,
        cgroup_dir: &std::path::Path,
        proc: &ProcFs,
    ) -> Result<(), ProbeError> {
        self.watch(cgroup_id)?;
        let pids: Vec<u32> = std::fs::read_to_string(cgroup_dir.join("cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default();
        for existing in sockets::existing_connections(proc, &pids) {
            if let Err(err) = self.track_existing(existing.tgid, existing.fd, cgroup_id) {
                tracing::debug!(error = %err, "tracking an existing connection");
            }
        }
        Ok(())
    }

    /// Stops tracking new connections of `cgroup_id`.
    pub fn unwatch(&mut self, cgroup_id: u64) -> Result<(), ProbeError> {
        let map = self.ebpf.map_mut(WATCHED).ok_or(ProbeError::MissingMap(WATCHED))?;
        let mut watched: HashMap<_, u64, u32> =
            HashMap::try_from(map).map_err(|source| ProbeError::Map { name: WATCHED, source })?;
        let _ = watched.remove(&cgroup_id);
        Ok(())
    }

    /// Tracks an already-established connection (accepted before the agent
    /// started); its parser joins at the next request line.
    pub fn track_existing(&mut self, tgid: u32, fd: u32, cgroup_id: u64) -> Result<(), ProbeError> {
        let map = self.ebpf.map_mut(CONNECTIONS).ok_or(ProbeError::MissingMap(CONNECTIONS))?;
        // aya's HashMap handle also serves LRU hash maps.
        let mut connections: HashMap<_, u64, ConnState> =
            HashMap::try_from(map).map_err(|source| ProbeError::Map { name: CONNECTIONS, source })?;
        let key = u64::from(tgid) << 32 | u64::from(fd);
        // The protocol is decided by the next data seen (mid-stream rules).
        let state = ConnState { cgroup_id, mode: conn_mode::UNKNOWN, ..ConnState::default() };
        connections.insert(key, state, 0).map_err(|source| ProbeError::Map { name: CONNECTIONS, source })?;
        // The kernel follows I/O only of processes marked in a tgid bitmap.
        let map = self.ebpf.map_mut(SEEDED_TGIDS).ok_or(ProbeError::MissingMap(SEEDED_TGIDS))?;
        let mut seeded: Array<_, u64> =
            Array::try_from(map).map_err(|source| ProbeError::Map { name: SEEDED_TGIDS, source })?;
        let (word, byte) = tgid_slot(u64::from(tgid));
        let marked = seeded.get(&word, 0).map_err(|source| ProbeError::Map { name: SEEDED_TGIDS, source })?;
        seeded.set(word, marked | 1 << (byte * 8), 0).map_err(|source| ProbeError::Map { name: SEEDED_TGIDS, source })
    }

    /// Second handles on the kernel's connection map and counters, for
    /// the reader: to tell connections the kernel evicted from quiet ones,
    /// and to learn that the ring lost events.
    pub fn kernel_maps(&self) -> Result<KernelMaps, ProbeError> {
        Ok(KernelMaps {
            connections: HashMap::try_from(self.second_handle(CONNECTIONS)?)
                .map_err(|source| ProbeError::Map { name: CONNECTIONS, source })?,
            stats: PerCpuArray::try_from(self.second_handle(STATS)?)
                .map_err(|source| ProbeError::Map { name: STATS, source })?,
        })
    }

    /// Another handle on map `name` (a duplicated fd).
    fn second_handle(&self, name: &'static str) -> Result<aya::maps::Map, ProbeError> {
        let map_error = |source| ProbeError::Map { name, source };
        let data = match self.ebpf.map(name).ok_or(ProbeError::MissingMap(name))? {
            aya::maps::Map::LruHashMap(data) | aya::maps::Map::PerCpuArray(data) => data,
            _ => return Err(ProbeError::MissingMap(name)),
        };
        let fd = std::os::fd::AsFd::as_fd(data.fd()).try_clone_to_owned().map_err(|io_error| {
            map_error(aya::maps::MapError::SyscallError(aya::sys::SyscallError { call: "dup", io_error }))
        })?;
        aya::maps::Map::from_map_data(MapData::from_fd(fd).map_err(map_error)?).map_err(map_error)
    }

    /// The programs' own log (aya-log), handed to its forwarding task
    /// (once).
    pub fn take_log(&mut self) -> Option<super::ebpf_log::ProgramLog> {
        self.log.take()
    }

    /// The ring buffer, handed to the reader task (once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self.ebpf.take_map(EVENTS).ok_or(ProbeError::MissingMap(EVENTS))?;
        RingBuf::try_from(map).map_err(|source| ProbeError::Map { name: EVENTS, source })
    }

    /// The driver path's event ring and fd map, handed to the driver
    /// reader (once).
    pub fn take_driver_maps(&mut self) -> Result<crate::probes::driver::DriverMaps, ProbeError> {
        let ring = self.ebpf.take_map(DRIVER_EVENTS).ok_or(ProbeError::MissingMap(DRIVER_EVENTS))?;
        let ring = RingBuf::try_from(ring).map_err(|source| ProbeError::Map { name: DRIVER_EVENTS, source })?;
        let fds = self.ebpf.take_map(DRIVER_FDS).ok_or(ProbeError::MissingMap(DRIVER_FDS))?;
        let fds = HashMap::try_from(fds).map_err(|source| ProbeError::Map { name: DRIVER_FDS, source })?;
        Ok(crate::probes::driver::DriverMaps { ring, fds })
    }

    /// Kernel run-time statistics of this probe's programs.
    pub fn program_stats(&self) -> Vec<crate::probes::BpfProgramStats> {
        crate::probes::program_stats(&self.ebpf)
    }

    /// The kernel side's counters.
    pub fn stats(&self) -> Result<RequestProbeStats, ProbeError> {
        let map = self.ebpf.map(STATS).ok_or(ProbeError::MissingMap(STATS))?;
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|source| ProbeError::Map { name: STATS, source })?;
        let sum = |stat: RequestStat| -> Result<u64, ProbeError> {
            let values = stats.get(&(stat as u32), 0).map_err(|source| ProbeError::Map { name: STATS, source })?;
            Ok(values.iter().sum())
        };
        Ok(RequestProbeStats {
            emitted: sum(RequestStat::Emitted)?,
            ring_full_drops: sum(RequestStat::RingFull)?,
            connection_map_full: sum(RequestStat::ConnectionMapFull)?,
            args_map_full: sum(RequestStat::ArgsMapFull)?,
            capture_failed: sum(RequestStat::CaptureFailed)?,
            http2_lost_sync: sum(RequestStat::H2LostSync)?,
            http2_lost_implausible: sum(RequestStat::H2LostImplausible)?,
            http2_lost_budget: sum(RequestStat::H2LostBudget)?,
            http2_lost_fault: sum(RequestStat::H2LostFault)?,
            http2_headers_joined: sum(RequestStat::H2HeadersJoined)?,
            driver_ring_full_drops: sum(RequestStat::DriverRingFull)?,
            undecoded_socket_calls: sum(RequestStat::UndecodedSocketCall)?,
        })
    }
}

/// The kernel's connection map and counters, read by the reader's sweeps.
pub struct KernelMaps {
    connections: HashMap<MapData, u64, ConnState>,
    stats: PerCpuArray<MapData, u64>,
}

impl KernelMaps {
    /// Events the kernel dropped on a full ring, since load.
    fn ring_drops(&self) -> u64 {
        self.stats.get(&(RequestStat::RingFull as u32), 0).map_or(0, |values| values.iter().sum())
    }
}

/// The host as the tracker's sweeps see it: processes and fds through
/// procfs, connections through the kernel map.
struct HostLiveness<'a> {
    proc: &'a ProcFs,
    kernel: Option<&'a KernelMaps>,
}

impl tracker::Liveness for HostLiveness<'_> {
    fn start_time(&self, tgid: u32) -> Option<u64> {
        self.proc.start_time(tgid)
    }

    fn is_socket(&self, tgid: u32, fd: u32) -> bool {
        match self.proc.fd_target(tgid, fd) {
            Ok(target) => target.to_str().is_some_and(|t| t.starts_with("socket:[")),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
            // Not allowed to look (no ptrace access): cannot tell, keep it.
            Err(_) => true,
        }
    }

    fn kernel_tracks(&self, connection: u64) -> bool {
        let Some(kernel) = self.kernel else { return true };
        !matches!(kernel.connections.get(&connection, 0), Err(aya::maps::MapError::KeyNotFound))
    }
}

/// What the reader task has done, shared with the collector.
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Events decoded from the ring buffer.
    pub events: AtomicU64,
    /// Malformed ring records (wrong size).
    pub malformed: AtomicU64,
    /// Request events dropped because the collector lagged.
    pub dropped: AtomicU64,
    /// Connections currently followed.
    pub connections: AtomicU64,
    /// HTTP/2 connections recognised.
    pub http2_connections: AtomicU64,
    /// Requests open now per (cgroup, port): a level, replaced whole after
    /// every change, so nothing lost on the way (a full channel, an
    /// unknown cgroup) can leave it wrong.
    pub open_requests: std::sync::Mutex<OpenRequests>,
    /// What the tracker ended on its own (missed endings).
    pub tracker: std::sync::Mutex<TrackerStats>,
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Longest time an event waits in the ring before the reader looks.
const DRAIN_INTERVAL: Duration = Duration::from_millis(20);

/// Bytes (received, sent) per traffic key since the last flush.
type ByteCounts = std::collections::HashMap<tracker::TrafficKey, (u64, u64), foldhash::fast::RandomState>;

/// A ring record of a variable-length event: the event's fields up to
/// `header` bytes, then `count` (the u32 at bytes 36-40, the same place
/// in both event types) items of `item` bytes, at most `max_count`.
/// Copied into `scratch`; `None` for a record too short for what it says
/// it holds.
///
/// # Safety
/// `T` must be a plain-data repr(C) struct, valid for every byte pattern,
/// of at least `header + max_count * item` bytes.
unsafe fn read_record<'a, T>(
    record: &[u8],
    scratch: &'a mut T,
    (header, item, max_count): (usize, usize, usize),
) -> Option<&'a T> {
    let count = u32::from_ne_bytes(record.get(36..40)?.try_into().ok()?) as usize;
    let length = header.checked_add(count.checked_mul(item)?)?;
    if count > max_count || record.len() < length {
        return None;
    }
    // SAFETY: `length` <= the struct's size (the caller's promise and the
    // check above), and any bytes make a valid `T`.
    unsafe { std::ptr::copy_nonoverlapping(record.as_ptr(), (scratch as *mut T).cast::<u8>(), length) };
    Some(scratch)
}

/// The `IoEvent` a ring record holds (it ends after its captured prefix).
fn read_io_event<'a>(record: &[u8], scratch: &'a mut IoEvent) -> Option<&'a IoEvent> {
    // SAFETY: IoEvent is plain data; its prefix holds CAPTURE_PREFIX bytes.
    unsafe { read_record(record, scratch, (IO_EVENT_HEADER, 1, podgpu_common::CAPTURE_PREFIX)) }
}

/// The `H2Event` a ring record holds (it ends after its frames).
fn read_h2_event<'a>(record: &[u8], scratch: &'a mut H2Event) -> Option<&'a H2Event> {
    // SAFETY: H2Event is plain data with room for MAX_H2_FRAMES frames.
    unsafe {
        read_record(record, scratch, (H2_EVENT_HEADER, std::mem::size_of::<H2Frame>(), podgpu_common::MAX_H2_FRAMES))
    }
}

fn drain_ring(
    ring: &mut RingBuf<MapData>,
    (scratch, h2_scratch): (&mut IoEvent, &mut H2Event),
    tracker: &mut tracker::Tracker,
    stats: &ReaderStats,
    outcomes: &mut Vec<RequestEvent>,
    bytes: &mut ByteCounts,
) {
    while let Some(item) = ring.next() {
        // Both record types start with four u64 then `kind`.
        let kind = item.get(32..36).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        if matches!(kind, Some(k) if k == IoKind::H2Read as u32 || k == IoKind::H2Write as u32) {
            let Some(event) = read_h2_event(&item, h2_scratch) else {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            stats.events.fetch_add(1, Ordering::Relaxed);
            tracker.observe_h2(event, outcomes);
            continue;
        }
        let Some(event) = read_io_event(&item, scratch) else {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        stats.events.fetch_add(1, Ordering::Relaxed);
        let counted = tracker.observe(event, outcomes);
        if let (true, Some((port, probe))) = (event.bytes > 0, counted) {
            let counts = bytes.entry((event.cgroup_id, port, probe)).or_default();
            match event.kind {
                k if k == podgpu_common::IoKind::Read as u32 => counts.0 += event.bytes as u64,
                k if k == podgpu_common::IoKind::Write as u32 => counts.1 += event.bytes as u64,
                _ => {}
            }
        }
    }
}

/// Time between tracker sweeps (missed endings, recount of open requests):
/// the bound on how long a lost ending can hold a request open.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Drains the ring buffer whenever it has data, until `shutdown`.
pub async fn run_reader(
    ring: RingBuf<MapData>,
    proc: ProcFs,
    probe_paths: traffic::ProbePaths,
    kernel: Option<KernelMaps>,
    updates: mpsc::Sender<Vec<ProbeUpdate>>,
    stats: Arc<ReaderStats>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and keeps it open, unchanged,
    // for as long as the AsyncFd that owns the ring buffer lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    let mut tracker = tracker::Tracker::new(proc.clone(), probe_paths);
    let host = HostLiveness { proc: &proc, kernel: kernel.as_ref() };
    let mut outcomes = Vec::new();
    let mut bytes = ByteCounts::default();
    let mut scratch = Box::new(IoEvent::zeroed());
    let mut h2_scratch = H2Event::default();
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut ring_drops_seen = kernel.as_ref().map_or(0, KernelMaps::ring_drops);
    // The kernel wakes us only for batches (512 KiB); the timer bounds how
    // stale a quiet connection's events can get.
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = sweep.tick() => {
                let ring_drops = kernel.as_ref().map_or(0, KernelMaps::ring_drops);
                if ring_drops > ring_drops_seen {
                    tracing::debug!(lost = ring_drops - ring_drops_seen, "request ring lost events; open requests resynchronise");
                    tracker.events_lost();
                    ring_drops_seen = ring_drops;
                }
                tracker.sweep(monotonic_ns(), &host, &mut outcomes);
                *stats.tracker.lock().expect("tracker stats poisoned") = tracker.stats();
                *stats.open_requests.lock().expect("open requests poisoned") = tracker.open_requests().clone();
            }
            _ = drain.tick() => drain_ring(ring.get_mut(), (&mut scratch, &mut h2_scratch), &mut tracker, &stats, &mut outcomes, &mut bytes),
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain_ring(guard.get_inner_mut(), (&mut scratch, &mut h2_scratch), &mut tracker, &stats, &mut outcomes, &mut bytes);
                guard.clear_ready();
            }
        }
        if !outcomes.is_empty() {
            *stats.open_requests.lock().expect("open requests poisoned") = tracker.open_requests().clone();
        }
        // One send per drain: per-event channel traffic would cost more
        // than the parsing.
        if !outcomes.is_empty() || !bytes.is_empty() {
            let byte_updates = bytes.drain().map(|((cgroup_id, port, probe), (received, sent))| ProbeUpdate::Bytes {
                cgroup_id,
                port,
                probe,
                received,
                sent,
            });
            let batch: Vec<ProbeUpdate> = outcomes.drain(..).map(ProbeUpdate::Request).chain(byte_updates).collect();
            let count = batch.len() as u64;
            if updates.try_send(batch).is_err() {
                stats.dropped.fetch_add(count, Ordering::Relaxed);
            }
        }
        let tracker_stats = tracker.stats();
        stats.connections.store(tracker.len() as u64, Ordering::Relaxed);
        stats.http2_connections.store(tracker_stats.http2_connections, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes the kernel side writes for an event with `captured`
    /// prefix bytes.
    fn record(captured: &[u8]) -> Vec<u8> {
        let mut event = IoEvent::zeroed();
        event.connection = 42;
        event.bytes = 300;
        event.kind = IoKind::Write as u32;
        event.prefix_len = captured.len() as u32;
        event.suffix_len = 2;
        event.suffix[..2].copy_from_slice(b"\r\n");
        event.prefix[..captured.len()].copy_from_slice(captured);
        // SAFETY: plain-data struct viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&event as *const IoEvent).cast::<u8>(), std::mem::size_of::<IoEvent>())
        };
        bytes[..IO_EVENT_HEADER + captured.len()].to_vec()
    }

    #[test]
    fn a_record_carries_only_its_captured_bytes() {
        let mut scratch = IoEvent::zeroed();
        scratch.prefix.fill(b'x');
        let bytes = record(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(bytes.len(), IO_EVENT_HEADER + 17);
        let event = read_io_event(&bytes, &mut scratch).expect("a whole record");
        assert_eq!((event.connection, event.bytes, event.prefix_len), (42, 300, 17));
        assert_eq!(&event.prefix[..17], b"HTTP/1.1 200 OK\r\n");
        assert_eq!(&event.suffix[..event.suffix_len as usize], b"\r\n");
        assert!(read_io_event(&record(b""), &mut scratch).is_some_and(|event| event.prefix_len == 0));
    }

    #[test]
    fn an_http2_record_carries_only_its_frames() {
        let mut event = H2Event { connection: 9, kind: IoKind::H2Write as u32, frame_count: 2, ..H2Event::default() };
        event.frames[0] = H2Frame { length: 12, stream_id: 1, kind: 1, flags: 4, _pad: [0; 2] };
        event.frames[1] = H2Frame { length: 256, stream_id: 1, kind: 0, flags: 1, _pad: [0; 2] };
        // SAFETY: plain-data struct viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&event as *const H2Event).cast::<u8>(), std::mem::size_of::<H2Event>())
        };
        let record = &bytes[..H2_EVENT_HEADER + 2 * std::mem::size_of::<H2Frame>()];
        let mut scratch = H2Event::default();
        scratch.frames[2].length = 77;
        let read = read_h2_event(record, &mut scratch).expect("a whole record");
        assert_eq!((read.connection, read.frame_count), (9, 2));
        assert_eq!(read.frames[..2], event.frames[..2]);
        assert!(read_h2_event(&record[..record.len() - 1], &mut scratch).is_none(), "a frame cut short");
        let mut lying = bytes.to_vec();
        lying[36..40].copy_from_slice(&(podgpu_common::MAX_H2_FRAMES as u32 + 1).to_ne_bytes());
        lying.resize(lying.len() + 64, 0);
        assert!(read_h2_event(&lying, &mut scratch).is_none(), "more frames than an event holds");
    }

    #[test]
    fn a_record_shorter_than_it_says_is_refused() {
        let mut scratch = IoEvent::zeroed();
        let bytes = record(b"GET / HTTP/1.1\r\n");
        assert!(read_io_event(&bytes[..bytes.len() - 1], &mut scratch).is_none());
        assert!(read_io_event(&bytes[..20], &mut scratch).is_none());
        let mut lying = bytes.clone();
        lying[36..40].copy_from_slice(&(podgpu_common::CAPTURE_PREFIX as u32 + 1).to_ne_bytes());
        lying.resize(std::mem::size_of::<IoEvent>() + 8, 0);
        assert!(read_io_event(&lying, &mut scratch).is_none());
    }
}
