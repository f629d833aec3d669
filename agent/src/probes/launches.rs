//! The launch probe (`agent-ebpf/src/launches.rs`): finds every libcuda
//! the pods' processes have mapped (`/proc/PID/maps`), attaches the launch
//! uprobes once per library file (device, inode) through the process's
//! root (`/proc/PID/root/...`, so a container's own libcuda is found), and
//! reads the per-CPU launch counts.
//!
//! A uprobe is a breakpoint on the file's code, so one attachment covers
//! every process mapping that file, now and later. Launches made through
//! the CUDA runtime reach these entry points too (the runtime calls the
//! driver API).
use std::collections::{HashMap, HashSet};

use aya::maps::PerCpuHashMap;
use aya::programs::uprobe::UProbeScope;
use aya::programs::UProbe;
use aya::Ebpf;
use podgpu_common::LaunchKey;

use super::ProbeError;
use crate::proc::{MappedFile, ProcFs};

/// (program, exported symbol) pairs: each entry point and its per-thread
/// default-stream (`_ptsz`) variant.
const ENTRY_POINTS: [(&str, &str); 8] = [
    ("cu_launch_kernel", "cuLaunchKernel"),
    ("cu_launch_kernel", "cuLaunchKernel_ptsz"),
    ("cu_launch_kernel_ex", "cuLaunchKernelEx"),
    ("cu_launch_kernel_ex", "cuLaunchKernelEx_ptsz"),
    ("cu_launch_cooperative_kernel", "cuLaunchCooperativeKernel"),
    ("cu_launch_cooperative_kernel", "cuLaunchCooperativeKernel_ptsz"),
    ("cu_graph_launch", "cuGraphLaunch"),
    ("cu_graph_launch", "cuGraphLaunch_ptsz"),
];
const PROGRAMS: [&str; 4] =
    ["cu_launch_kernel", "cu_launch_kernel_ex", "cu_launch_cooperative_kernel", "cu_graph_launch"];
const LAUNCHES: &str = "LAUNCHES";
/// What a file must be called to be probed.
pub const LIBRARY_NAME: &str = "libcuda.so";

/// Loaded launch programs and the libraries they are attached to.
pub struct LaunchProbe {
    ebpf: Ebpf,
    /// Library files attached to, by (device, inode).
    attached: HashSet<(String, u64)>,
}

impl LaunchProbe {
    /// Loads the embedded object (programs loaded, nothing attached yet).
    pub fn load() -> Result<Self, ProbeError> {
        let mut ebpf = Ebpf::load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podgpu-launches")))?;
        for name in PROGRAMS {
            let program: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or(ProbeError::MissingProgram(name))?
                .try_into()
                .map_err(|source| ProbeError::Program { name, source })?;
            program.load().map_err(|source| ProbeError::Program { name, source })?;
        }
        Ok(Self { ebpf, attached: HashSet::new() })
    }

    /// Library files probed so far.
    pub fn libraries(&self) -> usize {
        self.attached.len()
    }

    /// Attaches the entry points to `library`, mapped by `pid`, unless this
    /// file already has them; returns how many entry points were found in
    /// it (0: already attached, or not a libcuda after all).
    pub fn attach(&mut self, proc: &ProcFs, pid: u32, library: &MappedFile) -> Result<usize, ProbeError> {
        let key = (library.device.clone(), library.inode);
        if self.attached.contains(&key) {
            return Ok(0);
        }
        let path = proc.root().join(pid.to_string()).join("root").join(library.path.trim_start_matches('/'));
        let mut found = 0;
        for (name, symbol) in ENTRY_POINTS {
            let program: &mut UProbe = self
                .ebpf
                .program_mut(name)
                .ok_or(ProbeError::MissingProgram(name))?
                .try_into()
                .map_err(|source| ProbeError::Program { name, source })?;
            match program.attach(symbol, &path, UProbeScope::AllProcesses) {
                Ok(_) => found += 1,
                // Older drivers lack some entry points (`_ptsz`, `Ex`).
                Err(aya::programs::ProgramError::UProbeError(aya::programs::uprobe::UProbeError::SymbolError {
                    ..
                })) => {}
                Err(source) => return Err(ProbeError::Program { name, source }),
            }
        }
        self.attached.insert(key);
        tracing::info!(path = %path.display(), entry_points = found, "launch probes attached to libcuda");
        Ok(found)
    }

