//! Completion spans (the wait programs of `agent-ebpf/src/spans.rs`): per
//! process, how long it had GPU work outstanding, cumulative, and its
//! fair span time, where each instant with work outstanding counts `1 / n`
//! for the `n` processes outstanding then (`gpu::attribution::spans`
//! splits what launch counts cannot separate by it).
//!
//! Busy time and spans closed come from the kernel's per-process sums,
//! which lose nothing. The fair time needs the spans' overlap, so closed
//! spans come through a ring buffer: when it was full (`spans_lost` grew)
//! the fair times of that read are unknown to the estimator, never made
//! up.
use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::Ebpf;
use podgpu_common::{SpanEvent, SpanState};

use super::ProbeError;
use crate::proc::ProcFs;

/// (program, exported symbol) of the waits: each is probed at entry and
/// at return, attached and detached with the launch entry points (the
/// launch sampler's budget covers both).
pub const WAIT_POINTS: [(&str, &str); 12] = [
    ("cu_ctx_synchronize", "cuCtxSynchronize"),
    ("wait_return", "cuCtxSynchronize"),
    // CUDA 12.5 and later: the context as an argument (NULL: the current).
    ("cu_ctx_synchronize", "cuCtxSynchronize_v2"),
    ("wait_return", "cuCtxSynchronize_v2"),
    ("cu_stream_synchronize", "cuStreamSynchronize"),
    ("wait_return", "cuStreamSynchronize"),
    ("cu_stream_synchronize", "cuStreamSynchronize_ptsz"),
    ("wait_return", "cuStreamSynchronize_ptsz"),
    ("cu_memcpy_dtoh", "cuMemcpyDtoH_v2"),
    ("wait_return", "cuMemcpyDtoH_v2"),
    ("cu_memcpy_dtoh", "cuMemcpyDtoH_v2_ptds"),
    ("wait_return", "cuMemcpyDtoH_v2_ptds"),
];

/// The wait programs, loaded with the launch programs.
pub const WAIT_PROGRAMS: [&str; 4] = ["cu_ctx_synchronize", "cu_stream_synchronize", "cu_memcpy_dtoh", "wait_return"];

const PROCESS_SPANS: &str = "PROCESS_SPANS";
const SPAN_EVENTS: &str = "SPAN_EVENTS";
const SPANS_LOST: &str = "SPANS_LOST";

/// One process's spans so far, as the node reports them.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SpanRow {
    /// Process.
    pub pid: u32,
    /// Seconds with work outstanding (closed spans and the open one).
    pub busy_s: f64,
    /// Fair span time, seconds.
    pub fair_s: f64,
    /// Spans closed.
    pub closed: u64,
}

/// Every process's spans at one read.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SpanTotals {
    /// Processes whose spans count (a first span closed).
    pub rows: Vec<SpanRow>,
    /// Closed spans the ring had no room for, cumulative.
    pub lost: u64,
    /// Waits probed per process since the previous read (for the launch
    /// sampler's budget: each is two traps).
    #[serde(skip)]
    pub waits_since_last_read: HashMap<u32, u64>,
}

/// Reads the spans and integrates the fair time between reads.
pub struct SpanReader {
    events: RingBuf<MapData>,
    /// Fair nanoseconds per process, cumulative.
    fair_ns: HashMap<u32, f64>,
    /// `bpf_ktime_get_ns` of the last read.
    last_read_ns: u64,
    /// Waits per process at the last read.
    waits: HashMap<u32, u64>,
}

