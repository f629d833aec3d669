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
pub mod packet;

/// Capacity of the set of cgroups user space asks the probes to watch.
pub const MAX_WATCHED_CGROUPS: u32 = 4096;

/// 64-bit words in each tgid set of the request probe: one byte per tgid,
/// eight per word, so 2^20 tgids (1 MiB) before larger ones alias smaller.
pub const SERVER_TGID_WORDS: u32 = 1 << 17;

/// Slots of the request probe's memory of processes in no watched cgroup
/// (8 bytes each, direct-mapped by tgid): 512 KiB.
pub const UNWATCHED_SLOTS: u32 = 1 << 16;

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
/// Capacity of the map of server-side TCP sockets between the handshake
/// and their first read or write (LRU: every passive open on the node
/// passes through it, most in microseconds).
pub const MAX_PASSIVE_SOCKETS: u32 = 65536;
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
    /// The kernel's `struct sock` address of the connection (0: seeded by
    /// user space, learnt at its first read or write). A different socket
    /// on the same (tgid, fd) means the fd was closed and reused.
    pub socket: u64,
    /// A `conn_mode` value.
    pub mode: u32,
    /// Bytes into the next read before the next HTTP/2 frame header.
    pub read_skip: u32,
    /// Bytes into the next write before the next HTTP/2 frame header.
    pub write_skip: u32,
    /// Frame boundaries lost so far on this connection.
    pub lost_sync: u32,
    /// The first bytes of a read frame header whose rest is in the next
    /// read (a header straddling two syscalls).
    pub read_partial: [u8; 8],
    /// As `read_partial`, for writes.
    pub write_partial: [u8; 8],
    /// Valid bytes in `read_partial` (0-8).
    pub read_partial_len: u32,
    /// Valid bytes in `write_partial` (0-8).
    pub write_partial_len: u32,
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
    /// A watched process began serving a connection: its first read or
    /// write of a socket accepted in a watched cgroup (`bytes` = server
    /// port; `connection` names the process and its fd).
    Accept = 0,
    /// Bytes read from a tracked connection (0 = end of stream, < 0 = -errno).
    Read = 1,
    /// Bytes written to a tracked connection (< 0 = -errno).
    Write = 2,
    /// The server closed the tracked connection, or it was reset.
    Close = 3,
    /// HTTP/2 frames of a read (an `H2Event`).
    H2Read = 4,
    /// HTTP/2 frames of a write (an `H2Event`).
    H2Write = 5,
}

/// One I/O syscall on a tracked server-side connection, read out of the
/// ring buffer by user space, which owns the protocol parsers. A record
/// holds the fields up to `prefix` and then only the `prefix_len` bytes
/// captured (`IO_EVENT_HEADER + prefix_len` bytes in all): the ring
/// carries what was moved, not 512 bytes per call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IoEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the syscall returned.
    pub timestamp_ns: u64,
    /// cgroup v2 id of the process.
    pub cgroup_id: u64,
    /// Connection key: `tgid << 32 | fd`.
    pub connection: u64,
    /// The call's result: bytes moved, 0 for EOF, or -errno. For
    /// `Accept` events: the connection's local (server) port; the prefix
    /// holds the peer as a `sockaddr_in`/`sockaddr_in6` (an all-zero IPv6
    /// address when the kernel side could not read it).
    pub bytes: i64,
    /// An `IoKind`.
    pub kind: u32,
    /// Valid bytes in `prefix`.
    pub prefix_len: u32,
    /// Valid bytes at the start of `suffix`.
    pub suffix_len: u32,
    /// Number of iovecs of a vectored call (1 otherwise).
    pub segments: u32,
    /// The last `suffix_len` bytes moved, left-aligned.
    pub suffix: [u8; CAPTURE_SUFFIX],
    /// The first bytes moved (from the first buffer of a vectored call);
    /// a record ends after `prefix_len` of them.
    pub prefix: [u8; CAPTURE_PREFIX],
}

impl IoEvent {
    /// An event with every field zero (a reader's scratch, a test's start).
    pub const fn zeroed() -> Self {
        Self {
            timestamp_ns: 0,
            cgroup_id: 0,
            connection: 0,
            bytes: 0,
            kind: 0,
            prefix_len: 0,
            suffix_len: 0,
            segments: 0,
            suffix: [0; CAPTURE_SUFFIX],
            prefix: [0; CAPTURE_PREFIX],
        }
    }
}

/// Bytes of an `IoEvent` before its prefix: the shortest record.
pub const IO_EVENT_HEADER: usize = core::mem::offset_of!(IoEvent, prefix);

/// The HTTP/2 frame headers of one read or write, emitted after its
/// `IoEvent` by the frame-walking program. Starts with the same fields as
/// `IoEvent` so user space can tell the two apart by `kind`. A record
/// ends after its `frame_count` frames.
#[repr(C)]
#[derive(Clone, Copy, Default)]
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

