//! Which processes' socket calls the request probe looks at: those of
//! watched cgroups (pods), and servers it already follows. Every socket
//! call on the node passes this filter first, so its cost is the node's
//! tax on socket I/O outside the watched pods.
//!
//! A process found in no watched cgroup is remembered (`UNWATCHED`), so
//! its later calls cost a few array reads instead of a cgroup lookup.
//! What could make that memory wrong ends it:
//! - user space watching a new cgroup bumps `WATCH_GENERATION[0]`;
//! - any task moving between cgroups (`cgroup_attach_task`, e.g. runc
//!   placing a container's first process) sets `WATCH_GENERATION[1]`;
//! - a thread exiting clears its process's entry (`sched_process_exit`),
//!   so a reused tgid starts unknown.
//!
//! An entry is valid only while it holds the current generation (the sum
//! of both counters) and its own tgid: a stale, aliased or torn entry
//! only costs its process the lookup, never hides a watched one.

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap},
    programs::RawTracePointContext,
};
use podgpu_common::{tgid_slot, MAX_WATCHED_CGROUPS, SERVER_TGID_WORDS, UNWATCHED_SLOTS};

/// cgroup ids whose accepted connections are tracked.
#[map]
static WATCHED_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_WATCHED_CGROUPS, 0);

/// tgids (one byte each, modulo the map's size) that serve a tracked
/// connection: their calls go straight to the connection lookup. Set by
/// the kernel, never cleared: a stale or aliased mark only costs that
/// process the lookup.
#[map]
static SERVER_TGIDS: Array<u64> = Array::with_max_entries(SERVER_TGID_WORDS, 0);

/// The same for processes whose connections user space seeded (they
/// predate the agent). Separate from `SERVER_TGIDS` so that user space
/// never rewrites a word the kernel marks bytes in.
#[map]
static SEEDED_TGIDS: Array<u64> = Array::with_max_entries(SERVER_TGID_WORDS, 0);

/// Processes in no watched cgroup, slot `tgid % UNWATCHED_SLOTS`:
/// `generation << 32 | tgid`, where `generation` is the watch generation
/// plus one (0: empty) when the process was found unwatched.
#[map]
static UNWATCHED: Array<u64> = Array::with_max_entries(UNWATCHED_SLOTS, 0);

/// [0]: bumped by user space after each new watched cgroup; [1]: set here
/// on every cgroup migration. Two words, one writer kind each, so user
/// space's read-modify-write cannot undo the kernel's store.
#[map]
static WATCH_GENERATION: Array<u64> = Array::with_max_entries(2, 0);

/// Whether the socket calls of the current process are looked at.
#[inline(always)]
pub fn follows(tgid: u64) -> bool {
    if is_server(tgid) {
        return true;
    }
    let stamp = unwatched_stamp(tgid);
    let slot = (tgid % UNWATCHED_SLOTS as u64) as u32;
    if UNWATCHED.get(slot).is_some_and(|entry| *entry == stamp) {
        return false;
    }
    if watched_cgroup().is_some() {
        return true;
    }
    if let Some(entry) = UNWATCHED.get_ptr_mut(slot) {
        // SAFETY: an 8-byte map value; a racing writer leaves one of two
        // valid entries (or a torn one that matches no process).
        unsafe { *entry = stamp };
    }
    false
}

/// What `UNWATCHED` holds for `tgid` found unwatched in this generation.
/// The generation is read before the cgroup, so a migration or a new
/// watch that lands in between leaves an entry of the older generation.
#[inline(always)]
fn unwatched_stamp(tgid: u64) -> u64 {
    let generation = |index: u32| WATCH_GENERATION.get(index).copied().unwrap_or(0);
    let current = generation(0).wrapping_add(generation(1)).wrapping_add(1);
    current << 32 | (tgid & 0xffff_ffff)
}

#[inline(always)]
fn is_server(tgid: u64) -> bool {
    let (word, byte) = tgid_slot(tgid);
    let marked = |map: &Array<u64>| map.get(word).is_some_and(|value| (value >> (byte * 8)) & 0xff != 0);
    marked(&SERVER_TGIDS) || marked(&SEEDED_TGIDS)
}

/// Marks `tgid` as a server of a tracked connection.
pub fn mark_server(tgid: u64) {
    let (word, byte) = tgid_slot(tgid);
    if let Some(value) = SERVER_TGIDS.get_ptr_mut(word) {
        // SAFETY: byte `byte` (< 8) of an 8-byte map value; a single-byte
        // store leaves the other tgids' bytes alone.
        unsafe { *(value as *mut u8).add(byte as usize) = 1 };
    }
}

/// The current process's cgroup, if it is watched.
#[inline(always)]
pub fn watched_cgroup() -> Option<u64> {
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    WATCHED_CGROUPS.get_ptr(cgroup_id).map(|_| cgroup_id)
}

/// A task moved between cgroups: what `UNWATCHED` knows may be wrong now.
/// The new generation is the time, not a count: two CPUs storing at once
/// each store a value never held before, which a plain store can do
/// (the BPF target has no atomic add in Rust's core).
#[raw_tracepoint(tracepoint = "cgroup_attach_task")]
pub fn cgroup_migrated(_ctx: RawTracePointContext) -> i32 {
    if let Some(generation) = WATCH_GENERATION.get_ptr_mut(1) {
        // SAFETY: an 8-byte map value.
        unsafe { *generation = bpf_ktime_get_ns() };
    }
    0
}

/// A thread exits: forget its process, so a tgid reused later starts
/// unknown. The last thread's exit comes after the last call of any.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn process_exited(_ctx: RawTracePointContext) -> i32 {
    let tgid = bpf_get_current_pid_tgid() >> 32;
    let slot = (tgid % UNWATCHED_SLOTS as u64) as u32;
    if let Some(entry) = UNWATCHED.get_ptr_mut(slot) {
        // SAFETY: an 8-byte map value.
        unsafe {
            if *entry & 0xffff_ffff == tgid {
                *entry = 0;
            }
        }
    }
    0
}
