//! Types shared by the kernel side (`agent-ebpf`) and user space (`agent`).
//!
//! One definition per struct that crosses the kernel boundary: both sides
//! compile this file, so a field added here can never be out of step. Every
//! struct is `#[repr(C)]` with fixed-width fields and no implicit padding, so
//! it can be read from a map as plain bytes (`aya::Pod` with the `user`
//! feature).
#![no_std]
#![deny(missing_docs)]

pub mod driver;

/// Capacity of the set of cgroups user space asks the probes to watch.
pub const MAX_WATCHED_CGROUPS: u32 = 4096;

/// 64-bit words in each tgid set of the request probe: one byte per tgid,
/// eight per word, so 2^20 tgids (1 MiB) before larger ones alias smaller.
pub const SERVER_TGID_WORDS: u32 = 1 << 17;

/// (word, byte within the word) of a tgid in the request probe's tgid sets.
/// One byte per tgid, so the kernel marks one with a plain byte store (the
/// BPF target has no atomic OR, and a read-modify-write of a shared word
/// could lose another CPU's mark).
#[inline(always)]
pub const fn tgid_slot(tgid: u64) -> (u32, u64) {
    (((tgid >> 3) % SERVER_TGID_WORDS as u64) as u32, tgid & 7)
}

/// Value stored in the watched-cgroup set: which kinds of traffic to follow.
/// Only bit 0 (TCP server connections) is defined today.
pub const WATCH_TCP: u32 = 1;

/// Bytes of each read/write the request probe copies from the start of the
/// buffer: enough for request and response heads of inference APIs.
pub const CAPTURE_PREFIX: usize = 512;
/// Bytes copied from the end of the last buffer (chunked terminators, SSE).
pub const CAPTURE_SUFFIX: usize = 8;
/// Capacity of the tracked-connection map (LRU: the oldest idle connection
/// is evicted when full; evictions are detected by user space GC).
pub const MAX_TRACKED_CONNECTIONS: u32 = 65536;
/// Size of the request probe's ring buffer in bytes.
pub const REQUEST_RING_BYTES: u32 = 4 << 20;

/// HTTP/2 frame headers recorded per event (request-relevant types only:
/// DATA, HEADERS, RST_STREAM, GOAWAY).
pub const MAX_H2_FRAMES: usize = 16;

/// Connection protocol as the kernel side tracks it.
pub mod conn_mode {
    /// Not decided yet (no data seen, or joined mid-stream).
    pub const UNKNOWN: u32 = 0;
    /// HTTP/1.x or anything that is not HTTP/2: no frame walking.
    pub const OTHER: u32 = 1;
    /// HTTP/2, frame boundaries known.
    pub const H2: u32 = 2;
    /// HTTP/2, frame boundary lost; resynchronising on plausible headers.
    pub const H2_UNSYNCED: u32 = 3;
}

/// Per-connection state kept by the kernel side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnState {
    /// cgroup v2 id of the process that accepted the connection.
    pub cgroup_id: u64,
    /// A `conn_mode` value.
    pub mode: u32,
    /// Bytes into the next read before the next HTTP/2 frame header.
    pub read_skip: u32,
    /// Bytes into the next write before the next HTTP/2 frame header.
    pub write_skip: u32,
    /// Frame boundaries lost so far on this connection.
    pub lost_sync: u32,
}

/// One HTTP/2 frame header seen in a read or write.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2Frame {
    /// Payload length.
    pub length: u32,
    /// Stream id (reserved bit cleared).
    pub stream_id: u32,
    /// Frame type.
    pub kind: u8,
    /// Frame flags.
    pub flags: u8,
    /// Padding (zero).
    pub _pad: [u8; 2],
}

/// What a request-probe event reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// A watched process accepted a connection (`bytes` = new fd).
    Accept = 0,
    /// Bytes read from a tracked connection (0 = end of stream, < 0 = -errno).
    Read = 1,
    /// Bytes written to a tracked connection (< 0 = -errno).
    Write = 2,
    /// The tracked connection's fd was closed.
    Close = 3,
    /// HTTP/2 frames of a read (an `H2Event`).
    H2Read = 4,
    /// HTTP/2 frames of a write (an `H2Event`).
    H2Write = 5,
}

/// One I/O syscall on a tracked server-side connection. Fixed size, read
/// out of the ring buffer by user space, which owns the protocol parsers.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IoEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the syscall returned.
    pub timestamp_ns: u64,
    /// cgroup v2 id of the process.
    pub cgroup_id: u64,
    /// Connection key: `tgid << 32 | fd`.
    pub connection: u64,
    /// Syscall return value: bytes moved, 0 for EOF, or -errno. For
    /// `Accept` events: the listening socket's fd (the new fd is in
    /// `connection`).
    pub bytes: i64,
    /// An `IoKind`.
    pub kind: u32,
    /// Valid bytes in `prefix`.
    pub prefix_len: u32,
    /// Valid bytes at the start of `suffix`.
    pub suffix_len: u32,
    /// Number of iovecs of a vectored call (1 otherwise).
    pub segments: u32,
    /// The first bytes moved (from the first buffer of a vectored call).
    pub prefix: [u8; CAPTURE_PREFIX],
    /// The last `suffix_len` bytes moved, left-aligned.
    pub suffix: [u8; CAPTURE_SUFFIX],
}

