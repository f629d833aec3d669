//! HTTP/2 frame walking, tail-called from the socket programs (see the crate
//! root): decides the protocol, follows frame headers through every
//! buffer of a read or write and across syscalls, and emits the
//! request-relevant ones as `H2Event`s.
//!
//! The walk is one flat loop of steps over the syscall's data, each step
//! moving to the next iovec and/or taking the next frame-header bytes. A
//! header split across iovecs or syscalls (gRPC C-core writes each frame
//! header as an iovec of its own; a reader's buffer ends anywhere) is
//! gathered piece by piece: its first bytes are kept with the connection
//! until the rest arrives. All of the walk's position lives in map memory
//! (`WalkInput`), so the verifier sees every step alike, and the walk can
//! go on in a fresh invocation (a tail call to itself) when its step
//! budget or its frame scratch runs out: up to `MAX_CONTINUATIONS` times.

use aya_ebpf::{
    helpers::{bpf_probe_read_user, generated::bpf_probe_read_user as probe_read_user_raw},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use aya_ebpf::{macros::map, maps::PerCpuArray};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use podgpu_common::{
    conn_mode, ConnState, H2Event, H2Frame, IoKind, RequestStat, WalkInput, H2_EVENT_HEADER, MAX_H2_FRAMES,
};

use crate::{bump, IoVec, CONNECTIONS, H2_SCRATCH, WALK_INPUT};

/// Where an `H2Event` is put together before its used bytes go into the
/// ring.
#[map]
static H2_EVENT_SCRATCH: PerCpuArray<H2Event> = PerCpuArray::with_max_entries(1, 0);

/// How one invocation's walk ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// All of the syscall's data walked.
    Done,
    /// Budget or frame scratch used up: a continuation goes on.
    Paused,
    /// The frame boundary is lost (the `RequestStat` says why).
    Lost(RequestStat),
}

/// Times one syscall's walk may continue in a fresh invocation (the
/// kernel allows 33 tail calls in a chain; the socket program used one).
const MAX_CONTINUATIONS: u32 = 31;
/// Steps per invocation: each moves to the next iovec and/or takes one
/// frame header (or a piece of one). 32 invocations follow at least 1,024
/// iovecs or frames per syscall.
const STEPS: u32 = 64;
const H2_PREFACE_LEN: u32 = 24;
const FRAME_HEADER_LEN: u64 = 9;
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

/// Whether this CPU's frame scratch is full.
#[inline(always)]
fn scratch_full(walk: *const WalkInput) -> bool {
    // SAFETY: this CPU's scratch slot.
    unsafe { read_volatile(addr_of!((*walk).recorded)) >= MAX_H2_FRAMES as u32 }
}

/// Appends a frame to this CPU's scratch (dropped when it is full).
#[inline(always)]
fn record(walk: *mut WalkInput, frame: H2Frame) {
    // SAFETY: this CPU's scratch slots.
    unsafe {
        let index = read_volatile(addr_of!((*walk).recorded));
        if let Some(slot) = H2_SCRATCH.get_ptr_mut(index) {
            *slot = frame;
            write_volatile(addr_of_mut!((*walk).recorded), index + 1);
        }
    }
}

/// Reads iovec `index` of the syscall into the walk's current buffer,
/// clamped to the bytes the syscall moved.
///
/// # Safety
/// `walk` must be this CPU's `WalkInput`.
#[inline(always)]
unsafe fn load_segment(walk: *mut WalkInput, index: u32) -> Result<(), RequestStat> {
    let (buffer, walked, moved) = unsafe { ((*walk).buffer, read_volatile(addr_of!((*walk).walked)), (*walk).moved) };
    let segment = unsafe { bpf_probe_read_user((buffer + u64::from(index) * 16) as *const IoVec) }
        .map_err(|_| RequestStat::H2LostFault)?;
    let left = moved.saturating_sub(walked);
    unsafe {
        write_volatile(addr_of_mut!((*walk).segment), index);
        write_volatile(addr_of_mut!((*walk).segment_base), segment.base);
        write_volatile(addr_of_mut!((*walk).segment_len), if segment.len < left { segment.len } else { left });
    }
    Ok(())
}

