//! Request I/O of watched pods' server-side connections, for user-space
//! HTTP parsers.
//!
//! Connections are tracked from `accept`/`accept4` in a watched cgroup (user
//! space also seeds connections that predate the agent) until `close`.
//! For tracked connections only, the read-family (`read`, `recvfrom`,
//! `readv`, `recvmsg`) and write-family (`write`, `sendto`, `writev`,
//! `sendmsg`) syscalls produce one ring-buffer event each: kernel timestamp,
//! bytes moved, the first `CAPTURE_PREFIX` bytes and the last
//! `CAPTURE_SUFFIX` bytes. Any other read/write on the node costs one hash
//! lookup at entry and one at exit. Syscall tracepoints are the base path
//! because kprobes and fentry are unavailable on this project's machines.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, generated},
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::TracePointContext,
};
use podgpu_common::{
    conn_mode, ConnState, H2Frame, IoEvent, IoKind, RequestStat, WalkInput, CAPTURE_PREFIX, CAPTURE_SUFFIX,
    MAX_H2_FRAMES, MAX_TRACKED_CONNECTIONS, MAX_WATCHED_CGROUPS, REQUEST_RING_BYTES, REQUEST_STAT_COUNT,
};

/// cgroup ids whose accepted connections are tracked.
#[map]
static WATCHED_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_WATCHED_CGROUPS, 0);

/// Tracked connections (`tgid << 32 | fd`) -> cgroup and protocol state.
#[map]
static CONNECTIONS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

/// Arguments of an in-progress syscall, per thread, from entry to exit.
/// A thread's slot is written in place at every entry and marked
/// `CONSUMED` at exit, never deleted: an insert plus a delete per syscall
/// cost more than the two in-place writes. LRU so slots of exited threads
/// make room for new ones.
#[map]
static PENDING: LruHashMap<u64, Pending> = LruHashMap::with_max_entries(16384, 0);

/// `Pending::kind` of a slot whose syscall has exited.
const CONSUMED: u32 = u32::MAX;

/// Events for user space.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(REQUEST_RING_BYTES, 0);

/// Frames found by the current walk, copied into the event afterwards.
/// Writing them through a map (not at a counted offset into the event)
/// keeps the count out of the verifier's pointer arithmetic, so equal walk
/// states prune and the walk verifies in linear time.
#[map]
static H2_SCRATCH: PerCpuArray<H2Frame> = PerCpuArray::with_max_entries(MAX_H2_FRAMES as u32, 0);

/// What the exit program hands the frame walker.
#[map]
static WALK_INPUT: PerCpuArray<WalkInput> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: the `h2_walk` program. A tail call keeps the walk out of the
/// exit program, so each verifies on its own (together they exceed the
/// verifier's budget).
#[map]
static WALKERS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The probe's own counters, indexed by `RequestStat`.
#[map]
static REQUEST_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REQUEST_STAT_COUNT, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct Pending {
    /// Buffer (contiguous calls) or iovec array (vectored calls).
    buffer: u64,
    /// 0 for a contiguous buffer, else the iovec count.
    segments: u64,
    cgroup_id: u64,
    fd: u32,
    kind: u32,
    /// The connection's `conn_mode` at entry (saves a lookup at exit).
    mode: u32,
    _padding: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

// Offsets in the syscall tracepoint records (see .../syscalls/*/format).
/// Reads a syscall argument or return value straight from the tracepoint
/// record: tracepoint programs may load from their context directly, which
/// saves a `bpf_probe_read` helper call per field on every syscall.
///
/// # Safety
/// `offset` must be an 8-byte aligned field of the syscall tracepoint's
/// format (the verifier rejects anything else).
#[inline(always)]
unsafe fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    unsafe { *(aya_ebpf::EbpfContext::as_ptr(ctx) as *const u8).add(offset).cast::<T>() }
}

const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;
// struct user_msghdr: msg_iov at 16, msg_iovlen at 24.
const MSGHDR_IOV: u64 = 16;
const MSGHDR_IOVLEN: u64 = 24;
const EAGAIN: i64 = 11;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Pending bytes in the ring that trigger a wakeup of the reader.
const WAKEUP_BYTES: u64 = 64 * 1024;
/// iovecs inspected when looking for the last byte of a vectored call.
const MAX_SEGMENTS_WALKED: u64 = 8;

fn bump(stat: RequestStat) {
    if let Some(value) = REQUEST_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: this CPU's slot, exclusive while the program runs.
        unsafe { *value += 1 };
    }
}

fn connection_key(fd: u64) -> u64 {
    (bpf_get_current_pid_tgid() & 0xffff_ffff_0000_0000) | (fd & 0xffff_ffff)
}

// ---- accept: start tracking -------------------------------------------

fn accept_enter(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if WATCHED_CGROUPS.get_ptr(cgroup_id).is_none() {
        return Ok(());
    }
    // The listening socket: user space maps it to the server port once.
    // SAFETY: offset from the tracepoint format.
    let listener: u64 = unsafe { field(ctx, ARG0) };
    stash(Pending {
        buffer: 0,
        segments: 0,
        cgroup_id,
        fd: listener as u32,
        kind: IoKind::Accept as u32,
        mode: conn_mode::UNKNOWN,
        _padding: 0,
    })
}