/// Bytes of an `H2Event` before its frames: a record holds these and
/// `frame_count` frames.
pub const H2_EVENT_HEADER: usize = core::mem::offset_of!(H2Event, frames);

/// Frame-header bytes a walk gathers before decoding them. A header
/// needs 9; the slack lets the verifier bound a read of up to 9 bytes at
/// an offset of up to 8 without knowing that they sum to 9.
pub const H2_HEADER_SCRATCH: usize = 24;

/// The frame walker's state for one syscall (per-CPU scratch). The exit
/// program fills the syscall's part; the walker keeps its position here,
/// in map memory rather than registers, between steps (so the verifier
/// sees every step alike and prunes) and across its tail calls.
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
    /// Frames recorded in the scratch and not yet emitted.
    pub recorded: u32,
    /// Start of the current buffer (the contiguous one or an iovec's).
    pub segment_base: u64,
    /// Bytes of the syscall's data in the current buffer.
    pub segment_len: u64,
    /// Offset of the next frame-header byte, relative to the current
    /// buffer; beyond its end while a payload is being skipped.
    pub next: u64,
    /// Bytes of the syscall's data before the current buffer.
    pub walked: u64,
    /// Index of the current iovec.
    pub segment: u32,
    /// Continuations so far (the walker tail-calls itself when its frame
    /// scratch or its step budget is used up).
    pub continuations: u32,
    /// Valid bytes in `header` (a header gathered across buffers).
    pub header_len: u32,
    /// Padding (zero).
    pub _pad: u32,
    /// The frame header being gathered.
    pub header: [u8; H2_HEADER_SCRATCH],
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

/// Kernel handles the identity probes remember (LRU: the oldest of a
/// process that created more are forgotten first).
pub const MAX_KERNEL_HANDLES: u32 = 16384;
/// Bytes of a kernel's name kept (mangled C++ names run long; the prefix
/// plus the length tell kernels apart in practice).
pub const KERNEL_NAME_BYTES: usize = 120;
/// Modules and libraries whose image hash the identity probes remember.
pub const MAX_MODULE_HANDLES: u32 = 4096;
/// Bytes at the start of a module image hashed into its identity: a
/// fatbin's header (magic, version, sizes) and the headers of its first
/// images, which differ between builds (fewer where fewer are mapped).
pub const MODULE_IMAGE_HASH_BYTES: usize = 256;

/// FNV-1a, 64-bit: the hash the kernel identity uses on both sides (the
/// probes hash module images with it, user space names with it).
pub const fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    let mut index = 0;
    while index < bytes.len() {
        hash = (hash ^ bytes[index] as u64).wrapping_mul(FNV_PRIME);
        index += 1;
    }
    hash
}
/// FNV-1a's offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a's prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A kernel handle of one process: a `CUfunction` or a `CUkernel`
/// (`cuLaunchKernel` takes either, cast).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KernelHandle {
    /// Process (thread group) id.
    pub tgid: u32,
    /// Zero (keeps `handle` aligned).
    pub pad: u32,
    /// The handle.
    pub handle: u64,
}

/// The name a kernel handle was created for (`cuModuleGetFunction`,
/// `cuLibraryGetKernel`; `cuKernelGetFunction` copies its kernel's).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelName {
    /// Bytes of `name` read, the terminating NUL included (0: none).
    pub len: u32,
    /// Zero.
    pub pad: u32,
    /// Hash of the image of the module or library the name was looked up
    /// in (`MODULE_IMAGE_HASH_BYTES` of it, or the path it was loaded
    /// from); 0 when its load was not seen (before the probes attached).
    pub image: u64,
    /// The name's first bytes.
    pub name: [u8; KERNEL_NAME_BYTES],
}

/// Launch sites the launch probes remember (LRU), per process and handle.
pub const MAX_LAUNCH_SITES: u32 = 4096;
/// Words of the user stack kept from a handle's first launch: the frames
/// above the launch call, scanned for return addresses in user space.
pub const LAUNCH_SITE_WORDS: usize = 64;

/// Where a handle was first launched from (`agent-ebpf/src/launches.rs`):
/// the call's return address and the top of the caller's stack, so that
/// user space can name the launch site's code (module and offset) for a
/// handle whose creation the identity probes did not see.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchSite {
    /// The launch call's return address (the caller's next instruction).
    pub return_address: u64,
    /// Block dimensions of that launch (0 for graphs).
    pub block: [u32; 3],
    /// Zero (keeps `stack` aligned).
    pub pad: u32,
    /// The user stack from the stack pointer at the call's entry.
    pub stack: [u64; LAUNCH_SITE_WORDS],
}

