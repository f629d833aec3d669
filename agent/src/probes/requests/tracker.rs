//! Turns the request probe's events into request outcomes per cgroup: one
//! HTTP/1.1 parser or HTTP/2 stream tracker per connection, created on
//! accept (or on the first request line or HTTP/2 frames of a connection
//! that predates the agent) and dropped on close or after long idleness.
//! Each connection knows its server port (from the listening socket it was
//! accepted on), so outcomes can be counted per port.
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use podgpu_common::{H2Event, IoEvent, IoKind, CAPTURE_SUFFIX};

use super::http1::{looks_like_request, Http1Connection, Io, Outcome};
use super::http2::Http2Connection;
use super::sockets::PortResolver;

/// HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Connections idle this long are forgotten (the kernel map is LRU too).
const IDLE_NS: u64 = 15 * 60 * 1_000_000_000;
const EPIPE: i64 = 32;
const ECONNRESET: i64 = 104;

/// A request outcome with the pod cgroup it happened in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestEvent {
    /// cgroup v2 id of the serving process.
    pub cgroup_id: u64,
    /// Server port of the connection; 0 when it could not be named.
    pub port: u16,
    /// What happened.
    pub outcome: Outcome,
}

#[derive(Debug)]
enum Protocol {
    Http1(Http1Connection),
    /// Streams are tracked from the kernel's frame records (`H2Event`).
    Http2(Http2Connection),
}

#[derive(Debug)]
struct Connection {
    cgroup_id: u64,
    port: u16,
    protocol: Option<Protocol>,
    last_seen_ns: u64,
}

/// Counters the tracker keeps about what it could not follow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrackerStats {
    /// Connections seen (accepted or joined mid-stream).
    pub connections: u64,
    /// Connections recognised as HTTP/2.
    pub http2_connections: u64,
    /// Connections forgotten after idling.
    pub idle_evictions: u64,
}

/// All tracked connections of the node.
#[derive(Debug)]
pub struct Tracker {
    /// foldhash, not SipHash: looked up for every event, keyed by kernel
    /// values no client chooses.
    connections: HashMap<u64, Connection, foldhash::fast::RandomState>,
    stats: TrackerStats,
    outcomes: Vec<Outcome>,
    ports: PortResolver,
}

/// (tgid, fd) of a connection key (`tgid << 32 | fd`).
fn split_key(connection: u64) -> (u32, u32) {
    ((connection >> 32) as u32, connection as u32)
}

impl Tracker {
    /// A tracker naming ports through `proc_root` (the host's /proc).
    pub fn new(proc_root: &Path) -> Self {
        Self {
            connections: HashMap::default(),
            stats: TrackerStats::default(),
            outcomes: Vec::new(),
            ports: PortResolver::new(proc_root),
        }
    }

    /// What the tracker could not follow so far.
    pub fn stats(&self) -> TrackerStats {
        self.stats
    }

    /// Connections currently tracked.
    pub fn len(&self) -> usize {
        self.connections.len()
    }

