//! NVIDIA driver calls, seen at `ioctl` and `close`. Three sets of hooks
//! run the same code:
//! - uprobes on the driver libraries' PLT stubs of `ioctl` and `close`
//!   (`*_up`: libcuda's calls into libc), which cost nothing outside the
//!   processes that use those libraries;
//! - the per-syscall tracepoints `syscalls:sys_enter_ioctl`,
//!   `sys_exit_ioctl` and `sys_enter_close` (`*_tp`: other syscalls run no
//!   program, but every syscall on the node takes the kernel's
//!   syscall-tracing slow path);
//! - where tracefs cannot be reached, the raw `sys_enter`/`sys_exit`
//!   tracepoints, which every syscall on the node runs.
//!
//! The costs are measured in docs/requests.md. Any set is attached only
//! where the node has an NVIDIA driver (or stand-ins for one).
//!
//! `ioctl` entry: a request shaped like an NVIDIA escape (`_IOWR('F', nr,
//! size)`, `nr` in the escape ranges), or any ioctl of a process already
//! seen calling the driver (UVM commands carry no `_IOC` shape), is looked
//! up in `DRIVER_FDS`. An fd checked as not NVIDIA's is ignored; a known
//! or unverified one has its arguments stashed. At exit, after the driver
//! wrote its results back, `driver_decode` (tail-called, so it verifies on
//! its own) unwraps XFER, reads the parameter struct chosen by escape and
//! size, and emits one `DriverEvent`. Unknown sizes are counted, never
//! read. User space checks unverified fds (`/proc/PID/fd`, device numbers)
//! and fills `DRIVER_FDS`; `close` of a mapped fd removes it.

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
    },
    macros::{map, raw_tracepoint, tracepoint, uprobe, uretprobe},
    maps::{Array, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext, TracePointContext},
    EbpfContext,
};
use podgpu_common::{
    driver::{
        decode_flags, driver_event, escape, fd_kind, is_escape_shaped, DriverEvent, DRIVER_RING_BYTES, MAX_DRIVER_FDS,
        STATUS_UNKNOWN,
    },
    tgid_slot, RequestStat, SERVER_TGID_WORDS,
};

use crate::{bump, syscalls, TAIL_CALLS};

/// (tgid << 32 | fd) -> `fd_kind`, written by user space after checking the
/// fd, removed by the kernel at close. LRU: an evicted entry only makes
/// the fd unverified again.
#[map]
static DRIVER_FDS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(MAX_DRIVER_FDS, 0);

/// tgids (a byte each, as `SERVER_TGIDS`) that issued an escape-shaped
/// ioctl: their other ioctls and their closes are looked at too.
#[map]
static DRIVER_TGIDS: Array<u64> = Array::with_max_entries(SERVER_TGID_WORDS, 0);

/// Driver events for user space.
#[map]
static DRIVER_EVENTS: RingBuf = RingBuf::with_byte_size(DRIVER_RING_BYTES, 0);

/// What the exit program hands `driver_decode`.
#[map]
static DRIVER_INPUT: PerCpuArray<DriverInput> = PerCpuArray::with_max_entries(1, 0);

/// Slot of `driver_decode` in `TAIL_CALLS`.
pub const DECODE_SLOT: u32 = 1;

/// The tracepoint path's tail call (slot 0: `driver_decode_tp`): a program
/// array holds programs of one type, and `TAIL_CALLS` holds raw ones.
#[map]
static DRIVER_TP_TAIL_CALLS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The library path's tail call (slot 0: `driver_decode_up`), for the
/// same reason: uprobes are programs of their own type.
#[map]
static DRIVER_UP_TAIL_CALLS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Offsets in the `syscalls:sys_enter_*` records of the first three
/// arguments, and in `sys_exit_*` of the return value (each field 8 bytes
/// after the 8-byte common header and the syscall number; the records'
/// `format` files in tracefs).
const TP_ARGS: [usize; 3] = [16, 24, 32];
const TP_RET: usize = 16;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct DriverInput {
    params: u64,
    cgroup_id: u64,
    started_ns: u64,
    ret: i64,
    request: u32,
    fd: u32,
    fd_kind: u32,
    _padding: u32,
}