impl Default for LaunchSite {
    fn default() -> Self {
        Self { return_address: 0, block: [0; 3], pad: 0, stack: [0; LAUNCH_SITE_WORDS] }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), u64 + 3 u32 + u32 + u64 array: no padding (checked by
// a test); every bit pattern is valid.
unsafe impl aya::Pod for LaunchSite {}

impl Default for KernelName {
    fn default() -> Self {
        Self { len: 0, pad: 0, image: 0, name: [0; KERNEL_NAME_BYTES] }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), u32 + u32 + u64: no padding; any bit pattern is valid.
unsafe impl aya::Pod for KernelHandle {}

/// Completion spans (`agent-ebpf/src/launches.rs`): per process, the
/// span open now and what closed spans added up to. A span runs from the
/// first launch after the process's work was last known complete to the
/// return of the wait that completes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanState {
    /// `bpf_ktime_get_ns` when the open span began (0: none open).
    pub open_since_ns: u64,
    /// Nanoseconds of closed spans, cumulative (the first span is not
    /// counted: it may have begun before the probes were attached).
    pub busy_ns: u64,
    /// Spans closed, cumulative (the first not counted either).
    pub closed: u64,
    /// When the process's work was last known complete (0: never).
    pub idle_since_ns: u64,
    /// The stream the open span's launches went to (`span_stream`).
    pub stream: u64,
    /// How many streams the open span launched on: 0, 1, or 2 for more
    /// (or unknown): only a context-wide wait then closes it.
    pub streams: u32,
    /// 1 once a span closed (the spans after it count).
    pub primed: u32,
    /// Waits probed, cumulative (each costs the waiting thread two traps:
    /// the launch sampler's budget counts them).
    pub waits: u64,
}

/// One closed span, as the ring buffer carries it to user space (for the
/// fair split, which needs the spans' overlap in time).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanEvent {
    /// Process (thread group) id.
    pub tgid: u32,
    /// Zero.
    pub pad: u32,
    /// Start, `bpf_ktime_get_ns`.
    pub start_ns: u64,
    /// End.
    pub end_ns: u64,
}

/// Processes whose spans are tracked at once.
pub const MAX_SPAN_PROCESSES: u32 = 8192;

/// Bytes of the span event ring (24-byte events: ~43,000 between reads).
pub const SPAN_RING_BYTES: u32 = 1 << 20;

#[cfg(feature = "user")]
// SAFETY: repr(C), five u64, two u32, one u64: no padding; any bit pattern is valid.
unsafe impl aya::Pod for SpanState {}

#[cfg(feature = "user")]
// SAFETY: repr(C), u32 + u32 + two u64: no padding; any bit pattern is valid.
unsafe impl aya::Pod for SpanEvent {}

#[cfg(feature = "user")]
// SAFETY: repr(C), u32 + u32 + 120 bytes: no padding; any bit pattern is valid.
unsafe impl aya::Pod for KernelName {}

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
    /// HTTP/2 frame boundaries lost (resynchronised later): all causes.
    H2LostSync = 5,
    /// Driver events lost because their ring buffer was full.
    DriverRingFull = 6,
    /// Of `H2LostSync`: a header that is not a valid HTTP/2 frame header.
    H2LostImplausible = 7,
    /// Of `H2LostSync`: more frames in one syscall than the walker's
    /// whole tail-call chain follows.
    H2LostBudget = 8,
    /// Of `H2LostSync`: user memory that could not be read.
    H2LostFault = 9,
    /// HTTP/2 frame headers split across iovecs or syscalls, gathered.
    H2HeadersJoined = 10,
    /// Reads or writes of a tracked connection by a call whose buffer the
    /// probe cannot find (`sendfile`, `splice`, io_uring): not followed.
    UndecodedSocketCall = 11,
}

/// Number of entries in `REQUEST_STATS`.
pub const REQUEST_STAT_COUNT: u32 = 12;

#[cfg(test)]
mod tests {
    use super::*;

    /// The ring-buffer event has no implicit padding, so user space can
    /// reinterpret its bytes.
    #[test]
    fn io_event_has_no_padding() {
        assert_eq!(core::mem::size_of::<IoEvent>(), 4 * 8 + 4 * 4 + CAPTURE_PREFIX + CAPTURE_SUFFIX);
        assert_eq!(IO_EVENT_HEADER, 4 * 8 + 4 * 4 + CAPTURE_SUFFIX);
        assert_eq!(core::mem::size_of::<H2Event>(), 4 * 8 + 4 * 4 + MAX_H2_FRAMES * 12);
        assert_eq!(H2_EVENT_HEADER, 4 * 8 + 4 * 4);
        assert_eq!(core::mem::size_of::<WalkInput>(), 10 * 8 + 6 * 4 + H2_HEADER_SCRATCH);
        assert_eq!(core::mem::size_of::<LaunchKey>(), 40);
        assert_eq!(core::mem::size_of::<SpanState>(), 56);
        assert_eq!(core::mem::size_of::<SpanEvent>(), 24);
        assert_eq!(core::mem::size_of::<H2Frame>(), 12);
        assert_eq!(core::mem::size_of::<ConnState>(), 56);
        assert_eq!(core::mem::size_of::<KernelName>(), 16 + KERNEL_NAME_BYTES);
        assert_eq!(core::mem::size_of::<LaunchSite>(), 24 + 8 * LAUNCH_SITE_WORDS);
    }
}
