//! Answered requests per pod for the packet-layer candidates: a log2
//! latency histogram per socket cgroup (the container's), as a request
//! source that serves every pod from one attachment would keep them.
//! The socket's cgroup is read once per connection (`bpf_skb_cgroup_id`)
//! and kept in its state; an answer costs one per-CPU hash lookup.
use aya_ebpf::{
    macros::map,
    maps::{Array, LruPerCpuHashMap},
};

/// Latency buckets: log2 of ns.
pub(crate) const BUCKETS: usize = 64;

/// Requests answered, by socket cgroup, by log2 of their latency in ns
/// (per CPU).
#[map]
static PACKET_POD_LATENCY: LruPerCpuHashMap<u64, [u64; BUCKETS]> = LruPerCpuHashMap::with_max_entries(4_096, 0);

/// An empty histogram to insert from (too large for the stack).
#[map]
static EMPTY_HISTOGRAM: Array<[u64; BUCKETS]> = Array::with_max_entries(1, 0);

/// Counts a request of cgroup `cgroup_id` answered after `latency_ns`.
#[inline(always)]
pub(crate) fn answered(cgroup_id: u64, latency_ns: u64) {
    let log2 = (63 - (latency_ns | 1).leading_zeros()) as usize;
    // Through memory, so that the compiler cannot drop the mask as
    // redundant: the verifier does not know the range of a count of
    // leading zeros and needs it to bound the index.
    // SAFETY: a local.
    let bucket = unsafe { core::ptr::read_volatile(&log2) } & (BUCKETS - 1);
    let histogram = match PACKET_POD_LATENCY.get_ptr_mut(cgroup_id) {
        Some(histogram) => histogram,
        None => {
            let Some(empty) = EMPTY_HISTOGRAM.get(0) else { return };
            if PACKET_POD_LATENCY.insert(cgroup_id, empty, 0).is_err() {
                return;
            }
            let Some(histogram) = PACKET_POD_LATENCY.get_ptr_mut(cgroup_id) else { return };
            histogram
        }
    };
    // SAFETY: this CPU's value of the pod's histogram.
    unsafe { (*histogram)[bucket] += 1 };
}
