//! What the packet-layer request candidates (`agent-ebpf/src/packet_h1.rs`,
//! `packet_h2.rs`) keep in the kernel for user space to read: per pod,
//! request counts and histograms of time to first response byte and of
//! latency, by the answering socket's cgroup; per connection, its open
//! requests (the in-flight level, counted where it is kept).

/// Buckets of each histogram: four per power of two of nanoseconds
/// (`bucket_of`), so a bucket's width is at most a quarter of its floor.
pub const PACKET_LATENCY_BUCKETS: usize = 256;

/// Pods (socket cgroups) whose requests are kept at once (LRU; kubelet's
/// default is 110 pods a node).
pub const MAX_PACKET_PODS: u32 = 1024;

/// One pod's requests as the packet-layer candidates count them, shared
/// by the CPUs (atomic adds: a per-CPU copy would cost the node this
/// struct times its CPUs for every pod). What a request's start writes
/// (the packet in) and what its answer writes (the packet out, often on
/// another CPU) sit on different cache lines, so that the two do not
/// pull one line back and forth per request. Requests answered are the
/// latency histogram's total (`answered`): one count fewer per answer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PacketPodRequests {
    /// Requests whose first byte came in, on connections whose state has
    /// been removed since (each connection keeps its own count until
    /// then: `H1Connection::requests_started`).
    pub started: u64,
    /// Requests whose connection closed (FIN, RST or its socket's
    /// release) before their answer ended.
    pub aborted: u64,
    /// Requests whose answer's end could not be told (a head longer than
    /// what is read, a chunked body's terminal chunk split between
    /// packets): counted, never timed.
    pub ends_unknown: u64,
    /// Keeps the histograms off the first cache line.
    pub padding: [u64; 5],
    /// Last request byte in -> first response body byte out.
    pub ttft: [u64; PACKET_LATENCY_BUCKETS],
    /// First request byte in -> last response byte out.
    pub latency: [u64; PACKET_LATENCY_BUCKETS],
}

impl PacketPodRequests {
    /// Nothing counted yet.
    pub const EMPTY: Self = Self {
        started: 0,
        aborted: 0,
        ends_unknown: 0,
        padding: [0; 5],
        ttft: [0; PACKET_LATENCY_BUCKETS],
        latency: [0; PACKET_LATENCY_BUCKETS],
    };

    /// Requests answered to the end of their response.
    pub fn answered(&self) -> u64 {
        self.latency.iter().sum()
    }
}

/// The bucket of a duration of `ns` nanoseconds: below 4 ns, `ns`;
/// above, four buckets per power of two, by the two bits after the
/// leading one.
#[inline(always)]
pub const fn bucket_of(ns: u64) -> usize {
    if ns < 4 {
        return ns as usize;
    }
    let log2 = 63 - ns.leading_zeros() as usize;
    (log2 - 1) * 4 + ((ns >> (log2 - 2)) & 3) as usize
}

/// The shortest duration (ns) bucket `bucket` holds.
pub const fn bucket_floor(bucket: usize) -> u64 {
    if bucket < 4 {
        return bucket as u64;
    }
    let (log2, sub) = (bucket / 4 + 1, (bucket % 4) as u64);
    (4 + sub) << (log2 - 2)
}

/// HTTP/1.1 connections followed at once (LRU; removed at their close).
pub const H1_MAX_CONNECTIONS: u32 = 65_536;
/// HTTP/2 connections followed at once (LRU; removed at their close).
pub const H2_MAX_CONNECTIONS: u32 = 16_384;

/// One connection, from the pod's side: its open request.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct H1Connection {
    /// Requests started on this connection and not yet added to its pod's
    /// `started` (that is done once, when the connection's state is
    /// removed, so that a request's start writes nothing the other CPUs
    /// write): user space adds the live connections' to the pod's.
    pub requests_started: u64,
    /// When the open request's first byte came in (0: none open).
    pub request_started_ns: u64,
    /// When its latest byte came in.
    pub request_last_in_ns: u64,
    /// When its answer's first body byte went out (0: not yet).
    pub first_body_ns: u64,
    /// The TCP sequence number just past a `Content-Length` answer.
    pub answer_end_seq: u32,
    /// Whether `next_out_seq` is set (a data packet went out).
    pub sent: u32,
    /// The socket's cgroup (the container's), read once.
    pub cgroup_id: u64,
    /// The TCP sequence number past the furthest byte out.
    pub next_out_seq: u32,
    /// How the open request's answer is delimited (`packet_h1::framing`).
    pub framing: u32,
    /// The pod is the client on this connection: not followed.
    pub client: u32,
    /// The open request is a HEAD: its answer has no body.
    pub head_request: u32,
    /// The last answer head's length (0: none kept), where its
    /// `Content-Length` or `Transfer-Encoding` line started, and the
    /// length's digits: a server's heads on one connection are alike, so
    /// the next head is checked at these places before it is scanned.
    pub head_length: u32,
    /// See `head_length`.
    pub framing_line: u32,
    /// See `head_length`.
    pub length_digits: u32,
    /// Padding, zero.
    pub padding: u32,
}

