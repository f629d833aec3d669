//! Types shared by the kernel side (`agent-ebpf`) and user space (`agent`).
//!
//! One definition per struct that crosses the kernel boundary: both sides
//! compile this file, so a field added here can never be out of step. Every
//! struct is `#[repr(C)]` with fixed-width fields and no implicit padding, so
//! it can be read from a map as plain bytes (`aya::Pod` with the `user`
//! feature).
#![no_std]
#![deny(missing_docs)]

/// Capacity of the per-cgroup socket counter map. A node rarely runs more
/// than a few hundred containers; the headroom absorbs churn between two
/// user-space garbage collections.
pub const MAX_TRACKED_CGROUPS: u32 = 4096;

/// Capacity of the set of cgroups user space asks the probes to watch.
pub const MAX_WATCHED_CGROUPS: u32 = 4096;

/// Value stored in the watched-cgroup set: which kinds of traffic to count.
/// Only bit 0 (TCP sockets) is defined today.
pub const WATCH_TCP: u32 = 1;

/// Cumulative TCP socket activity of one cgroup, summed per CPU by user space.
///
/// Keyed by the cgroup v2 id (`bpf_get_current_cgroup_id`, the inode of the
/// cgroup directory). Counts only successful calls that moved bytes, and
/// never `MSG_PEEK` reads, which would count the same bytes twice.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketCounters {
    /// Bytes returned by `recvmsg`-family calls on TCP sockets.
    pub recv_bytes: u64,
    /// Number of such calls that returned at least one byte.
    pub recv_calls: u64,
    /// Bytes accepted by `sendmsg`-family calls on TCP sockets.
    pub send_bytes: u64,
    /// Number of such calls that sent at least one byte.
    pub send_calls: u64,
}

impl SocketCounters {
    /// Adds another CPU's (or cgroup's) counters to these.
    pub fn accumulate(&mut self, other: &SocketCounters) {
        self.recv_bytes = self.recv_bytes.wrapping_add(other.recv_bytes);
        self.recv_calls = self.recv_calls.wrapping_add(other.recv_calls);
        self.send_bytes = self.send_bytes.wrapping_add(other.send_bytes);
        self.send_calls = self.send_calls.wrapping_add(other.send_calls);
    }
}

/// Counters the probes keep about themselves (index into the `PROBE_STATS`
/// per-CPU array).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeStat {
    /// Events from watched cgroups that were counted.
    Counted = 0,
    /// Events from watched cgroups lost because the counter map was full.
    MapFull = 1,
}

/// Number of entries in the `PROBE_STATS` array.
pub const PROBE_STAT_COUNT: u32 = 2;

#[cfg(feature = "user")]
// SAFETY: repr(C), four u64 fields, no padding, every bit pattern valid.
unsafe impl aya::Pod for SocketCounters {}

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

    /// The struct has no padding: its size is exactly the sum of its fields,
    /// which is what makes reading it from kernel memory sound.
    #[test]
    fn socket_counters_have_no_padding() {
        assert_eq!(core::mem::size_of::<SocketCounters>(), 4 * 8);
    }

    /// The ring-buffer event has no implicit padding, so user space can
    /// reinterpret its bytes.
    #[test]
    fn io_event_has_no_padding() {
        assert_eq!(core::mem::size_of::<IoEvent>(), 4 * 8 + 4 * 4 + CAPTURE_PREFIX + CAPTURE_SUFFIX);
    }

    /// Accumulating wraps like the kernel's u64 counters instead of panicking.
    #[test]
    fn accumulate_adds_fields_and_wraps() {
        let mut a = SocketCounters { recv_bytes: u64::MAX, recv_calls: 1, send_bytes: 2, send_calls: 3 };
        a.accumulate(&SocketCounters { recv_bytes: 2, recv_calls: 1, send_bytes: 5, send_calls: 0 });
        assert_eq!(a, SocketCounters { recv_bytes: 1, recv_calls: 2, send_bytes: 7, send_calls: 3 });
    }
}
