//! No-op programs for the overhead benchmarks, attached on their own to
//! measure what a hook costs before a probe does any work: raw
//! tracepoints (`baseline_enter`/`baseline_exit`) on the request probe's
//! socket-layer hooks (`bench-probes`' floor) or on `sys_enter`/`sys_exit`
//! (the driver path's; every syscall on the node passes them). The
//! per-syscall variant (`baseline_tracepoint`, attached to the
//! `syscalls:sys_enter_*`/`sys_exit_*` tracepoints of the calls the probes
//! need) measures the alternative: hooks that other syscalls never run.
//! Attached to `sock:sock_recv_length`/`sock_send_length` instead, it
//! measures hooks off the syscall path altogether (socket I/O only).
//!
//! The packet-layer candidates in the same object are not no-ops: they
//! are the design `bench-probes` prices against the request probe,
//! programs on the pods' cgroup (`cgroup_skb`) that run only for those
//! pods' packets and delimit requests in the kernel, keeping counts and
//! histograms per pod there (`pod_requests`) instead of sending an event
//! per call: `packet_h1` for HTTP/1.1, `packet_h2` for HTTP/2.
#![no_std]
#![no_main]
// The BPF atomic add (`pod_requests`).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_probe_read_kernel, generated::bpf_task_pt_regs},
    macros::{map, raw_tracepoint, tracepoint},
    maps::Array,
    programs::{RawTracePointContext, TracePointContext},
};

/// Slot 0: the tgid whose socket calls `socket_call_args` records (set by
/// user space); slot 1..=4: what it read (dx, si, di, orig_ax).
#[map]
static SOCKET_CALL: Array<u64> = Array::with_max_entries(5, 0);

/// On `sock:sock_recv_length`/`sock_send_length`: reads the syscall's
/// registers from the task (`bpf_task_pt_regs`), as socket-level request
/// probes would need to find the fd and the user buffer without a syscall
/// hook. Records them for one tgid, for the benchmark's feasibility check.
#[tracepoint]
pub fn socket_call_args(_ctx: TracePointContext) -> i32 {
    let target = SOCKET_CALL.get(0).copied().unwrap_or(0);
    if target == 0 || bpf_get_current_pid_tgid() >> 32 != target {
        return 0;
    }
    // SAFETY: the current task's BTF pointer and its saved user registers,
    // read through the checked helper.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf() as *mut _) as u64;
        // x86_64 `struct pt_regs`: dx 96, si 104, di 112, orig_ax 120.
        if let Ok(values) = bpf_probe_read_kernel((regs + 96) as *const [u64; 4]) {
            for (index, value) in values.iter().enumerate() {
                if let Some(slot) = SOCKET_CALL.get_ptr_mut(index as u32 + 1) {
                    *slot = *value;
                }
            }
        }
    }
    0
}

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

// The packet-layer candidates.
mod http1_head;
mod packet_h1;
mod packet_h2;
mod packet_release;
mod pod_requests;
mod tcp_segment;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
