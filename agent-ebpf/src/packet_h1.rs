//! The packet-layer candidate for HTTP/1.1 (`packet_ingress`/
//! `packet_egress`), priced by `bench-probes` against the socket-layer
//! request probe: `cgroup_skb` programs on the pods' cgroup that delimit
//! requests in the pod's own TCP packets, with nothing sent to user
//! space per request (counts and histograms per pod, `pod_requests`).
//!
//! - A request starts with a data packet in whose first bytes are a
//!   method (an upper-case letter, not "HT" of a response).
//! - Its answer starts with the next data packet out: the response head,
//!   read once (`HEAD_BYTES`) for its status, `Content-Length` and
//!   `Transfer-Encoding`. TTFT runs from the request's last packet in to
//!   the answer's first body byte out.
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
//! head longer than `HEAD_BYTES` or not in the answer's first packet, a
//! chunked body whose terminal chunk is split between packets (the next
//! request on the connection ends it). A connection on which the pod
//! sends a request first is the pod's own client connection and is not
//! followed. Retransmitted packets out are not counted twice (each
//! connection keeps the next sequence number out). IPv4 only.
use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_loop, bpf_skb_cgroup_id, bpf_skb_load_bytes},
    },
    macros::{cgroup_skb, map},
    maps::{LruHashMap, PerCpuArray},
    programs::SkBuffContext,
};

use core::ffi::c_void;

use crate::tcp_segment::TcpSegment;
use podgpu_common::packet::{H1Connection, H1_MAX_CONNECTIONS};

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

/// Bytes of an answer's first packet read for its head.
const HEAD_BYTES: usize = 512;
/// Lines of a head whose name is looked at (those starting with `c` or
/// `t`: `Content-Length`, `Transfer-Encoding`).
const CANDIDATE_LINES: usize = 8;

/// Where an answer's head is read (per CPU), and the scan's state. The
/// scan runs one 8-byte word per `bpf_loop` call: a bounded loop over
/// the bytes is walked by the verifier iteration by iteration and passes
/// its limit, where a `bpf_loop` callback is verified once.
#[repr(C)]
struct HeadScratch {
    /// The head's bytes, as words; twice `HEAD_BYTES` so that a masked
    /// index is always inside.
    words: [u64; 2 * HEAD_BYTES / 8],
    /// Where the lines that may name a header of interest start.
    candidates: [u32; CANDIDATE_LINES],
    /// How many of `candidates` are set.
    found: u32,
    /// Where the line being scanned starts.
    line: u32,
    /// Bytes of the head read into `words`.
    read: u32,
    /// Bytes of the head, blank line included (0: its end not found yet).
    length: u32,
    /// Pass 2's findings: `Content-Length` (if `has_length`), and whether
    /// the body is chunked; where that line starts and the length's
    /// digits.
    content_length: u64,
    has_length: u32,
    chunked: u32,
    framing_line: u32,
    length_digits: u32,
}

impl HeadScratch {
    #[inline(always)]
    fn byte(&self, index: usize) -> u8 {
        let index = index & (2 * HEAD_BYTES - 1);
        (self.words[index >> 3] >> ((index & 7) * 8)) as u8
    }
}

#[map]
static HEAD_SCRATCH: PerCpuArray<HeadScratch> = PerCpuArray::with_max_entries(1, 0);

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