/// One direction of a connection, as the walk left it.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct H2Direction {
    /// The TCP sequence number of the next payload byte expected.
    pub next_seq: u32,
    /// Bytes of the current frame (or of the client preface) that are
    /// still to come before the next frame header.
    pub skip: u32,
    /// Whether a data packet went this way yet.
    pub seen: u32,
}

/// A request open on a stream.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct H2OpenStream {
    /// The stream id (0: the slot is free).
    pub stream: u32,
    /// Time from its headers in to its first DATA frame out, in units of
    /// 1,024 ns (0: none out yet).
    pub ttft_units: u32,
    /// When its request headers came in.
    pub started_ns: u64,
}

/// A connection, from the pod's side.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct H2Connection {
    /// Frames into the pod.
    pub ingress: H2Direction,
    /// Frames out of the pod.
    pub egress: H2Direction,
    /// The frame boundary is lost: the connection is no longer walked.
    pub lost: u64,
    /// The socket's cgroup (the container's), read once.
    pub cgroup_id: u64,
    /// Requests started on this connection and not yet added to its pod's
    /// `started` (as `H1Connection::requests_started`).
    pub requests_started: u64,
    /// Open requests, by stream id: a client's streams are odd and
    /// increasing, so the last `H2_STREAM_SLOTS` opened fall in distinct
    /// slots, and no map is looked up per frame.
    pub streams: [H2OpenStream; H2_STREAM_SLOTS],
}

/// Requests open at once on one connection that are told apart (h2load
/// keeps 16; servers allow about 100 by default). A request whose slot a
/// newer stream takes is counted as lost (`H2_PACKET_LOST[1]`).
pub const H2_STREAM_SLOTS: usize = 64;

#[cfg(feature = "user")]
// SAFETY: repr(C), only u64 fields and arrays: no padding (checked by a
// test); every bit pattern is valid.
unsafe impl aya::Pod for PacketPodRequests {}

#[cfg(feature = "user")]
// SAFETY: repr(C), five u64 and ten u32, each u64 at a multiple of 8: no padding (checked by a test);
// every bit pattern is valid.
unsafe impl aya::Pod for H1Connection {}

#[cfg(feature = "user")]
// SAFETY: repr(C), two 12-byte directions, then u64s and 16-byte slots:
// no padding (checked by a test); every bit pattern is valid.
unsafe impl aya::Pod for H2Connection {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_requests_have_no_padding() {
        assert_eq!(core::mem::size_of::<PacketPodRequests>(), 64 + 8 * 2 * PACKET_LATENCY_BUCKETS);
        assert_eq!(core::mem::size_of::<H1Connection>(), 5 * 8 + 10 * 4);
        assert_eq!(core::mem::size_of::<H2Connection>(), 2 * 12 + 3 * 8 + 16 * H2_STREAM_SLOTS);
    }

    #[test]
    fn buckets_split_each_power_of_two_in_four() {
        assert_eq!((bucket_of(0), bucket_of(3), bucket_of(4), bucket_of(7), bucket_of(8)), (0, 3, 4, 7, 8));
        assert_eq!((bucket_of(1023), bucket_of(1024), bucket_of(1280)), (35, 36, 37));
        assert_eq!(bucket_of(u64::MAX), PACKET_LATENCY_BUCKETS - 5);
        for ns in [4, 5, 100, 1_000, 999_999, 1 << 40, (1 << 40) + 12_345, u64::MAX / 3] {
            let bucket = bucket_of(ns);
            assert!(bucket_floor(bucket) <= ns && ns < bucket_floor(bucket + 1), "{ns} in bucket {bucket}");
            assert!(bucket_floor(bucket + 1) - bucket_floor(bucket) <= bucket_floor(bucket) / 4 + 1);
        }
    }
}
