//! Socket activity per cgroup, from the `sock:sock_recv_length` and
//! `sock:sock_send_length` tracepoints.
//!
//! Both tracepoints fire in the context of the task doing the I/O, after the
//! protocol's recvmsg/sendmsg returned, so `bpf_get_current_cgroup_id` names
//! the container that moved the bytes. They carry no payload, which keeps
//! this probe cheap: one hash lookup for cgroups nobody watches. The request
//! tracker (payload-aware) replaces it.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id,
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::TracePointContext,
};
use podgpu_common::{ProbeStat, SocketCounters, MAX_TRACKED_CGROUPS, MAX_WATCHED_CGROUPS, PROBE_STAT_COUNT};

/// cgroup ids user space wants counted (value: `WATCH_*` flags).
#[map]
static WATCHED_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_WATCHED_CGROUPS, 0);

/// Cumulative counters per cgroup id, one copy per CPU so no atomics are
/// needed on the hot path.
#[map]
static SOCKET_COUNTERS: PerCpuHashMap<u64, SocketCounters> = PerCpuHashMap::with_max_entries(MAX_TRACKED_CGROUPS, 0);

/// The probe's own counters, indexed by `ProbeStat`.
#[map]
static PROBE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_STAT_COUNT, 0);

// Field offsets from /sys/kernel/tracing/events/sock/sock_recv_length/format
// (identical for sock_send_length; stable since the tracepoints were added in 6.0).
const FAMILY_OFFSET: usize = 16;
const PROTOCOL_OFFSET: usize = 18;
const RET_OFFSET: usize = 20;
const FLAGS_OFFSET: usize = 24;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const MSG_PEEK: i32 = 2;
const BPF_NOEXIST: u64 = 1;

#[derive(Clone, Copy)]
enum Direction {
    Recv,
    Send,
}

#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    let _ = try_count(&ctx, Direction::Recv);
    0
}

#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    let _ = try_count(&ctx, Direction::Send);
    0
}

fn try_count(ctx: &TracePointContext, direction: Direction) -> Result<(), i32> {
    // SAFETY: offsets come from the tracepoint's format file; reads are
    // bounds-checked by bpf_probe_read_kernel.
    let (family, protocol, ret, flags) = unsafe {
        (
            ctx.read_at::<u16>(FAMILY_OFFSET)?,
            ctx.read_at::<u16>(PROTOCOL_OFFSET)?,
            ctx.read_at::<i32>(RET_OFFSET)?,
            ctx.read_at::<i32>(FLAGS_OFFSET)?,
        )
    };
    if ret <= 0 || protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6) {
        return Ok(());
    }
    if matches!(direction, Direction::Recv) && flags & MSG_PEEK != 0 {
        return Ok(());
    }
    // SAFETY: helper with no arguments, valid in tracepoint context.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if WATCHED_CGROUPS.get_ptr(cgroup_id).is_none() {
        return Ok(());
    }
    let bytes = ret as u64;
    match SOCKET_COUNTERS.get_ptr_mut(cgroup_id) {
        Some(counters) => {
            // SAFETY: per-CPU value owned by this CPU while the program runs.
            let counters = unsafe { &mut *counters };
            add(counters, direction, bytes);
        }
        None => {
            let mut first = SocketCounters::default();
            add(&mut first, direction, bytes);
            if SOCKET_COUNTERS.insert(cgroup_id, first, BPF_NOEXIST).is_err() {
                // Either the map is full or another CPU inserted first; the
                // latter is rare enough that counting it as a drop is honest.
                bump(ProbeStat::MapFull);
                return Ok(());
            }
        }
    }
    bump(ProbeStat::Counted);
    Ok(())
}

#[inline(always)]
fn add(counters: &mut SocketCounters, direction: Direction, bytes: u64) {
    match direction {
        Direction::Recv => {
            counters.recv_bytes += bytes;
            counters.recv_calls += 1;
        }
        Direction::Send => {
            counters.send_bytes += bytes;
            counters.send_calls += 1;
        }
    }
}

#[inline(always)]
fn bump(stat: ProbeStat) {
    if let Some(value) = PROBE_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, exclusive to this CPU while the program runs.
        unsafe { *value += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