#[tracepoint]
pub fn accept4_enter(ctx: TracePointContext) -> u32 {
    let _ = accept_enter(&ctx);
    0
}

#[tracepoint]
pub fn accept_enter_plain(ctx: TracePointContext) -> u32 {
    let _ = accept_enter(&ctx);
    0
}

// ---- reads and writes: stash arguments at entry -------------------------

/// Contiguous calls: `(fd, buf, ...)`.
fn stash_contiguous(ctx: &TracePointContext, kind: IoKind) -> Result<(), i64> {
    // SAFETY: offsets from the tracepoint format.
    let fd: u64 = unsafe { field(ctx, ARG0) };
    let Some(state) = CONNECTIONS.get_ptr(connection_key(fd)) else { return Ok(()) };
    // SAFETY: as above; the map value is plain data.
    let (buffer, cgroup_id, mode) = unsafe { (field::<u64>(ctx, ARG1), (*state).cgroup_id, (*state).mode) };
    stash(Pending { buffer, segments: 0, cgroup_id, fd: fd as u32, kind: kind as u32, mode, _padding: 0 })
}

/// Vectored calls: `(fd, iov, iovcnt)`.
fn stash_vectored(ctx: &TracePointContext, kind: IoKind) -> Result<(), i64> {
    // SAFETY: offsets from the tracepoint format.
    let fd: u64 = unsafe { field(ctx, ARG0) };
    let Some(state) = CONNECTIONS.get_ptr(connection_key(fd)) else { return Ok(()) };
    // SAFETY: as above.
    let (buffer, segments, cgroup_id, mode) =
        unsafe { (field::<u64>(ctx, ARG1), field::<u64>(ctx, ARG2), (*state).cgroup_id, (*state).mode) };
    stash(Pending { buffer, segments, cgroup_id, fd: fd as u32, kind: kind as u32, mode, _padding: 0 })
}

/// Message calls: `(fd, msghdr, flags)`; the iovec array is read from the header.
fn stash_message(ctx: &TracePointContext, kind: IoKind) -> Result<(), i64> {
    // SAFETY: offsets from the tracepoint format.
    let fd: u64 = unsafe { field(ctx, ARG0) };
    let Some(state) = CONNECTIONS.get_ptr(connection_key(fd)) else { return Ok(()) };
    // SAFETY: as above; user memory is read through the checked helper.
    let (header, cgroup_id, mode) = unsafe { (field::<u64>(ctx, ARG1), (*state).cgroup_id, (*state).mode) };
    let buffer: u64 = unsafe { bpf_probe_read_user((header + MSGHDR_IOV) as *const u64)? };
    let segments: u64 = unsafe { bpf_probe_read_user((header + MSGHDR_IOVLEN) as *const u64)? };
    stash(Pending { buffer, segments, cgroup_id, fd: fd as u32, kind: kind as u32, mode, _padding: 0 })
}

fn stash(pending: Pending) -> Result<(), i64> {
    let id = bpf_get_current_pid_tgid();
    if let Some(slot) = PENDING.get_ptr_mut(id) {
        // SAFETY: this thread's slot; only this thread writes it.
        unsafe { *slot = pending };
        return Ok(());
    }
    if PENDING.insert(id, pending, 0).is_err() {
        bump(RequestStat::ArgsMapFull);
    }
    Ok(())
}

macro_rules! entry {
    ($name:ident, $stash:ident, $kind:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            let _ = $stash(&ctx, $kind);
            0
        }
    };
}

entry!(read_enter, stash_contiguous, IoKind::Read);
entry!(recvfrom_enter, stash_contiguous, IoKind::Read);
entry!(readv_enter, stash_vectored, IoKind::Read);
entry!(recvmsg_enter, stash_message, IoKind::Read);
entry!(write_enter, stash_contiguous, IoKind::Write);
entry!(sendto_enter, stash_contiguous, IoKind::Write);
entry!(writev_enter, stash_vectored, IoKind::Write);
entry!(sendmsg_enter, stash_message, IoKind::Write);

// ---- every exit: emit ----------------------------------------------------

#[tracepoint]
pub fn syscall_exit(ctx: TracePointContext) -> u32 {
    let _ = try_exit(&ctx);
    0
}

