//! What the probes need to know about the architecture: syscall numbers,
//! and where `pt_regs` keeps the first three arguments and the syscall
//! number (read from `sys_enter`'s context, or from the task inside a
//! socket call). x86_64 is measured here; arm64 (Grace Hopper nodes) follows
//! the kernel's generic syscall table and has not been run yet.

#[cfg(bpf_target_arch = "x86_64")]
mod arch {
    pub const READ: i64 = 0;
    pub const WRITE: i64 = 1;
    pub const CLOSE: i64 = 3;
    pub const IOCTL: i64 = 16;
    pub const READV: i64 = 19;
    pub const WRITEV: i64 = 20;
    pub const SENDTO: i64 = 44;
    pub const RECVFROM: i64 = 45;
    pub const SENDMSG: i64 = 46;
    pub const RECVMSG: i64 = 47;
    /// `dx`, `si`, `di` sit at offsets 96-119 of `struct pt_regs`.
    pub const ARGS_OFFSET: usize = 96;
    /// Index of arguments 0, 1, 2 in those three slots.
    pub const ARG_SLOT: [usize; 3] = [2, 1, 0];
    /// `orig_ax`: the syscall number, kept while `ax` takes the result.
    pub const NR_OFFSET: usize = 120;
}

#[cfg(bpf_target_arch = "aarch64")]
mod arch {
    pub const IOCTL: i64 = 29;
    pub const CLOSE: i64 = 57;
    pub const READ: i64 = 63;
    pub const WRITE: i64 = 64;
    pub const READV: i64 = 65;
    pub const WRITEV: i64 = 66;
    pub const SENDTO: i64 = 206;
    pub const RECVFROM: i64 = 207;
    pub const SENDMSG: i64 = 211;
    pub const RECVMSG: i64 = 212;
    /// `x0`-`x2` open `struct pt_regs`.
    pub const ARGS_OFFSET: usize = 0;
    pub const ARG_SLOT: [usize; 3] = [0, 1, 2];
    /// `syscallno`, after `regs[31]`, `sp`, `pc`, `pstate` and `orig_x0`.
    pub const NR_OFFSET: usize = 280;
}

pub use arch::*;

/// The syscall number and first three arguments saved in `regs` (a
/// `struct pt_regs` in kernel memory): one checked read where the
/// architecture keeps them side by side (x86_64), two otherwise.
///
/// # Safety
/// `regs` must be the current task's saved user registers.
#[inline(always)]
pub unsafe fn call_registers(regs: u64) -> Result<(i64, [u64; 3]), i64> {
    use aya_ebpf::helpers::bpf_probe_read_kernel;
    let [first, second, third] = ARG_SLOT;
    if NR_OFFSET == ARGS_OFFSET + 24 {
        // SAFETY: kernel memory through the checked helper.
        let span: [u64; 4] = unsafe { bpf_probe_read_kernel((regs + ARGS_OFFSET as u64) as *const [u64; 4])? };
        Ok((span[3] as i64, [span[first], span[second], span[third]]))
    } else {
        // SAFETY: as above.
        let nr: i64 = unsafe { bpf_probe_read_kernel((regs + NR_OFFSET as u64) as *const i64)? };
        let slots: [u64; 3] = unsafe { bpf_probe_read_kernel((regs + ARGS_OFFSET as u64) as *const [u64; 3])? };
        Ok((nr, [slots[first], slots[second], slots[third]]))
    }
}
