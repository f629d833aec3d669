//! What the packet-layer request candidates (`agent-ebpf/src/packet_h1.rs`,
//! `packet_h2.rs`) keep per pod in the kernel and user space reads each
//! tick: request counts and log2 histograms of time to first response
//! byte and of latency, by the answering socket's cgroup.

/// Log2-of-nanoseconds buckets of each histogram: bucket `i` holds
/// durations in [2^i, 2^(i+1)) ns.
pub const PACKET_LATENCY_BUCKETS: usize = 64;

/// Pods (socket cgroups) whose requests are kept at once (LRU).
pub const MAX_PACKET_PODS: u32 = 4096;

/// One pod's requests as the packet-layer candidates count them (per
/// CPU; user space sums the CPUs).
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

    /// Adds `other`'s counts to these (one CPU's to the sum).
    pub fn add(&mut self, other: &Self) {
        self.started += other.started;
        self.answered += other.answered;
        self.aborted += other.aborted;
        self.ends_unknown += other.ends_unknown;
        for (sum, count) in self.ttft.iter_mut().zip(other.ttft.iter()) {
            *sum += count;
        }
        for (sum, count) in self.latency.iter_mut().zip(other.latency.iter()) {
            *sum += count;
        }
    }
}

/// The log2 bucket of a duration of `ns` nanoseconds (0 counts as 1).
#[inline(always)]
pub const fn log2_bucket(ns: u64) -> usize {
    (63 - (ns | 1).leading_zeros()) as usize
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
    fn buckets_are_log2_of_nanoseconds() {
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1), 0);
        assert_eq!(log2_bucket(1023), 9);
        assert_eq!(log2_bucket(1024), 10);
        assert_eq!(log2_bucket(u64::MAX), 63);
    }

    #[test]
    fn sums_add_every_field() {
        let mut one = PacketPodRequests::EMPTY;
        one.started = 3;
        one.latency[10] = 2;
        one.ttft[9] = 1;
        let mut sum = PacketPodRequests::EMPTY;
        sum.add(&one);
        sum.add(&one);
        assert_eq!((sum.started, sum.latency[10], sum.ttft[9], sum.answered), (6, 4, 2, 0));
    }
}