/// The HTTP/2 frame headers of one read or write, emitted after its
/// `IoEvent` by the frame-walking program. Starts with the same fields as
/// `IoEvent` so user space can tell the two apart by `kind`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct H2Event {
    /// Same as the `IoEvent` of the syscall.
    pub timestamp_ns: u64,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// Connection key.
    pub connection: u64,
    /// Bytes moved.
    pub bytes: i64,
    /// `IoKind::H2Read` or `IoKind::H2Write`.
    pub kind: u32,
    /// Valid entries in `frames`.
    pub frame_count: u32,
    /// The connection's `conn_mode` after the walk.
    pub mode: u32,
    /// Padding (zero).
    pub _pad: u32,
    /// Request-relevant frame headers, in order.
    pub frames: [H2Frame; MAX_H2_FRAMES],
}

/// What the exit program hands the frame walker (per-CPU scratch).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct WalkInput {
    /// Buffer or iovec array.
    pub buffer: u64,
    /// 0 for a contiguous buffer, else the iovec count.
    pub segments: u64,
    /// Bytes moved.
    pub moved: u64,
    /// Connection key.
    pub connection: u64,
    /// Timestamp of the syscall's `IoEvent`.
    pub timestamp_ns: u64,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// 1 for a read, 0 for a write.
    pub is_read: u32,
    /// Frames recorded so far by the walk (kept in map memory, not in a
    /// register, so the verifier does not track its value).
    pub recorded: u32,
    /// Where a continued walk resumes: next header offset within the
    /// current buffer.
    pub resume_next: u64,
    /// Bytes of the syscall's data already walked past.
    pub resume_walked: u64,
    /// iovec the walk resumes in.
    pub resume_segment: u32,
    /// Continuations so far (the walker tail-calls itself when its frame
    /// scratch or its step budget is used up, instead of giving up).
    pub continuations: u32,
}

/// Launch accounting (`agent-ebpf/src/launches.rs`): uprobes on libcuda's
/// launch entry points count launches per `LaunchKey` in a per-CPU hash
/// map, never one event per launch.
pub const MAX_LAUNCH_KEYS: u32 = 16384;

/// Which libcuda entry point launched (`LaunchKey::kind`).
pub mod launch_kind {
    /// `cuLaunchKernel` / `_ptsz`.
    pub const KERNEL: u32 = 0;
    /// `cuLaunchKernelEx` / `_ptsz`.
    pub const KERNEL_EX: u32 = 1;
    /// `cuLaunchCooperativeKernel` / `_ptsz`.
    pub const COOPERATIVE: u32 = 2;
    /// `cuGraphLaunch` / `_ptsz`: `function` is the graph handle.
    pub const GRAPH: u32 = 3;
}

/// What one launch is counted under: process, entry point, kernel function
/// (or graph) handle and launch size.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LaunchKey {
    /// Process (thread group) id.
    pub tgid: u32,
    /// `launch_kind`.
    pub kind: u32,
    /// `CUfunction` (or `CUgraphExec`) handle.
    pub function: u64,
    /// Grid dimensions (0 for graphs).
    pub grid: [u32; 3],
    /// Block dimensions (0 for graphs).
    pub block: [u32; 3],
}

#[cfg(feature = "user")]
// SAFETY: repr(C), 4 + 4 + 8 + 12 + 12 bytes with no padding (checked by a
// test); every bit pattern is valid.
unsafe impl aya::Pod for LaunchKey {}

#[cfg(feature = "user")]
// SAFETY: repr(C); u64s first, then u32s, then byte arrays whose lengths
// keep the following u32s aligned: no padding (checked by a test), and
// every bit pattern is valid.
unsafe impl aya::Pod for IoEvent {}

#[cfg(feature = "user")]
// SAFETY: repr(C), u64 then four u32: no padding, any bit pattern valid.
unsafe impl aya::Pod for ConnState {}

#[cfg(feature = "user")]
// SAFETY: repr(C), four u64, four u32, then 12-byte frames: no padding.
unsafe impl aya::Pod for H2Event {}

/// Counters the request probe keeps about itself (`REQUEST_STATS` index).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestStat {
    /// Events written to the ring buffer.
    Emitted = 0,
    /// Events lost because the ring buffer was full.
    RingFull = 1,
    /// Connections not tracked because the map was full.
    ConnectionMapFull = 2,
    /// Syscall arguments not stashed because the map was full.
    ArgsMapFull = 3,
    /// Reads of user memory that failed (payload missing from an event).
    CaptureFailed = 4,
    /// HTTP/2 frame boundaries lost (resynchronised later).
    H2LostSync = 5,
    /// Driver events lost because their ring buffer was full.
    DriverRingFull = 6,
}

/// Number of entries in `REQUEST_STATS`.
pub const REQUEST_STAT_COUNT: u32 = 7;

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring-buffer event has no implicit padding, so user space can
    /// reinterpret its bytes.
    #[test]
    fn io_event_has_no_padding() {
        assert_eq!(core::mem::size_of::<IoEvent>(), 4 * 8 + 4 * 4 + CAPTURE_PREFIX + CAPTURE_SUFFIX);
        assert_eq!(core::mem::size_of::<H2Event>(), 4 * 8 + 4 * 4 + MAX_H2_FRAMES * 12);
        assert_eq!(core::mem::size_of::<WalkInput>(), 8 * 8 + 4 * 4);
        assert_eq!(core::mem::size_of::<LaunchKey>(), 40);
        assert_eq!(core::mem::size_of::<H2Frame>(), 12);
        assert_eq!(core::mem::size_of::<ConnState>(), 24);
    }
}
