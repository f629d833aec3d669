//! The socket-activity probe (`agent-ebpf/src/sock.rs`): TCP bytes and calls
//! per watched cgroup, from the `sock:sock_{recv,send}_length` tracepoints.
use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, PerCpuArray, PerCpuHashMap};
use aya::programs::TracePoint;
use aya::Ebpf;
use podgpu_common::{ProbeStat, SocketCounters, WATCH_TCP};

use super::{ensure_tracefs, ProbeError};

const PROGRAMS: [(&str, &str, &str); 2] =
    [("sock_recv_length", "sock", "sock_recv_length"), ("sock_send_length", "sock", "sock_send_length")];
const WATCHED: &str = "WATCHED_CGROUPS";
const COUNTERS: &str = "SOCKET_COUNTERS";
const STATS: &str = "PROBE_STATS";

/// The probe's own counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SocketProbeStats {
    /// Events counted for watched cgroups.
    pub counted: u64,
    /// Events lost because the counter map was full.
    pub map_full_drops: u64,
}

/// Loaded and attached socket probe. Dropping it detaches the programs.
pub struct SocketProbe {
    ebpf: Ebpf,
}

impl SocketProbe {
    /// Loads the object embedded at build time and attaches both tracepoints.
    pub fn load() -> Result<Self, ProbeError> {
        ensure_tracefs()?;
        let mut ebpf = Ebpf::load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podgpu-sock")))?;
        for (name, category, tracepoint) in PROGRAMS {
            let program: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or(ProbeError::MissingProgram(name))?
                .try_into()
                .map_err(|source| ProbeError::Program { name, source })?;
            program.load().map_err(|source| ProbeError::Program { name, source })?;
            program.attach(category, tracepoint).map_err(|source| ProbeError::Program { name, source })?;
        }
        Ok(Self { ebpf })
    }

    fn watched(&mut self) -> Result<HashMap<&mut aya::maps::MapData, u64, u32>, ProbeError> {
        let map = self.ebpf.map_mut(WATCHED).ok_or(ProbeError::MissingMap(WATCHED))?;
        HashMap::try_from(map).map_err(|source| ProbeError::Map { name: WATCHED, source })
    }

    /// Starts counting traffic of `cgroup_id`.
    pub fn watch(&mut self, cgroup_id: u64) -> Result<(), ProbeError> {
        self.watched()?.insert(cgroup_id, WATCH_TCP, 0).map_err(|source| ProbeError::Map { name: WATCHED, source })
    }

    /// Stops counting `cgroup_id` and frees its counters.
    pub fn unwatch(&mut self, cgroup_id: u64) -> Result<(), ProbeError> {
        // Absent keys are fine: the cgroup may never have moved a byte.
        let _ = self.watched()?.remove(&cgroup_id);
        let map = self.ebpf.map_mut(COUNTERS).ok_or(ProbeError::MissingMap(COUNTERS))?;
        let mut counters: PerCpuHashMap<_, u64, SocketCounters> =
            PerCpuHashMap::try_from(map).map_err(|source| ProbeError::Map { name: COUNTERS, source })?;
        let _ = counters.remove(&cgroup_id);
        Ok(())
    }

    /// Cumulative counters of every cgroup that moved bytes, summed over CPUs.
    pub fn read(&self) -> Result<StdHashMap<u64, SocketCounters>, ProbeError> {
        let map = self.ebpf.map(COUNTERS).ok_or(ProbeError::MissingMap(COUNTERS))?;
        let counters: PerCpuHashMap<_, u64, SocketCounters> =
            PerCpuHashMap::try_from(map).map_err(|source| ProbeError::Map { name: COUNTERS, source })?;
        let mut totals = StdHashMap::new();
        for entry in counters.iter() {
            let (cgroup_id, per_cpu) = entry.map_err(|source| ProbeError::Map { name: COUNTERS, source })?;
            let mut total = SocketCounters::default();
            for cpu in per_cpu.iter() {
                total.accumulate(cpu);
            }
            totals.insert(cgroup_id, total);
        }
        Ok(totals)
    }

    /// The probe's own counters.
    pub fn stats(&self) -> Result<SocketProbeStats, ProbeError> {
        let map = self.ebpf.map(STATS).ok_or(ProbeError::MissingMap(STATS))?;
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|source| ProbeError::Map { name: STATS, source })?;
        let sum = |stat: ProbeStat| -> Result<u64, ProbeError> {
            let values = stats.get(&(stat as u32), 0).map_err(|source| ProbeError::Map { name: STATS, source })?;
            Ok(values.iter().sum())
        };
        Ok(SocketProbeStats { counted: sum(ProbeStat::Counted)?, map_full_drops: sum(ProbeStat::MapFull)? })
    }
}
