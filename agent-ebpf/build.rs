//! Sets `bpf_target_arch` (the host's architecture) for the eBPF crate:
//! syscall numbers and `pt_regs` layouts differ between architectures.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    aya_build::emit_bpf_target_arch_cfg().map_err(|err| err.to_string().into())
}
