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
    conn_mode, ConnState, H2Event, H2Frame, IoEvent, IoKind, RequestStat, WalkInput, CAPTURE_PREFIX, CAPTURE_SUFFIX,
    MAX_H2_FRAMES, MAX_TRACKED_CONNECTIONS, MAX_WATCHED_CGROUPS, REQUEST_RING_BYTES, REQUEST_STAT_COUNT,
};

/// cgroup ids whose accepted connections are tracked.
#[map]
static WATCHED_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_WATCHED_CGROUPS, 0);

/// Tracked connections (`tgid << 32 | fd`) -> cgroup and protocol state.
#[map]
static CONNECTIONS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

/// Arguments of an in-progress syscall, per thread, from entry to exit.
/// A plain hash (LRU inserts cost more); entries are removed at exit.
#[map]
static PENDING: HashMap<u64, Pending> = HashMap::with_max_entries(16384, 0);

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
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

// Offsets in the syscall tracepoint records (see .../syscalls/*/format).
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

fn accept_enter() -> Result<(), i64> {
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if WATCHED_CGROUPS.get_ptr(cgroup_id).is_none() {
        return Ok(());
    }
    let pending = Pending { buffer: 0, segments: 0, cgroup_id, fd: 0, kind: IoKind::Accept as u32 };
    if PENDING.insert(bpf_get_current_pid_tgid(), pending, 0).is_err() {
        bump(RequestStat::ArgsMapFull);
    }
    Ok(())
}

#[tracepoint]
pub fn accept4_enter(_ctx: TracePointContext) -> u32 {
    let _ = accept_enter();
    0
}

#[tracepoint]
pub fn accept_enter_plain(_ctx: TracePointContext) -> u32 {
    let _ = accept_enter();
    0
}

// ---- reads and writes: stash arguments at entry -------------------------

/// Contiguous calls: `(fd, buf, ...)`.
fn stash_contiguous(ctx: &TracePointContext, kind: IoKind) -> Result<(), i64> {
    // SAFETY: offsets from the tracepoint format.
    let fd: u64 = unsafe { ctx.read_at(ARG0)? };
    let Some(state) = CONNECTIONS.get_ptr(connection_key(fd)) else { return Ok(()) };
    // SAFETY: as above; the map value is plain data.
    let (buffer, cgroup_id) = unsafe { (ctx.read_at::<u64>(ARG1)?, (*state).cgroup_id) };
    stash(Pending { buffer, segments: 0, cgroup_id, fd: fd as u32, kind: kind as u32 })
}

/// Vectored calls: `(fd, iov, iovcnt)`.
fn stash_vectored(ctx: &TracePointContext, kind: IoKind) -> Result<(), i64> {
    // SAFETY: offsets from the tracepoint format.
    let fd: u64 = unsafe { ctx.read_at(ARG0)? };
    let Some(state) = CONNECTIONS.get_ptr(connection_key(fd)) else { return Ok(()) };
    // SAFETY: as above.
    let (buffer, segments, cgroup_id) =
        unsafe { (ctx.read_at::<u64>(ARG1)?, ctx.read_at::<u64>(ARG2)?, (*state).cgroup_id) };
    stash(Pending { buffer, segments, cgroup_id, fd: fd as u32, kind: kind as u32 })
}

/// Message calls: `(fd, msghdr, flags)`; the iovec array is read from the header.
fn stash_message(ctx: &TracePointContext, kind: IoKind) -> Result<(), i64> {
    // SAFETY: offsets from the tracepoint format.
    let fd: u64 = unsafe { ctx.read_at(ARG0)? };
    let Some(state) = CONNECTIONS.get_ptr(connection_key(fd)) else { return Ok(()) };
    // SAFETY: as above; user memory is read through the checked helper.
    let (header, cgroup_id) = unsafe { (ctx.read_at::<u64>(ARG1)?, (*state).cgroup_id) };
    let buffer: u64 = unsafe { bpf_probe_read_user((header + MSGHDR_IOV) as *const u64)? };
    let segments: u64 = unsafe { bpf_probe_read_user((header + MSGHDR_IOVLEN) as *const u64)? };
    stash(Pending { buffer, segments, cgroup_id, fd: fd as u32, kind: kind as u32 })
}