/// Up to `STEPS` steps of the walk.
///
/// # Safety
/// `walk` must be this CPU's `WalkInput`.
#[inline(always)]
unsafe fn walk_steps(walk: *mut WalkInput) -> Outcome {
    for _ in 0..STEPS {
        if scratch_full(walk) {
            return Outcome::Paused;
        }
        // SAFETY (whole loop): fields of this CPU's scratch slot.
        let mut next = unsafe { read_volatile(addr_of!((*walk).next)) };
        let mut len = unsafe { read_volatile(addr_of!((*walk).segment_len)) };
        if next >= len {
            // This buffer is used up (or its rest is payload): move on.
            let walked = unsafe { read_volatile(addr_of!((*walk).walked)) } + len;
            next -= len;
            unsafe {
                write_volatile(addr_of_mut!((*walk).walked), walked);
                write_volatile(addr_of_mut!((*walk).next), next);
            }
            let (segments, moved) = unsafe { ((*walk).segments, (*walk).moved) };
            if walked >= moved {
                return Outcome::Done;
            }
            let index = unsafe { read_volatile(addr_of!((*walk).segment)) } + 1;
            if segments == 0 || u64::from(index) >= segments {
                // The kernel moved more than the buffers hold: not walkable.
                return Outcome::Lost(RequestStat::H2LostFault);
            }
            if let Err(stat) = unsafe { load_segment(walk, index) } {
                return Outcome::Lost(stat);
            }
            len = unsafe { read_volatile(addr_of!((*walk).segment_len)) };
            if next >= len {
                continue;
            }
        }
        // Header bytes start at `next`: take what this buffer holds of them.
        let have = unsafe { read_volatile(addr_of!((*walk).header_len)) };
        if have >= FRAME_HEADER_LEN as u32 {
            return Outcome::Lost(RequestStat::H2LostFault);
        }
        let need = FRAME_HEADER_LEN - u64::from(have);
        let available = len - next;
        let take = if available < need { available } else { need };
        if take == 0 || take > FRAME_HEADER_LEN {
            return Outcome::Lost(RequestStat::H2LostFault);
        }
        let base = unsafe { read_volatile(addr_of!((*walk).segment_base)) };
        // SAFETY: `have` <= 8 and `take` <= 9 keep the write inside the
        // 24-byte `header`; the source is user memory, read by the helper.
        let read = unsafe {
            let destination = addr_of_mut!((*walk).header).cast::<u8>().add(have as usize);
            probe_read_user_raw(destination.cast(), take as u32, (base + next) as *const core::ffi::c_void)
        };
        if read != 0 {
            return Outcome::Lost(RequestStat::H2LostFault);
        }
        next += take;
        if u64::from(have) + take < FRAME_HEADER_LEN {
            // The rest of the header is in the next buffer (or syscall).
            unsafe {
                write_volatile(addr_of_mut!((*walk).header_len), have + take as u32);
                write_volatile(addr_of_mut!((*walk).next), next);
            }
            continue;
        }
        if have > 0 {
            bump(RequestStat::H2HeadersJoined);
        }
        let header = unsafe { read_volatile(addr_of!((*walk).header)) };
        let length = u32::from(header[0]) << 16 | u32::from(header[1]) << 8 | u32::from(header[2]);
        let kind = header[3];
        let raw_id =
            u32::from(header[5]) << 24 | u32::from(header[6]) << 16 | u32::from(header[7]) << 8 | u32::from(header[8]);
        if !plausible(length, kind, raw_id & 0x7fff_ffff, raw_id & 0x8000_0000 != 0) {
            return Outcome::Lost(RequestStat::H2LostImplausible);
        }
        if matches!(kind, 0 | 1 | 3 | 7) {
            record(walk, H2Frame { length, stream_id: raw_id & 0x7fff_ffff, kind, flags: header[4], _pad: [0; 2] });
        }
        unsafe {
            write_volatile(addr_of_mut!((*walk).header_len), 0);
            write_volatile(addr_of_mut!((*walk).next), next + u64::from(length));
        }
    }
    Outcome::Paused
}

