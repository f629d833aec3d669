//! Completion spans: per process, how long it had GPU work outstanding.
//!
//! A counted launch opens the process's span if none is open (and notes
//! the stream it went to). A wait that completes the process's work
//! closes it at the wait's return: `cuCtxSynchronize` always;
//! `cuStreamSynchronize(s)` (and a synchronous device-to-host copy, which
//! waits on the default stream) only when every launch of the span went
//! to `s`, since another stream's work may still run. A span a wait
//! cannot close stays open: its time is an upper bound, never too short.
//!
//! While launch accounting samples (launches are not counted all the
//! time), a span's first launch may be missed; a context-wide wait then
//! closes a span reaching back to when the work was last known complete.
//! The first span of each process is not counted: it may have begun
//! before the probes were attached.
//!
//! The wait probes are attached and detached with the launch probes (the
//! launch sampler keeps both within its budget, counting a wait as two
//! traps); a span whose wait fell outside the attached part of a second
//! stays open until a wait that is probed.
//!
//! Closed spans are summed per process in `PROCESS_SPANS` (what bounds a
//! share: never lost) and sent to user space through `SPAN_EVENTS` (for
//! the overlap between processes; a full ring counts `SPANS_LOST`).
//! Threads of one process update its state without a lock: a race can
//! only lose an open (a launch racing a closing wait), which the next
//! launch reopens.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use podgpu_common::{SpanEvent, SpanState, MAX_SPAN_PROCESSES, SPAN_RING_BYTES};

/// Span state per process.
#[map]
static PROCESS_SPANS: HashMap<u32, SpanState> = HashMap::with_max_entries(MAX_SPAN_PROCESSES, 0);

/// Closed spans, for user space.
#[map]
static SPAN_EVENTS: RingBuf = RingBuf::with_byte_size(SPAN_RING_BYTES, 0);

/// Closed spans the ring had no room for, per CPU.
#[map]
static SPANS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per thread inside a wait: [what it waits on (`WAIT_*`), the stream].
/// LRU: a thread killed inside a wait leaves its entry, which ages out
/// instead of filling the map.
#[map]
static PENDING_WAITS: LruHashMap<u64, [u64; 2]> = LruHashMap::with_max_entries(4096, 0);

const WAIT_CONTEXT: u64 = 0;
const WAIT_STREAM: u64 = 1;

/// More than one stream (or one not known).
const MIXED: u32 = 2;

/// Marks a default stream in `span_stream`'s value (stream handles are
/// user addresses, far below it).
const DEFAULT_STREAM: u64 = 1 << 63;

/// The stream a handle names, as spans tell streams apart. The default
/// streams (0, `CU_STREAM_LEGACY` = 1, `CU_STREAM_PER_THREAD` = 2; 0 is
/// per-thread under the `_ptsz` entry points, which share the programs)
/// are taken per calling thread: a wait on a thread's default stream then
/// closes only a span whose launches all came from that thread, and two
/// threads launching on the legacy default stream keep the span open
/// (looser, never too tight).
#[inline(always)]
pub fn span_stream(handle: u64) -> u64 {
    if handle <= 2 {
        DEFAULT_STREAM | (bpf_get_current_pid_tgid() & 0xffff_ffff)
    } else {
        handle
    }
}

/// A counted launch of `tgid` on `stream` (`None`: not known).
#[inline(always)]
pub fn launched(tgid: u32, stream: Option<u64>) {
    // The clock is read only when a span opens: most launches find theirs
    // open already.
    let Some(state) = PROCESS_SPANS.get_ptr_mut(&tgid) else {
        let state = SpanState {
            // SAFETY: helper without arguments.
            open_since_ns: unsafe { bpf_ktime_get_ns() },
            stream: stream.map_or(0, span_stream),
            streams: if stream.is_some() { 1 } else { MIXED },
            ..SpanState::default()
        };
        // A full map leaves this process without spans (it bounds nothing).
        let _ = PROCESS_SPANS.insert(&tgid, &state, 0);
        return;
    };
    // SAFETY: this process's entry; see the module comment on races.
    let state = unsafe { &mut *state };
    if state.open_since_ns == 0 {
        // SAFETY: helper without arguments.
        state.open_since_ns = unsafe { bpf_ktime_get_ns() };
        state.streams = 0;
    }
    match stream.map(span_stream) {
        Some(stream) if state.streams == 0 => {
            state.stream = stream;
            state.streams = 1;
        }
        Some(stream) if state.streams == 1 && state.stream == stream => {}
        _ => state.streams = MIXED,
    }
}

