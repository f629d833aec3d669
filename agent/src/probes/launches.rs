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
use std::collections::HashMap;
use std::time::{Duration, Instant};

use aya::maps::PerCpuHashMap;
use aya::programs::uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope};
use aya::programs::UProbe;
use aya::Ebpf;
use podgpu_common::{KernelHandle, LaunchKey, LaunchSite};

use super::elf::file_offset;
use super::kernel_identity::{IDENTITY_POINTS, IDENTITY_PROGRAMS};
use super::spans::{SpanReader, SpanTotals, WAIT_POINTS, WAIT_PROGRAMS};
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
const WINDOW: &str = "WINDOW";
const LAUNCH_SITES: &str = "LAUNCH_SITES";
/// What a file must be called to be probed.
pub const LIBRARY_NAME: &str = "libcuda.so";

/// A libcuda file the launch probe holds open, for others to probe too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibraryFile {
    /// `/proc/self/fd/N`: the file itself, whatever became of its path.
    pub open: std::path::PathBuf,
    /// Where it was found (through the process's root).
    pub found_at: std::path::PathBuf,
}

/// One libcuda file, opened once: attachments go through
/// `/proc/self/fd/N`, so the file stays reachable after the process that
/// revealed it exits, and its entry points are resolved only once.
struct Library {
    file: std::fs::File,
    /// (program, file offset) of each entry point found.
    points: Vec<(&'static str, u64)>,
}

/// Loaded launch programs, the libraries found, and whether the probes are
/// attached to them now (sampling attaches for part of each second).
pub struct LaunchProbe {
    ebpf: Ebpf,
    spans: SpanReader,
    /// Library files, by (device, inode).
    libraries: HashMap<(String, u64), Library>,
    /// The same files in the order found (for the driver path, which
    /// probes them too).
    library_files: Vec<LibraryFile>,
    /// Live attachments, with the program that owns each.
    links: Vec<(&'static str, UProbeLinkId)>,
    attached: bool,
}

impl LaunchProbe {
    /// Loads the embedded object (programs loaded, nothing attached yet).
    pub fn load() -> Result<Self, ProbeError> {
        let mut ebpf = Ebpf::load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podgpu-launches")))?;
        for name in PROGRAMS.into_iter().chain(IDENTITY_PROGRAMS).chain(WAIT_PROGRAMS) {
            program(&mut ebpf, name)?.load().map_err(|source| ProbeError::Program { name, source })?;
        }
        let spans = SpanReader::new(&mut ebpf)?;
        Ok(Self {
            ebpf,
            spans,
            libraries: HashMap::new(),
            library_files: Vec::new(),
            links: Vec::new(),
            attached: false,
        })
    }

    /// Library files found so far.
    pub fn libraries(&self) -> usize {
        self.libraries.len()
    }

    /// The library files found so far, in order.
    pub fn library_files(&self) -> &[LibraryFile] {
        &self.library_files
    }

    /// Whether the probes are attached now.
    pub fn is_attached(&self) -> bool {
        self.attached
    }

    /// Adds `library`, mapped by `pid`, unless this file is known: opens
    /// it through the process's root, resolves its entry points, and
    /// attaches them if the probes are attached now. Returns how many
    /// entry points it has (0: already known, or not a libcuda after all).
    pub fn add_library(&mut self, proc: &ProcFs, pid: u32, library: &MappedFile) -> Result<usize, ProbeError> {
        let key = (library.device.clone(), library.inode);
        if self.libraries.contains_key(&key) {
            return Ok(0);
        }
        let path = proc.root().join(pid.to_string()).join("root").join(library.path.trim_start_matches('/'));
        let file = std::fs::File::open(&path).map_err(|err| ProbeError::Library { path: path.clone(), source: err })?;
        let points = entry_points(&file).map_err(|err| ProbeError::Library { path: path.clone(), source: err })?;
        let found = points.len();
        let identity = identity_points(&file).map_err(|err| ProbeError::Library { path: path.clone(), source: err })?;
        let added = Library { file, points };
        if self.attached {
            self.attach_library(&added)?;
        }
        // The identity calls stay probed whatever the sampling does: they
        // run when a program loads its kernels, once, not per launch. Their
        // links live as long as the programs (never detached).
        let library_path = fd_path(&added.file);
        for &(name, offset) in &identity {
            program(&mut self.ebpf, name)?
                .attach(UProbeAttachLocation::AbsoluteOffset(offset), &library_path, UProbeScope::AllProcesses)
                .map_err(|source| ProbeError::Program { name, source })?;
        }
        self.library_files.push(LibraryFile { open: library_path, found_at: path.clone() });
        self.libraries.insert(key, added);
        tracing::info!(
            path = %path.display(),
            entry_points = found,
            identity_points = identity.len(),
            "libcuda found for launch accounting"
        );
        Ok(found)
    }

