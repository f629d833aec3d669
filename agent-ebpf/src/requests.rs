//! Request I/O of watched pods' server-side TCP connections, for user-space
//! HTTP parsers.
//!
//! Four raw tracepoints in the socket layer, none on the syscall path, so
//! a syscall that moves no socket data pays nothing for them:
//! - `inet_sock_set_state`, `tcp_destroy_sock`: a socket entering SYN_RECV
//!   is the server side of a new connection (`PASSIVE_SOCKETS`). A tracked
//!   connection ends with a `Close` event when the server closes it
//!   (FIN_WAIT1, LAST_ACK: both in the server's own close) or when the
//!   socket is freed (after a reset, once the server let go of it). Not
//!   at the reset itself: on loopback a peer's reset is processed inside
//!   the server's own send, before that send's event.
//! - `sock_recv_length`, `sock_send_length`: every `sock_recvmsg` and
//!   `sock_sendmsg` (read, write, the send/recv family and their vectored
//!   forms). The syscall's own registers (`bpf_task_pt_regs`) name the fd
//!   and the user buffer. The first call of a process of a watched cgroup
//!   on a passive socket starts tracking it as (tgid, fd) with an `Accept`
//!   event; every call on a tracked connection emits one ring-buffer event:
//!   kernel timestamp, bytes moved, the first `CAPTURE_PREFIX` bytes and
//!   the last `CAPTURE_SUFFIX` bytes.
//!
//! Rare conditions (a map refusing an insert, an HTTP/2 walk giving up, a
//! driver call of an unknown size) also log at debug level through
//! aya-log, which the agent forwards into `tracing`; never on the per-event
//! path.
//!
//! A socket call of a process that never served a tracked connection costs
//! the process filter (`filter.rs`): a few array reads once its process is
//! known to be in no watched cgroup, a cgroup lookup before. The driver path's
//! syscall tracepoints (`driver.rs`) live in this object for its shared
//! maps, and are attached only on nodes with an NVIDIA driver.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
        generated::{self, bpf_task_pt_regs},
    },
    macros::{map, raw_tracepoint},
    maps::{LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::RawTracePointContext,
};
use aya_log_ebpf::debug;
use podgpu_common::{
    conn_mode, ConnState, H2Frame, IoEvent, IoKind, RequestStat, WalkInput, CAPTURE_PREFIX, CAPTURE_SUFFIX,
    IO_EVENT_HEADER, MAX_H2_FRAMES, MAX_PASSIVE_SOCKETS, MAX_TRACKED_CONNECTIONS, REQUEST_RING_BYTES,
    REQUEST_STAT_COUNT,
};

/// Tracked connections (`tgid << 32 | fd`) -> cgroup and protocol state.
#[map]
static CONNECTIONS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

/// Server-side TCP sockets (`struct sock` address) from the handshake to
/// their close: which tracked connection each became, for the close.
/// LRU: an evicted one is either never tracked or ends by user space's
/// sweep instead of its `Close` event.
#[map]
static PASSIVE_SOCKETS: LruHashMap<u64, Passive> = LruHashMap::with_max_entries(MAX_PASSIVE_SOCKETS, 0);

/// Events for user space.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(REQUEST_RING_BYTES, 0);

/// Where an `IoEvent` is put together before only its used bytes go into
/// the ring: writes into this hot per-CPU slot are cheap, and the ring
/// then carries ~100-400 bytes per call instead of the full 576.
#[map]
static EVENT_SCRATCH: PerCpuArray<IoEvent> = PerCpuArray::with_max_entries(1, 0);

/// Frames found by the current walk, copied into the event afterwards.
/// Writing them through a map (not at a counted offset into the event)
/// keeps the count out of the verifier's pointer arithmetic, so equal walk
/// states prune and the walk verifies in linear time.
#[map]
static H2_SCRATCH: PerCpuArray<H2Frame> = PerCpuArray::with_max_entries(MAX_H2_FRAMES as u32, 0);

/// What the socket programs hand the frame walker.
#[map]
static WALK_INPUT: PerCpuArray<WalkInput> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: the `h2_walk` program; slot 1 (`driver::DECODE_SLOT`):
/// `driver_decode`. Tail calls keep them out of their callers, so each
/// verifies on its own (together they exceed the verifier's budget).
#[map]
static TAIL_CALLS: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// The probe's own counters, indexed by `RequestStat`.
#[map]
static REQUEST_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REQUEST_STAT_COUNT, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct Passive {
    /// The tracked connection it became (0: not yet, or never).
    connection: u64,
    /// Set once the server closed it: later calls do not track it again.
    closed: u64,
}

