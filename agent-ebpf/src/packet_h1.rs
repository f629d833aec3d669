//! The packet-layer candidate for HTTP/1.1 (`packet_ingress`/
//! `packet_egress`), priced by `bench-probes` against the socket-layer
//! request probe: `cgroup_skb` programs on the pods' cgroup that delimit
//! requests in the pod's own TCP packets, with nothing sent to user
//! space per request (counts and histograms per pod, `pod_requests`).
//!
//! - A request starts with a data packet in whose first bytes are a
//!   method (an upper-case letter, not "HT" of a response).
//! - Its answer starts with the next data packet out: the response head,
//!   read once (`http1_head`, up to 512 bytes) for its status,
//!   `Content-Length` and `Transfer-Encoding`. TTFT runs from the
//!   request's last packet in to the answer's first body byte out.
//! - Its answer ends when `Content-Length` body bytes have gone out, when
//!   a chunked body's last packet ends in the terminal chunk
//!   (`0\r\n\r\n`), at once for a HEAD request or a 204/304, and at the
//!   pod's FIN for a body delimited by the close.
//! - The pod's FIN or an RST either way ends the connection: an open
//!   request is aborted and the state removed. So does the release of
//!   the pod's socket (`packet_release`), for a connection that ends
//!   without either on the wire.
//!
//! What it cannot time, it counts as ended untimed rather than guess: a
//! head longer than 512 bytes or not in the answer's first packet, a
//! chunked body whose terminal chunk is split between packets (the next
//! request on the connection ends it). A connection on which the pod
//! sends a request first is the pod's own client connection and is not
//! followed. A retransmitted packet out is never taken for a new
//! answer's head (each connection keeps the furthest sequence number
//! out), and an answer's end is a sequence number, which neither a
//! retransmission nor packets handled out of order can move. The head is
//! read by `http1_head`. IPv4 only.
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_skb_cgroup_id},
    macros::{cgroup_skb, map},
    maps::LruHashMap,
    programs::SkBuffContext,
};

use podgpu_common::packet::{H1Connection, H1_MAX_CONNECTIONS};

use crate::http1_head::read_head;
use crate::tcp_segment::TcpSegment;
use crate::{packet_release, pod_requests};

/// How the open request's answer is delimited, as far as it has gone out.
mod framing {
    /// No answer byte out yet.
    pub const AWAITING_HEAD: u32 = 0;
    /// A `Content-Length` body: ends at `answer_end_seq`.
    pub const LENGTH: u32 = 1;
    /// A chunked body: ends with its terminal chunk.
    pub const CHUNKED: u32 = 2;
    /// Neither: the body ends when the pod closes the connection.
    pub const UNTIL_CLOSE: u32 = 3;
    /// The head could not be read: the end is not known.
    pub const UNKNOWN: u32 = 4;
}

#[map]
static PACKET_CONNECTIONS: LruHashMap<u64, H1Connection> = LruHashMap::with_max_entries(H1_MAX_CONNECTIONS, 0);

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

/// Whether a payload's first two bytes start a request: a method, not
/// the "HTTP/" of a response.
#[inline(always)]
fn is_request(first: [u8; 2]) -> bool {
    first[0].is_ascii_uppercase() && !(first[0] == b'H' && first[1] == b'T')
}

