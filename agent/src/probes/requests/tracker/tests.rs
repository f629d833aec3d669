//! The tracker against crafted probe events and a fake host: lifecycles,
//! HTTP/2 records, missed endings healed by sweeps, traffic classes.
use super::*;
use podgpu_common::{CAPTURE_PREFIX, CAPTURE_SUFFIX};
use std::path::Path;

fn tracker() -> Tracker {
    Tracker::new(ProcFs::new(Path::new("/nonexistent")), ProbePaths::parse("/health").unwrap())
}

/// A host where every process and socket lives and the kernel tracks
/// everything, unless told otherwise.
#[derive(Default)]
struct FakeHost {
    dead: HashSet<u32>,
    restarted: HashSet<u32>,
    not_sockets: HashSet<(u32, u32)>,
    evicted: HashSet<u64>,
}

impl Liveness for FakeHost {
    fn start_time(&self, tgid: u32) -> Option<u64> {
        (!self.dead.contains(&tgid)).then_some(if self.restarted.contains(&tgid) { 2 } else { 1 })
    }
    fn is_socket(&self, tgid: u32, fd: u32) -> bool {
        !self.not_sockets.contains(&(tgid, fd))
    }
    fn kernel_tracks(&self, connection: u64) -> bool {
        !self.evicted.contains(&connection)
    }
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\n\r\n";

/// Opens one request on connection (tgid, fd) at time `at`.
fn open_one(tracker: &mut Tracker, tgid: u32, fd: u32, at: u64, out: &mut Vec<RequestEvent>) {
    let key = u64::from(tgid) << 32 | u64::from(fd);
    tracker.observe(&event(IoKind::Accept, key, at, 0, b""), out);
    tracker.observe(&event(IoKind::Read, key, at + 1, REQUEST.len() as i64, REQUEST), out);
}

fn event(kind: IoKind, connection: u64, at: u64, bytes: i64, data: &[u8]) -> IoEvent {
    let mut event = IoEvent {
        timestamp_ns: at,
        cgroup_id: 7,
        connection,
        bytes,
        kind: kind as u32,
        prefix_len: data.len().min(CAPTURE_PREFIX) as u32,
        suffix_len: data.len().min(CAPTURE_SUFFIX) as u32,
        segments: 1,
        prefix: [0; CAPTURE_PREFIX],
        suffix: [0; CAPTURE_SUFFIX],
    };
    let n = event.prefix_len as usize;
    event.prefix[..n].copy_from_slice(&data[..n]);
    let s = event.suffix_len as usize;
    event.suffix[..s].copy_from_slice(&data[data.len() - s..]);
    event
}

/// A chunked response in one small write, sent by the kernel without a
/// separate suffix (it fit in the prefix), still ends at its terminator.
#[test]
fn suffix_comes_from_the_prefix_when_left_out() {
    let mut tracker = tracker();
    let mut out = Vec::new();
    let request = b"GET / HTTP/1.1\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
    let mut write = event(IoKind::Write, 1, 20, response.len() as i64, response);
    write.suffix_len = 0;
    for e in [event(IoKind::Accept, 1, 0, 0, b""), event(IoKind::Read, 1, 10, request.len() as i64, request), write] {
        tracker.observe(&e, &mut out);
    }
    assert!(matches!(out.last().map(|e| e.outcome), Some(Outcome::Completed(t)) if t.end_ns == 20), "{out:?}");
}

/// Accept, a request, its response, close: one start and one
/// completion attributed to the connection's cgroup and to the server port
/// the accept reported.
#[test]
fn accepted_connection_lifecycle() {
    let mut tracker = tracker();
    let mut out = Vec::new();
    let request = b"GET / HTTP/1.1\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    tracker.observe(&event(IoKind::Accept, 1, 0, 8000, b""), &mut out);
    tracker.observe(&event(IoKind::Read, 1, 10, request.len() as i64, request), &mut out);
    assert_eq!(tracker.open_requests().get(&(7, 8000, false)), Some(&1));
    for e in [event(IoKind::Write, 1, 20, response.len() as i64, response), event(IoKind::Close, 1, 30, 0, b"")] {
        tracker.observe(&e, &mut out);
    }
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|e| e.cgroup_id == 7));
    assert!(matches!(out[1].outcome, Outcome::Completed(t) if t.end_ns == 20));
    assert!(tracker.is_empty());
}

