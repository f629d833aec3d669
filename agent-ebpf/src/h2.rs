//! HTTP/2 frame walking, tail-called from `syscall_exit` (see the crate
//! root): decides the protocol, follows frame headers across syscalls and
//! iovecs, and emits the request-relevant ones as `H2Event`s.
//!
//! One invocation follows at most `MAX_WALK` headers per buffer and
//! records at most `MAX_H2_FRAMES` frames. When either runs out before the
//! syscall's data does (a busy server writing many streams' frames at
//! once), the walker emits what it has and tail-calls itself to go on from
//! there, up to `MAX_CONTINUATIONS` times, so no END_STREAM is skipped.

use aya_ebpf::{helpers::bpf_probe_read_user, macros::raw_tracepoint, programs::RawTracePointContext};
use podgpu_common::{conn_mode, ConnState, H2Event, H2Frame, IoKind, RequestStat, WalkInput, MAX_H2_FRAMES};

use crate::{
    bump, IoVec, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, CONNECTIONS, EVENTS, H2_SCRATCH,
    WAKEUP_BYTES, WALK_INPUT,
};

/// Progress of a frame walk through one syscall's buffers.
struct Walk {
    /// Offset of the next frame header, relative to the current buffer.
    next: u64,
    /// The boundary was lost (implausible or straddling header).
    lost: bool,
    /// This invocation's budget (steps or frame scratch) ran out at `next`:
    /// a continuation goes on from there.
    paused: bool,
}

/// Times one syscall's walk may continue in a fresh invocation (the
/// kernel allows 33 tail calls in a chain; `syscall_exit` used one).
const MAX_CONTINUATIONS: u32 = 24;

/// Whether this CPU's frame scratch is full.
#[inline(always)]
fn scratch_full() -> bool {
    match WALK_INPUT.get_ptr(0) {
        // SAFETY: this CPU's scratch slot.
        Some(input) => (unsafe { (*input).recorded }) >= MAX_H2_FRAMES as u32,
        None => true,
    }
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
        if scratch_full() {
            walk.paused = true;
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
        // More frames in this buffer than one invocation follows.
        walk.paused = true;
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
#[raw_tracepoint]
pub fn h2_walk(ctx: RawTracePointContext) -> i32 {
    let Some(input) = WALK_INPUT.get_ptr(0) else { return 0 };
    // SAFETY: this CPU's scratch slot, written just before the tail call.
    let input = unsafe { *input };
    let Some(state) = CONNECTIONS.get_ptr_mut(input.connection) else { return 0 };
    // SAFETY: the connection's map value.
    unsafe { follow_http2(&ctx, &input, state) };
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
unsafe fn follow_http2(ctx: &RawTracePointContext, input: &WalkInput, state: *mut ConnState) {
    let is_read = input.is_read != 0;
    let moved = input.moved;
    let resuming = input.continuations > 0;
    let mut skip: u64 = 0;
    if !resuming {
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
    }

    // Walk each buffer in turn, carrying the offset of the next header from
    // one into the next. `walk.next` is relative to the current buffer.
    let unsynced = unsafe { (*state).mode } == conn_mode::H2_UNSYNCED;
    let mut walk = Walk { next: if resuming { input.resume_next } else { skip }, lost: false, paused: false };
    let mut walked = if resuming { input.resume_walked } else { 0 };
    let mut index = if resuming { input.resume_segment as usize } else { 0 };
    if input.segments == 0 {
        unsafe { walk_buffer(input.buffer, moved, &mut walk) };
        if !walk.paused {
            walked = moved;
        }
    } else {
        while index < MAX_WALK_SEGMENTS && (index as u64) < input.segments && walked < moved && !walk.lost {
            let Ok(segment) = (unsafe { bpf_probe_read_user((input.buffer + index as u64 * 16) as *const IoVec) })
            else {
                walk.lost = true;
                break;
            };
            let len = if segment.len < moved - walked { segment.len } else { moved - walked };
            unsafe { walk_buffer(segment.base, len, &mut walk) };
            if walk.paused {
                break;
            }
            // Not lost means the next header is at or beyond this buffer's end.
            walk.next = walk.next.saturating_sub(len);
            walked += len;
            index += 1;
        }
    }
    if walk.paused && !walk.lost {
        // Hand over: emit what this invocation recorded, then go on from
        // the next header in a fresh invocation.
        emit_frames(input, conn_mode::H2);
        if input.continuations + 1 < MAX_CONTINUATIONS {
            if let Some(next) = WALK_INPUT.get_ptr_mut(0) {
                // SAFETY: this CPU's scratch slot.
                unsafe {
                    (*next).resume_next = walk.next;
                    (*next).resume_walked = walked;
                    (*next).resume_segment = index as u32;
                    (*next).continuations = input.continuations + 1;
                    // Only returns when the tail call fails.
                    let _ = crate::TAIL_CALLS.tail_call(ctx, 0);
                }
            }
        }
        walk.lost = true;
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
    emit_frames(input, unsafe { (*state).mode });
}

/// Emits the frames recorded in this CPU's scratch as one `H2Event` (none:
/// nothing) and empties the scratch.
#[inline(always)]
fn emit_frames(input: &WalkInput, mode: u32) {
    // Read back from map memory: an untracked value for the verifier.
    let Some(scratch) = WALK_INPUT.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's scratch slot.
    let recorded = unsafe { (*scratch).recorded };
    if recorded == 0 {
        return;
    }
    unsafe { (*scratch).recorded = 0 };
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
        (*event).bytes = input.moved as i64;
        (*event).kind = if input.is_read != 0 { IoKind::H2Read as u32 } else { IoKind::H2Write as u32 };
        (*event).mode = mode;
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
