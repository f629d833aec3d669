//! Request I/O of watched pods' server-side connections, for user-space
//! HTTP parsers.
//!
//! Connections are tracked from `accept`/`accept4` in a watched cgroup (user
//! space also seeds connections that predate the agent) until `close`.
//! For tracked connections only, the read-family (`read`, `recvfrom`,
//! `readv`, `recvmsg`) and write-family (`write`, `sendto`, `writev`,
//! `sendmsg`) syscalls produce one ring-buffer event each: kernel timestamp,
//! bytes moved, the first `CAPTURE_PREFIX` bytes and the last
//! `CAPTURE_SUFFIX` bytes.
//!
//! Two raw tracepoints, `sys_enter` and `sys_exit`, see every syscall. Raw
//! tracepoints skip the per-syscall tracepoints' record building (measured:
//! no-op programs cost 5% of a saturated server's throughput as raw
//! tracepoints, 8.5% as the eleven per-syscall ones), and kprobes and
//! fentry are unavailable on this project's machines. Any other syscall
//! costs a compare on its number; a read or write of a process that never
//! accepted a tracked connection costs one byte test (`SERVER_TGIDS`).
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user, generated,
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::RawTracePointContext,
};
use podgpu_common::{
    conn_mode, tgid_slot, ConnState, H2Frame, IoEvent, IoKind, RequestStat, WalkInput, CAPTURE_PREFIX, CAPTURE_SUFFIX,
    MAX_H2_FRAMES, MAX_TRACKED_CONNECTIONS, MAX_WATCHED_CGROUPS, REQUEST_RING_BYTES, REQUEST_STAT_COUNT,
    SERVER_TGID_WORDS,
};

/// cgroup ids whose accepted connections are tracked.
#[map]
static WATCHED_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_WATCHED_CGROUPS, 0);

/// Tracked connections (`tgid << 32 | fd`) -> cgroup and protocol state.
#[map]
static CONNECTIONS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

/// tgids (one byte each, modulo the map's size) that accepted a connection
/// in a watched cgroup: the pre-filter that keeps every other process's
/// reads and writes off the connection lookup. Set by the kernel at
/// accept, never cleared: a stale or aliased mark only costs that process
/// the lookup.
#[map]
static SERVER_TGIDS: Array<u64> = Array::with_max_entries(SERVER_TGID_WORDS, 0);

/// The same for processes whose connections user space seeded (they
/// predate the agent). Separate from `SERVER_TGIDS` so that user space
/// never rewrites a word the kernel marks bytes in.
#[map]
static SEEDED_TGIDS: Array<u64> = Array::with_max_entries(SERVER_TGID_WORDS, 0);

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

/// Slot 0: the `h2_walk` program; slot 1 (`driver::DECODE_SLOT`):
/// `driver_decode`. Tail calls keep them out of the exit program, so each
/// verifies on its own (together they exceed the verifier's budget).
#[map]
static TAIL_CALLS: ProgramArray = ProgramArray::with_max_entries(2, 0);

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
    /// The connection's `conn_mode` at entry (saves a lookup at exit);
    /// for an ioctl, the fd's `fd_kind`.
    mode: u32,
    _padding: u32,
    /// Entry time of an ioctl (time blocked in the driver); 0 otherwise.
    started_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

/// Syscall arguments 0-2 of the current syscall (`sys_enter`'s context).
fn syscall_args(ctx: &RawTracePointContext) -> Result<[u64; 3], i64> {
    let regs: u64 = ctx.arg(0);
    // SAFETY: `regs` is the kernel's `struct pt_regs *` for this syscall,
    // read through the checked helper.
    let slots: [u64; 3] = unsafe { bpf_probe_read_kernel((regs as usize + syscalls::ARGS_OFFSET) as *const [u64; 3])? };
    let [first, second, third] = syscalls::ARG_SLOT;
    Ok([slots[first], slots[second], slots[third]])
}