/// An ioctl's arguments, per thread, from entry to exit. A thread's slot is
/// written in place at every entry and marked `CONSUMED` at exit, never
/// deleted: an insert plus a delete per call cost more than two in-place
/// writes. LRU so slots of exited threads make room for new ones.
#[map]
static PENDING: LruHashMap<u64, Pending> = LruHashMap::with_max_entries(16384, 0);

/// `Pending::fd_kind` of a slot whose ioctl has exited.
const CONSUMED: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pending {
    params: u64,
    cgroup_id: u64,
    started_ns: u64,
    request: u32,
    fd: u32,
    fd_kind: u32,
    _padding: u32,
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

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn syscall_enter(ctx: RawTracePointContext) -> i32 {
    let nr: i64 = ctx.arg(1);
    if nr != syscalls::IOCTL && nr != syscalls::CLOSE {
        return 0;
    }
    let tgid = bpf_get_current_pid_tgid() >> 32;
    if nr == syscalls::CLOSE {
        if is_client(tgid) {
            if let Ok([fd, _, _]) = syscall_args(&ctx) {
                close(tgid, fd);
            }
        }
        return 0;
    }
    if let Ok(args) = syscall_args(&ctx) {
        if let Some(pending) = ioctl_enter(args, tgid) {
            stash(&ctx, pending);
        }
    }
    0
}

/// `syscalls:sys_enter_ioctl`: the raw path's `ioctl` branch.
#[tracepoint]
pub fn ioctl_enter_tp(ctx: TracePointContext) -> i32 {
    let tgid = bpf_get_current_pid_tgid() >> 32;
    // SAFETY: fields of the syscall record at their fixed offsets.
    let args = unsafe { TP_ARGS.map(|offset| ctx.read_at::<u64>(offset).unwrap_or(u64::MAX)) };
    if let Some(pending) = ioctl_enter(args, tgid) {
        stash(&ctx, pending);
    }
    0
}

/// `syscalls:sys_exit_ioctl`.
#[tracepoint]
pub fn ioctl_exit_tp(ctx: TracePointContext) -> i32 {
    // SAFETY: the return value's field of the syscall record.
    let ret = unsafe { ctx.read_at::<i64>(TP_RET) }.unwrap_or(-1);
    if let Some(pending) = consume_pending() {
        if hand_to_decode(&pending, ret) {
            // SAFETY: the tail call replaces this program or returns.
            unsafe { DRIVER_TP_TAIL_CALLS.tail_call(&ctx, 0) };
        }
    }
    0
}

/// `syscalls:sys_enter_close`.
#[tracepoint]
pub fn close_enter_tp(ctx: TracePointContext) -> i32 {
    let tgid = bpf_get_current_pid_tgid() >> 32;
    if is_client(tgid) {
        // SAFETY: the fd field of the syscall record.
        if let Ok(fd) = unsafe { ctx.read_at::<u64>(TP_ARGS[0]) } {
            close(tgid, fd);
        }
    }
    0
}

/// Uprobe on a driver library's PLT stub of `ioctl` (the call into libc):
/// the same arguments as the syscall, seen only in processes that use the
/// library, so no other process or syscall pays for it.
#[uprobe]
pub fn ioctl_enter_up(ctx: ProbeContext) -> u32 {
    let tgid = bpf_get_current_pid_tgid() >> 32;
    let args = [0, 1, 2].map(|n| ctx.arg::<u64>(n).unwrap_or(u64::MAX));
    if let Some(pending) = ioctl_enter(args, tgid) {
        stash(&ctx, pending);
    }
    0
}

/// Uretprobe on the same stub: libc's `ioctl` returned (-1 with `errno`
/// where the syscall failed, which is all the decoder asks of it).
#[uretprobe]
pub fn ioctl_exit_up(ctx: RetProbeContext) -> u32 {
    let ret: u64 = ctx.ret();
    if let Some(pending) = consume_pending() {
        if hand_to_decode(&pending, ret as i32 as i64) {
            // SAFETY: the tail call replaces this program or returns.
            unsafe { DRIVER_UP_TAIL_CALLS.tail_call(&ctx, 0) };
        }
    }
    0
}

/// Uprobe on a driver library's PLT stub of `close`.
#[uprobe]
pub fn close_enter_up(ctx: ProbeContext) -> u32 {
    let tgid = bpf_get_current_pid_tgid() >> 32;
    if is_client(tgid) {
        if let Some(fd) = ctx.arg::<u64>(0) {
            close(tgid, fd);
        }
    }
    0
}

fn stash<C: EbpfContext>(ctx: &C, pending: Pending) {
    let id = bpf_get_current_pid_tgid();
    if let Some(slot) = PENDING.get_ptr_mut(id) {
        // SAFETY: this thread's slot; only this thread writes it.
        unsafe { *slot = pending };
        return;
    }
    if PENDING.insert(id, pending, 0).is_err() {
        bump(RequestStat::ArgsMapFull);
        aya_log_ebpf::debug!(ctx, "ioctl of fd {} not followed: argument map full", pending.fd);
    }
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn syscall_exit(ctx: RawTracePointContext) -> i32 {
    if let Some(pending) = consume_pending() {
        if hand_to_decode(&pending, ctx.arg(1)) {
            // SAFETY: the tail call replaces this program or returns.
            unsafe { TAIL_CALLS.tail_call(&ctx, DECODE_SLOT) };
        }
    }
    0
}

/// This thread's stashed ioctl, if its process is a driver client and
/// the slot was not consumed yet; marks it consumed.
#[inline(always)]
fn consume_pending() -> Option<Pending> {
    let id = bpf_get_current_pid_tgid();
    if !is_client(id >> 32) {
        return None;
    }
    let slot = PENDING.get_ptr_mut(id)?;
    // SAFETY: this thread's slot (plain data), copied, then marked consumed.
    let pending = unsafe { *slot };
    if pending.fd_kind == CONSUMED {
        return None;
    }
    unsafe { (*slot).fd_kind = CONSUMED };
    Some(pending)
}

#[inline(always)]
fn is_client(tgid: u64) -> bool {
    let (word, byte) = tgid_slot(tgid);
    DRIVER_TGIDS.get(word).is_some_and(|value| (value >> (byte * 8)) & 0xff != 0)
}

#[inline(always)]
fn mark_client(tgid: u64) {
    let (word, byte) = tgid_slot(tgid);
    if let Some(value) = DRIVER_TGIDS.get_ptr_mut(word) {
        // SAFETY: byte `byte` (< 8) of an 8-byte map value.
        unsafe { *(value as *mut u8).add(byte as usize) = 1 };
    }
}

/// `ioctl` entry with arguments (fd, request, parameters): the stash for
/// the exit, or `None` if it is not a driver call.
#[inline(always)]
fn ioctl_enter([fd, request, params]: [u64; 3], tgid: u64) -> Option<Pending> {
    let request = request as u32;
    if !is_escape_shaped(request) && !is_client(tgid) {
        return None;
    }
    let key = (tgid << 32) | (fd & 0xffff_ffff);
    let kind = match DRIVER_FDS.get_ptr(key) {
        // SAFETY: plain-data map value.
        Some(kind) => unsafe { *kind },
        None => fd_kind::UNVERIFIED,
    };
    if kind == fd_kind::NOT_NVIDIA {
        return None;
    }
    mark_client(tgid);
    Some(Pending {
        params,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        // SAFETY: helper without arguments.
        started_ns: unsafe { bpf_ktime_get_ns() },
        request,
        fd: fd as u32,
        fd_kind: kind,
        _padding: 0,
    })
}

/// `ioctl` exit: leaves the call for the decoder (this CPU's scratch slot);
/// the caller tail-calls its own decoder.
#[inline(always)]
fn hand_to_decode(pending: &Pending, ret: i64) -> bool {
    let Some(input) = DRIVER_INPUT.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's scratch slot.
    unsafe {
        *input = DriverInput {
            params: pending.params,
            cgroup_id: pending.cgroup_id,
            started_ns: pending.started_ns,
            ret,
            request: pending.request,
            fd: pending.fd,
            fd_kind: pending.fd_kind,
            _padding: 0,
        };
    }
    true
}

/// `close` by a driver client: forget the fd, and tell user space if it was
/// a mapped one.
#[inline(always)]
fn close(tgid: u64, fd: u64) {
    let key = (tgid << 32) | (fd & 0xffff_ffff);
    let Some(kind) = DRIVER_FDS.get_ptr(key) else { return };
    // SAFETY: plain-data map value.
    let kind = unsafe { *kind };
    let _ = DRIVER_FDS.remove(key);
    let Some(mut entry) = DRIVER_EVENTS.reserve::<DriverEvent>(0) else {
        bump(RequestStat::DriverRingFull);
        return;
    };
    // SAFETY: a reserved, exclusively owned ring slot of the right size.
    unsafe {
        entry.as_mut_ptr().write(DriverEvent {
            timestamp_ns: bpf_ktime_get_ns(),
            cgroup_id: bpf_get_current_cgroup_id(),
            tgid: tgid as u32,
            fd: fd as u32,
            event: driver_event::CLOSE,
            status: STATUS_UNKNOWN,
            fd_kind: kind,
            ..DriverEvent::default()
        })
    };
    entry.submit(0);
}

#[raw_tracepoint]
pub fn driver_decode(ctx: RawTracePointContext) -> i32 {
    decode_call(&ctx)
}

/// `driver_decode` for the tracepoint path.
#[tracepoint]
pub fn driver_decode_tp(ctx: TracePointContext) -> i32 {
    decode_call(&ctx)
}

/// `driver_decode` for the library path.
#[uprobe]
pub fn driver_decode_up(ctx: ProbeContext) -> u32 {
    decode_call(&ctx) as u32
}

/// Decodes the call `hand_to_decode` left and emits its event.
#[inline(always)]
fn decode_call<C: EbpfContext>(ctx: &C) -> i32 {
    let Some(input) = DRIVER_INPUT.get(0) else { return 0 };
    let input = *input;
    let Some(mut entry) = DRIVER_EVENTS.reserve::<DriverEvent>(0) else {
        bump(RequestStat::DriverRingFull);
        return 0;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut event = DriverEvent {
        timestamp_ns: now,
        duration_ns: now.saturating_sub(input.started_ns),
        cgroup_id: input.cgroup_id,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        fd: input.fd,
        event: driver_event::IOCTL,
        request: input.request,
        nr: input.request,
        ret: input.ret as i32,
        status: STATUS_UNKNOWN,
        fd_kind: input.fd_kind,
        ..DriverEvent::default()
    };
    if input.fd_kind != fd_kind::UVM && is_escape_shaped(input.request) {
        decode(&mut event, input.params);
        if event.flags & decode_flags::DECODED == 0 {
            let (nr, size, flags) = (event.nr, event.size, event.flags);
            aya_log_ebpf::debug!(
                ctx,
                "driver call nr {:x} with {} bytes of parameters not decoded (flags {:x})",
                nr,
                size,
                flags
            );
        }
    }
    // SAFETY: a reserved, exclusively owned ring slot of the right size.
    unsafe { entry.as_mut_ptr().write(event) };
    entry.submit(0);
    0
}

/// `nv_ioctl_xfer_t`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Xfer {
    request: u32,
    size: u32,
    params: u64,
}

/// Reads `N` u32 words of parameters.
#[inline(always)]
fn words<const N: usize>(params: u64, event: &mut DriverEvent) -> Option<[u32; N]> {
    // SAFETY: user memory through the checked helper.
    match unsafe { bpf_probe_read_user(params as *const [u32; N]) } {
        Ok(words) => Some(words),
        Err(_) => {
            event.flags |= decode_flags::READ_FAILED;
            None
        }
    }
}

#[inline(always)]
fn read_u64(address: u64, event: &mut DriverEvent) -> u64 {
    // SAFETY: user memory through the checked helper.
    unsafe { bpf_probe_read_user(address as *const u64) }.unwrap_or_else(|_| {
        event.flags |= decode_flags::READ_FAILED;
        0
    })
}

/// Class of NV01_MEMORY_LOCAL_USER (VRAM), NV01_DEVICE_0, and
/// KEPLER_CHANNEL_GROUP_A (every TSG since Kepler).
const CLASS_VRAM: u32 = 0x40;
const CLASS_DEVICE: u32 = 0x80;
const CLASS_CHANNEL_GROUP: u32 = 0xa06c;
/// `NV_MEMORY_ALLOCATION_PARAMS.size`, `NV_CHANNEL_GROUP_ALLOCATION_PARAMETERS.engineType`.
const VRAM_SIZE_OFFSET: u64 = 64;
const ENGINE_TYPE_OFFSET: u64 = 12;

#[inline(always)]
fn decode(event: &mut DriverEvent, params: u64) {
    let mut nr = event.request & 0xff;
    let mut size = (event.request >> 16) & 0x3fff;
    let mut params = params;
    if nr == escape::XFER && size == 16 {
        // SAFETY: user memory through the checked helper.
        let Ok(xfer) = (unsafe { bpf_probe_read_user(params as *const Xfer) }) else {
            event.flags |= decode_flags::READ_FAILED;
            return;
        };
        // The inner command is the escape number (some callers encode it).
        nr = if xfer.request > 0xff { xfer.request & 0xff } else { xfer.request };
        size = xfer.size;
        params = xfer.params;
        event.flags |= decode_flags::XFER;
    }
    event.nr = nr;
    event.size = size;
    match (nr, size) {
        (escape::RM_ALLOC, 32) => {
            let Some(w) = words::<8>(params, event) else { return };
            alloc(event, [w[0], w[1], w[2], w[3]], u64::from(w[4]) | u64::from(w[5]) << 32, w[7]);
        }
        (escape::RM_ALLOC, 48) => {
            let Some(w) = words::<12>(params, event) else { return };
            alloc(event, [w[0], w[1], w[2], w[3]], u64::from(w[4]) | u64::from(w[5]) << 32, w[10]);
        }
        (escape::RM_FREE, 16) => {
            let Some(w) = words::<4>(params, event) else { return };
            event.handles = [w[0], w[1], w[2]];
            event.status = w[3];
            event.flags |= decode_flags::DECODED;
        }
        (escape::RM_CONTROL, 32) => {
            let Some(w) = words::<8>(params, event) else { return };
            event.handles = [w[0], w[1], w[2]];
            event.status = w[7];
            event.flags |= decode_flags::DECODED;
        }
        (escape::RM_ALLOC_MEMORY, 56) => {
            let Some(w) = words::<14>(params, event) else { return };
            event.handles = [w[0], w[1], w[2]];
            event.class = w[3];
            event.alloc_word = u64::from(w[8]) | u64::from(w[9]) << 32;
            event.status = w[10];
            event.flags |= decode_flags::DECODED;
        }
        (escape::RM_MAP_MEMORY, 56) => {
            let Some(w) = words::<14>(params, event) else { return };
            event.handles = [w[0], w[1], w[2]];
            event.alloc_word = u64::from(w[6]) | u64::from(w[7]) << 32;
            event.status = w[10];
            event.flags |= decode_flags::DECODED;
        }
        _ => {}
    }
}

/// RM_ALLOC (NVOS21 or NVOS64): handles, class, status, and the one word
/// of the class's allocation parameters the signals need.
#[inline(always)]
fn alloc(event: &mut DriverEvent, head: [u32; 4], alloc_params: u64, status: u32) {
    event.handles = [head[0], head[1], head[2]];
    event.class = head[3];
    event.status = status;
    event.flags |= decode_flags::DECODED;
    if alloc_params == 0 {
        return;
    }
    event.alloc_word = match head[3] {
        CLASS_VRAM => read_u64(alloc_params + VRAM_SIZE_OFFSET, event),
        CLASS_DEVICE => read_u64(alloc_params, event) & 0xffff_ffff,
        CLASS_CHANNEL_GROUP => read_u64(alloc_params + ENGINE_TYPE_OFFSET, event) & 0xffff_ffff,
        _ => 0,
    };
}