/// Where the bytes of one socket call are in user memory.
#[derive(Clone, Copy)]
struct UserBuffer {
    /// Buffer (contiguous calls) or iovec array (vectored calls).
    buffer: u64,
    /// 0 for a contiguous buffer, else the iovec count.
    segments: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

// struct user_msghdr: msg_iov at 16, msg_iovlen at 24.
const MSGHDR_IOV: u64 = 16;
const MSGHDR_IOVLEN: u64 = 24;
const EAGAIN: i64 = 11;
const MSG_PEEK: u64 = 2;
// include/net/tcp_states.h
const TCP_FIN_WAIT1: u64 = 4;
const TCP_SYN_RECV: u64 = 3;
const TCP_LAST_ACK: u64 = 9;
/// `struct sock_common` opens with `skc_daddr` (0), `skc_rcv_saddr` (4),
/// `skc_hash` (8), `skc_dport` (12, network order), `skc_num` (14, host
/// order), `skc_family` (16): a layout unchanged since Linux 3.x, read
/// without BTF relocations.
const SKC_DADDR: u64 = 0;
const SKC_DPORT: u64 = 12;
const SKC_NUM: u64 = 14;
const SKC_FAMILY: u64 = 16;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// What an IPv6 socket's IPv4 peer field holds when the peer is IPv6
/// (`LOOPBACK4_IPV6`, 127.0.0.6): the real address is further into the
/// struct, so the event says "unknown" and user space asks procfs.
const LOOPBACK4_IPV6: [u8; 4] = [127, 0, 0, 6];
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Pending bytes in the ring that trigger a wakeup of the reader. Each
/// wakeup is an irq_work plus a context switch; at 64 KiB they cost a
/// saturated server ~10% of its throughput (measured: 0.80 -> 0.91). The
/// reader also drains every 20 ms, so this only matters under load, and
/// the 4 MiB ring keeps 3.5 MiB of headroom.
const WAKEUP_BYTES: u64 = 512 * 1024;
/// iovecs inspected when looking for the last byte of a vectored call.
const MAX_SEGMENTS_WALKED: u64 = 8;

fn bump(stat: RequestStat) {
    if let Some(value) = REQUEST_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: this CPU's slot, exclusive while the program runs.
        unsafe { *value += 1 };
    }
}

// ---- connection life: the handshake and the server's close ----------------

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn socket_state(ctx: RawTracePointContext) -> i32 {
    let socket: u64 = ctx.arg(0);
    let new_state: u64 = ctx.arg::<u64>(2) & 0xffff_ffff;
    match new_state {
        TCP_SYN_RECV => {
            let _ = PASSIVE_SOCKETS.insert(socket, Passive { connection: 0, closed: 0 }, 0);
        }
        TCP_FIN_WAIT1 | TCP_LAST_ACK => server_closed(socket, false),
        _ => {}
    }
    0
}

#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn socket_destroyed(ctx: RawTracePointContext) -> i32 {
    server_closed(ctx.arg(0), true);
    0
}

/// The server closed `socket` (`gone`: it is being freed).
fn server_closed(socket: u64, gone: bool) {
    let Some(passive) = PASSIVE_SOCKETS.get_ptr_mut(socket) else { return };
    // SAFETY: plain-data map value; a concurrent writer can at worst make
    // the close emitted twice, which user space ignores.
    let (connection, closed) = unsafe { ((*passive).connection, (*passive).closed) };
    if connection != 0 && closed == 0 {
        unsafe { (*passive).closed = 1 };
        if let Some(state) = CONNECTIONS.get_ptr(connection) {
            // SAFETY: plain-data map value.
            let (owner, cgroup_id) = unsafe { ((*state).socket, (*state).cgroup_id) };
            // The fd may already serve another socket (a close we saw late).
            if owner == socket {
                let _ = CONNECTIONS.remove(connection);
                let _ = emit(connection, cgroup_id, IoKind::Close as u32, 0, None);
            }
        }
    }
    if gone {
        let _ = PASSIVE_SOCKETS.remove(socket);
    }
}