    /// Launches counted so far, per key, summed over CPUs.
    pub fn counts(&self) -> Result<Vec<(LaunchKey, u64)>, ProbeError> {
        let map = self.ebpf.map(LAUNCHES).ok_or(ProbeError::MissingMap(LAUNCHES))?;
        let launches: PerCpuHashMap<_, LaunchKey, u64> =
            PerCpuHashMap::try_from(map).map_err(|source| ProbeError::Map { name: LAUNCHES, source })?;
        let mut counts = Vec::new();
        for entry in launches.iter() {
            let (key, per_cpu) = entry.map_err(|source| ProbeError::Map { name: LAUNCHES, source })?;
            counts.push((key, per_cpu.iter().sum()));
        }
        Ok(counts)
    }

    /// Forgets the keys of `tgids` (exited processes) in the kernel map.
    pub fn forget(&mut self, keys: &[LaunchKey]) -> Result<(), ProbeError> {
        let map = self.ebpf.map_mut(LAUNCHES).ok_or(ProbeError::MissingMap(LAUNCHES))?;
        let mut launches: PerCpuHashMap<_, LaunchKey, u64> =
            PerCpuHashMap::try_from(map).map_err(|source| ProbeError::Map { name: LAUNCHES, source })?;
        for key in keys {
            let _ = launches.remove(key);
        }
        Ok(())
    }

    /// Kernel run-time statistics of this probe's programs.
    pub fn program_stats(&self) -> Vec<crate::probes::BpfProgramStats> {
        crate::probes::program_stats(&self.ebpf)
    }
}

/// Threads one launch of `key` starts (grid x block; 0 for graphs).
pub fn threads_per_launch(key: &LaunchKey) -> u64 {
    key.grid.iter().chain(&key.block).map(|&d| u64::from(d)).product()
}

/// Launches of one process, function and size, as the node reports them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LaunchRow {
    /// Process.
    pub pid: u32,
    /// Pod UID (`None`: a host process).
    pub pod_uid: Option<String>,
    /// Entry point (`kernel`, `kernel_ex`, `cooperative`, `graph`).
    pub entry: &'static str,
    /// Function (or graph) handle, hex.
    pub function: String,
    /// Grid dimensions.
    pub grid: [u32; 3],
    /// Block dimensions.
    pub block: [u32; 3],
    /// Launches so far.
    pub launches: u64,
    /// Threads started so far (launches x grid x block).
    pub threads: u64,
}

/// Name of a `launch_kind`.
pub fn entry_name(kind: u32) -> &'static str {
    match kind {
        podgpu_common::launch_kind::KERNEL => "kernel",
        podgpu_common::launch_kind::KERNEL_EX => "kernel_ex",
        podgpu_common::launch_kind::COOPERATIVE => "cooperative",
        podgpu_common::launch_kind::GRAPH => "graph",
        _ => "unknown",
    }
}

/// What the launch task publishes: cumulative launches per pod (exited
/// processes included) and the live per-process table.
#[derive(Clone, Debug, Default)]
pub struct LaunchSnapshot {
    /// Launches per pod UID since the agent started.
    pub per_pod: HashMap<String, u64>,
    /// Live rows (processes still running).
    pub rows: Vec<LaunchRow>,
    /// libcuda files probed.
    pub libraries: usize,
    /// When the reader published this (`None`: not yet). A reader that
    /// stops publishing must not leave counts that read as "no launches".
    pub published: Option<std::time::Instant>,
}
