//! The packet-layer candidate for HTTP/2 (`packet_h2_ingress`/
//! `packet_h2_egress`), priced by `bench-probes` beside the HTTP/1.1 one
//! in the crate root: `cgroup_skb` programs on the watched pod's cgroup
//! that walk HTTP/2 frame headers in the pod's own TCP packets and
//! delimit requests in the kernel. A HEADERS frame in opens a stream's
//! request; its first DATA frame out is its first body byte (TTFT, from
//! the request's headers); the first frame out that ends the stream
//! (END_STREAM on DATA or HEADERS) answers it, and its times go into its
//! pod's histograms (`pod_requests`); RST_STREAM either way aborts it, and
//! so does the connection's close (the pod's FIN or an RST, or its
//! socket's release: `packet_release`), which also removes its state. Nothing is sent to user space per request.
//!
//! Frames cross packet boundaries: each direction of a connection keeps
//! how many bytes of the current frame are still to come, and the TCP
//! sequence number it expects next, so a retransmitted packet is not
//! walked twice. What the candidate does not do (and the socket-layer
//! probe does): a frame header split between two packets, a gap in the
//! sequence or a connection joined after its preface lose the
//! connection's boundary for good (counted in `H2_PACKET_LOST`; its open
//! requests end untimed), and IPv6 is not read.
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_skb_cgroup_id},
    macros::{cgroup_skb, map},
    maps::{LruHashMap, PerCpuArray},
    programs::SkBuffContext,
};

use crate::tcp_segment::TcpSegment;
use podgpu_common::packet::{
    H2Connection, H2Direction as Direction, H2OpenStream as OpenStream, H2_MAX_CONNECTIONS,
    H2_STREAM_SLOTS as STREAM_SLOTS,
};

use crate::{packet_release, pod_requests};

#[map]
static H2_PACKET_CONNECTIONS: LruHashMap<u64, H2Connection> = LruHashMap::with_max_entries(H2_MAX_CONNECTIONS, 0);

/// Where a new connection's state is put together (per CPU).
#[map]
static H2_FRESH_CONNECTION: PerCpuArray<H2Connection> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU: [0] connections whose boundary was lost, [1] open requests
/// reset or pushed out of their slot, [2] packets whose frames outnumbered
/// one program run's walk.
#[map]
static H2_PACKET_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

const FRAME_HEADER: u32 = 9;
/// "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", the client's first bytes.
const PREFACE: u32 = 24;
/// Frame headers one program run reads (h2load's 16 streams answered in
/// one write are 32 frames).
const MAX_FRAMES: u32 = 64;
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const END_STREAM: u8 = 1;

#[cgroup_skb]
pub fn packet_h2_ingress(ctx: SkBuffContext) -> i32 {
    let _ = packet(&ctx, true);
    1
}

#[cgroup_skb]
pub fn packet_h2_egress(ctx: SkBuffContext) -> i32 {
    let _ = packet(&ctx, false);
    1
}

