//! No-op programs on the request probe's raw tracepoints (`sys_enter`,
//! `sys_exit`). The overhead benchmark attaches them on their own to
//! measure what the hook itself costs every syscall on the node, before
//! the probe does any work: the floor under the probe's overhead. The
//! per-syscall variant (`baseline_tracepoint`, attached to the
//! `syscalls:sys_enter_*`/`sys_exit_*` tracepoints of the calls the probes
//! need) measures the alternative: hooks that other syscalls never run.
//! Attached to `sock:sock_recv_length`/`sock_send_length` instead, it
//! measures hooks off the syscall path altogether (socket I/O only).
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};

#[tracepoint]
pub fn baseline_tracepoint(_ctx: TracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn baseline_enter(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn baseline_exit(_ctx: RawTracePointContext) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
