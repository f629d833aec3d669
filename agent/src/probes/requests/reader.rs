//! The reader task: drains the request probe's ring buffer (on wakeups and
//! on a short timer), checks and copies each variable-length record, feeds
//! the per-connection tracker, and sweeps it for missed endings; sends the
//! collector one batch of request outcomes and byte counts per drain.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use podgpu_common::{H2Event, H2Frame, IoEvent, IoKind, H2_EVENT_HEADER, IO_EVENT_HEADER};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::tracker::{self, OpenRequests, RequestEvent, TrackerStats};
use super::{traffic, KernelMaps, ProbeUpdate};
use crate::proc::ProcFs;

/// The host as the tracker's sweeps see it: processes and fds through
/// procfs, connections through the kernel map.
struct HostLiveness<'a> {
    proc: &'a ProcFs,
    kernel: Option<&'a KernelMaps>,
}

impl tracker::Liveness for HostLiveness<'_> {
    fn start_time(&self, tgid: u32) -> Option<u64> {
        self.proc.start_time(tgid)
    }

    fn is_socket(&self, tgid: u32, fd: u32) -> bool {
        match self.proc.fd_target(tgid, fd) {
            Ok(target) => target.to_str().is_some_and(|t| t.starts_with("socket:[")),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
            // Not allowed to look (no ptrace access): cannot tell, keep it.
            Err(_) => true,
        }
    }

    fn kernel_tracks(&self, connection: u64) -> bool {
        self.kernel.is_none_or(|kernel| kernel.tracks(connection))
    }
}

/// What the reader task has done, shared with the collector.
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Events decoded from the ring buffer.
    pub events: AtomicU64,
    /// Malformed ring records (wrong size).
    pub malformed: AtomicU64,
    /// Request events dropped because the collector lagged.
    pub dropped: AtomicU64,
    /// Connections currently followed.
    pub connections: AtomicU64,
    /// HTTP/2 connections recognised.
    pub http2_connections: AtomicU64,
    /// Requests open now per (cgroup, port): a level, replaced whole after
    /// every change, so nothing lost on the way (a full channel, an
    /// unknown cgroup) can leave it wrong.
    pub open_requests: std::sync::Mutex<OpenRequests>,
    /// What the tracker ended on its own (missed endings).
    pub tracker: std::sync::Mutex<TrackerStats>,
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Longest time an event waits in the ring before the reader looks.
const DRAIN_INTERVAL: Duration = Duration::from_millis(20);

/// Bytes (received, sent) per traffic key since the last flush.
type ByteCounts = std::collections::HashMap<tracker::TrafficKey, (u64, u64), foldhash::fast::RandomState>;

/// A ring record of a variable-length event: the event's fields up to
/// `header` bytes, then `count` (the u32 at bytes 36-40, the same place
/// in both event types) items of `item` bytes, at most `max_count`.
/// Copied into `scratch`; `None` for a record too short for what it says
/// it holds.
///
/// # Safety
/// `T` must be a plain-data repr(C) struct, valid for every byte pattern,
/// of at least `header + max_count * item` bytes.
unsafe fn read_record<'a, T>(
    record: &[u8],
    scratch: &'a mut T,
    (header, item, max_count): (usize, usize, usize),
) -> Option<&'a T> {
    let count = u32::from_ne_bytes(record.get(36..40)?.try_into().ok()?) as usize;
    let length = header.checked_add(count.checked_mul(item)?)?;
    if count > max_count || record.len() < length {
        return None;
    }
    // SAFETY: `length` <= the struct's size (the caller's promise and the
    // check above), and any bytes make a valid `T`.
    unsafe { std::ptr::copy_nonoverlapping(record.as_ptr(), (scratch as *mut T).cast::<u8>(), length) };
    Some(scratch)
}

/// The `IoEvent` a ring record holds (it ends after its captured prefix).
fn read_io_event<'a>(record: &[u8], scratch: &'a mut IoEvent) -> Option<&'a IoEvent> {
    // SAFETY: IoEvent is plain data; its prefix holds CAPTURE_PREFIX bytes.
    unsafe { read_record(record, scratch, (IO_EVENT_HEADER, 1, podgpu_common::CAPTURE_PREFIX)) }
}

