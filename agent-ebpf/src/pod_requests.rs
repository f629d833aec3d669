//! Requests per pod for the packet-layer candidates: counts and log2
//! histograms of TTFT and latency per socket cgroup (the container's), in
//! one LRU per-CPU hash map, as a request source that serves every pod
//! from one attachment keeps them. A connection reads its socket's cgroup
//! once (`bpf_skb_cgroup_id`) and keeps it in its state; each count costs
//! one per-CPU hash lookup.
use aya_ebpf::{
    macros::map,
    maps::{Array, LruPerCpuHashMap},
};
use podgpu_common::packet::{log2_bucket, PacketPodRequests, MAX_PACKET_PODS, PACKET_LATENCY_BUCKETS};

/// Requests by socket cgroup (per CPU).
#[map]
static PACKET_POD_REQUESTS: LruPerCpuHashMap<u64, PacketPodRequests> =
    LruPerCpuHashMap::with_max_entries(MAX_PACKET_PODS, 0);

/// An empty value to insert from (too large for the stack).
#[map]
static EMPTY_POD: Array<PacketPodRequests> = Array::with_max_entries(1, 0);

/// This CPU's counts of cgroup `cgroup_id`, created empty on first use.
#[inline(always)]
fn pod(cgroup_id: u64) -> Option<*mut PacketPodRequests> {
    if let Some(pod) = PACKET_POD_REQUESTS.get_ptr_mut(cgroup_id) {
        return Some(pod);
    }
    let empty = EMPTY_POD.get(0)?;
    PACKET_POD_REQUESTS.insert(cgroup_id, empty, 0).ok()?;
    PACKET_POD_REQUESTS.get_ptr_mut(cgroup_id)
}

/// A bucket index the verifier can bound.
#[inline(always)]
fn bucket(ns: u64) -> usize {
    let log2 = log2_bucket(ns);
    // Through memory, so that the compiler cannot drop the mask as
    // redundant: the verifier does not know the range of a count of
    // leading zeros and needs it to bound the index.
    // SAFETY: a local.
    (unsafe { core::ptr::read_volatile(&log2) }) & (PACKET_LATENCY_BUCKETS - 1)
}

/// A request of cgroup `cgroup_id` came in.
#[inline(always)]
pub(crate) fn started(cgroup_id: u64) {
    if let Some(pod) = pod(cgroup_id) {
        // SAFETY: this CPU's value of the pod.
        unsafe { (*pod).started += 1 };
    }
}

/// A request of cgroup `cgroup_id` was answered: its first body byte went
/// out `ttft_ns` after its last byte came in (0: not known, not counted),
/// its last byte `latency_ns` after its first came in.
#[inline(always)]
pub(crate) fn answered(cgroup_id: u64, ttft_ns: u64, latency_ns: u64) {
    let (ttft, latency) = (bucket(ttft_ns), bucket(latency_ns));
    if let Some(pod) = pod(cgroup_id) {
        // SAFETY: this CPU's value of the pod.
        unsafe {
            (*pod).answered += 1;
            (*pod).latency[latency] += 1;
            if ttft_ns != 0 {
                (*pod).ttft[ttft] += 1;
            }
        }
    }
}

/// A request of cgroup `cgroup_id` ended without a complete answer: its
/// connection closed (`aborted`), or its answer's end could not be told.
#[inline(always)]
pub(crate) fn ended_untimed(cgroup_id: u64, aborted: bool) {
    if let Some(pod) = pod(cgroup_id) {
        // SAFETY: this CPU's value of the pod.
        unsafe {
            if aborted {
                (*pod).aborted += 1;
            } else {
                (*pod).ends_unknown += 1;
            }
        }
    }
}