/// HTTP/2 is recognised by its preface, never parsed as HTTP/1; its
/// streams come from frame records, and a close aborts open streams.
#[test]
fn http2_streams_from_frame_records() {
    use podgpu_common::{H2Frame, MAX_H2_FRAMES};
    let mut tracker = tracker();
    let mut out = Vec::new();
    tracker.observe(&event(IoKind::Accept, 2, 0, 0, b""), &mut out);
    tracker.observe(&event(IoKind::Read, 2, 1, 24, H2_PREFACE), &mut out);
    tracker.observe(&event(IoKind::Write, 2, 2, 9, b"\0\0\0\x04\0\0\0\0\0"), &mut out);
    assert!(out.is_empty());
    assert_eq!(tracker.stats().http2_connections, 1);
    let record = |kind: IoKind, at: u64, frames: &[H2Frame]| {
        let mut all = [H2Frame::default(); MAX_H2_FRAMES];
        all[..frames.len()].copy_from_slice(frames);
        H2Event {
            timestamp_ns: at,
            cgroup_id: 7,
            connection: 2,
            bytes: 1,
            kind: kind as u32,
            frame_count: frames.len() as u32,
            mode: 2,
            _pad: 0,
            frames: all,
        }
    };
    let headers = |id, flags| H2Frame { length: 10, stream_id: id, kind: 1, flags, _pad: [0; 2] };
    tracker.observe_h2(&record(IoKind::H2Read, 3, &[headers(1, 0x5), headers(3, 0x5)]), &mut out);
    tracker.observe_h2(&record(IoKind::H2Write, 4, &[headers(1, 0x5)]), &mut out);
    tracker.observe(&event(IoKind::Close, 2, 5, 0, b""), &mut out);
    assert_eq!(out.len(), 4, "{out:?}");
    assert!(matches!(out[2].outcome, Outcome::Completed(_)));
    assert!(matches!(out[3].outcome, Outcome::Aborted { started_ns: 3, at_ns: 5 }));
}

/// A lost HTTP/2 frame boundary (the kernel's notice: an event without
/// frames, mode unsynced) heals the pod's in-flight level: the stream that
/// is heard from again stays open, the silent one is aborted once the
/// grace period has passed, and the recount agrees.
#[test]
fn a_lost_http2_boundary_heals_the_open_level() {
    use super::super::http2::LOST_SYNC_GRACE_NS;
    use podgpu_common::{conn_mode, H2Frame, MAX_H2_FRAMES};
    let mut tracker = tracker();
    let mut out = Vec::new();
    tracker.observe(&event(IoKind::Accept, 2, 0, 0, b""), &mut out);
    tracker.observe(&event(IoKind::Read, 2, 1, 24, H2_PREFACE), &mut out);
    let record = |kind: IoKind, at: u64, frames: &[H2Frame], mode: u32| {
        let mut all = [H2Frame::default(); MAX_H2_FRAMES];
        all[..frames.len()].copy_from_slice(frames);
        H2Event {
            timestamp_ns: at,
            cgroup_id: 7,
            connection: 2,
            bytes: 1,
            kind: kind as u32,
            frame_count: frames.len() as u32,
            mode,
            _pad: 0,
            frames: all,
        }
    };
    let frame = |kind, id, flags| H2Frame { length: 10, stream_id: id, kind, flags, _pad: [0; 2] };
    tracker.observe_h2(&record(IoKind::H2Read, 3, &[frame(1, 1, 0x5), frame(1, 3, 0x5)], conn_mode::H2), &mut out);
    assert_eq!(tracker.open_requests()[&(7, 0, false)], 2);
    // The write holding stream 1's END_STREAM was not walked.
    tracker.observe_h2(&record(IoKind::H2Write, 10, &[], conn_mode::H2_UNSYNCED), &mut out);
    // Resynchronised: stream 3 is heard from again.
    tracker.observe_h2(&record(IoKind::H2Write, 20, &[frame(0, 3, 0)], conn_mode::H2), &mut out);
    let host = FakeHost::default();
    tracker.sweep(10 + LOST_SYNC_GRACE_NS / 2, &host, &mut out);
    assert_eq!(tracker.open_requests()[&(7, 0, false)], 2, "within the grace period");
    tracker.sweep(11 + LOST_SYNC_GRACE_NS, &host, &mut out);
    assert_eq!(tracker.open_requests()[&(7, 0, false)], 1, "stream 1 expired, stream 3 still open");
    assert_eq!(tracker.stats().http2_streams_expired, 1);
    assert_eq!(tracker.stats().open_request_corrections, 0, "the running level matched the recount");
}

