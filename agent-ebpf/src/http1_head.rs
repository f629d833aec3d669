//! The HTTP/1.1 candidate's reading of an answer's head
//! (`packet_h1`): its status, its `Content-Length` and whether its body
//! is chunked, and where its blank line ends it. The head is copied once
//! from the answer's first packet; a connection's heads are alike, so it
//! is first checked at the places the last one had these
//! (`like_the_last`), and scanned only where that fails, in two
//! `bpf_loop` callbacks (a bounded loop over 512 bytes passes the
//! verifier's limit; a callback is verified once).
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_loop, bpf_skb_load_bytes},
    macros::map,
    maps::PerCpuArray,
    programs::SkBuffContext,
};
use podgpu_common::packet::H1Connection;

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

/// What an answer's head says of its body.
pub(crate) struct Head {
    /// Where its `Content-Length` or `Transfer-Encoding` line starts (0:
    /// neither), and the length's digits.
    pub(crate) framing_line: u32,
    pub(crate) length_digits: u32,
    pub(crate) status: u32,
    /// Bytes of the head, blank line included (0: its end was not found:
    /// nothing else is read).
    pub(crate) length: u32,
    /// `Content-Length`, if given.
    pub(crate) content_length: Option<u64>,
    pub(crate) chunked: bool,
}

/// Reads the response head at the start of the payload: `None` when the
/// payload does not start with one (its `length` is 0 when its end is not
/// within `HEAD_BYTES`).
#[inline(always)]
pub(crate) fn read_head(
    ctx: &SkBuffContext,
    payload: u32,
    length: u32,
    last: &H1Connection,
) -> Result<Option<Head>, i64> {
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
