//! No-op programs on the request probe's hooks, for the overhead benchmark:
//! attached alone, they measure the cost of the hook itself (every syscall
//! on the node passes through it), the floor under the probe's overhead.
use aya::Ebpf;

use super::ProbeError;

/// (program, raw tracepoint): the same hooks as the request probe.
const PROGRAMS: [(&str, &str); 2] = [("baseline_enter", "sys_enter"), ("baseline_exit", "sys_exit")];

/// The syscalls the request and driver probes act on
/// (`agent-ebpf/src/syscalls.rs`).
pub const PROBED_SYSCALLS: [&str; 12] = [
    "read", "write", "close", "ioctl", "readv", "writev", "accept", "accept4", "sendto", "recvfrom", "sendmsg",
    "recvmsg",
];

/// The attached no-op programs; dropping detaches them.
pub struct HookBaseline {
    /// Held only to keep the programs attached.
    _ebpf: Ebpf,
}

impl HookBaseline {
    /// Loads and attaches the no-op programs.
    pub fn attach() -> Result<Self, ProbeError> {
        let mut ebpf = Ebpf::load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podgpu-baseline")))?;
        super::attach_raw_tracepoints(&mut ebpf, &PROGRAMS)?;
        Ok(Self { _ebpf: ebpf })
    }

    /// Loads one no-op program and attaches it to the socket tracepoints
    /// `sock:sock_recv_length` and `sock:sock_send_length`: hooks that run
    /// on socket I/O only and leave the syscall path alone. Needs tracefs.
    pub fn attach_socket_tracepoints() -> Result<Self, ProbeError> {
        Self::attach_tracepoints(&[("sock", "sock_recv_length"), ("sock", "sock_send_length")])
    }

    /// Loads one no-op program and attaches it to the per-syscall
    /// tracepoints (`syscalls:sys_enter_NAME` and `sys_exit_NAME`) of each
    /// of `syscalls`: the hooks a probe would use if it ran only on the
    /// calls it needs. Needs tracefs (`/sys/kernel/tracing`).
    pub fn attach_per_syscall(syscalls: &[&str]) -> Result<Self, ProbeError> {
        let names: Vec<(&str, String)> = syscalls
            .iter()
            .flat_map(|syscall| ["enter", "exit"].map(|side| ("syscalls", format!("sys_{side}_{syscall}"))))
            .collect();
        let names: Vec<(&str, &str)> = names.iter().map(|(category, name)| (*category, name.as_str())).collect();
        Self::attach_tracepoints(&names)
    }

    /// Loads the no-op tracepoint program and attaches it to each
    /// (category, name).
    fn attach_tracepoints(tracepoints: &[(&str, &str)]) -> Result<Self, ProbeError> {
        const NAME: &str = "baseline_tracepoint";
        let mut ebpf = Ebpf::load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podgpu-baseline")))?;
        let program: &mut aya::programs::TracePoint = ebpf
            .program_mut(NAME)
            .ok_or(ProbeError::MissingProgram(NAME))?
            .try_into()
            .map_err(|source| ProbeError::Program { name: NAME, source })?;
        program.load().map_err(|source| ProbeError::Program { name: NAME, source })?;
        for (category, name) in tracepoints {
            program.attach(category, name).map_err(|source| ProbeError::Program { name: NAME, source })?;
        }
        Ok(Self { _ebpf: ebpf })
    }
}
