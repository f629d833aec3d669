//! eBPF probes: loading the programs built from `agent-ebpf`, attaching
//! them, and reading their maps. One module per program set.
pub mod requests;

use std::io;
use std::path::Path;

/// Failures while loading, attaching or reading probes.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The kernel refused the object (permissions, verifier, missing BTF).
    #[error("loading eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program is missing from the object (build mismatch).
    #[error("eBPF program {0} not found in the object")]
    MissingProgram(&'static str),
    /// A map is missing from the object (build mismatch).
    #[error("eBPF map {0} not found in the object")]
    MissingMap(&'static str),
    /// Loading or attaching one program failed.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What the kernel said.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Reading or updating a map failed.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What the kernel said.
        #[source]
        source: aya::maps::MapError,
    },
    /// tracefs is neither mounted nor mountable.
    #[error("tracefs at {path}: {source}")]
    Tracefs {
        /// Mount point tried.
        path: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

/// The kernel's own accounting of one eBPF program (counts only while
/// `kernel.bpf_stats_enabled=1`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BpfProgramStats {
    /// Program name.
    pub name: String,
    /// Total time spent running it, ns.
    pub run_time_ns: u64,
    /// Times it ran.
    pub run_count: u64,
}

/// Run-time statistics of every program of a loaded object.
pub fn program_stats(ebpf: &aya::Ebpf) -> Vec<BpfProgramStats> {
    ebpf.programs()
        .filter_map(|(name, program)| {
            let info = program.info().ok()?;
            Some(BpfProgramStats {
                name: name.to_string(),
                run_time_ns: info.run_time().as_nanos() as u64,
                run_count: info.run_count(),
            })
        })
        .collect()
}

const TRACEFS: &str = "/sys/kernel/tracing";

/// Tracepoints are attached by id, read from tracefs; many hosts (this
/// project's CI machine among them) do not mount it by default.
pub fn ensure_tracefs() -> Result<(), ProbeError> {
    if Path::new(TRACEFS).join("events").is_dir() || Path::new("/sys/kernel/debug/tracing/events").is_dir() {
        return Ok(());
    }
    let error = |source| ProbeError::Tracefs { path: TRACEFS.to_string(), source };
    let target = std::ffi::CString::new(TRACEFS).map_err(|err| error(io::Error::other(err)))?;
    let fstype = c"tracefs";
    let source = c"nodev";
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(error(io::Error::last_os_error()));
    }
    tracing::info!(path = TRACEFS, "mounted tracefs");
    Ok(())
}