// struct user_msghdr: msg_iov at 16, msg_iovlen at 24.
const MSGHDR_IOV: u64 = 16;
const MSGHDR_IOVLEN: u64 = 24;
const EAGAIN: i64 = 11;
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

#[inline(always)]
fn is_server(tgid: u64) -> bool {
    let (word, byte) = tgid_slot(tgid);
    let marked = |map: &Array<u64>| map.get(word).is_some_and(|value| (value >> (byte * 8)) & 0xff != 0);
    marked(&SERVER_TGIDS) || marked(&SEEDED_TGIDS)
}

fn mark_server(tgid: u64) {
    let (word, byte) = tgid_slot(tgid);
    if let Some(value) = SERVER_TGIDS.get_ptr_mut(word) {
        // SAFETY: byte `byte` (< 8) of an 8-byte map value; a single-byte
        // store leaves the other tgids' bytes alone.
        unsafe { *(value as *mut u8).add(byte as usize) = 1 };
    }
}

// ---- syscall entry: stash the arguments of tracked I/O ---------------------

/// What a syscall number means to the probe.
enum Entry {
    Accept,
    /// `(fd, buf, count)` or `(fd, buf, len, flags, ...)`.
    Contiguous(IoKind),
    /// `(fd, iov, iovcnt)`.
    Vectored(IoKind),
    /// `(fd, msghdr, flags)`.
    Message(IoKind),
    Close,
    /// `(fd, request, params)`: a driver call if the fd is NVIDIA's.
    Ioctl,
}

