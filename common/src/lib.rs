//! Types shared by the kernel side (`agent-ebpf`) and user space (`agent`).
//!
//! One definition per struct that crosses the kernel boundary: both sides
//! compile this file, so a field added here can never be out of step. Every
//! struct is `#[repr(C)]` with fixed-width fields and no implicit padding, so
//! it can be read from a map as plain bytes (`aya::Pod` with the `user`
//! feature).
#![no_std]
#![deny(missing_docs)]

/// Capacity of the set of cgroups user space asks the probes to watch.
pub const MAX_WATCHED_CGROUPS: u32 = 4096;

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
    /// Syscall return value: bytes moved, 0 for EOF, or -errno.
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

#[cfg(feature = "user")]
// SAFETY: repr(C); u64s first, then u32s, then byte arrays: no padding
// (checked by a test), and every bit pattern is valid.
unsafe impl aya::Pod for IoEvent {}

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
}

/// Number of entries in `REQUEST_STATS`.
pub const REQUEST_STAT_COUNT: u32 = 5;

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring-buffer event has no implicit padding, so user space can
    /// reinterpret its bytes.
    #[test]
    fn io_event_has_no_padding() {
        assert_eq!(core::mem::size_of::<IoEvent>(), 4 * 8 + 4 * 4 + CAPTURE_PREFIX + CAPTURE_SUFFIX);
    }
}
