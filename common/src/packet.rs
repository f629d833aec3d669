//! What the packet-layer request candidates (`agent-ebpf/src/packet_h1.rs`,
//! `packet_h2.rs`) keep per pod in the kernel and user space reads each
//! tick: request counts and histograms of time to first response byte
//! and of latency, by the answering socket's cgroup.

/// Buckets of each histogram: four per power of two of nanoseconds
/// (`bucket_of`), so a bucket's width is at most a quarter of its floor.
pub const PACKET_LATENCY_BUCKETS: usize = 256;

/// Pods (socket cgroups) whose requests are kept at once (LRU; kubelet's
/// default is 110 pods a node).
pub const MAX_PACKET_PODS: u32 = 1024;

/// One pod's requests as the packet-layer candidates count them, shared
/// by the CPUs (atomic adds: a per-CPU copy would cost the node this
/// struct times its CPUs for every pod).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PacketPodRequests {
    /// Requests whose first byte came in.
    pub started: u64,
    /// Requests answered to the end of their response.
    pub answered: u64,
    /// Requests whose connection closed (FIN or RST) before their answer
    /// ended.
    pub aborted: u64,
    /// Requests whose response end could not be told (a head longer than
    /// what is read, or framing not understood): counted, never timed.
    pub ends_unknown: u64,
    /// Last request byte in -> first response body byte out.
    pub ttft: [u64; PACKET_LATENCY_BUCKETS],
    /// First request byte in -> last response byte out.
    pub latency: [u64; PACKET_LATENCY_BUCKETS],
}

impl PacketPodRequests {
    /// Nothing counted yet.
    pub const EMPTY: Self = Self {
        started: 0,
        answered: 0,
        aborted: 0,
        ends_unknown: 0,
        ttft: [0; PACKET_LATENCY_BUCKETS],
        latency: [0; PACKET_LATENCY_BUCKETS],
    };
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

#[cfg(feature = "user")]
// SAFETY: repr(C), only u64 fields and arrays: no padding (checked by a
// test); every bit pattern is valid.
unsafe impl aya::Pod for PacketPodRequests {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_requests_have_no_padding() {
        assert_eq!(core::mem::size_of::<PacketPodRequests>(), 8 * (4 + 2 * PACKET_LATENCY_BUCKETS));
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