fn count(index: u32) {
    if let Some(value) = H2_PACKET_LOST.get_ptr_mut(index) {
        // SAFETY: this CPU's slot.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn packet(ctx: &SkBuffContext, ingress: bool) -> Result<(), i64> {
    let Some(segment) = TcpSegment::of(ctx, ingress) else { return Ok(()) };
    let key = segment.key;
    let connection = match H2_PACKET_CONNECTIONS.get_ptr_mut(&key) {
        Some(connection) => connection,
        // A close of a connection not followed (or already removed).
        None if segment.end == segment.payload => return Ok(()),
        None => {
            // Too large for the stack: put together in map memory. Only
            // the walk's fields are ever written there, so its stream
            // slots stay free.
            let fresh = H2_FRESH_CONNECTION.get_ptr_mut(0).ok_or(0)?;
            // SAFETY: this CPU's scratch slot.
            unsafe {
                (*fresh).ingress = Direction { next_seq: 0, skip: PREFACE, seen: 0 };
                (*fresh).egress = Direction::default();
                (*fresh).lost = 0;
                (*fresh).requests_started = 0;
                (*fresh).cgroup_id = bpf_skb_cgroup_id(ctx.skb.skb);
                H2_PACKET_CONNECTIONS.insert(&key, &*fresh, 0)?;
            }
            packet_release::remember(ctx, key);
            H2_PACKET_CONNECTIONS.get_ptr_mut(&key).ok_or(0)?
        }
    };
    // SAFETY: plain-data map value of this connection. Its two directions
    // may run at once on two CPUs: each writes its own `Direction`, and a
    // stream slot is opened by one and closed by the other, so a race at
    // worst loses one request's count.
    let state = unsafe { &mut *connection };
    if state.lost == 0 && segment.end > segment.payload && !walk(ctx, state, &segment, ingress)? {
        state.lost = 1;
        end_open_requests(state, false);
    }
    if segment.closing && (segment.reset || !ingress) {
        end_open_requests(state, true);
        pod_requests::connection_removed(state.cgroup_id, state.requests_started);
        H2_PACKET_CONNECTIONS.remove(&key)?;
    }
    Ok(())
}

/// The socket of connection `key` was released (`packet_release`): its
/// open requests end with it, as at the pod's FIN.
#[inline(always)]
pub(crate) fn released(key: u64) {
    let Some(connection) = H2_PACKET_CONNECTIONS.get_ptr_mut(&key) else { return };
    // SAFETY: plain-data map value of this connection.
    let state = unsafe { &mut *connection };
    end_open_requests(state, true);
    pod_requests::connection_removed(state.cgroup_id, state.requests_started);
    let _ = H2_PACKET_CONNECTIONS.remove(&key);
}

/// Ends every request open on the connection untimed: `aborted` by its
/// close, or its boundary lost.
#[inline(always)]
fn end_open_requests(state: &mut H2Connection, aborted: bool) {
    for slot in state.streams.iter_mut() {
        if slot.stream != 0 {
            slot.stream = 0;
            pod_requests::ended_untimed(state.cgroup_id, aborted);
        }
    }
}

/// Walks the frame headers of one data packet: `false` when the
/// connection's frame boundary is lost with it (counted).
#[inline(always)]
fn walk(ctx: &SkBuffContext, state: &mut H2Connection, segment: &TcpSegment, ingress: bool) -> Result<bool, i64> {
    let TcpSegment { payload, end: total, seq, .. } = *segment;
    let length = total - payload;
    let direction = if ingress { &mut state.ingress } else { &mut state.egress };
    if direction.seen == 0 {
        direction.seen = 1;
        direction.next_seq = seq;
        // Only a connection seen from the client's first byte, its
        // preface, is walked.
        if ingress && ctx.load::<u8>(payload as usize)? != b'P' {
            count(0);
            return Ok(false);
        }
    }
    let direction = if ingress { &mut state.ingress } else { &mut state.egress };
    // Wrapping compare: behind is a retransmission (walked already),
    // ahead is a gap (lost).
    let ahead = seq.wrapping_sub(direction.next_seq) as i32;
    if ahead < 0 {
        return Ok(true);
    }
    if ahead > 0 {
        count(0);
        return Ok(false);
    }
    direction.next_seq = seq.wrapping_add(length);
    if direction.skip >= length {
        direction.skip -= length;
        return Ok(true);
    }
    let mut offset = payload + direction.skip;
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    for _ in 0..MAX_FRAMES {
        if offset >= total {
            break;
        }
        if offset + FRAME_HEADER > total {
            count(0);
            return Ok(false);
        }
        let header: [u8; 9] = ctx.load(offset as usize)?;
        let frame_length = u32::from_be_bytes([0, header[0], header[1], header[2]]);
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        offset += FRAME_HEADER + frame_length;
        if stream == 0 {
            continue;
        }
        let slot = &mut state.streams[(stream >> 1) as usize & (STREAM_SLOTS - 1)];
        if kind == RST_STREAM {
            if slot.stream == stream {
                slot.stream = 0;
                count(1);
                pod_requests::ended_untimed(state.cgroup_id, true);
            }
        } else if ingress {
            if kind == HEADERS && slot.stream != stream {
                if slot.stream != 0 {
                    count(1);
                    pod_requests::ended_untimed(state.cgroup_id, false);
                }
                *slot = OpenStream { stream, ttft_units: 0, started_ns: now };
                state.requests_started += 1;
            }
        } else if (kind == DATA || kind == HEADERS) && slot.stream == stream {
            let elapsed = now.saturating_sub(slot.started_ns);
            if kind == DATA && slot.ttft_units == 0 {
                slot.ttft_units = ((elapsed >> 10) as u32).max(1);
            }
            if flags & END_STREAM != 0 {
                slot.stream = 0;
                let ttft = if slot.ttft_units != 0 { u64::from(slot.ttft_units) << 10 } else { elapsed };
                pod_requests::answered(state.cgroup_id, ttft.max(1), elapsed);
            }
        }
    }
    if offset < total {
        // More frames than one run reads: the rest of the packet is not
        // walked, and the boundary with it.
        count(2);
        return Ok(false);
    }
    let direction = if ingress { &mut state.ingress } else { &mut state.egress };
    direction.skip = offset - total;
    Ok(true)
}
