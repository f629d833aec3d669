//! Turns the request probe's events into request outcomes per cgroup: one
//! HTTP/1.1 parser or HTTP/2 stream tracker per connection, created on
//! accept (or on the first request line or HTTP/2 frames of a connection
//! that predates the agent) and dropped when the connection ends. Each
//! connection knows its server port (the kernel side reports it), so
//! outcomes can be counted per port.
//!
//! The tracker is also the source of truth for requests in flight: it keeps
//! the number of open requests per (cgroup, port) in step with every
//! outcome it emits, and a connection whose ending the probe never reported
//! is ended here, aborting its open requests, by one of these rules:
//! - an accept on a (tgid, fd) already tracked (the fd was reused; the
//!   kernel side tells sockets apart, so this holds even when the close
//!   was never seen);
//! - its process exited (checked every sweep; a SIGKILLed server closes its
//!   sockets without a close syscall);
//! - it has open requests, has been quiet since the last sweep, and its fd
//!   is no longer a socket, or the kernel no longer tracks it (LRU eviction);
//! - it idled for 15 minutes.
//!
//! Every sweep also recounts the open requests from the parsers themselves,
//! so the published level can never drift from what the parsers hold.
//!
//! Events lost inside the kernel (a full ring buffer) may have carried a
//! response's end. Then every HTTP/1.1 connection with open requests is
//! marked suspect (`events_lost`), and a suspect connection resynchronises
//! at its next request line: requests still open then are aborted instead
//! of being taken as pipelined. (HTTP/2 streams are not resynchronised this
//! way; a lost END_STREAM is ended with its connection.)
use std::collections::{HashMap, HashSet};

use podgpu_common::{conn_mode, H2Event, IoEvent, IoKind, CAPTURE_SUFFIX};

use super::http1::{looks_like_request, Http1Connection, Io, Outcome};
use super::http2::Http2Connection;
use super::sockets::PortResolver;
use super::traffic::{peer_of, Peer, ProbePaths};
use crate::proc::ProcFs;

/// HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Connections idle this long are forgotten (the kernel map is LRU too).
const IDLE_NS: u64 = 15 * 60 * 1_000_000_000;
/// A connection with open requests and no event for this long has its fd
/// and kernel entry checked at the next sweep.
const QUIET_NS: u64 = 1_000_000_000;
const EPIPE: i64 = 32;
const ECONNRESET: i64 = 104;

/// A request outcome with the pod cgroup it happened in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestEvent {
    /// cgroup v2 id of the serving process.
    pub cgroup_id: u64,
    /// Server port of the connection; 0 when it could not be named.
    pub port: u16,
    /// Health-check or metrics-scrape traffic (`traffic::ProbePaths`).
    pub probe: bool,
    /// What happened.
    pub outcome: Outcome,
}

/// Where a connection's requests are counted: cgroup id, server port, and
/// whether they are probe traffic.
pub type TrafficKey = (u64, u16, bool);

/// Open requests per `TrafficKey`: the level that `requests_in_flight` is
/// read from (keys may hold 0). foldhash: updated twice per request.
pub type OpenRequests = HashMap<TrafficKey, u64, foldhash::fast::RandomState>;

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
    /// Events may have been lost while requests were open.
    suspect: bool,
    /// Its requests are health checks or metrics scrapes.
    probe: bool,
    /// Accepted from another container of the same pod (a sidecar's hop):
    /// its requests were counted where they entered the pod.
    internal: bool,
}

impl Connection {
    fn new(cgroup_id: u64, port: u16, at_ns: u64) -> Self {
        Self { cgroup_id, port, protocol: None, last_seen_ns: at_ns, suspect: false, probe: false, internal: false }
    }

    /// Where its requests and bytes are counted (`None`: nowhere).
    fn counted_as(&self) -> Option<TrafficKey> {
        (!self.internal).then_some((self.cgroup_id, self.port, self.probe))
    }

    fn open_requests(&self) -> usize {
        match &self.protocol {
            Some(Protocol::Http1(http)) => http.in_flight(),
            Some(Protocol::Http2(http)) => http.in_flight(),
            None => 0,
        }
    }
}

/// Why a connection stopped being tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// The probe saw its close.
    Closed,
    /// An accept reused its (tgid, fd): its close was missed.
    FdReused,
    /// Its process is gone.
    ProcessExited,
    /// Its fd is no longer a socket: its close was missed.
    FdGone,
    /// The kernel map no longer holds it: nothing more will be seen.
    KernelEvicted,
    /// No event for `IDLE_NS`.
    Idle,
}