impl SpanReader {
    /// Takes the ring out of the launch object (it is read only here).
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        let map = ebpf.take_map(SPAN_EVENTS).ok_or(ProbeError::MissingMap(SPAN_EVENTS))?;
        let events = RingBuf::try_from(map).map_err(|source| ProbeError::Map { name: SPAN_EVENTS, source })?;
        Ok(Self { events, fair_ns: HashMap::new(), last_read_ns: 0, waits: HashMap::new() })
    }

    /// Reads the spans as of `now_ns` (`bpf_ktime_get_ns` time), and
    /// forgets the processes that exited.
    pub fn read(&mut self, ebpf: &mut Ebpf, proc: &ProcFs, now_ns: u64) -> Result<SpanTotals, ProbeError> {
        let mut closed: Vec<SpanEvent> = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= std::mem::size_of::<SpanEvent>() {
                // SAFETY: the ring holds `SpanEvent`s written by our
                // program; read unaligned from the ring's bytes.
                closed.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<SpanEvent>()) });
            }
        }
        let map = ebpf.map_mut(PROCESS_SPANS).ok_or(ProbeError::MissingMap(PROCESS_SPANS))?;
        let mut states: BpfHashMap<_, u32, SpanState> =
            BpfHashMap::try_from(map).map_err(|source| ProbeError::Map { name: PROCESS_SPANS, source })?;
        let live: Vec<(u32, SpanState)> = states.iter().flatten().collect();
        let mut gone = Vec::new();
        let mut intervals: Vec<(u32, u64, u64)> =
            closed.iter().map(|event| (event.tgid, event.start_ns, event.end_ns)).collect();
        let mut rows = Vec::new();
        let mut waits_since_last_read = HashMap::new();
        for (pid, state) in &live {
            if proc.start_time(*pid).is_none() {
                gone.push(*pid);
                continue;
            }
            let before = self.waits.insert(*pid, state.waits).unwrap_or(0);
            waits_since_last_read.insert(*pid, state.waits.saturating_sub(before));
            let open_ns = if state.open_since_ns != 0 { now_ns.saturating_sub(state.open_since_ns) } else { 0 };
            if state.open_since_ns != 0 {
                intervals.push((*pid, state.open_since_ns, now_ns));
            }
            if state.primed != 0 {
                rows.push((*pid, state.busy_ns + open_ns, state.closed));
            }
        }
        for pid in &gone {
            let _ = states.remove(pid);
            self.fair_ns.remove(pid);
            self.waits.remove(pid);
        }
        if self.last_read_ns != 0 {
            for (pid, fair) in fair_shares(&intervals, self.last_read_ns, now_ns) {
                *self.fair_ns.entry(pid).or_default() += fair;
            }
        }
        self.last_read_ns = now_ns;
        let lost = lost(ebpf)?;
        let mut rows: Vec<SpanRow> = rows
            .into_iter()
            .map(|(pid, busy_ns, closed)| SpanRow {
                pid,
                busy_s: busy_ns as f64 / 1e9,
                fair_s: self.fair_ns.get(&pid).copied().unwrap_or(0.0) / 1e9,
                closed,
            })
            .collect();
        rows.sort_by_key(|row| row.pid);
        Ok(SpanTotals { rows, lost, waits_since_last_read })
    }
}

fn lost(ebpf: &Ebpf) -> Result<u64, ProbeError> {
    let map = ebpf.map(SPANS_LOST).ok_or(ProbeError::MissingMap(SPANS_LOST))?;
    let lost: PerCpuArray<_, u64> =
        PerCpuArray::try_from(map).map_err(|source| ProbeError::Map { name: SPANS_LOST, source })?;
    Ok(lost.get(&0, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0))
}

/// Each process's fair nanoseconds in [from, to): its spans (`(pid,
/// start, end)`, clipped to the range and merged per process) share each
/// instant equally with the others outstanding then.
pub fn fair_shares(intervals: &[(u32, u64, u64)], from: u64, to: u64) -> HashMap<u32, f64> {
    // +1 / -1 per process at each clipped span edge.
    let mut edges: Vec<(u64, u32, i32)> = Vec::with_capacity(intervals.len() * 2);
    for &(pid, start, end) in intervals {
        let (start, end) = (start.max(from), end.min(to));
        if start < end {
            edges.push((start, pid, 1));
            edges.push((end, pid, -1));
        }
    }
    edges.sort_unstable();
    // Spans open per process (its own may overlap), and the processes
    // with at least one.
    let mut depth: HashMap<u32, i32> = HashMap::new();
    let mut outstanding: Vec<u32> = Vec::new();
    let mut fair: HashMap<u32, f64> = HashMap::new();
    let mut last = from;
    for (at, pid, step) in edges {
        if at > last && !outstanding.is_empty() {
            let each = (at - last) as f64 / outstanding.len() as f64;
            for &p in &outstanding {
                *fair.entry(p).or_default() += each;
            }
        }
        last = at;
        let open = depth.entry(pid).or_default();
        *open += step;
        match (*open, step) {
            (1, 1) => outstanding.push(pid),
            (0, -1) => outstanding.retain(|&p| p != pid),
            _ => {}
        }
    }
    fair
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alone a process gets all of its span; two overlapping share the
    /// overlap; a process's own overlapping spans count once; what lies
    /// outside the range counts nothing.
    #[test]
    fn overlap_is_shared_equally() {
        let fair = fair_shares(&[(1, 0, 100), (2, 50, 150), (2, 60, 70), (3, 500, 600)], 0, 200);
        assert_eq!(fair[&1], 50.0 + 25.0);
        assert_eq!(fair[&2], 25.0 + 50.0);
        assert!(!fair.contains_key(&3));
        assert_eq!(fair_shares(&[(1, 0, 100)], 40, 60)[&1], 20.0);
    }
}