    /// Attaches the entry points of every library (no-op if attached);
    /// returns when counting began: the midpoint of the attachments (each
    /// entry point counts from its own).
    pub fn attach(&mut self) -> Result<Instant, ProbeError> {
        let started = Instant::now();
        if self.attached {
            return Ok(started);
        }
        self.attached = true;
        let libraries: Vec<(std::path::PathBuf, Vec<(&'static str, u64)>)> =
            self.libraries.values().map(|library| (fd_path(&library.file), library.points.clone())).collect();
        for (path, points) in libraries {
            self.attach_points(&path, &points)?;
        }
        Ok(started + started.elapsed() / 2)
    }

    fn attach_library(&mut self, library: &Library) -> Result<(), ProbeError> {
        self.attach_points(&fd_path(&library.file), &library.points)
    }

    fn attach_points(&mut self, path: &std::path::Path, points: &[(&'static str, u64)]) -> Result<(), ProbeError> {
        for &(name, offset) in points {
            let link = program(&mut self.ebpf, name)?
                .attach(UProbeAttachLocation::AbsoluteOffset(offset), path, UProbeScope::AllProcesses)
                .map_err(|source| ProbeError::Program { name, source })?;
            self.links.push((name, link));
        }
        Ok(())
    }

    /// Detaches everything: launches cost nothing until the next attach.
    /// The links are closed in parallel: each close stops its counting at
    /// once but then waits for the kernel's grace periods (tens of ms), so
    /// closing them one by one would leave the last ones counting (and
    /// trapping) for hundreds of ms longer than the first.
    pub fn detach(&mut self) {
        let mut owned = Vec::with_capacity(self.links.len());
        for (name, link) in std::mem::take(&mut self.links) {
            if let Ok(program) = program(&mut self.ebpf, name) {
                if let Ok(link) = program.take_link(link) {
                    owned.push(link);
                }
            }
        }
        std::thread::scope(|scope| {
            for link in owned {
                scope.spawn(move || drop(link));
            }
        });
        self.attached = false;
    }

    /// The time one probed launch costs the launching thread here: a
    /// function of this binary is called with and without a launch probe
    /// on it (the trap, the program and the return: what a launch pays).
    pub fn calibrate(&mut self) -> Result<std::time::Duration, ProbeError> {
        const CALLS: u32 = 5_000;
        let exe = std::path::PathBuf::from("/proc/self/exe");
        let file = std::fs::File::open(&exe).map_err(|err| ProbeError::Library { path: exe.clone(), source: err })?;
        let offset = symbol_offset(&file, CALIBRATION_SYMBOL)
            .map_err(|err| ProbeError::Library { path: exe.clone(), source: err })?;
        // The same arguments for every call: the probe reads them as a
        // launch's function and sizes, so each call updates one existing
        // key, as a real launch of a known kernel does. (Arguments that
        // varied made every call insert a new key: 6-7x the cost of a
        // launch on an H200 host, and a full map.)
        let time_calls = || {
            let started = std::time::Instant::now();
            for _ in 0..CALLS {
                let [f, gx, gy, gz, bx, by, bz] = std::hint::black_box(CALIBRATION_LAUNCH);
                std::hint::black_box(podgpu_uprobe_calibration_target(f, gx, gy, gz, bx, by, bz));
            }
            started.elapsed()
        };
        // Medians of several rounds: one round can be slowed by anything
        // else starting up with the agent.
        const ROUNDS: usize = 5;
        let median = |mut rounds: Vec<Duration>| {
            rounds.sort_unstable();
            rounds[rounds.len() / 2]
        };
        let bare = median((0..ROUNDS).map(|_| time_calls()).collect());
        let name = PROGRAMS[0];
        let link = program(&mut self.ebpf, name)?
            .attach(UProbeAttachLocation::AbsoluteOffset(offset), &exe, UProbeScope::AllProcesses)
            .map_err(|source| ProbeError::Program { name, source })?;
        let probed = median((0..ROUNDS).map(|_| time_calls()).collect());
        let _ = program(&mut self.ebpf, name)?.detach(link);
        // The calibration's own counts are not launches; they also say
        // whether every call was probed (a round that was not would make
        // the cost read low).
        let own: Vec<(LaunchKey, u64)> =
            self.counts()?.into_iter().filter(|(key, _)| key.tgid == std::process::id()).collect();
        let counted: u64 = own.iter().map(|(_, n)| n).sum();
        self.forget(&own.into_iter().map(|(key, _)| key).collect::<Vec<_>>())?;
        let expected = ROUNDS as u64 * u64::from(CALLS);
        if counted < expected {
            return Err(ProbeError::Calibration(format!("{counted} of {expected} calibration calls were probed")));
        }
        if probed <= bare {
            // Noise swamped the traps (a busy machine at start): a cost of
            // 0 would switch the budget off.
            return Err(ProbeError::Calibration(format!("probed calls took {probed:?}, bare ones {bare:?}")));
        }
        Ok((probed - bare) / CALLS)
    }

    /// Counts only launches within [start, end) of CLOCK_MONOTONIC (the
    /// kernel's `bpf_ktime_get_ns`); `None` counts every launch.
    pub fn set_window(&mut self, window: Option<(Duration, Duration)>) -> Result<(), ProbeError> {
        let map = self.ebpf.map_mut(WINDOW).ok_or(ProbeError::MissingMap(WINDOW))?;
        let mut bounds: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(map).map_err(|source| ProbeError::Map { name: WINDOW, source })?;
        let (start, end) = window.map_or((0, 0), |(start, end)| (start.as_nanos() as u64, end.as_nanos() as u64));
        // End first: a half-written window never opens early.
        bounds.set(1, 0, 0).map_err(|source| ProbeError::Map { name: WINDOW, source })?;
        bounds.set(0, start, 0).map_err(|source| ProbeError::Map { name: WINDOW, source })?;
        bounds.set(1, end, 0).map_err(|source| ProbeError::Map { name: WINDOW, source })
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
        // A reused pid's handles must not find the dead process's sites.
        let map = self.ebpf.map_mut(LAUNCH_SITES).ok_or(ProbeError::MissingMap(LAUNCH_SITES))?;
        let mut sites: aya::maps::HashMap<_, KernelHandle, LaunchSite> =
            aya::maps::HashMap::try_from(map).map_err(|source| ProbeError::Map { name: LAUNCH_SITES, source })?;
        for key in keys {
            let _ = sites.remove(&KernelHandle { tgid: key.tgid, pad: 0, handle: key.function });
        }
        Ok(())
    }

    /// Where `handle` (process, handle) was first launched from
    /// (`launch_sites`); `None` when no site was kept for it.
    pub fn site(&self, handle: (u32, u64)) -> Result<Option<LaunchSite>, ProbeError> {
        let map = self.ebpf.map(LAUNCH_SITES).ok_or(ProbeError::MissingMap(LAUNCH_SITES))?;
        let sites: aya::maps::HashMap<_, KernelHandle, LaunchSite> =
            aya::maps::HashMap::try_from(map).map_err(|source| ProbeError::Map { name: LAUNCH_SITES, source })?;
        match sites.get(&KernelHandle { tgid: handle.0, pad: 0, handle: handle.1 }, 0) {
            Ok(site) => Ok(Some(site)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(ProbeError::Map { name: LAUNCH_SITES, source }),
        }
    }

    /// The kernel identity of every named handle, by (process, handle).
    pub fn identities(&self) -> Result<HashMap<(u32, u64), u64>, ProbeError> {
        super::kernel_identity::identities(&self.ebpf)
    }

    /// Every process's completion spans as of now (`probes::spans`).
    pub fn spans(&mut self, proc: &ProcFs) -> Result<SpanTotals, ProbeError> {
        let now_ns = monotonic_now().as_nanos() as u64;
        self.spans.read(&mut self.ebpf, proc, now_ns)
    }

    /// Kernel run-time statistics of this probe's programs.
    pub fn program_stats(&self) -> Vec<crate::probes::BpfProgramStats> {
        crate::probes::program_stats(&self.ebpf)
    }
}

/// A launch program of `ebpf`.
fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, ProbeError> {
    ebpf.program_mut(name)
        .ok_or(ProbeError::MissingProgram(name))?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })
}

/// The path of an open file through this process's fd table.
fn fd_path(file: &std::fs::File) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    std::path::PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The symbol the calibration probes: a function of this binary that
/// stands for a launch entry point.
const CALIBRATION_SYMBOL: &str = "podgpu_uprobe_calibration_target";

/// What `LaunchProbe::calibrate` passes the target: a function handle and
/// grid and block sizes, as `cuLaunchKernel` takes them.
const CALIBRATION_LAUNCH: [u32; 7] = [0x0ca1, 4, 1, 1, 128, 1, 1];

/// Called by `LaunchProbe::calibrate` with and without a probe on it; its
/// first seven arguments are laid out as `cuLaunchKernel`'s (the seventh
/// on the stack on x86-64), so the launch program reads the same key on
/// every call.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn podgpu_uprobe_calibration_target(
    function: u32,
    grid_x: u32,
    grid_y: u32,
    grid_z: u32,
    block_x: u32,
    block_y: u32,
    block_z: u32,
) -> u32 {
    std::hint::black_box(function ^ grid_x ^ grid_y ^ grid_z ^ block_x ^ block_y ^ block_z)
}

/// (program, file offset) of each kernel identity call `file` exports
/// (`cuLibraryGetKernel` and `cuKernelGetFunction` came with CUDA 12).
fn identity_points(file: &std::fs::File) -> std::io::Result<Vec<(&'static str, u64)>> {
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(std::io::Error::other)?;
    Ok(IDENTITY_POINTS.iter().filter_map(|&(name, symbol)| Some((name, file_offset(&elf, symbol)?))).collect())
}

/// (program, file offset) of each launch entry point and wait `file`
/// exports (older drivers lack some: `_ptsz`, `Ex`); sampled together.
fn entry_points(file: &std::fs::File) -> std::io::Result<Vec<(&'static str, u64)>> {
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(std::io::Error::other)?;
    Ok(ENTRY_POINTS
        .iter()
        .chain(&WAIT_POINTS)
        .filter_map(|&(name, symbol)| Some((name, file_offset(&elf, symbol)?)))
        .collect())
}

/// File offset of `symbol` in `file`.
fn symbol_offset(file: &std::fs::File, symbol: &str) -> std::io::Result<u64> {
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(std::io::Error::other)?;
    file_offset(&elf, symbol)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("symbol {symbol} not found")))
}

/// Threads one launch of `key` starts (grid x block; 0 for graphs).
pub fn threads_per_launch(key: &LaunchKey) -> u64 {
    threads_per_launch_of(key.grid, key.block)
}

/// Threads one launch of the given shape starts.
pub fn threads_per_launch_of(grid: [u32; 3], block: [u32; 3]) -> u64 {
    grid.iter().chain(&block).map(|&d| u64::from(d)).product()
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
    /// The kernel's identity across processes, hex (`None`: the handle
    /// was created before the identity probes saw it, or is a graph).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Where `kernel` came from: `name` (the identity probes saw the
    /// handle created) or `site` (its launch site stands for that kernel
    /// elsewhere, `probes::site_book`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_from: Option<&'static str>,
    /// Grid dimensions.
    pub grid: [u32; 3],
    /// Block dimensions.
    pub block: [u32; 3],
    /// Launches so far.
    pub launches: u64,
    /// Threads started so far (launches x grid x block).
    pub threads: u64,
}

/// Where the kernel identities of `rows`' launches came from, as
/// launches per source: `name` (the identity probes saw the handle
/// created), `site` (its launch site named it), `none` (per-process costs;
/// graphs among them).
pub fn launches_by_identity_source(rows: &[LaunchRow]) -> [(&'static str, u64); 3] {
    let mut by_source = [("name", 0), ("site", 0), ("none", 0)];
    for row in rows {
        let index = match row.kernel_from {
            Some("name") => 0,
            Some("site") => 1,
            _ => 2,
        };
        by_source[index].1 += row.launches;
    }
    by_source
}

/// A handle or identity as `LaunchRow` writes it (`0x1f`).
pub fn parse_hex(text: &str) -> Option<u64> {
    u64::from_str_radix(text.trim_start_matches("0x"), 16).ok()
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
    /// The same files, in the order found (`LaunchProbe::library_files`).
    pub library_files: Vec<LibraryFile>,
    /// When the reader published this (`None`: not yet). A reader that
    /// stops publishing must not leave counts that read as "no launches".
    pub published: Option<std::time::Instant>,
    /// Part of the last second the probes were attached (1: exact counts;
    /// less: counts scaled from a sample, `launch_sampler`).
    pub duty: f64,
    /// Calibrated cost of one probed launch, ns.
    pub hit_cost_ns: u64,
    /// Completion spans per process, cumulative.
    pub spans: SpanTotals,
    /// What each launch program cost so far (while
    /// `kernel.bpf_stats_enabled`), for the agent's /metrics beside the
    /// request probe's.
    pub programs: Vec<crate::probes::BpfProgramStats>,
}

/// CLOCK_MONOTONIC now: the clock of the kernel's `bpf_ktime_get_ns`.
pub fn monotonic_now() -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}
