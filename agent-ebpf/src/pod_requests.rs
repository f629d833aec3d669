//! Requests per pod for the packet-layer candidates: counts and
//! histograms of TTFT and latency per socket cgroup (the container's), in
//! one LRU hash map shared by the CPUs, as a request source that serves
//! every pod from one attachment keeps them. A connection reads its
//! socket's cgroup once (`bpf_skb_cgroup_id`) and keeps it in its state;
//! each count costs one hash lookup and an atomic add. (A per-CPU map
//! would spare the atomic but cost each pod's 4 KiB once per CPU, half a
//! gigabyte for a thousand pods on a 128-CPU node.)
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, LruHashMap},
};
use podgpu_common::packet::{bucket_of, PacketPodRequests, MAX_PACKET_PODS, PACKET_LATENCY_BUCKETS};

/// Requests by socket cgroup.
#[map]
static PACKET_POD_REQUESTS: LruHashMap<u64, PacketPodRequests> = LruHashMap::with_max_entries(MAX_PACKET_PODS, 0);

/// An empty value to insert from (too large for the stack).
#[map]
static EMPTY_POD: Array<PacketPodRequests> = Array::with_max_entries(1, 0);

/// The counts of cgroup `cgroup_id`, created empty on first use.
#[inline(always)]
fn pod(cgroup_id: u64) -> Option<*mut PacketPodRequests> {
    if let Some(pod) = PACKET_POD_REQUESTS.get_ptr_mut(cgroup_id) {
        return Some(pod);
    }
    let empty = EMPTY_POD.get(0)?;
    // Only if still absent: another CPU may have put it there since, and
    // a replacement would drop what it counted.
    let _ = PACKET_POD_REQUESTS.insert(cgroup_id, empty, u64::from(BPF_NOEXIST));
    PACKET_POD_REQUESTS.get_ptr_mut(cgroup_id)
}

/// Adds one to a counter shared by the CPUs: the BPF atomic add (Rust's
/// core has no `fetch_add` for this target, which lacks compare-and-swap;
/// the intrinsic lowers to the instruction).
#[inline(always)]
fn add_one(counter: *mut u64) {
    // SAFETY: a u64 in a map value, aligned, that every writer updates
    // atomically.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
}

/// A bucket index the verifier can bound.
#[inline(always)]
fn bucket(ns: u64) -> usize {
    let bucket = bucket_of(ns);
    // Through memory, so that the compiler cannot drop the mask as
    // redundant: the verifier does not know the range of a count of
    // leading zeros and needs it to bound the index.
    // SAFETY: a local.
    (unsafe { core::ptr::read_volatile(&bucket) }) & (PACKET_LATENCY_BUCKETS - 1)
}

/// A connection of cgroup `cgroup_id` on which `requests` requests came
/// in is no longer followed: its count joins the pod's.
#[inline(always)]
pub(crate) fn connection_removed(cgroup_id: u64, requests: u64) {
    if requests == 0 {
        return;
    }
    if let Some(pod) = pod(cgroup_id) {
        // SAFETY: a u64 of the pod's map value, updated atomically by
        // every writer.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*pod).started, requests) };
    }
}

/// A request of cgroup `cgroup_id` was answered: its first body byte went
/// out `ttft_ns` after its last byte came in, its last byte `latency_ns`
/// after its first came in.
#[inline(always)]
pub(crate) fn answered(cgroup_id: u64, ttft_ns: u64, latency_ns: u64) {
    let (ttft, latency) = (bucket(ttft_ns), bucket(latency_ns));
    if let Some(pod) = pod(cgroup_id) {
        // SAFETY: the pod's map value.
        unsafe {
            add_one(&raw mut (*pod).latency[latency]);
            add_one(&raw mut (*pod).ttft[ttft]);
        }
    }
}

/// A request of cgroup `cgroup_id` ended without a complete answer: its
/// connection closed (`aborted`), or its answer's end could not be told.
#[inline(always)]
pub(crate) fn ended_untimed(cgroup_id: u64, aborted: bool) {
    if let Some(pod) = pod(cgroup_id) {
        // SAFETY: the pod's map value.
        unsafe { add_one(if aborted { &raw mut (*pod).aborted } else { &raw mut (*pod).ends_unknown }) };
    }
}