/// Idle connections are collected and their open requests aborted.
#[test]
fn idle_connections_are_collected() {
    let mut tracker = tracker();
    let mut out = Vec::new();
    tracker.observe(&event(IoKind::Read, 3, 5, REQUEST.len() as i64, REQUEST), &mut out);
    assert_eq!(tracker.len(), 1, "mid-stream connection joined at its request line");
    tracker.sweep(5 + IDLE_NS + 1, &FakeHost::default(), &mut out);
    assert!(tracker.is_empty());
    assert!(matches!(out.last().unwrap().outcome, Outcome::Aborted { .. }));
    assert_eq!(tracker.stats().idle_evictions, 1);
    assert!(tracker.open_requests().values().all(|open| *open == 0));
}

/// The open level follows starts and endings; a missed close followed
/// by an accept on the same fd aborts what the old connection held.
#[test]
fn fd_reuse_ends_the_old_connection() {
    let mut tracker = tracker();
    let mut out = Vec::new();
    open_one(&mut tracker, 9, 4, 10, &mut out);
    open_one(&mut tracker, 9, 5, 10, &mut out);
    assert_eq!(tracker.open_requests()[&(7, 0, false)], 2);
    open_one(&mut tracker, 9, 4, 50, &mut out);
    assert_eq!(tracker.open_requests()[&(7, 0, false)], 2, "one aborted, one new");
    assert_eq!(tracker.stats().fd_reuses, 1);
    assert_eq!(out.iter().filter(|e| matches!(e.outcome, Outcome::Aborted { .. })).count(), 1);
}

/// A server killed with requests open (no close syscall ever comes) has
/// them aborted at the next sweep; so does a pid reused by a new process.
#[test]
fn exited_processes_end_their_connections() {
    let mut tracker = tracker();
    let mut out = Vec::new();
    let mut host = FakeHost::default();
    for fd in 4..9 {
        open_one(&mut tracker, 100, fd, 10, &mut out);
    }
    open_one(&mut tracker, 200, 4, 10, &mut out);
    open_one(&mut tracker, 300, 4, 10, &mut out);
    tracker.sweep(20, &host, &mut out);
    assert_eq!(tracker.open_requests()[&(7, 0, false)], 7, "all alive");
    host.dead.insert(100);
    host.restarted.insert(300);
    tracker.sweep(30, &host, &mut out);
    assert_eq!(tracker.open_requests()[&(7, 0, false)], 1);
    assert_eq!(tracker.stats().process_exits, 6);
    assert_eq!(tracker.len(), 1);
}

/// A quiet connection with an open request whose fd stopped being a
/// socket, or which the kernel map dropped, is ended; busy connections
/// and connections with nothing open are not checked.
#[test]
fn lost_fds_and_kernel_evictions_end_quiet_connections() {
    let mut tracker = tracker();
    let mut out = Vec::new();
    let mut host = FakeHost::default();
    open_one(&mut tracker, 1, 4, 0, &mut out);
    open_one(&mut tracker, 1, 5, 0, &mut out);
    open_one(&mut tracker, 1, 6, 0, &mut out);
    host.not_sockets.insert((1, 4));
    host.evicted.insert(1 << 32 | 5);
    tracker.sweep(QUIET_NS / 2, &host, &mut out);
    assert_eq!(tracker.open_requests()[&(7, 0, false)], 3, "not quiet yet");
    tracker.sweep(QUIET_NS + 10, &host, &mut out);
    assert_eq!(tracker.open_requests()[&(7, 0, false)], 1);
    assert_eq!((tracker.stats().fds_gone, tracker.stats().kernel_evictions), (1, 1));
}