/// What an answer's head says of its body.
struct Head {
    /// Where its `Content-Length` or `Transfer-Encoding` line starts (0:
    /// neither), and the length's digits.
    framing_line: u32,
    length_digits: u32,
    status: u32,
    /// Bytes of the head, blank line included (0: its end was not found:
    /// nothing else is read).
    length: u32,
    /// `Content-Length`, if given.
    content_length: Option<u64>,
    chunked: bool,
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

/// Reads the response head at the start of the payload: `None` when the
/// payload does not start with one (its `length` is 0 when its end is not
/// within `HEAD_BYTES`).
#[inline(always)]
fn read_head(ctx: &SkBuffContext, payload: u32, length: u32, last: &H1Connection) -> Result<Option<Head>, i64> {
    let scratch = HEAD_SCRATCH.get_ptr_mut(0).ok_or(0)?;
    // SAFETY: this CPU's scratch.
    let scratch = unsafe { &mut *scratch };
    // 1..=HEAD_BYTES, in a form the verifier can bound (the helper
    // refuses a length that may be zero).
    let read = ((length.min(HEAD_BYTES as u32) as usize).wrapping_sub(1) & (HEAD_BYTES - 1)) + 1;
    // SAFETY: the program's own skb, into this CPU's scratch, at most
    // `HEAD_BYTES` of its `2 * HEAD_BYTES`.
    let loaded = unsafe {
        bpf_skb_load_bytes(ctx.skb.skb as *const _, payload, scratch.words.as_mut_ptr() as *mut _, read as u32)
    };
    if loaded != 0 {
        return Err(loaded);
    }
    const VERSION: u64 = u64::from_le_bytes(*b"HTTP/1.\0");
    if read < 16 || scratch.words[0] & 0x00ff_ffff_ffff_ffff != VERSION {
        return Ok(None);
    }
    let digit = |index: usize| u32::from(scratch.byte(index).wrapping_sub(b'0'));
    let status = digit(9) * 100 + digit(10) * 10 + digit(11);
    if let Some(head) = like_the_last(scratch, read, status, last) {
        return Ok(Some(head));
    }
    // Pass 1: the blank line, and the lines that may name a header of
    // interest.
    scratch.found = 0;
    scratch.line = 0;
    scratch.read = read as u32;
    scratch.length = 0;
    // SAFETY: a callback of the signature `bpf_loop` calls, cast as the
    // kernel takes it (not through an integer, so that the load keeps the
    // relocation that marks it as a function).
    unsafe {
        let callback = core::mem::transmute::<unsafe extern "C" fn(u64, *mut c_void) -> i64, *mut c_void>(scan_word);
        bpf_loop(read.div_ceil(8) as u32, callback, core::ptr::null_mut(), 0);
    }
    if scratch.length == 0 {
        return Ok(Some(Head {
            framing_line: 0,
            length_digits: 0,
            status,
            length: 0,
            content_length: None,
            chunked: false,
        }));
    }
    // Pass 2: the candidate lines' names and values.
    scratch.has_length = 0;
    scratch.chunked = 0;
    scratch.framing_line = 0;
    scratch.length_digits = 0;
    // SAFETY: as above.
    unsafe {
        let callback = core::mem::transmute::<unsafe extern "C" fn(u64, *mut c_void) -> i64, *mut c_void>(read_line);
        bpf_loop(scratch.found.min(CANDIDATE_LINES as u32), callback, core::ptr::null_mut(), 0);
    }
    Ok(Some(Head {
        framing_line: scratch.framing_line,
        length_digits: scratch.length_digits,
        status,
        length: scratch.length,
        content_length: (scratch.has_length != 0).then_some(scratch.content_length),
        chunked: scratch.chunked != 0,
    }))
}

/// One candidate line of the head (pass 2, a `bpf_loop` callback like
/// pass 1): a `Content-Length` line gives the body's length, a
/// `Transfer-Encoding` line a chunked body (the only transfer coding an
/// HTTP/1.1 answer may end with).
#[inline(never)]
unsafe extern "C" fn read_line(index: u64, _context: *mut c_void) -> i64 {
    let Some(scratch) = HEAD_SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: this CPU's scratch.
    let scratch = unsafe { &mut *scratch };
    let start = scratch.candidates[index as usize & (CANDIDATE_LINES - 1)] as usize & (HEAD_BYTES - 1);
    if names(scratch, start, b"content-length:") {
        let (value, digits) = decimal(scratch, start + 15);
        scratch.content_length = value;
        scratch.has_length = 1;
        scratch.framing_line = start as u32;
        scratch.length_digits = digits;
    } else if names(scratch, start, b"transfer-encoding:") {
        scratch.chunked = 1;
        scratch.framing_line = start as u32;
        scratch.length_digits = 0;
    }
    0
}

/// The head in `scratch` read at the places the connection's last head
/// had them (`H1Connection::head_length`), without a scan: its framing
/// line where the last one's was, and its blank line where that puts it
/// (moved by a length with more or fewer digits). `None` when anything
/// differs: the head is then scanned.
#[inline(always)]
fn like_the_last(scratch: &HeadScratch, read: usize, status: u32, last: &H1Connection) -> Option<Head> {
    if last.head_length == 0 || last.framing_line < 2 {
        return None;
    }
    let line = last.framing_line as usize & (HEAD_BYTES - 1);
    if scratch.byte(line - 1) != b'\n' {
        return None;
    }
    let (length, content_length, chunked, digits) = if names(scratch, line, b"content-length:") {
        let (value, digits) = decimal(scratch, line + 15);
        if digits == 0 {
            return None;
        }
        ((last.head_length + digits).checked_sub(last.length_digits)?, Some(value), false, digits)
    } else if names(scratch, line, b"transfer-encoding:") {
        (last.head_length, None, true, 0)
    } else {
        return None;
    };
    let end = length as usize;
    if end < 4 || end > read {
        return None;
    }
    const BLANK_LINE: [u8; 4] = *b"\r\n\r\n";
    if (0..4).any(|offset| scratch.byte(end - 4 + offset) != BLANK_LINE[offset]) {
        return None;
    }
    Some(Head { framing_line: last.framing_line, length_digits: digits, status, length, content_length, chunked })
}

/// One 8-byte word of the head scan: finds its line feeds (eight bytes
/// at a time, by the has-a-zero-byte test on the word XOR `\n`s) and, at
/// each, ends the line: the blank line ends the head and the loop (1),
/// a line starting with `c` or `t` is kept as a candidate.
#[inline(never)]
unsafe extern "C" fn scan_word(index: u64, _context: *mut c_void) -> i64 {
    const LINE_FEEDS: u64 = 0x0a0a_0a0a_0a0a_0a0a;
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let Some(scratch) = HEAD_SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: this CPU's scratch.
    let scratch = unsafe { &mut *scratch };
    let base = (index as usize * 8) & (HEAD_BYTES - 1);
    let flipped = scratch.words[base >> 3] ^ LINE_FEEDS;
    // A high bit per zero byte (and, rarely, a false one above a true
    // one: each is checked below).
    let hits = flipped.wrapping_sub(ONES) & !flipped & HIGHS;
    if hits == 0 {
        return 0;
    }
    for byte in 0..8 {
        if (hits >> (byte * 8 + 7)) & 1 == 0 {
            continue;
        }
        let position = base + byte;
        if position as u32 >= scratch.read {
            return 1;
        }
        if scratch.byte(position) != b'\n' {
            continue;
        }
        let line = scratch.line as usize & (HEAD_BYTES - 1);
        if position <= line + 1 {
            scratch.length = position as u32 + 1;
            return 1;
        }
        let initial = scratch.byte(line) | 0x20;
        let found = scratch.found as usize;
        if (initial == b'c' || initial == b't') && found < CANDIDATE_LINES {
            scratch.candidates[found & (CANDIDATE_LINES - 1)] = line as u32;
            scratch.found = found as u32 + 1;
        }
        scratch.line = position as u32 + 1;
    }
    0
}

/// Whether the line at `start` begins with `name` (lower case), in any
/// case.
#[inline(always)]
fn names(scratch: &HeadScratch, start: usize, name: &[u8]) -> bool {
    for (offset, expected) in name.iter().enumerate() {
        if scratch.byte(start + offset) | 0x20 != *expected {
            return false;
        }
    }
    true
}

/// The decimal number after optional spaces (at most three) at `start`,
/// and its digits.
#[inline(always)]
fn decimal(scratch: &HeadScratch, start: usize) -> (u64, u32) {
    let mut first = start;
    for _ in 0..3 {
        if scratch.byte(first) != b' ' {
            break;
        }
        first += 1;
    }
    let (mut value, mut digits) = (0u64, 0u32);
    for offset in 0..20 {
        let byte = scratch.byte(first + offset);
        if !byte.is_ascii_digit() {
            break;
        }
        value = value.wrapping_mul(10).wrapping_add(u64::from(byte - b'0'));
        digits += 1;
    }
    (value, digits)
}