#[inline(always)]
fn wait_entered(what: u64, stream: u64) -> u32 {
    // A full map loses this wait's close: the span stays open (longer).
    let _ = PENDING_WAITS.insert(&bpf_get_current_pid_tgid(), &[what, stream], 0);
    0
}

/// `cuCtxSynchronize()` and `cuCtxSynchronize_v2(ctx)`: all of the
/// context's work is complete at return.
#[uprobe]
pub fn cu_ctx_synchronize(_ctx: ProbeContext) -> u32 {
    wait_entered(WAIT_CONTEXT, 0)
}

/// `cuStreamSynchronize(hStream)` / `_ptsz`.
#[uprobe]
pub fn cu_stream_synchronize(ctx: ProbeContext) -> u32 {
    wait_entered(WAIT_STREAM, span_stream(ctx.arg::<u64>(0).unwrap_or(0)))
}

/// `cuMemcpyDtoH(dst, src, bytes)`: synchronous, it waits for the default
/// stream's work before copying.
#[uprobe]
pub fn cu_memcpy_dtoh(_ctx: ProbeContext) -> u32 {
    wait_entered(WAIT_STREAM, span_stream(0))
}

/// The return of any wait: closes the span if the wait completed all of
/// its work.
#[uretprobe]
pub fn wait_return(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: a value of this map, copied before the entry is removed.
    let Some(&[what, stream]) = (unsafe { PENDING_WAITS.get(&id) }) else {
        return 0;
    };
    let _ = PENDING_WAITS.remove(&id);
    let tgid = (id >> 32) as u32;
    let Some(state) = PROCESS_SPANS.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: this process's entry; see the module comment on races.
    let state = unsafe { &mut *state };
    state.waits += 1;
    // CUresult: a failed wait completed nothing we know of.
    let result: u64 = ctx.ret();
    if result as u32 != 0 {
        return 0;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let completes = what == WAIT_CONTEXT || (state.streams == 1 && state.stream == stream);
    if !completes {
        return 0;
    }
    let start = if state.open_since_ns != 0 {
        state.open_since_ns
    } else if what == WAIT_CONTEXT && state.idle_since_ns != 0 && launches_unseen_since(state.idle_since_ns, now) {
        // Launches were not counted all the time since the work was last
        // complete: it may have been outstanding all along.
        state.idle_since_ns
    } else {
        0
    };
    state.open_since_ns = 0;
    state.streams = 0;
    state.idle_since_ns = now;
    if start == 0 || start >= now {
        return 0;
    }
    if state.primed == 0 {
        state.primed = 1;
        return 0;
    }
    state.busy_ns += now - start;
    state.closed += 1;
    let event = SpanEvent { tgid, pad: 0, start_ns: start, end_ns: now };
    if SPAN_EVENTS.output::<SpanEvent>(&event, 0).is_err() {
        if let Some(lost) = SPANS_LOST.get_ptr_mut(0) {
            // SAFETY: this CPU's slot.
            unsafe { *lost += 1 };
        }
    }
    0
}

/// Whether launch counting was off at any time in [since, now]: it
/// samples (`WINDOW` set) and its window began after `since` or ended
/// before `now`.
#[inline(always)]
fn launches_unseen_since(since: u64, now: u64) -> bool {
    let end = crate::WINDOW.get(1).copied().unwrap_or(0);
    if end == 0 {
        return false;
    }
    let start = crate::WINDOW.get(0).copied().unwrap_or(0);
    start > since || now >= end
}