/// After the kernel lost events, a keep-alive connection whose
/// response end was lost resynchronises at its next request line; a
/// pipelined request on a healthy connection is still pipelined.
#[test]
fn lost_events_resynchronise_at_the_next_request() {
    let mut tracker = tracker();
    let mut out = Vec::new();
    open_one(&mut tracker, 1, 4, 0, &mut out);
    open_one(&mut tracker, 1, 5, 0, &mut out);
    let (lossy, healthy) = (1u64 << 32 | 4, 1u64 << 32 | 5);
    tracker.events_lost();
    // The healthy connection's response arrives after the loss.
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    tracker.observe(&event(IoKind::Write, healthy, 5, response.len() as i64, response), &mut out);
    tracker.observe(&event(IoKind::Read, healthy, 6, REQUEST.len() as i64, REQUEST), &mut out);
    tracker.observe(&event(IoKind::Read, healthy, 7, REQUEST.len() as i64, REQUEST), &mut out);
    assert_eq!(tracker.open_requests()[&(7, 0, false)], 3, "lossy 1 + healthy pipelined 2");
    tracker.observe(&event(IoKind::Read, lossy, 8, REQUEST.len() as i64, REQUEST), &mut out);
    assert_eq!(tracker.open_requests()[&(7, 0, false)], 3, "lossy: old one aborted, new one open");
    assert_eq!(tracker.stats().resyncs, 1);
    assert!(matches!(out.iter().rev().nth(1).map(|e| e.outcome), Some(Outcome::Aborted { started_ns: 1, .. })));
}

/// Requests for probe paths are counted apart, on their own key; the
/// class follows the connection's request lines.
#[test]
fn probe_requests_are_counted_apart() {
    let mut tracker = tracker();
    let mut out = Vec::new();
    let health = b"GET /health HTTP/1.1\r\n\r\n";
    tracker.observe(&event(IoKind::Accept, 5, 0, 0, b""), &mut out);
    tracker.observe(&event(IoKind::Read, 5, 1, health.len() as i64, health), &mut out);
    assert_eq!(tracker.open_requests().get(&(7, 0, true)), Some(&1));
    assert!(out.iter().all(|e| e.probe));
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    tracker.observe(&event(IoKind::Write, 5, 2, response.len() as i64, response), &mut out);
    tracker.observe(&event(IoKind::Read, 5, 3, REQUEST.len() as i64, REQUEST), &mut out);
    assert_eq!(tracker.open_requests().get(&(7, 0, false)), Some(&1), "the next request is inference");
    assert!(!out.last().unwrap().probe);
}

/// A connection from a loopback peer into a process with its own
/// network namespace (another container of the pod, e.g. a sidecar)
/// is not counted; in the host's network namespace it is.
#[test]
fn intra_pod_hops_are_not_counted() {
    let proc_root = tempfile::tempdir().unwrap();
    for (pid, namespace) in [(2, "net:[1]"), (8, "net:[1]"), (9, "net:[2]")] {
        let dir = proc_root.path().join(format!("{pid}/ns"));
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(namespace, dir.join("net")).unwrap();
    }
    let mut tracker = Tracker::new(ProcFs::new(proc_root.path()), ProbePaths::default());
    let mut loopback_peer = [0u8; 16];
    loopback_peer[..2].copy_from_slice(&2u16.to_ne_bytes());
    loopback_peer[4..8].copy_from_slice(&[127, 0, 0, 1]);
    let mut out = Vec::new();
    for tgid in [8u64, 9] {
        let key = tgid << 32 | 4;
        let counted = tracker.observe(&event(IoKind::Accept, key, 0, 0, &loopback_peer), &mut out);
        assert_eq!(counted.is_none(), tgid == 9);
        tracker.observe(&event(IoKind::Read, key, 1, REQUEST.len() as i64, REQUEST), &mut out);
    }
    assert_eq!(out.len(), 1, "only the host-network server's request: {out:?}");
    assert_eq!(tracker.open_requests().values().sum::<u64>(), 1);
    assert_eq!(tracker.stats().intra_pod_connections, 1);
}
