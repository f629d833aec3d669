//! The request probe (`agent-ebpf/src/requests.rs`): loads and attaches its
//! socket-layer tracepoints (and, where the node has an NVIDIA driver, the
//! driver path's syscall tracepoints that share its object), manages the
//! watched cgroups and tracked connections, and hands the ring buffer to
//! the reader task (`reader`) that drains it through the per-connection
//! parsers.
mod driver_hooks;
pub mod http1;
pub mod http2;
mod reader;
pub mod sockets;
pub mod tracker;
pub mod traffic;

pub use driver_hooks::{DriverHooks, DriverHooksUsed, DriverLibrary};
pub use reader::{monotonic_ns, run_reader, ReaderStats, SWEEP_INTERVAL};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::{Ebpf, EbpfLoader};
use podgpu_common::{conn_mode, tgid_slot, ConnState, RequestStat, WATCH_TCP};

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
    /// Whether the kernel still tracks `connection` (true when the map
    /// cannot say).
    fn tracks(&self, connection: u64) -> bool {
        !matches!(self.connections.get(&connection, 0), Err(aya::maps::MapError::KeyNotFound))
    }

    /// Events the kernel dropped on a full ring, since load.
    fn ring_drops(&self) -> u64 {
        self.stats.get(&(RequestStat::RingFull as u32), 0).map_or(0, |values| values.iter().sum())
    }
}