/// Tail-called by the socket programs for connections that are (or may be)
/// HTTP/2: decides the protocol on the first data, walks the frame headers
/// of this read or write, carries where the next header starts (and any
/// header bytes already seen) into the next syscall, and emits an
/// `H2Event` with the request-relevant frames.
#[raw_tracepoint]
pub fn h2_walk(ctx: RawTracePointContext) -> i32 {
    let Some(walk) = WALK_INPUT.get_ptr_mut(0) else { return 0 };
    // SAFETY: this CPU's scratch slot, written just before the tail call.
    let connection = unsafe { (*walk).connection };
    let Some(state) = CONNECTIONS.get_ptr_mut(connection) else { return 0 };
    // SAFETY: the connection's map value and this CPU's scratch slot.
    unsafe { follow_http2(&ctx, walk, state) };
    0
}

/// Copies the 8 bytes a partial header can have between two arrays.
///
/// # Safety
/// Both must point to at least 8 valid bytes.
#[inline(always)]
unsafe fn copy_partial<const FROM: usize, const TO: usize>(from: *const [u8; FROM], to: *mut [u8; TO]) {
    unsafe { core::ptr::copy_nonoverlapping(from.cast::<u8>(), to.cast::<u8>(), 8) };
}

/// First four bytes of the data (for the preface check).
fn first_bytes(walk: &WalkInput) -> Option<[u8; 4]> {
    let base = if walk.segments == 0 {
        walk.buffer
    } else {
        // SAFETY: user memory through the checked helper.
        unsafe { bpf_probe_read_user(walk.buffer as *const IoVec) }.ok()?.base
    };
    // SAFETY: as above.
    unsafe { bpf_probe_read_user(base as *const [u8; 4]) }.ok()
}

/// Decides the protocol on a connection's first data and sets up the
/// walk of this syscall from the connection's carried position. `false`
/// when there is nothing to walk (not HTTP/2, or no data to decide on).
///
/// # Safety
/// `walk` must be this CPU's `WalkInput`, `state` the connection's value.
#[inline(always)]
unsafe fn start_walk(walk: *mut WalkInput, state: *mut ConnState) -> bool {
    let is_read = unsafe { (*walk).is_read } != 0;
    let mut skip: u64 = 0;
    let mut mode = unsafe { (*state).mode };
    if mode == conn_mode::UNKNOWN {
        if !is_read || unsafe { (*walk).moved } < 4 {
            return false;
        }
        let Some(first) = first_bytes(unsafe { &*walk }) else { return false };
        if first == *b"PRI " {
            mode = conn_mode::H2;
            skip = u64::from(H2_PREFACE_LEN);
        } else if first[0].is_ascii_uppercase() {
            unsafe { (*state).mode = conn_mode::OTHER };
            return false;
        } else {
            // Joined mid-stream: maybe HTTP/2, decided by a plausible header.
            mode = conn_mode::H2_UNSYNCED;
        }
        unsafe { (*state).mode = mode };
    } else if mode == conn_mode::OTHER {
        return false;
    }
    unsafe {
        (*walk).header_len = 0;
        if mode == conn_mode::H2 && skip == 0 {
            // Carry on from the previous syscall in this direction.
            if is_read {
                skip = u64::from((*state).read_skip);
                (*walk).header_len = (*state).read_partial_len & 0xf;
                copy_partial(addr_of!((*state).read_partial), addr_of_mut!((*walk).header));
            } else {
                skip = u64::from((*state).write_skip);
                (*walk).header_len = (*state).write_partial_len & 0xf;
                copy_partial(addr_of!((*state).write_partial), addr_of_mut!((*walk).header));
            }
        }
        (*walk).next = skip;
        (*walk).walked = 0;
        if (*walk).segments == 0 {
            (*walk).segment = 0;
            (*walk).segment_base = (*walk).buffer;
            (*walk).segment_len = (*walk).moved;
            true
        } else {
            load_segment(walk, 0).is_ok()
        }
    }
}