    /// Whether no connection is tracked.
    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    /// Processes one probe event, appending request events; returns the
    /// server port of the event's connection (0: unknown or untracked).
    pub fn observe(&mut self, event: &IoEvent, out: &mut Vec<RequestEvent>) -> u16 {
        let at = event.timestamp_ns;
        if event.kind == IoKind::Accept as u32 {
            // fd numbers are reused: an accept replaces whatever was there.
            self.stats.connections += 1;
            let (tgid, _) = split_key(event.connection);
            let port = self.ports.listener_port(tgid, event.bytes as u32, Instant::now()).unwrap_or(0);
            self.connections.insert(
                event.connection,
                Connection { cgroup_id: event.cgroup_id, port, protocol: None, last_seen_ns: at },
            );
            return port;
        }
        let prefix = &event.prefix[..(event.prefix_len as usize).min(event.prefix.len())];
        let suffix_len = (event.suffix_len as usize).min(event.suffix.len());
        // The kernel leaves the suffix out when the whole payload fit in
        // the prefix: its last bytes are the suffix.
        let whole_in_prefix = suffix_len == 0 && event.bytes > 0 && prefix.len() as i64 == event.bytes;
        let suffix = if whole_in_prefix {
            &prefix[prefix.len().saturating_sub(CAPTURE_SUFFIX)..]
        } else {
            &event.suffix[..suffix_len]
        };
        let io = match event.kind {
            k if k == IoKind::Read as u32 && event.bytes > 0 => Io::Read { bytes: event.bytes as u64, prefix },
            k if k == IoKind::Read as u32 && event.bytes == 0 => Io::Eof,
            k if k == IoKind::Write as u32 && event.bytes > 0 => {
                Io::Write { bytes: event.bytes as u64, prefix, suffix }
            }
            k if k == IoKind::Write as u32 && (event.bytes == -EPIPE || event.bytes == -ECONNRESET) => Io::WriteError,
            k if k == IoKind::Close as u32 => Io::Close,
            // Errors and unknown kinds move no bytes: no port needed.
            _ => return 0,
        };
        let connection = match self.connections.get_mut(&event.connection) {
            Some(connection) => connection,
            None => {
                // A connection that predates the agent (seeded in the kernel
                // map): join it at its next request line.
                let Io::Read { prefix, .. } = io else { return 0 };
                if !looks_like_request(prefix) && !prefix.starts_with(H2_PREFACE) {
                    return 0;
                }
                self.stats.connections += 1;
                let (tgid, fd) = split_key(event.connection);
                let port = self.ports.socket_port(tgid, fd).unwrap_or(0);
                self.connections.entry(event.connection).or_insert(Connection {
                    cgroup_id: event.cgroup_id,
                    port,
                    protocol: None,
                    last_seen_ns: at,
                })
            }
        };
        connection.last_seen_ns = at;
        if connection.protocol.is_none() {
            match io {
                Io::Read { prefix, .. }
                    if prefix.starts_with(H2_PREFACE) || H2_PREFACE.starts_with(prefix) && !prefix.is_empty() =>
                {
                    self.stats.http2_connections += 1;
                    connection.protocol = Some(Protocol::Http2(Http2Connection::default()));
                }
                Io::Read { prefix, .. } if looks_like_request(prefix) => {
                    connection.protocol = Some(Protocol::Http1(Http1Connection::default()));
                }
                _ => {}
            }
        }
        self.outcomes.clear();
        match connection.protocol.as_mut() {
            Some(Protocol::Http1(http)) => http.observe(at, io, &mut self.outcomes),
            // HTTP/2 data arrives as frame records; here only endings matter.
            Some(Protocol::Http2(http)) if matches!(io, Io::Eof | Io::WriteError | Io::Close) => {
                http.close(at, &mut self.outcomes)
            }
            _ => {}
        }
        let (cgroup_id, port) = (connection.cgroup_id, connection.port);
        out.extend(self.outcomes.iter().map(|&outcome| RequestEvent { cgroup_id, port, outcome }));
        if matches!(io, Io::Close) {
            self.connections.remove(&event.connection);
        }
        port
    }

    /// Processes the HTTP/2 frames of one read or write.
    pub fn observe_h2(&mut self, event: &H2Event, out: &mut Vec<RequestEvent>) {
        let at = event.timestamp_ns;
        let ports = &self.ports;
        let connection = self.connections.entry(event.connection).or_insert_with(|| {
            // Joined mid-stream: the kernel resynchronised on frame headers.
            let (tgid, fd) = split_key(event.connection);
            let port = ports.socket_port(tgid, fd).unwrap_or(0);
            Connection { cgroup_id: event.cgroup_id, port, protocol: None, last_seen_ns: at }
        });
        connection.last_seen_ns = at;
        if !matches!(connection.protocol, Some(Protocol::Http2(_))) {
            self.stats.connections += u64::from(connection.protocol.is_none());
            self.stats.http2_connections += 1;
            connection.protocol = Some(Protocol::Http2(Http2Connection::default()));
        }
        let Some(Protocol::Http2(http)) = connection.protocol.as_mut() else { return };
        let frames = &event.frames[..(event.frame_count as usize).min(event.frames.len())];
        self.outcomes.clear();
        if event.kind == IoKind::H2Read as u32 {
            http.on_read(at, frames, &mut self.outcomes);
        } else {
            http.on_write(at, frames, &mut self.outcomes);
        }
        let (cgroup_id, port) = (connection.cgroup_id, connection.port);
        out.extend(self.outcomes.iter().map(|&outcome| RequestEvent { cgroup_id, port, outcome }));
    }