/// Counters the tracker keeps about connections it ended on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrackerStats {
    /// Connections seen (accepted or joined mid-stream).
    pub connections: u64,
    /// Connections recognised as HTTP/2.
    pub http2_connections: u64,
    /// Connections forgotten after idling.
    pub idle_evictions: u64,
    /// Connections replaced by an accept on the same (tgid, fd).
    pub fd_reuses: u64,
    /// Connections ended because their process exited.
    pub process_exits: u64,
    /// Connections ended because their fd was no longer a socket.
    pub fds_gone: u64,
    /// Connections ended because the kernel map dropped them.
    pub kernel_evictions: u64,
    /// Suspect HTTP/1.1 connections resynchronised at a request line.
    pub resyncs: u64,
    /// HTTP/2 streams ended because nothing of them was seen for the
    /// grace period after the kernel lost the connection's frame boundary.
    pub http2_streams_expired: u64,
    /// Connections from another container of the same pod, not counted.
    pub intra_pod_connections: u64,
    /// Sweeps whose recount of open requests differed from the running
    /// level (should stay 0; a non-zero value means an ending was lost
    /// between parser and level and has now been healed).
    pub open_request_corrections: u64,
}

/// What the tracker asks the host when it sweeps: whether processes and
/// connections it follows still exist.
pub trait Liveness {
    /// Start time of process `tgid` (`None`: gone).
    fn start_time(&self, tgid: u32) -> Option<u64>;
    /// Whether `fd` of `tgid` is (still) a socket.
    fn is_socket(&self, tgid: u32, fd: u32) -> bool;
    /// Whether the kernel still follows `connection` (`tgid << 32 | fd`).
    fn kernel_tracks(&self, connection: u64) -> bool;
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
    proc: ProcFs,
    probe_paths: ProbePaths,
    open: OpenRequests,
    /// Start time of each process that owns tracked connections, as first
    /// seen: a different one later means the pid was reused.
    processes: HashMap<u32, u64>,
    /// Whether each server process has a network namespace of its own (a
    /// pod's), where a loopback peer is another container of the pod.
    private_network: HashMap<u32, bool>,
}

/// (tgid, fd) of a connection key (`tgid << 32 | fd`).
fn split_key(connection: u64) -> (u32, u32) {
    ((connection >> 32) as u32, connection as u32)
}

/// Hands `outcomes` on as request events of `key`, keeping the
/// open-request level in step (`None`: not counted, dropped).
fn deliver(open: &mut OpenRequests, outcomes: &mut Vec<Outcome>, key: Option<TrafficKey>, out: &mut Vec<RequestEvent>) {
    let Some(key @ (cgroup_id, port, probe)) = key.filter(|_| !outcomes.is_empty()) else {
        outcomes.clear();
        return;
    };
    // Entries stay at 0 rather than being removed: a keep-alive
    // connection goes 0 -> 1 -> 0 on every request.
    let level = open.entry(key).or_default();
    for outcome in outcomes.drain(..) {
        match outcome {
            Outcome::Started { .. } => *level += 1,
            Outcome::Completed(_) | Outcome::Aborted { .. } => *level = level.saturating_sub(1),
        }
        out.push(RequestEvent { cgroup_id, port, probe, outcome });
    }
}

impl Tracker {
    /// A tracker naming ports through `proc` (the host's /proc) and
    /// counting requests for `probe_paths` as probe traffic.
    pub fn new(proc: ProcFs, probe_paths: ProbePaths) -> Self {
        Self {
            connections: HashMap::default(),
            stats: TrackerStats::default(),
            outcomes: Vec::new(),
            ports: PortResolver::new(proc.clone()),
            proc,
            probe_paths,
            open: OpenRequests::default(),
            processes: HashMap::new(),
            private_network: HashMap::new(),
        }
    }