/// The `H2Event` a ring record holds (it ends after its frames).
fn read_h2_event<'a>(record: &[u8], scratch: &'a mut H2Event) -> Option<&'a H2Event> {
    // SAFETY: H2Event is plain data with room for MAX_H2_FRAMES frames.
    unsafe {
        read_record(record, scratch, (H2_EVENT_HEADER, std::mem::size_of::<H2Frame>(), podgpu_common::MAX_H2_FRAMES))
    }
}

fn drain_ring(
    ring: &mut RingBuf<MapData>,
    (scratch, h2_scratch): (&mut IoEvent, &mut H2Event),
    tracker: &mut tracker::Tracker,
    stats: &ReaderStats,
    outcomes: &mut Vec<RequestEvent>,
    bytes: &mut ByteCounts,
) {
    while let Some(item) = ring.next() {
        // Both record types start with four u64 then `kind`.
        let kind = item.get(32..36).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        if matches!(kind, Some(k) if k == IoKind::H2Read as u32 || k == IoKind::H2Write as u32) {
            let Some(event) = read_h2_event(&item, h2_scratch) else {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            stats.events.fetch_add(1, Ordering::Relaxed);
            tracker.observe_h2(event, outcomes);
            continue;
        }
        let Some(event) = read_io_event(&item, scratch) else {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        stats.events.fetch_add(1, Ordering::Relaxed);
        let counted = tracker.observe(event, outcomes);
        if let (true, Some((port, probe))) = (event.bytes > 0, counted) {
            let counts = bytes.entry((event.cgroup_id, port, probe)).or_default();
            match event.kind {
                k if k == podgpu_common::IoKind::Read as u32 => counts.0 += event.bytes as u64,
                k if k == podgpu_common::IoKind::Write as u32 => counts.1 += event.bytes as u64,
                _ => {}
            }
        }
    }
}

/// Time between tracker sweeps (missed endings, recount of open requests):
/// the bound on how long a lost ending can hold a request open.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Drains the ring buffer whenever it has data, until `shutdown`.
pub async fn run_reader(
    ring: RingBuf<MapData>,
    proc: ProcFs,
    probe_paths: traffic::ProbePaths,
    kernel: Option<KernelMaps>,
    updates: mpsc::Sender<Vec<ProbeUpdate>>,
    stats: Arc<ReaderStats>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and keeps it open, unchanged,
    // for as long as the AsyncFd that owns the ring buffer lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    let mut tracker = tracker::Tracker::new(proc.clone(), probe_paths);
    let host = HostLiveness { proc: &proc, kernel: kernel.as_ref() };
    let mut outcomes = Vec::new();
    let mut bytes = ByteCounts::default();
    let mut scratch = Box::new(IoEvent::zeroed());
    let mut h2_scratch = H2Event::default();
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut ring_drops_seen = kernel.as_ref().map_or(0, KernelMaps::ring_drops);
    // The kernel wakes us only for batches (512 KiB); the timer bounds how
    // stale a quiet connection's events can get.
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = sweep.tick() => {
                let ring_drops = kernel.as_ref().map_or(0, KernelMaps::ring_drops);
                if ring_drops > ring_drops_seen {
                    tracing::debug!(lost = ring_drops - ring_drops_seen, "request ring lost events; open requests resynchronise");
                    tracker.events_lost();
                    ring_drops_seen = ring_drops;
                }
                tracker.sweep(monotonic_ns(), &host, &mut outcomes);
                *stats.tracker.lock().expect("tracker stats poisoned") = tracker.stats();
                *stats.open_requests.lock().expect("open requests poisoned") = tracker.open_requests().clone();
            }
            _ = drain.tick() => drain_ring(ring.get_mut(), (&mut scratch, &mut h2_scratch), &mut tracker, &stats, &mut outcomes, &mut bytes),
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain_ring(guard.get_inner_mut(), (&mut scratch, &mut h2_scratch), &mut tracker, &stats, &mut outcomes, &mut bytes);
                guard.clear_ready();
            }
        }
        if !outcomes.is_empty() {
            *stats.open_requests.lock().expect("open requests poisoned") = tracker.open_requests().clone();
        }
        // One send per drain: per-event channel traffic would cost more
        // than the parsing.
        if !outcomes.is_empty() || !bytes.is_empty() {
            let byte_updates = bytes.drain().map(|((cgroup_id, port, probe), (received, sent))| ProbeUpdate::Bytes {
                cgroup_id,
                port,
                probe,
                received,
                sent,
            });
            let batch: Vec<ProbeUpdate> = outcomes.drain(..).map(ProbeUpdate::Request).chain(byte_updates).collect();
            let count = batch.len() as u64;
            if updates.try_send(batch).is_err() {
                stats.dropped.fetch_add(count, Ordering::Relaxed);
            }
        }
        let tracker_stats = tracker.stats();
        stats.connections.store(tracker.len() as u64, Ordering::Relaxed);
        stats.http2_connections.store(tracker_stats.http2_connections, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes the kernel side writes for an event with `captured`
    /// prefix bytes.
    fn record(captured: &[u8]) -> Vec<u8> {
        let mut event = IoEvent::zeroed();
        event.connection = 42;
        event.bytes = 300;
        event.kind = IoKind::Write as u32;
        event.prefix_len = captured.len() as u32;
        event.suffix_len = 2;
        event.suffix[..2].copy_from_slice(b"\r\n");
        event.prefix[..captured.len()].copy_from_slice(captured);
        // SAFETY: plain-data struct viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&event as *const IoEvent).cast::<u8>(), std::mem::size_of::<IoEvent>())
        };
        bytes[..IO_EVENT_HEADER + captured.len()].to_vec()
    }

    #[test]
    fn a_record_carries_only_its_captured_bytes() {
        let mut scratch = IoEvent::zeroed();
        scratch.prefix.fill(b'x');
        let bytes = record(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(bytes.len(), IO_EVENT_HEADER + 17);
        let event = read_io_event(&bytes, &mut scratch).expect("a whole record");
        assert_eq!((event.connection, event.bytes, event.prefix_len), (42, 300, 17));
        assert_eq!(&event.prefix[..17], b"HTTP/1.1 200 OK\r\n");
        assert_eq!(&event.suffix[..event.suffix_len as usize], b"\r\n");
        assert!(read_io_event(&record(b""), &mut scratch).is_some_and(|event| event.prefix_len == 0));
    }

    #[test]
    fn an_http2_record_carries_only_its_frames() {
        let mut event = H2Event { connection: 9, kind: IoKind::H2Write as u32, frame_count: 2, ..H2Event::default() };
        event.frames[0] = H2Frame { length: 12, stream_id: 1, kind: 1, flags: 4, _pad: [0; 2] };
        event.frames[1] = H2Frame { length: 256, stream_id: 1, kind: 0, flags: 1, _pad: [0; 2] };
        // SAFETY: plain-data struct viewed as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&event as *const H2Event).cast::<u8>(), std::mem::size_of::<H2Event>())
        };
        let record = &bytes[..H2_EVENT_HEADER + 2 * std::mem::size_of::<H2Frame>()];
        let mut scratch = H2Event::default();
        scratch.frames[2].length = 77;
        let read = read_h2_event(record, &mut scratch).expect("a whole record");
        assert_eq!((read.connection, read.frame_count), (9, 2));
        assert_eq!(read.frames[..2], event.frames[..2]);
        assert!(read_h2_event(&record[..record.len() - 1], &mut scratch).is_none(), "a frame cut short");
        let mut lying = bytes.to_vec();
        lying[36..40].copy_from_slice(&(podgpu_common::MAX_H2_FRAMES as u32 + 1).to_ne_bytes());
        lying.resize(lying.len() + 64, 0);
        assert!(read_h2_event(&lying, &mut scratch).is_none(), "more frames than an event holds");
    }

    #[test]
    fn a_record_shorter_than_it_says_is_refused() {
        let mut scratch = IoEvent::zeroed();
        let bytes = record(b"GET / HTTP/1.1\r\n");
        assert!(read_io_event(&bytes[..bytes.len() - 1], &mut scratch).is_none());
        assert!(read_io_event(&bytes[..20], &mut scratch).is_none());
        let mut lying = bytes.clone();
        lying[36..40].copy_from_slice(&(podgpu_common::CAPTURE_PREFIX as u32 + 1).to_ne_bytes());
        lying.resize(std::mem::size_of::<IoEvent>() + 8, 0);
        assert!(read_io_event(&lying, &mut scratch).is_none());
    }
}
