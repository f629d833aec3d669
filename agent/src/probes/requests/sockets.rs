//! A process's TCP sockets as procfs shows them: which fd is which socket
//! inode (`/proc/PID/fd`), and each socket's local port and state
//! (`/proc/PID/net/tcp{,6}`, the process's network namespace).
//!
//! Two uses: finding server-side connections accepted before the agent
//! watched a pod (so long-lived keep-alive connections are followed too),
//! and naming the server port a connection belongs to (`PortResolver`), for
//! triggers that count only some ports.
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::proc::ProcFs;

/// One established server-side connection of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExistingConnection {
    /// Process (thread group) id.
    pub tgid: u32,
    /// The connection's fd in that process.
    pub fd: u32,
}

const TCP_ESTABLISHED: &str = "01";
const TCP_LISTEN: &str = "0A";

/// A TCP socket's local port and whether it listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TcpSocket {
    local_port: u16,
    state: SocketState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SocketState {
    Listening,
    Established,
    Other,
}

/// Parses a `/proc/PID/net/tcp{,6}` table into `sockets` by inode.
fn parse_tcp_table(text: &str, sockets: &mut HashMap<u64, TcpSocket>) {
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 10 {
            continue;
        }
        let Some(local_port) = fields[1].rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok()) else {
            continue;
        };
        let Ok(inode) = fields[9].parse::<u64>() else { continue };
        let state = match fields[3] {
            TCP_LISTEN => SocketState::Listening,
            TCP_ESTABLISHED => SocketState::Established,
            _ => SocketState::Other,
        };
        sockets.insert(inode, TcpSocket { local_port, state });
    }
}

/// Every TCP socket of `pid`'s network namespace, by inode.
fn tcp_sockets(proc: &ProcFs, pid: u32) -> HashMap<u64, TcpSocket> {
    let mut sockets = HashMap::new();
    for table in proc.tcp_tables(pid) {
        parse_tcp_table(&table, &mut sockets);
    }
    sockets
}

/// Established server-side connections of `pids`: established sockets
/// whose local port the same namespace listens on.
pub fn existing_connections(proc: &ProcFs, pids: &[u32]) -> Vec<ExistingConnection> {
    let mut found = Vec::new();
    for &pid in pids {
        let sockets = tcp_sockets(proc, pid);
        let listening: HashSet<u16> =
            sockets.values().filter(|s| s.state == SocketState::Listening).map(|s| s.local_port).collect();
        for (fd, inode) in proc.socket_fds(pid) {
            let Some(socket) = sockets.get(&inode) else { continue };
            if socket.state == SocketState::Established && listening.contains(&socket.local_port) {
                found.push(ExistingConnection { tgid: pid, fd });
            }
        }
    }
    found
}

/// How long a listener's port is trusted before it is looked up again (a
/// process may close a listener and open another on the same fd number).
const LISTENER_TTL: Duration = Duration::from_secs(60);
/// Bound on cached listeners (processes come and go).
const MAX_LISTENERS: usize = 4096;

/// Names the local (server) port of sockets, caching listeners: every
/// connection accepted from one listener shares its port, so a busy server
/// costs one procfs lookup per listener per minute.
#[derive(Debug)]
pub struct PortResolver {
    proc: ProcFs,
    listeners: HashMap<(u32, u32), (Option<u16>, Instant)>,
}

impl PortResolver {
    /// A resolver reading `proc` (the host's /proc).
    pub fn new(proc: ProcFs) -> Self {
        Self { proc, listeners: HashMap::new() }
    }

    /// The port of listening socket `fd` of `tgid` (cached).
    pub fn listener_port(&mut self, tgid: u32, fd: u32, now: Instant) -> Option<u16> {
        if let Some((port, at)) = self.listeners.get(&(tgid, fd)) {
            if now.saturating_duration_since(*at) < LISTENER_TTL {
                return *port;
            }
        }
        if self.listeners.len() >= MAX_LISTENERS {
            self.listeners.retain(|_, (_, at)| now.saturating_duration_since(*at) < LISTENER_TTL);
            if self.listeners.len() >= MAX_LISTENERS {
                self.listeners.clear();
            }
        }
        let port = self.socket_port(tgid, fd);
        self.listeners.insert((tgid, fd), (port, now));
        port
    }

    /// The local port of socket `fd` of `tgid`, looked up now (for
    /// connections joined mid-stream, which have no accept to go by).
    pub fn socket_port(&self, tgid: u32, fd: u32) -> Option<u16> {
        let inode = self.proc.socket_inode(tgid, fd)?;
        tcp_sockets(&self.proc, tgid).get(&inode).map(|s| s.local_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A fake /proc/42 with a listener on 8080 (fd 3), a server-side
    /// connection on it (fd 7), an outbound connection (fd 9) and a
    /// listener on 9090 (fd 4).
    fn fake_proc() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("42");
        fs::create_dir_all(base.join("net")).unwrap();
        fs::create_dir_all(base.join("fd")).unwrap();
        let header =
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let rows = [
            "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1",
            "   1: 0100007F:1F90 0100007F:C000 01 00000000:00000000 00:00000000 00000000     0        0 200 1",
            "   2: 0100007F:D000 0100007F:0050 01 00000000:00000000 00:00000000 00000000     0        0 300 1",
        ];
        fs::write(base.join("net/tcp"), format!("{header}{}\n", rows.join("\n"))).unwrap();
        let row6 = "   0: 00000000000000000000000000000000:2382 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 400 1";
        fs::write(base.join("net/tcp6"), format!("{header}{row6}\n")).unwrap();
        for (fd, inode) in [(3, 100), (7, 200), (9, 300), (4, 400)] {
            std::os::unix::fs::symlink(format!("socket:[{inode}]"), base.join(format!("fd/{fd}"))).unwrap();
        }
        std::os::unix::fs::symlink("/dev/null", base.join("fd/1")).unwrap();
        root
    }

    /// Only established sockets on a listening port count (not outbound
    /// client connections, not listeners themselves).
    #[test]
    fn finds_server_side_established_sockets() {
        let root = fake_proc();
        assert_eq!(
            existing_connections(&ProcFs::new(root.path()), &[42, 43]),
            vec![ExistingConnection { tgid: 42, fd: 7 }]
        );
    }

    /// Listener and connection fds resolve to their local port (IPv4 and
    /// IPv6 tables); non-sockets and unknown processes to nothing; a
    /// listener's answer is cached.
    #[test]
    fn resolves_ports() {
        let root = fake_proc();
        let mut resolver = PortResolver::new(ProcFs::new(root.path()));
        let now = Instant::now();
        assert_eq!(resolver.listener_port(42, 3, now), Some(8080));
        assert_eq!(resolver.listener_port(42, 4, now), Some(9090));
        assert_eq!(resolver.socket_port(42, 7), Some(8080));
        assert_eq!(resolver.socket_port(42, 1), None);
        assert_eq!(resolver.listener_port(43, 3, now), None);
        fs::remove_dir_all(root.path().join("42")).unwrap();
        assert_eq!(resolver.listener_port(42, 3, now), Some(8080), "cached");
        assert_eq!(resolver.listener_port(42, 3, now + LISTENER_TTL), None, "expired and gone");
    }
}