    /// Whether `tgid` has a network namespace of its own (cached).
    fn in_private_network(&mut self, tgid: u32) -> bool {
        let proc = &self.proc;
        *self.private_network.entry(tgid).or_insert_with(|| proc.has_own_network(tgid).unwrap_or(false))
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

    /// Requests open now, per (cgroup, port).
    pub fn open_requests(&self) -> &OpenRequests {
        &self.open
    }

    /// Processes one probe event, appending request events; returns where
    /// the event's bytes count (port 0: unknown or untracked; `None`: not
    /// at all, an intra-pod hop).
    pub fn observe(&mut self, event: &IoEvent, out: &mut Vec<RequestEvent>) -> Option<(u16, bool)> {
        let at = event.timestamp_ns;
        let prefix = &event.prefix[..(event.prefix_len as usize).min(event.prefix.len())];
        if event.kind == IoKind::Accept as u32 {
            // fd numbers are reused: an accept on a tracked (tgid, fd)
            // means that connection's close was missed.
            if self.connections.contains_key(&event.connection) {
                self.end(event.connection, at, Ending::FdReused, out);
            }
            self.stats.connections += 1;
            let (tgid, fd) = split_key(event.connection);
            let port = u16::try_from(event.bytes).unwrap_or(0);
            let mut connection = Connection::new(event.cgroup_id, port, at);
            // The prefix holds the peer's address; procfs knows the IPv6
            // ones the kernel side does not read.
            let loopback = match peer_of(prefix) {
                Peer::Loopback => true,
                Peer::Remote => false,
                Peer::Unknown => self.ports.peer_is_loopback(tgid, fd),
            };
            if loopback && self.in_private_network(tgid) {
                connection.internal = true;
                self.stats.intra_pod_connections += 1;
            }
            let counted = connection.counted_as();
            self.connections.insert(event.connection, connection);
            return counted.map(|(_, port, probe)| (port, probe));
        }
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
            _ => return Some((0, false)),
        };
        if matches!(io, Io::Close) {
            let counted = self.connections.get(&event.connection).map_or(Some((0, 0, false)), Connection::counted_as);
            self.end(event.connection, at, Ending::Closed, out);
            return counted.map(|(_, port, probe)| (port, probe));
        }
        let connection = match self.connections.get_mut(&event.connection) {
            Some(connection) => connection,
            None => {
                // A connection that predates the agent (seeded in the kernel
                // map): join it at its next request line.
                let Io::Read { prefix, .. } = io else { return Some((0, false)) };
                if !looks_like_request(prefix) && !prefix.starts_with(H2_PREFACE) {
                    return Some((0, false));
                }
                self.stats.connections += 1;
                let (tgid, fd) = split_key(event.connection);
                let port = self.ports.socket_port(tgid, fd).unwrap_or(0);
                self.connections.entry(event.connection).or_insert(Connection::new(event.cgroup_id, port, at))
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
        // The class follows the connection's request lines; it changes
        // only between requests, so a request ends in the class it began.
        if let Io::Read { prefix, .. } = io {
            if looks_like_request(prefix) && connection.open_requests() == 0 {
                connection.probe = self.probe_paths.matches_request(prefix);
            }
        }
        if connection.suspect {
            match (connection.protocol.as_mut(), io) {
                (Some(Protocol::Http1(http)), Io::Read { prefix, .. })
                    if looks_like_request(prefix) && http.in_flight() > 0 =>
                {
                    // What is still open was answered in events we lost.
                    http.observe(at, Io::Eof, &mut self.outcomes);
                    self.stats.resyncs += 1;
                    connection.suspect = false;
                }
                _ => connection.suspect = connection.open_requests() > 0,
            }
        }
        match connection.protocol.as_mut() {
            Some(Protocol::Http1(http)) => http.observe(at, io, &mut self.outcomes),
            // HTTP/2 data arrives as frame records; here only endings matter.
            Some(Protocol::Http2(http)) if matches!(io, Io::Eof | Io::WriteError) => http.close(at, &mut self.outcomes),
            _ => {}
        }
        let counted = connection.counted_as();
        deliver(&mut self.open, &mut self.outcomes, counted, out);
        counted.map(|(_, port, probe)| (port, probe))
    }

    /// Processes the HTTP/2 frames of one read or write.
    pub fn observe_h2(&mut self, event: &H2Event, out: &mut Vec<RequestEvent>) {
        let at = event.timestamp_ns;
        let ports = &self.ports;
        let connection = self.connections.entry(event.connection).or_insert_with(|| {
            // Joined mid-stream: the kernel resynchronised on frame headers.
            let (tgid, fd) = split_key(event.connection);
            let port = ports.socket_port(tgid, fd).unwrap_or(0);
            Connection::new(event.cgroup_id, port, at)
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
        if event.mode == conn_mode::H2_UNSYNCED {
            // Bytes after these frames were not walked (see `http2`).
            http.lost_sync(at);
        }
        let counted = connection.counted_as();
        deliver(&mut self.open, &mut self.outcomes, counted, out);
    }

    /// The kernel lost events (its ring was full): connections with open
    /// requests may have missed their endings.
    pub fn events_lost(&mut self) {
        for connection in self.connections.values_mut() {
            connection.suspect = connection.open_requests() > 0;
        }
    }

    /// Stops tracking `key`: a seen close completes a response delimited by
    /// it; any other ending aborts whatever was open.
    fn end(&mut self, key: u64, at_ns: u64, why: Ending, out: &mut Vec<RequestEvent>) {
        let Some(mut connection) = self.connections.remove(&key) else { return };
        match why {
            Ending::Closed => {}
            Ending::FdReused => self.stats.fd_reuses += 1,
            Ending::ProcessExited => self.stats.process_exits += 1,
            Ending::FdGone => self.stats.fds_gone += 1,
            Ending::KernelEvicted => self.stats.kernel_evictions += 1,
            Ending::Idle => self.stats.idle_evictions += 1,
        }
        self.outcomes.clear();
        match connection.protocol.as_mut() {
            Some(Protocol::Http1(http)) => {
                let io = if why == Ending::Closed { Io::Close } else { Io::Eof };
                http.observe(at_ns, io, &mut self.outcomes)
            }
            Some(Protocol::Http2(http)) => http.close(at_ns, &mut self.outcomes),
            None => {}
        }
        deliver(&mut self.open, &mut self.outcomes, connection.counted_as(), out);
    }

    /// Ends the connections whose ending the probe did not report (see the
    /// module doc) and recounts the open requests. Run about once a second.
    pub fn sweep(&mut self, now_ns: u64, host: &impl Liveness, out: &mut Vec<RequestEvent>) {
        let tgids: HashSet<u32> = self.connections.keys().map(|key| split_key(*key).0).collect();
        self.processes.retain(|tgid, _| tgids.contains(tgid));
        self.private_network.retain(|tgid, _| tgids.contains(tgid));
        let mut exited = HashSet::new();
        for tgid in tgids {
            match (self.processes.get(&tgid), host.start_time(tgid)) {
                (Some(known), Some(now)) if *known == now => {}
                (None, Some(now)) => {
                    self.processes.insert(tgid, now);
                }
                _ => {
                    self.processes.remove(&tgid);
                    exited.insert(tgid);
                }
            }
        }
        let ended: Vec<(u64, Ending)> = self
            .connections
            .iter()
            .filter_map(|(&key, connection)| {
                let (tgid, fd) = split_key(key);
                if exited.contains(&tgid) {
                    return Some((key, Ending::ProcessExited));
                }
                let quiet_ns = now_ns.saturating_sub(connection.last_seen_ns);
                if quiet_ns > IDLE_NS {
                    return Some((key, Ending::Idle));
                }
                if connection.open_requests() == 0 || quiet_ns < QUIET_NS {
                    return None;
                }
                if !host.is_socket(tgid, fd) {
                    Some((key, Ending::FdGone))
                } else if !host.kernel_tracks(key) {
                    Some((key, Ending::KernelEvicted))
                } else {
                    None
                }
            })
            .collect();
        for (key, why) in ended {
            self.end(key, now_ns, why, out);
        }
        for connection in self.connections.values_mut() {
            let Some(Protocol::Http2(http)) = connection.protocol.as_mut() else { continue };
            self.outcomes.clear();
            self.stats.http2_streams_expired += http.expire_unconfirmed(now_ns, &mut self.outcomes);
            deliver(&mut self.open, &mut self.outcomes, connection.counted_as(), out);
        }
        let mut recount = OpenRequests::default();
        for connection in self.connections.values() {
            let open = connection.open_requests() as u64;
            if let (true, Some(key)) = (open > 0, connection.counted_as()) {
                *recount.entry(key).or_default() += open;
            }
        }
        // Keys of connections that are gone go with them.
        self.open.retain(|_, open| *open > 0);
        if recount != self.open {
            self.stats.open_request_corrections += 1;
            self.open = recount;
        }
    }
}

#[cfg(test)]
mod tests;
