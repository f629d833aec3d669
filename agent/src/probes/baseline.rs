//! No-op programs on the request probe's hooks, for the overhead benchmark:
//! attached alone, they measure the cost of the hook itself (every syscall
//! on the node passes through it), the floor under the probe's overhead.
use aya::Ebpf;

use super::ProbeError;

/// (program, raw tracepoint): the same hooks as the request probe.
const PROGRAMS: [(&str, &str); 2] = [("baseline_enter", "sys_enter"), ("baseline_exit", "sys_exit")];

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
}