/// # Safety
/// `walk` must be this CPU's `WalkInput`, `state` the connection's value.
unsafe fn follow_http2(ctx: &RawTracePointContext, walk: *mut WalkInput, state: *mut ConnState) {
    let resuming = unsafe { (*walk).continuations } > 0;
    if !resuming && !unsafe { start_walk(walk, state) } {
        return;
    }
    let unsynced = unsafe { (*state).mode } == conn_mode::H2_UNSYNCED;
    let mut outcome = unsafe { walk_steps(walk) };
    if outcome == Outcome::Paused {
        // Hand over: emit what this invocation recorded, then go on from
        // the next step in a fresh invocation.
        emit_frames(walk, conn_mode::H2);
        let continuations = unsafe { (*walk).continuations } + 1;
        if continuations < MAX_CONTINUATIONS {
            unsafe {
                (*walk).continuations = continuations;
                // Only returns when the tail call fails.
                let _ = crate::TAIL_CALLS.tail_call(ctx, 0);
            }
        }
        outcome = Outcome::Lost(RequestStat::H2LostBudget);
        let connection = unsafe { (*walk).connection };
        aya_log_ebpf::debug!(
            ctx,
            "HTTP/2 walk of connection {:x} gave up: more frames than one chain follows",
            connection
        );
    }
    let mut lost_now = false;
    unsafe {
        if let Outcome::Lost(cause) = outcome {
            lost_now = !unsynced;
            if !unsynced {
                (*state).lost_sync += 1;
                bump(RequestStat::H2LostSync);
                bump(cause);
            }
            (*state).mode = conn_mode::H2_UNSYNCED;
            (*state).read_skip = 0;
            (*state).write_skip = 0;
            (*state).read_partial_len = 0;
            (*state).write_partial_len = 0;
        } else {
            (*state).mode = conn_mode::H2;
            // Done: `next` is relative to the end of the syscall's data.
            let carry = read_volatile(addr_of!((*walk).next)) as u32;
            let header_len = read_volatile(addr_of!((*walk).header_len)) & 0xf;
            let mut partial = [0u8; 8];
            copy_partial(addr_of!((*walk).header), &mut partial);
            if (*walk).is_read != 0 {
                (*state).read_skip = carry;
                (*state).read_partial_len = header_len;
                (*state).read_partial = partial;
            } else {
                (*state).write_skip = carry;
                (*state).write_partial_len = header_len;
                (*state).write_partial = partial;
            }
        }
    }
    // A new loss is reported even without frames: user space then treats
    // the connection's open streams as unconfirmed.
    emit_frames_or_notice(walk, unsafe { (*state).mode }, lost_now);
}

/// Emits the frames recorded in this CPU's scratch as one `H2Event` (none:
/// nothing) and empties the scratch.
#[inline(always)]
fn emit_frames(walk: *mut WalkInput, mode: u32) {
    emit_frames_or_notice(walk, mode, false);
}

/// As `emit_frames`; with `always`, an event without frames too.
#[inline(always)]
fn emit_frames_or_notice(walk: *mut WalkInput, mode: u32, always: bool) {
    // SAFETY: this CPU's scratch slot; read back from map memory, an
    // untracked value for the verifier.
    let recorded = unsafe { read_volatile(addr_of!((*walk).recorded)) };
    if recorded == 0 && !always {
        return;
    }
    unsafe { write_volatile(addr_of_mut!((*walk).recorded), 0) };
    let Some(event) = H2_EVENT_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's event scratch; constant indices.
    let copied = unsafe {
        (*event).timestamp_ns = (*walk).timestamp_ns;
        (*event).cgroup_id = (*walk).cgroup_id;
        (*event).connection = (*walk).connection;
        (*event).bytes = (*walk).moved as i64;
        (*event).kind = if (*walk).is_read != 0 { IoKind::H2Read as u32 } else { IoKind::H2Write as u32 };
        (*event).mode = mode;
        (*event)._pad = 0;
        let mut copied = 0usize;
        for index in 0..MAX_H2_FRAMES {
            if let Some(frame) = if (index as u32) < recorded { H2_SCRATCH.get_ptr(index as u32) } else { None } {
                (*event).frames[index] = *frame;
                copied = index + 1;
            }
        }
        (*event).frame_count = copied as u32;
        copied
    };
    // Only the frames found go into the ring (most calls carry a few).
    crate::output_prefix(event, H2_EVENT_HEADER + copied * core::mem::size_of::<H2Frame>());
}