fn try_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let id = bpf_get_current_pid_tgid();
    let Some(slot) = PENDING.get_ptr_mut(id) else { return Ok(()) };
    // SAFETY: this thread's slot (plain data), copied, then marked consumed.
    let pending = unsafe { *slot };
    if pending.kind == CONSUMED {
        return Ok(());
    }
    unsafe { (*slot).kind = CONSUMED };
    // SAFETY: offset from the tracepoint format.
    let ret: i64 = unsafe { field(ctx, RET) };
    if pending.kind == IoKind::Accept as u32 {
        if ret < 0 {
            return Ok(());
        }
        let key = (id & 0xffff_ffff_0000_0000) | (ret as u64 & 0xffff_ffff);
        let state = ConnState { cgroup_id: pending.cgroup_id, mode: conn_mode::UNKNOWN, ..ConnState::default() };
        if CONNECTIONS.insert(key, state, 0).is_err() {
            bump(RequestStat::ConnectionMapFull);
            return Ok(());
        }
        // The new fd is in the key; `bytes` carries the listening fd.
        return emit(key, pending.cgroup_id, IoKind::Accept as u32, i64::from(pending.fd), None);
    }
    // Non-blocking sockets answer EAGAIN constantly: not an event.
    if ret == -EAGAIN {
        return Ok(());
    }
    let key = (id & 0xffff_ffff_0000_0000) | u64::from(pending.fd);
    emit(key, pending.cgroup_id, pending.kind, ret, Some(&pending))?;
    if ret <= 0 {
        return Ok(());
    }
    // HTTP/2 (or not yet decided): walk the frame headers in `h2_walk`.
    if pending.mode == conn_mode::OTHER {
        return Ok(());
    }
    if let Some(input) = WALK_INPUT.get_ptr_mut(0) {
        // SAFETY: this CPU's scratch slot.
        unsafe {
            *input = WalkInput {
                buffer: pending.buffer,
                segments: pending.segments,
                moved: ret as u64,
                connection: key,
                timestamp_ns: bpf_ktime_get_ns(),
                cgroup_id: pending.cgroup_id,
                is_read: u32::from(pending.kind == IoKind::Read as u32),
                recorded: 0,
            };
            WALKERS.tail_call(ctx, 0);
        }
    }
    Ok(())
}

// ---- close: stop tracking -----------------------------------------------

#[tracepoint]
pub fn close_enter(ctx: TracePointContext) -> u32 {
    let _ = try_close(&ctx);
    0
}

fn try_close(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offset from the tracepoint format.
    let fd: u64 = unsafe { field(ctx, ARG0) };
    let key = connection_key(fd);
    let Some(state) = CONNECTIONS.get_ptr(key) else { return Ok(()) };
    // SAFETY: plain-data map value.
    let cgroup_id = unsafe { (*state).cgroup_id };
    let _ = CONNECTIONS.remove(key);
    emit(key, cgroup_id, IoKind::Close as u32, 0, None)
}

// ---- the event -------------------------------------------------------------

fn emit(connection: u64, cgroup_id: u64, kind: u32, bytes: i64, io: Option<&Pending>) -> Result<(), i64> {
    let Some(mut entry) = EVENTS.reserve::<IoEvent>(0) else {
        bump(RequestStat::RingFull);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved, exclusively owned ring slot
    // of the right size; fields are written before submission.
    unsafe {
        (*event).timestamp_ns = bpf_ktime_get_ns();
        (*event).cgroup_id = cgroup_id;
        (*event).connection = connection;
        (*event).bytes = bytes;
        (*event).kind = kind;
        (*event).prefix_len = 0;
        (*event).suffix_len = 0;
        (*event).segments = 1;
        if let (Some(io), true) = (io, bytes > 0) {
            capture(event, io, bytes as u64);
        }
    }
    // Waking the reader per event costs more than the event: wake it only
    // when a batch is waiting; it also drains on a short timer.
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    entry.submit(flags);
    bump(RequestStat::Emitted);
    Ok(())
}

/// Copies the first and last bytes moved into the event.
///
/// # Safety
/// `event` must point to a reserved ring-buffer slot.
unsafe fn capture(event: *mut IoEvent, io: &Pending, moved: u64) {
    let (first_base, first_len) = if io.segments == 0 {
        (io.buffer, moved)
    } else {
        let Ok(first) = (unsafe { bpf_probe_read_user(io.buffer as *const IoVec) }) else {
            bump(RequestStat::CaptureFailed);
            return;
        };
        (first.base, if first.len < moved { first.len } else { moved })
    };
    unsafe { (*event).segments = if io.segments == 0 { 1 } else { io.segments as u32 } };

    let mut prefix = first_len;
    if prefix > CAPTURE_PREFIX as u64 {
        prefix = CAPTURE_PREFIX as u64;
    }
    if prefix > 0 && prefix <= CAPTURE_PREFIX as u64 {
        let dst = unsafe { (*event).prefix.as_mut_ptr() } as *mut c_void;
        // SAFETY: 0 < prefix <= CAPTURE_PREFIX, the size of `prefix`.
        if unsafe { generated::bpf_probe_read_user(dst, prefix as u32, first_base as *const c_void) } == 0 {
            unsafe { (*event).prefix_len = prefix as u32 };
        } else {
            bump(RequestStat::CaptureFailed);
        }
    }

    // A single buffer that fit in the prefix holds its own suffix: user
    // space takes it from there, which saves a second user-memory read on
    // every small message.
    if io.segments == 0 && unsafe { (*event).prefix_len } as u64 == moved {
        return;
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
        return;
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
}

mod h2;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
