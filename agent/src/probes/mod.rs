//! eBPF probes: loading the programs built from `agent-ebpf`, attaching
//! them, and reading their maps. One module per program set.
pub mod baseline;
pub mod driver;
pub mod ebpf_log;
pub mod elf;
pub mod kernel_identity;
pub mod launch_reader;
pub mod launch_sampler;
pub mod launch_sites;
pub mod launches;
pub mod privileges;
pub mod requests;
pub mod site_book;
pub mod spans;

/// `error` with its causes (`a: b: c`): aya's attach errors carry the
/// kernel's errno only in their source.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text = format!("{text}: {inner_text}");
        }
        cause = inner.source();
    }
    text
}

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
    /// The launch probe's cost could not be measured.
    #[error("calibrating the launch probe: {0}")]
    Calibration(String),
    /// Loading or attaching one program failed.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What the kernel said.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// No driver library could carry the driver path.
    #[error("driver libraries: {0}")]
    DriverLibraries(String),
    /// A library to probe could not be opened or read.
    #[error("library {path}: {source}")]
    Library {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
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

/// The program `name` of `ebpf` as its type `P`.
pub(crate) fn program_of<'a, P>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut P, ProbeError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(ProbeError::MissingProgram(name))?
        .try_into()
        .map_err(|source| ProbeError::Program { name, source })
}

/// Loads the raw tracepoint program `name` of `ebpf` (not attached).
pub fn load_raw_tracepoint<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::RawTracePoint, ProbeError> {
    let program: &mut aya::programs::RawTracePoint = program_of(ebpf, name)?;
    program.load().map_err(|source| ProbeError::Program { name, source })?;
    Ok(program)
}

/// Puts the loaded program `name` at `slot` of the program array `map`,
/// where the programs that tail-call it find it.
pub fn set_tail_call(ebpf: &mut aya::Ebpf, map: &'static str, slot: u32, name: &'static str) -> Result<(), ProbeError> {
    let program = ebpf.program(name).ok_or(ProbeError::MissingProgram(name))?;
    let fd = program
        .fd()
        .map_err(|source| ProbeError::Program { name, source })?
        .try_clone()
        .map_err(|err| ProbeError::Program { name, source: aya::programs::ProgramError::IOError(err) })?;
    let mut tail_calls: aya::maps::ProgramArray<_> =
        aya::maps::ProgramArray::try_from(ebpf.map_mut(map).ok_or(ProbeError::MissingMap(map))?)
            .map_err(|source| ProbeError::Map { name: map, source })?;
    tail_calls.set(slot, &fd, 0).map_err(|source| ProbeError::Map { name: map, source })
}

/// Loads the tracepoint program `name` of `ebpf` (not attached).
pub fn load_tracepoint<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::TracePoint, ProbeError> {
    let program: &mut aya::programs::TracePoint = program_of(ebpf, name)?;
    program.load().map_err(|source| ProbeError::Program { name, source })?;
    Ok(program)
}

/// Loads each named program of `ebpf` and attaches it to its raw
/// tracepoint.
pub fn attach_raw_tracepoints(ebpf: &mut aya::Ebpf, programs: &[(&'static str, &str)]) -> Result<(), ProbeError> {
    for &(name, tracepoint) in programs {
        let program = load_raw_tracepoint(ebpf, name)?;
        program.attach(tracepoint).map_err(|source| ProbeError::Program { name, source })?;
    }
    Ok(())
}