fn stash(pending: Pending) -> Result<(), i64> {
    if PENDING.insert(bpf_get_current_pid_tgid(), pending, 0).is_err() {
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
    let Some(pending) = PENDING.get_ptr(id) else { return Ok(()) };
    // SAFETY: the value is plain data; copied before the entry is removed.
    let pending = unsafe { *pending };
    let _ = PENDING.remove(id);
    // SAFETY: offset from the tracepoint format.
    let ret: i64 = unsafe { ctx.read_at(RET)? };
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
        return emit(key, pending.cgroup_id, IoKind::Accept as u32, ret, None);
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
    let Some(state) = CONNECTIONS.get_ptr(key) else { return Ok(()) };
    // SAFETY: plain-data map value.
    if unsafe { (*state).mode } == conn_mode::OTHER {
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
    let fd: u64 = unsafe { ctx.read_at(ARG0)? };
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

// ---- HTTP/2 frame walking ---------------------------------------------------

/// Progress of a frame walk through one syscall's buffers.
struct Walk {
    /// Offset of the next frame header, relative to the current buffer.
    next: u64,
    /// The boundary was lost (implausible or straddling header).
    lost: bool,
}

/// Appends a frame to this CPU's scratch (dropped when it is full).
#[inline(always)]
fn record(frame: H2Frame) {
    let Some(input) = WALK_INPUT.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's scratch slots.
    unsafe {
        let index = (*input).recorded;
        if let Some(slot) = H2_SCRATCH.get_ptr_mut(index) {
            *slot = frame;
            (*input).recorded = index + 1;
        }
    }
}

/// Follows frame headers through one contiguous buffer of `len` bytes.
///
/// # Safety
/// `event` must point to a reserved ring slot.
#[inline(always)]
unsafe fn walk_buffer(base: u64, len: u64, walk: &mut Walk) {
    let mut steps = 0u32;
    while steps < MAX_WALK && !walk.lost {
        steps += 1;
        if walk.next >= len {
            return;
        }
        if walk.next + 9 > len {
            // The header straddles buffers or syscalls.
            walk.lost = true;
            return;
        }
        let Ok(header) = (unsafe { bpf_probe_read_user((base + walk.next) as *const [u8; 9]) }) else {
            walk.lost = true;
            return;
        };
        let length = u32::from(header[0]) << 16 | u32::from(header[1]) << 8 | u32::from(header[2]);
        let kind = header[3];
        let raw_id =
            u32::from(header[5]) << 24 | u32::from(header[6]) << 16 | u32::from(header[7]) << 8 | u32::from(header[8]);
        if !plausible(length, kind, raw_id & 0x7fff_ffff, raw_id & 0x8000_0000 != 0) {
            walk.lost = true;
            return;
        }
        if matches!(kind, 0 | 1 | 3 | 7) {
            record(H2Frame { length, stream_id: raw_id & 0x7fff_ffff, kind, flags: header[4], _pad: [0; 2] });
        }
        walk.next += 9 + u64::from(length);
    }
    if walk.next < len {
        // More frames in this buffer than one walk follows.
        walk.lost = true;
    }
}

const H2_PREFACE_LEN: u32 = 24;
/// Frame headers walked per buffer (recorded or not).
const MAX_WALK: u32 = 32;
/// iovecs of a vectored call that frames are followed through.
const MAX_WALK_SEGMENTS: usize = 4;
/// Larger frames than this are taken as a sign of a lost boundary.
const MAX_PLAUSIBLE_FRAME: u32 = 1 << 20;

/// Whether a 9-byte frame header looks real (used to resynchronise).
/// SETTINGS, PING and GOAWAY live on stream 0; DATA, HEADERS, PRIORITY,
/// RST_STREAM, PUSH_PROMISE and CONTINUATION never do; WINDOW_UPDATE may
/// be either.
fn plausible(length: u32, kind: u8, stream_id: u32, reserved: bool) -> bool {
    let stream_ok = match kind {
        4 | 6 | 7 => stream_id == 0,
        8 => true,
        _ => stream_id != 0,
    };
    length <= MAX_PLAUSIBLE_FRAME && kind <= 9 && !reserved && stream_ok
}

/// Tail-called by `syscall_exit` for connections that are (or may be)
/// HTTP/2: decides the protocol on the first data, walks the frame headers
/// of this read or write, carries the offset of the next header into the
/// next syscall, and emits an `H2Event` with the request-relevant frames.
#[tracepoint]
pub fn h2_walk(_ctx: TracePointContext) -> u32 {
    let Some(input) = WALK_INPUT.get_ptr(0) else { return 0 };
    // SAFETY: this CPU's scratch slot, written just before the tail call.
    let input = unsafe { *input };
    let Some(state) = CONNECTIONS.get_ptr_mut(input.connection) else { return 0 };
    // SAFETY: the connection's map value.
    unsafe { follow_http2(&input, state) };
    0
}

/// First four bytes of the data (for the preface check).
fn first_bytes(input: &WalkInput) -> Option<[u8; 4]> {
    let base = if input.segments == 0 {
        input.buffer
    } else {
        // SAFETY: user memory through the checked helper.
        unsafe { bpf_probe_read_user(input.buffer as *const IoVec) }.ok()?.base
    };
    // SAFETY: as above.
    unsafe { bpf_probe_read_user(base as *const [u8; 4]) }.ok()
}

/// # Safety
/// `state` must be this connection's map value.
unsafe fn follow_http2(input: &WalkInput, state: *mut ConnState) {
    let is_read = input.is_read != 0;
    let moved = input.moved;
    let mut skip: u64 = 0;
    let mode = unsafe { (*state).mode };
    if mode == conn_mode::UNKNOWN {
        if !is_read || moved < 4 {
            return;
        }
        let Some(first) = first_bytes(input) else { return };
        if first == *b"PRI " {
            unsafe { (*state).mode = conn_mode::H2 };
            skip = u64::from(H2_PREFACE_LEN);
        } else if first[0].is_ascii_uppercase() {
            unsafe { (*state).mode = conn_mode::OTHER };
            return;
        } else {
            // Joined mid-stream: maybe HTTP/2, decided by a plausible header.
            unsafe { (*state).mode = conn_mode::H2_UNSYNCED };
        }
    } else if mode == conn_mode::OTHER {
        return;
    } else if mode == conn_mode::H2 {
        skip = u64::from(unsafe {
            if is_read {
                (*state).read_skip
            } else {
                (*state).write_skip
            }
        });
    }

    // Walk each buffer in turn, carrying the offset of the next header from
    // one into the next. `walk.next` is relative to the current buffer.
    let unsynced = unsafe { (*state).mode } == conn_mode::H2_UNSYNCED;
    let mut walk = Walk { next: skip, lost: false };
    let mut walked = 0u64;
    if input.segments == 0 {
        unsafe { walk_buffer(input.buffer, moved, &mut walk) };
        walked = moved;
    } else {
        let mut index = 0usize;
        while index < MAX_WALK_SEGMENTS && (index as u64) < input.segments && walked < moved && !walk.lost {
            let Ok(segment) = (unsafe { bpf_probe_read_user((input.buffer + index as u64 * 16) as *const IoVec) })
            else {
                walk.lost = true;
                break;
            };
            let len = if segment.len < moved - walked { segment.len } else { moved - walked };
            unsafe { walk_buffer(segment.base, len, &mut walk) };
            // Not lost means the next header is at or beyond this buffer's end.
            walk.next = walk.next.saturating_sub(len);
            walked += len;
            index += 1;
        }
    }
    // Data beyond the iovecs we follow cannot be walked.
    let lost = walk.lost || walked < moved;
    unsafe {
        if lost {
            if !unsynced {
                (*state).lost_sync += 1;
                bump(RequestStat::H2LostSync);
            }
            (*state).mode = conn_mode::H2_UNSYNCED;
        } else {
            (*state).mode = conn_mode::H2;
            // After a contiguous walk `next` is relative to the buffer start;
            // after the iovec loop it is already relative to the data's end.
            let carry = if input.segments == 0 { walk.next - moved } else { walk.next } as u32;
            if is_read {
                (*state).read_skip = carry;
            } else {
                (*state).write_skip = carry;
            }
        }
    }
    // Read back from map memory: an untracked value for the verifier.
    let recorded = match WALK_INPUT.get_ptr(0) {
        // SAFETY: this CPU's scratch slot.
        Some(input) => unsafe { (*input).recorded },
        None => 0,
    };
    if recorded == 0 {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<H2Event>(0) else {
        bump(RequestStat::RingFull);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: a reserved, exclusively owned ring slot; constant indices.
    unsafe {
        (*event).timestamp_ns = input.timestamp_ns;
        (*event).cgroup_id = input.cgroup_id;
        (*event).connection = input.connection;
        (*event).bytes = moved as i64;
        (*event).kind = if is_read { IoKind::H2Read as u32 } else { IoKind::H2Write as u32 };
        (*event).mode = (*state).mode;
        (*event)._pad = 0;
        let mut copied = 0u32;
        for index in 0..MAX_H2_FRAMES {
            let frame = if (index as u32) < recorded { H2_SCRATCH.get_ptr(index as u32) } else { None };
            (*event).frames[index] = match frame {
                Some(frame) => {
                    copied += 1;
                    *frame
                }
                None => H2Frame::default(),
            };
        }
        (*event).frame_count = copied;
    }
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    entry.submit(flags);
    bump(RequestStat::Emitted);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