// ---- socket calls: emit ----------------------------------------------------

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn socket_received(ctx: RawTracePointContext) -> i32 {
    let _ = socket_call(&ctx, IoKind::Read);
    0
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn socket_sent(ctx: RawTracePointContext) -> i32 {
    let _ = socket_call(&ctx, IoKind::Write);
    0
}

#[inline(always)]
fn socket_call(ctx: &RawTracePointContext, kind: IoKind) -> Result<(), i64> {
    // (struct sock *sk, int ret, int flags)
    let ret = ctx.arg::<u64>(1) as i32 as i64;
    // Non-blocking sockets answer EAGAIN constantly: not an event, and
    // the cheapest test, so first.
    if ret == -EAGAIN || (kind == IoKind::Read && ctx.arg::<u64>(2) & MSG_PEEK != 0) {
        return Ok(());
    }
    let id = bpf_get_current_pid_tgid();
    let tgid = id >> 32;
    if !filter::follows(tgid) {
        return Ok(());
    }
    let socket: u64 = ctx.arg(0);
    let Some((fd, io)) = call_buffer(kind)? else {
        if PASSIVE_SOCKETS.get_ptr(socket).is_some() {
            bump(RequestStat::UndecodedSocketCall);
        }
        return Ok(());
    };
    let key = (id & 0xffff_ffff_0000_0000) | (fd & 0xffff_ffff);
    let (cgroup_id, mode) = match CONNECTIONS.get_ptr_mut(key) {
        // SAFETY (all arms): plain-data map value of this connection.
        Some(state) if unsafe { (*state).socket } == socket => unsafe { ((*state).cgroup_id, (*state).mode) },
        Some(state) if unsafe { (*state).socket } == 0 => {
            // Seeded by user space: learn its socket, so its close is seen.
            unsafe { (*state).socket = socket };
            let _ = PASSIVE_SOCKETS.insert(socket, Passive { connection: key, closed: 0 }, 0);
            unsafe { ((*state).cgroup_id, (*state).mode) }
        }
        _ => match begin(ctx, key, socket, tgid)? {
            Some(cgroup_id) => (cgroup_id, conn_mode::UNKNOWN),
            None => return Ok(()),
        },
    };
    // A synchronised HTTP/2 connection's bytes reach user space as frame
    // records: its event needs no capture.
    let capture = ret > 0 && mode != conn_mode::H2;
    emit(key, cgroup_id, kind as u32, ret, capture.then_some((&io, ret as u64)))?;
    if ret <= 0 || mode == conn_mode::OTHER {
        return Ok(());
    }
    // HTTP/2 (or not yet decided): walk the frame headers in `h2_walk`.
    if let Some(input) = WALK_INPUT.get_ptr_mut(0) {
        // SAFETY: this CPU's scratch slot.
        unsafe {
            *input = WalkInput {
                buffer: io.buffer,
                segments: io.segments,
                moved: ret as u64,
                connection: key,
                timestamp_ns: bpf_ktime_get_ns(),
                cgroup_id,
                is_read: u32::from(kind == IoKind::Read),
                ..WalkInput::default()
            };
            TAIL_CALLS.tail_call(ctx, 0);
        }
    }
    Ok(())
}

/// The fd and user buffer of the syscall this socket call serves, from the
/// task's saved registers; `None` for calls that name no user buffer.
#[inline(always)]
fn call_buffer(kind: IoKind) -> Result<Option<(u64, UserBuffer)>, i64> {
    // SAFETY: the current task's BTF pointer; its saved user registers are
    // read through the checked helper.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf() as *mut _) } as u64;
    let (nr, [fd, second, third]) = unsafe { syscalls::call_registers(regs)? };
    let read = kind == IoKind::Read;
    let (buffer, segments) = match nr {
        syscalls::READ | syscalls::RECVFROM if read => (second, 0),
        syscalls::WRITE | syscalls::SENDTO if !read => (second, 0),
        syscalls::READV if read => (second, third),
        syscalls::WRITEV if !read => (second, third),
        syscalls::RECVMSG | syscalls::SENDMSG if (nr == syscalls::RECVMSG) == read => {
            // SAFETY: user memory through the checked helper.
            let iov: u64 = unsafe { bpf_probe_read_user((second + MSGHDR_IOV) as *const u64)? };
            let count: u64 = unsafe { bpf_probe_read_user((second + MSGHDR_IOVLEN) as *const u64)? };
            (iov, count)
        }
        _ => return Ok(None),
    };
    Ok(Some((fd, UserBuffer { buffer, segments })))
}

/// The first call of a watched process on a passive socket: track it as
/// `key` and tell user space; the connection's cgroup, or `None` when it
/// is not one to track.
#[inline(always)]
fn begin(ctx: &RawTracePointContext, key: u64, socket: u64, tgid: u64) -> Result<Option<u64>, i64> {
    let Some(passive) = PASSIVE_SOCKETS.get_ptr_mut(socket) else { return Ok(None) };
    // SAFETY: plain-data map value.
    if unsafe { (*passive).closed } != 0 {
        return Ok(None);
    }
    let Some(cgroup_id) = filter::watched_cgroup() else { return Ok(None) };
    let state = ConnState { cgroup_id, socket, mode: conn_mode::UNKNOWN, ..ConnState::default() };
    if CONNECTIONS.insert(key, state, 0).is_err() {
        bump(RequestStat::ConnectionMapFull);
        debug!(ctx, "connection map refused connection {:x} of cgroup {}: not followed", key, cgroup_id);
        return Ok(None);
    }
    // SAFETY: as above.
    unsafe { (*passive).connection = key };
    filter::mark_server(tgid);
    emit_accept(key, cgroup_id, socket)?;
    Ok(Some(cgroup_id))
}

/// The `Accept` event: the server port in `bytes`, the peer as a sockaddr
/// in the prefix (user space spots loopback peers).
#[inline(always)]
fn emit_accept(key: u64, cgroup_id: u64, socket: u64) -> Result<(), i64> {
    let Some(event) = event_scratch(cgroup_id, key, IoKind::Accept as u32) else { return Ok(()) };
    // SAFETY: `socket` is a live `struct sock` (its call is running), read
    // through the checked helper; `event` is this CPU's scratch slot.
    let prefix_len = unsafe {
        let port: u16 = bpf_probe_read_kernel((socket + SKC_NUM) as *const u16).unwrap_or(0);
        let family: u16 = bpf_probe_read_kernel((socket + SKC_FAMILY) as *const u16).unwrap_or(0);
        let peer_port: [u8; 2] = bpf_probe_read_kernel((socket + SKC_DPORT) as *const [u8; 2]).unwrap_or([0; 2]);
        let peer: [u8; 4] = bpf_probe_read_kernel((socket + SKC_DADDR) as *const [u8; 4]).unwrap_or([0; 4]);
        (*event).bytes = i64::from(port);
        let prefix = &mut (*event).prefix;
        prefix[..28].fill(0);
        prefix[..2].copy_from_slice(&family.to_ne_bytes());
        prefix[2..4].copy_from_slice(&peer_port);
        if family == AF_INET6 {
            if peer != LOOPBACK4_IPV6 {
                prefix[18..20].copy_from_slice(&[0xff, 0xff]);
                prefix[20..24].copy_from_slice(&peer);
            }
            28
        } else {
            prefix[4..8].copy_from_slice(&peer);
            if family == AF_INET {
                16
            } else {
                0
            }
        }
    };
    submit(event, prefix_len);
    Ok(())
}

/// This CPU's event scratch, its header filled for `kind` (no bytes, no
/// capture yet); `None` only if the map lookup fails.
#[inline(always)]
fn event_scratch(cgroup_id: u64, connection: u64, kind: u32) -> Option<*mut IoEvent> {
    let event = EVENT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, exclusive while the program runs.
    unsafe {
        (*event).timestamp_ns = bpf_ktime_get_ns();
        (*event).cgroup_id = cgroup_id;
        (*event).connection = connection;
        (*event).bytes = 0;
        (*event).kind = kind;
        (*event).prefix_len = 0;
        (*event).suffix_len = 0;
        (*event).segments = 1;
    }
    Some(event)
}

/// Copies the scratch event's header and the first `prefix_len` prefix
/// bytes into the ring.
#[inline(always)]
fn submit(event: *mut IoEvent, prefix_len: u64) {
    let mut captured = prefix_len;
    if captured > CAPTURE_PREFIX as u64 {
        captured = CAPTURE_PREFIX as u64;
    }
    // SAFETY: this CPU's slot.
    unsafe { (*event).prefix_len = captured as u32 };
    output_prefix(event, IO_EVENT_HEADER + captured as usize);
}

/// Writes the first `length` bytes of this CPU's event scratch `event` to
/// the ring (clamped to its size): a variable-length record.
#[inline(always)]
pub(crate) fn output_prefix<T>(event: *const T, length: usize) {
    let mut length = length;
    if length > core::mem::size_of::<T>() {
        length = core::mem::size_of::<T>();
    }
    // SAFETY: the first `length` (<= its size) bytes of a per-CPU map value.
    let record = unsafe { core::slice::from_raw_parts(event as *const u8, length) };
    if EVENTS.output::<[u8]>(record, wake_flags()).is_err() {
        bump(RequestStat::RingFull);
    } else {
        bump(RequestStat::Emitted);
    }
}

/// Waking the reader per event costs more than the event: wake it only
/// when a batch is waiting; it also drains on a short timer.
#[inline(always)]
fn wake_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

// ---- the event -------------------------------------------------------------

/// Writes one event; `capture_from` names the user buffer and how many of
/// its bytes to copy into the prefix (and suffix). Inlined: BPF calls take
/// at most five arguments.
#[inline(always)]
fn emit(
    connection: u64,
    cgroup_id: u64,
    kind: u32,
    bytes: i64,
    capture_from: Option<(&UserBuffer, u64)>,
) -> Result<(), i64> {
    let Some(event) = event_scratch(cgroup_id, connection, kind) else { return Ok(()) };
    // SAFETY: this CPU's scratch slot.
    unsafe { (*event).bytes = bytes };
    let prefix_len = match capture_from {
        // SAFETY: as above.
        Some((io, moved)) => unsafe { capture(event, io, moved) },
        None => 0,
    };
    submit(event, prefix_len);
    Ok(())
}

/// Copies the first and last bytes moved into the event; the number of
/// prefix bytes captured.
///
/// # Safety
/// `event` must point to this CPU's event scratch.
unsafe fn capture(event: *mut IoEvent, io: &UserBuffer, moved: u64) -> u64 {
    let (first_base, first_len) = if io.segments == 0 {
        (io.buffer, moved)
    } else {
        let Ok(first) = (unsafe { bpf_probe_read_user(io.buffer as *const IoVec) }) else {
            bump(RequestStat::CaptureFailed);
            return 0;
        };
        (first.base, if first.len < moved { first.len } else { moved })
    };
    unsafe { (*event).segments = if io.segments == 0 { 1 } else { io.segments as u32 } };

    let mut prefix = first_len;
    if prefix > CAPTURE_PREFIX as u64 {
        prefix = CAPTURE_PREFIX as u64;
    }
    let mut captured = 0;
    if prefix > 0 && prefix <= CAPTURE_PREFIX as u64 {
        let dst = unsafe { (*event).prefix.as_mut_ptr() } as *mut c_void;
        // SAFETY: 0 < prefix <= CAPTURE_PREFIX, the size of `prefix`.
        if unsafe { generated::bpf_probe_read_user(dst, prefix as u32, first_base as *const c_void) } == 0 {
            captured = prefix;
        } else {
            bump(RequestStat::CaptureFailed);
        }
    }

    // A single buffer that fit in the prefix holds its own suffix: user
    // space takes it from there, which saves a second user-memory read on
    // every small message.
    if io.segments == 0 && captured == moved {
        return captured;
    }
    // The last byte moved: in the single buffer, or in the iovec where the
    // running length reaches `moved` (within the first few iovecs).
    let (mut end, mut end_base) = (0u64, 0u64);
    if io.segments == 0 {
        (end, end_base) = (io.buffer + moved, io.buffer);
    } else {
        let mut remaining = moved;
        let mut index = 0u64;
        while index < MAX_SEGMENTS_WALKED && index < io.segments {
            let Ok(segment) = (unsafe { bpf_probe_read_user((io.buffer + index * 16) as *const IoVec) }) else { break };
            if segment.len >= remaining {
                (end, end_base) = (segment.base + remaining, segment.base);
                break;
            }
            remaining -= segment.len;
            index += 1;
        }
    }
    if end == 0 {
        return captured;
    }
    // Stay inside that segment: a short last iovec yields a shorter suffix.
    let mut suffix = end - end_base;
    if suffix > CAPTURE_SUFFIX as u64 {
        suffix = CAPTURE_SUFFIX as u64;
    }
    if suffix > 0 && suffix <= CAPTURE_SUFFIX as u64 {
        // Left-aligned: a constant destination keeps the verifier's bounds
        // check simple (0 < suffix <= CAPTURE_SUFFIX).
        let dst = unsafe { (*event).suffix.as_mut_ptr() } as *mut c_void;
        if unsafe { generated::bpf_probe_read_user(dst, suffix as u32, (end - suffix) as *const c_void) } == 0 {
            unsafe { (*event).suffix_len = suffix as u32 };
        }
    }
    captured
}

mod driver;
mod filter;
mod h2;
mod syscalls;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
