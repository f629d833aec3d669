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
//! `packet_ingress`/`packet_egress` are not no-ops: they are the candidate
//! design `bench-probes` prices against the request probe, programs on
//! the watched pod's own cgroup (`cgroup_skb`) that run only for that
//! pod's packets and delimit HTTP/1.1 requests in the kernel, keeping a
//! latency histogram per pod there (`pod_latency`) instead of sending an
//! event per call.
//! `packet_h2` prices the same design for HTTP/2.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_skb_cgroup_id, bpf_task_pt_regs},
    },
    macros::{cgroup_skb, map, raw_tracepoint, tracepoint},
    maps::{Array, LruHashMap},
    programs::{RawTracePointContext, SkBuffContext, TracePointContext},
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

// ---- the packet-layer candidate -------------------------------------------

/// One connection's request state, by (peer address, peer port, pod port).
#[repr(C)]
#[derive(Clone, Copy)]
struct PacketConnection {
    /// When the request being answered began (0: none open).
    request_started_ns: u64,
    bytes_in: u64,
    bytes_out: u64,
    requests: u64,
    /// The socket's cgroup (the container's), read once.
    cgroup_id: u64,
}

#[map]
static PACKET_CONNECTIONS: LruHashMap<u64, PacketConnection> = LruHashMap::with_max_entries(65_536, 0);

#[cgroup_skb]
pub fn packet_ingress(ctx: SkBuffContext) -> i32 {
    let _ = packet(&ctx, true);
    1
}

#[cgroup_skb]
pub fn packet_egress(ctx: SkBuffContext) -> i32 {
    let _ = packet(&ctx, false);
    1
}

/// A data packet of the pod's TCP connections: a request starts with a
/// payload whose first byte is an upper-case letter (a method) and ends
/// with the first response packet after it. IPv4 only (the benchmark's
/// loopback); pure ACKs leave at the length test.
#[inline(always)]
fn packet(ctx: &SkBuffContext, ingress: bool) -> Result<(), i64> {
    let Some(segment) = TcpSegment::of(ctx, ingress) else { return Ok(()) };
    let (cookie, payload) = (segment.key, segment.payload as usize);
    // Only a request's first byte is needed: a response is whatever the
    // pod sends after one.
    let first: u8 = if ingress { ctx.load(payload)? } else { 0 };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let connection = match PACKET_CONNECTIONS.get_ptr_mut(&cookie) {
        Some(connection) => connection,
        None => {
            // SAFETY: the program's own skb.
            let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
            let fresh = PacketConnection { request_started_ns: 0, bytes_in: 0, bytes_out: 0, requests: 0, cgroup_id };
            PACKET_CONNECTIONS.insert(&cookie, &fresh, 0)?;
            PACKET_CONNECTIONS.get_ptr_mut(&cookie).ok_or(0)?
        }
    };
    let moved = u64::from(segment.end - segment.payload);
    // SAFETY: plain-data map value of this connection.
    unsafe {
        if ingress {
            (*connection).bytes_in += moved;
            if first.is_ascii_uppercase() && (*connection).request_started_ns == 0 {
                (*connection).request_started_ns = now;
            }
        } else {
            (*connection).bytes_out += moved;
            let started = (*connection).request_started_ns;
            if started != 0 {
                (*connection).request_started_ns = 0;
                (*connection).requests += 1;
                pod_latency::answered((*connection).cgroup_id, now.saturating_sub(started));
            }
        }
    }
    Ok(())
}

mod packet_h2;
mod pod_latency;
mod tcp_segment;

use tcp_segment::TcpSegment;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
