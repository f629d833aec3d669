//! Turns the request probe's I/O events into request outcomes per cgroup:
//! one HTTP/1.1 parser per tracked connection, created on accept (or on the
//! first request line of a connection that predates the agent) and dropped
//! on close or after long idleness.
use std::collections::HashMap;

use podgpu_common::{IoEvent, IoKind};

use super::http1::{looks_like_request, Http1Connection, Io, Outcome};

/// HTTP/2 connection preface: such connections are recognised and skipped
/// until the HTTP/2 decoder lands.
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
    /// What happened.
    pub outcome: Outcome,
}

#[derive(Debug)]
enum Protocol {
    Http1(Http1Connection),
    /// Recognised but not decoded (HTTP/2 until its decoder lands).
    Skipped,
}

#[derive(Debug)]
struct Connection {
    cgroup_id: u64,
    protocol: Option<Protocol>,
    last_seen_ns: u64,
}

/// Counters the tracker keeps about what it could not follow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrackerStats {
    /// Connections seen (accepted or joined mid-stream).
    pub connections: u64,
    /// Connections recognised as HTTP/2 and not decoded.
    pub http2_connections_skipped: u64,
    /// Connections forgotten after idling.
    pub idle_evictions: u64,
}

/// All tracked connections of the node.
#[derive(Debug, Default)]
pub struct Tracker {
    connections: HashMap<u64, Connection>,
    stats: TrackerStats,
    outcomes: Vec<Outcome>,
}

impl Tracker {
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

    /// Processes one probe event, appending request events.
    pub fn observe(&mut self, event: &IoEvent, out: &mut Vec<RequestEvent>) {
        let at = event.timestamp_ns;
        if event.kind == IoKind::Accept as u32 {
            // fd numbers are reused: an accept replaces whatever was there.
            self.stats.connections += 1;
            self.connections
                .insert(event.connection, Connection { cgroup_id: event.cgroup_id, protocol: None, last_seen_ns: at });
            return;
        }
        let prefix = &event.prefix[..(event.prefix_len as usize).min(event.prefix.len())];
        let suffix_len = (event.suffix_len as usize).min(event.suffix.len());
        let suffix = &event.suffix[..suffix_len];
        let io = match event.kind {
            k if k == IoKind::Read as u32 && event.bytes > 0 => Io::Read { bytes: event.bytes as u64, prefix },
            k if k == IoKind::Read as u32 && event.bytes == 0 => Io::Eof,
            k if k == IoKind::Write as u32 && event.bytes > 0 => {
                Io::Write { bytes: event.bytes as u64, prefix, suffix }
            }
            k if k == IoKind::Write as u32 && (event.bytes == -EPIPE || event.bytes == -ECONNRESET) => Io::WriteError,
            k if k == IoKind::Close as u32 => Io::Close,
            _ => return,
        };
        let connection = match self.connections.get_mut(&event.connection) {
            Some(connection) => connection,
            None => {
                // A connection that predates the agent (seeded in the kernel
                // map): join it at its next request line.
                let Io::Read { prefix, .. } = io else { return };
                if !looks_like_request(prefix) && !prefix.starts_with(H2_PREFACE) {
                    return;
                }
                self.stats.connections += 1;
                self.connections.entry(event.connection).or_insert(Connection {
                    cgroup_id: event.cgroup_id,
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
                    self.stats.http2_connections_skipped += 1;
                    connection.protocol = Some(Protocol::Skipped);
                }
                Io::Read { prefix, .. } if looks_like_request(prefix) => {
                    connection.protocol = Some(Protocol::Http1(Http1Connection::default()));
                }
                _ => {}
            }
        }
        if let Some(Protocol::Http1(http)) = connection.protocol.as_mut() {
            self.outcomes.clear();
            http.observe(at, io, &mut self.outcomes);
            let cgroup_id = connection.cgroup_id;
            out.extend(self.outcomes.iter().map(|&outcome| RequestEvent { cgroup_id, outcome }));
        }
        if matches!(io, Io::Close) {
            self.connections.remove(&event.connection);
        }
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
                if let Some(Protocol::Http1(http)) = connection.protocol.as_mut() {
                    self.outcomes.clear();
                    http.observe(now_ns, Io::Eof, &mut self.outcomes);
                    out.extend(
                        self.outcomes.iter().map(|&outcome| RequestEvent { cgroup_id: connection.cgroup_id, outcome }),
                    );
                }
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

    /// Accept, a request, its response, close: one start and one
    /// completion attributed to the connection's cgroup.
    #[test]
    fn accepted_connection_lifecycle() {
        let mut tracker = Tracker::default();
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

    /// HTTP/2 is recognised and skipped (counted), never parsed as HTTP/1.
    #[test]
    fn http2_is_skipped_and_counted() {
        let mut tracker = Tracker::default();
        let mut out = Vec::new();
        tracker.observe(&event(IoKind::Accept, 2, 0, 5, b""), &mut out);
        tracker.observe(&event(IoKind::Read, 2, 1, 24, H2_PREFACE), &mut out);
        tracker.observe(&event(IoKind::Write, 2, 2, 9, b"\0\0\0\x04\0\0\0\0\0"), &mut out);
        assert!(out.is_empty());
        assert_eq!(tracker.stats().http2_connections_skipped, 1);
    }

    /// Idle connections are collected and their open requests aborted.
    #[test]
    fn idle_connections_are_collected() {
        let mut tracker = Tracker::default();
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