#[inline(always)]
fn classify(nr: i64) -> Option<Entry> {
    Some(match nr {
        syscalls::READ | syscalls::RECVFROM => Entry::Contiguous(IoKind::Read),
        syscalls::WRITE | syscalls::SENDTO => Entry::Contiguous(IoKind::Write),
        syscalls::READV => Entry::Vectored(IoKind::Read),
        syscalls::WRITEV => Entry::Vectored(IoKind::Write),
        syscalls::RECVMSG => Entry::Message(IoKind::Read),
        syscalls::SENDMSG => Entry::Message(IoKind::Write),
        syscalls::ACCEPT | syscalls::ACCEPT4 => Entry::Accept,
        syscalls::CLOSE => Entry::Close,
        syscalls::IOCTL => Entry::Ioctl,
        _ => return None,
    })
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn syscall_enter(ctx: RawTracePointContext) -> i32 {
    let nr: i64 = ctx.arg(1);
    let Some(entry) = classify(nr) else { return 0 };
    let _ = try_enter(&ctx, entry);
    0
}

fn try_enter(ctx: &RawTracePointContext, entry: Entry) -> Result<(), i64> {
    let tgid = bpf_get_current_pid_tgid() >> 32;
    match entry {
        Entry::Accept => return accept_enter(ctx, tgid),
        Entry::Ioctl => {
            return match driver::ioctl_enter(ctx, tgid)? {
                Some(pending) => stash(pending),
                None => Ok(()),
            }
        }
        Entry::Close if driver::is_client(tgid) => {
            let [fd, _, _] = syscall_args(ctx)?;
            driver::close(tgid, fd);
        }
        _ => {}
    }
    if !is_server(tgid) {
        return Ok(());
    }
    let [fd, second, third] = syscall_args(ctx)?;
    let key = (tgid << 32) | (fd & 0xffff_ffff);
    let Some(state) = CONNECTIONS.get_ptr(key) else { return Ok(()) };
    // SAFETY: plain-data map value.
    let (cgroup_id, mode) = unsafe { ((*state).cgroup_id, (*state).mode) };
    let (kind, buffer, segments) = match entry {
        Entry::Contiguous(kind) => (kind, second, 0),
        Entry::Vectored(kind) => (kind, second, third),
        Entry::Message(kind) => {
            // SAFETY: user memory through the checked helper.
            let buffer: u64 = unsafe { bpf_probe_read_user((second + MSGHDR_IOV) as *const u64)? };
            let segments: u64 = unsafe { bpf_probe_read_user((second + MSGHDR_IOVLEN) as *const u64)? };
            (kind, buffer, segments)
        }
        Entry::Close => return close(key, cgroup_id),
        Entry::Accept | Entry::Ioctl => return Ok(()),
    };
    stash(Pending { buffer, segments, cgroup_id, fd: fd as u32, kind: kind as u32, mode, _padding: 0, started_ns: 0 })
}

fn accept_enter(ctx: &RawTracePointContext, tgid: u64) -> Result<(), i64> {
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if WATCHED_CGROUPS.get_ptr(cgroup_id).is_none() {
        return Ok(());
    }
    // Marked at entry so that this accept's own exit passes the filter.
    mark_server(tgid);
    // The listening socket: user space maps it to the server port once.
    // The peer's address buffer (may be NULL) is copied out at exit.
    let [listener, peer_address, _] = syscall_args(ctx)?;
    stash(Pending {
        buffer: peer_address,
        segments: 0,
        cgroup_id,
        fd: listener as u32,
        kind: IoKind::Accept as u32,
        mode: conn_mode::UNKNOWN,
        _padding: 0,
        started_ns: 0,
    })
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

/// `close` of a tracked connection: stop tracking, tell user space.
fn close(key: u64, cgroup_id: u64) -> Result<(), i64> {
    let _ = CONNECTIONS.remove(key);
    emit(key, cgroup_id, IoKind::Close as u32, 0, None)
}

// ---- every exit: emit ----------------------------------------------------

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn syscall_exit(ctx: RawTracePointContext) -> i32 {
    let _ = try_exit(&ctx);
    0
}

fn try_exit(ctx: &RawTracePointContext) -> Result<(), i64> {
    let id = bpf_get_current_pid_tgid();
    if !is_server(id >> 32) && !driver::is_client(id >> 32) {
        return Ok(());
    }
    let Some(slot) = PENDING.get_ptr_mut(id) else { return Ok(()) };
    // SAFETY: this thread's slot (plain data), copied, then marked consumed.
    let pending = unsafe { *slot };
    if pending.kind == CONSUMED {
        return Ok(());
    }
    unsafe { (*slot).kind = CONSUMED };
    let ret: i64 = ctx.arg(1);
    if pending.kind == driver::PENDING_IOCTL {
        driver::ioctl_exit(ctx, &pending, ret);
        return Ok(());
    }
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
        // The new fd is in the key; `bytes` carries the listening fd and
        // the prefix the peer's address (user space spots loopback peers).
        let peer = (pending.buffer != 0).then_some((&pending, SOCKADDR_CAPTURE));
        return emit(key, pending.cgroup_id, IoKind::Accept as u32, i64::from(pending.fd), peer);
    }
    // Non-blocking sockets answer EAGAIN constantly: not an event.
    if ret == -EAGAIN {
        return Ok(());
    }
    let key = (id & 0xffff_ffff_0000_0000) | u64::from(pending.fd);
    emit(key, pending.cgroup_id, pending.kind, ret, (ret > 0).then_some((&pending, ret as u64)))?;
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
                ..WalkInput::default()
            };
            TAIL_CALLS.tail_call(ctx, 0);
        }
    }
    Ok(())
}

// ---- the event -------------------------------------------------------------

/// Bytes of a `sockaddr_in6` (the larger of the two families).
const SOCKADDR_CAPTURE: u64 = 28;

/// Writes one event; `capture_from` names the user buffer and how many of
/// its bytes to copy into the prefix (and suffix). Inlined: BPF calls take
/// at most five arguments.
#[inline(always)]
fn emit(
    connection: u64,
    cgroup_id: u64,
    kind: u32,
    bytes: i64,
    capture_from: Option<(&Pending, u64)>,
) -> Result<(), i64> {
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
        if let Some((io, moved)) = capture_from {
            capture(event, io, moved);
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

mod driver;
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