    /// Forgets connections idle since before `now_ns - IDLE_NS`, aborting
    /// their open requests (the kernel LRU may have evicted them silently).
    pub fn collect_idle(&mut self, now_ns: u64, out: &mut Vec<RequestEvent>) {
        let stale: Vec<u64> = self
            .connections
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.last_seen_ns) > IDLE_NS)
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            if let Some(mut connection) = self.connections.remove(&key) {
                self.stats.idle_evictions += 1;
                self.outcomes.clear();
                match connection.protocol.as_mut() {
                    Some(Protocol::Http1(http)) => http.observe(now_ns, Io::Eof, &mut self.outcomes),
                    Some(Protocol::Http2(http)) => http.close(now_ns, &mut self.outcomes),
                    None => {}
                }
                let (cgroup_id, port) = (connection.cgroup_id, connection.port);
                out.extend(self.outcomes.iter().map(|&outcome| RequestEvent { cgroup_id, port, outcome }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podgpu_common::{CAPTURE_PREFIX, CAPTURE_SUFFIX};

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
        let mut tracker = Tracker::new(Path::new("/nonexistent"));
        let mut out = Vec::new();
        let request = b"GET / HTTP/1.1\r\n\r\n";
        let response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        let mut write = event(IoKind::Write, 1, 20, response.len() as i64, response);
        write.suffix_len = 0;
        for e in [event(IoKind::Accept, 1, 0, 5, b""), event(IoKind::Read, 1, 10, request.len() as i64, request), write]
        {
            tracker.observe(&e, &mut out);
        }
        assert!(matches!(out.last().map(|e| e.outcome), Some(Outcome::Completed(t)) if t.end_ns == 20), "{out:?}");
    }

    /// Accept, a request, its response, close: one start and one
    /// completion attributed to the connection's cgroup.
    #[test]
    fn accepted_connection_lifecycle() {
        let mut tracker = Tracker::new(Path::new("/nonexistent"));
        let mut out = Vec::new();
        let request = b"GET / HTTP/1.1\r\n\r\n";
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        for e in [
            event(IoKind::Accept, 1, 0, 5, b""),
            event(IoKind::Read, 1, 10, request.len() as i64, request),
            event(IoKind::Write, 1, 20, response.len() as i64, response),
            event(IoKind::Close, 1, 30, 0, b""),
        ] {
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
        let mut tracker = Tracker::new(Path::new("/nonexistent"));
        let mut out = Vec::new();
        tracker.observe(&event(IoKind::Accept, 2, 0, 5, b""), &mut out);
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

    /// Idle connections are collected and their open requests aborted.
    #[test]
    fn idle_connections_are_collected() {
        let mut tracker = Tracker::new(Path::new("/nonexistent"));
        let mut out = Vec::new();
        let request = b"GET / HTTP/1.1\r\n\r\n";
        tracker.observe(&event(IoKind::Read, 3, 5, request.len() as i64, request), &mut out);
        assert_eq!(tracker.len(), 1, "mid-stream connection joined at its request line");
        tracker.collect_idle(5 + IDLE_NS + 1, &mut out);
        assert!(tracker.is_empty());
        assert!(matches!(out.last().unwrap().outcome, Outcome::Aborted { .. }));
        assert_eq!(tracker.stats().idle_evictions, 1);
    }
}