#[inline(always)]
fn packet(ctx: &SkBuffContext, ingress: bool) -> Result<(), i64> {
    let Some(segment) = TcpSegment::of(ctx, ingress) else { return Ok(()) };
    let length = segment.end - segment.payload;
    let connection = match PACKET_CONNECTIONS.get_ptr_mut(&segment.key) {
        Some(connection) => connection,
        // A close of a connection not followed (or already removed).
        None if length == 0 => return Ok(()),
        None => {
            // SAFETY: the program's own skb.
            let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
            let fresh = H1Connection {
                requests_started: 0,
                request_started_ns: 0,
                request_last_in_ns: 0,
                first_body_ns: 0,
                answer_end_seq: 0,
                sent: 0,
                cgroup_id,
                next_out_seq: 0,
                framing: framing::AWAITING_HEAD,
                client: 0,
                head_request: 0,
                head_length: 0,
                framing_line: 0,
                length_digits: 0,
                padding: 0,
            };
            PACKET_CONNECTIONS.insert(&segment.key, &fresh, 0)?;
            packet_release::remember(ctx, segment.key);
            PACKET_CONNECTIONS.get_ptr_mut(&segment.key).ok_or(0)?
        }
    };
    // SAFETY: plain-data map value of this connection. Its two directions
    // may run at once on two CPUs; a request is opened by one and closed
    // by the other, so a race at worst mistimes or loses one request.
    let state = unsafe { &mut *connection };
    if state.client != 0 {
        return Ok(());
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if length > 0 {
        if ingress {
            request_in(ctx, state, segment.payload, now)?;
        } else {
            answer_out(ctx, state, &segment, now)?;
        }
    }
    if segment.closing && (segment.reset || !ingress) {
        if state.request_started_ns != 0 {
            if state.framing == framing::UNTIL_CLOSE && !segment.reset {
                answered(state, now);
            } else {
                pod_requests::ended_untimed(state.cgroup_id, true);
            }
        }
        pod_requests::connection_removed(state.cgroup_id, state.requests_started);
        PACKET_CONNECTIONS.remove(&segment.key)?;
    }
    Ok(())
}

/// The socket of connection `key` was released (`packet_release`): an
/// answer still open ends with it, as at the pod's FIN.
#[inline(always)]
pub(crate) fn released(key: u64) {
    let Some(connection) = PACKET_CONNECTIONS.get_ptr_mut(&key) else { return };
    // SAFETY: plain-data map value of this connection.
    let state = unsafe { &mut *connection };
    if state.request_started_ns != 0 {
        pod_requests::ended_untimed(state.cgroup_id, true);
    }
    pod_requests::connection_removed(state.cgroup_id, state.requests_started);
    let _ = PACKET_CONNECTIONS.remove(&key);
}

/// A data packet into the pod.
#[inline(always)]
fn request_in(ctx: &SkBuffContext, state: &mut H1Connection, payload: u32, now: u64) -> Result<(), i64> {
    if state.request_started_ns != 0 && state.framing == framing::AWAITING_HEAD {
        // More of the open request (its body).
        state.request_last_in_ns = now;
        return Ok(());
    }
    let first: [u8; 2] = ctx.load(payload as usize)?;
    if !is_request(first) {
        return Ok(());
    }
    if state.request_started_ns != 0 {
        // A new request while the last answer's end was not seen.
        pod_requests::ended_untimed(state.cgroup_id, false);
    }
    state.request_started_ns = now;
    state.request_last_in_ns = now;
    state.first_body_ns = 0;
    state.framing = framing::AWAITING_HEAD;
    state.head_request = u32::from(first == *b"HE");
    state.requests_started += 1;
    Ok(())
}

/// A data packet out of the pod.
#[inline(always)]
fn answer_out(ctx: &SkBuffContext, state: &mut H1Connection, segment: &TcpSegment, now: u64) -> Result<(), i64> {
    let length = segment.end - segment.payload;
    if state.request_started_ns == 0 {
        // Nothing open: a retransmission, an answer to a request not
        // seen, or the pod asking as a client.
        let first: [u8; 2] = ctx.load(segment.payload as usize)?;
        if is_request(first) {
            state.client = 1;
        }
        return Ok(());
    }
    // Sequence numbers, compared wrapping. Packets of one connection may
    // be handled out of order on two CPUs (the writer's, and the one that
    // sends on an ACK), so every test below holds in any order: an answer
    // ends at the packet that carries its last byte, whichever comes
    // last.
    let end_seq = segment.seq.wrapping_add(length);
    let behind = state.sent != 0 && (segment.seq.wrapping_sub(state.next_out_seq) as i32) < 0;
    if state.sent == 0 || (end_seq.wrapping_sub(state.next_out_seq) as i32) > 0 {
        state.next_out_seq = end_seq;
        state.sent = 1;
    }
    if state.framing == framing::AWAITING_HEAD {
        // A head follows everything sent before it: what is behind is a
        // retransmission of an earlier answer.
        return if behind { Ok(()) } else { answer_head(ctx, state, segment, now) };
    }
    if state.first_body_ns == 0 {
        state.first_body_ns = now;
    }
    match state.framing {
        framing::LENGTH => {
            if (end_seq.wrapping_sub(state.answer_end_seq) as i32) >= 0 {
                answered(state, now);
            }
            Ok(())
        }
        framing::CHUNKED => {
            if ends_chunked_body(ctx, segment)? {
                answered(state, now);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The first packet of an answer: its head, and the body bytes after it.
#[inline(always)]
fn answer_head(ctx: &SkBuffContext, state: &mut H1Connection, segment: &TcpSegment, now: u64) -> Result<(), i64> {
    let Some(head) = read_head(ctx, segment.payload, segment.end - segment.payload, state)? else {
        // Not a head: a body packet handled before its head on another
        // CPU, or a stray. The head, when it comes, sets the framing.
        return Ok(());
    };
    if head.length == 0 {
        // A head whose end is not within `HEAD_BYTES`.
        state.framing = framing::UNKNOWN;
        return Ok(());
    }
    state.head_length = if head.framing_line != 0 { head.length } else { 0 };
    state.framing_line = head.framing_line;
    state.length_digits = head.length_digits;
    if (100..200).contains(&head.status) && head.status != 101 {
        // Informational (100 Continue): the final head is still to come.
        return Ok(());
    }
    if head.status == 101 {
        // Switching protocols: answered, and the rest is not HTTP/1.1.
        answered(state, now);
        state.client = 1;
        return Ok(());
    }
    let body_here = u64::from(segment.end - segment.payload).saturating_sub(u64::from(head.length));
    if body_here > 0 {
        state.first_body_ns = now;
    }
    let no_body = state.head_request != 0 || head.status == 204 || head.status == 304;
    if no_body || head.content_length == Some(0) {
        answered(state, now);
    } else if head.chunked {
        state.framing = framing::CHUNKED;
        if body_here > 0 && ends_chunked_body(ctx, segment)? {
            answered(state, now);
        }
    } else if let Some(content_length) = head.content_length {
        if body_here >= content_length {
            answered(state, now);
        } else if content_length >= 1 << 30 {
            // Past what wrapping sequence numbers compare.
            state.framing = framing::UNKNOWN;
        } else {
            state.answer_end_seq = segment.seq.wrapping_add(head.length).wrapping_add(content_length as u32);
            state.framing = framing::LENGTH;
        }
    } else {
        state.framing = framing::UNTIL_CLOSE;
    }
    Ok(())
}

/// Whether the packet ends in a chunked body's terminal chunk (no
/// trailers).
#[inline(always)]
fn ends_chunked_body(ctx: &SkBuffContext, segment: &TcpSegment) -> Result<bool, i64> {
    const LAST_CHUNK: [u8; 5] = *b"0\r\n\r\n";
    if segment.end - segment.payload < LAST_CHUNK.len() as u32 {
        return Ok(false);
    }
    let tail: [u8; 5] = ctx.load((segment.end - LAST_CHUNK.len() as u32) as usize)?;
    Ok(tail == LAST_CHUNK)
}

/// Ends the open request: answered now.
#[inline(always)]
fn answered(state: &mut H1Connection, now: u64) {
    let first_body = if state.first_body_ns != 0 { state.first_body_ns } else { now };
    pod_requests::answered(
        state.cgroup_id,
        first_body.saturating_sub(state.request_last_in_ns).max(1),
        now.saturating_sub(state.request_started_ns),
    );
    state.request_started_ns = 0;
    state.framing = framing::AWAITING_HEAD;
}
