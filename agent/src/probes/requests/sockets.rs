//! A process's TCP sockets as procfs shows them: which fd is which socket
//! inode (`/proc/PID/fd`), and each socket's local port and state
//! (`/proc/PID/net/tcp{,6}`, the process's network namespace).
//!
//! Two uses: finding server-side connections accepted before the agent
//! watched a pod (so long-lived keep-alive connections are followed too),
//! and what the kernel side could not say about a connection
//! (`PortResolver`): the server port of one joined mid-stream, the peer of
//! an IPv6 one.
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use procfs::net::{TcpNetEntry, TcpState};

use crate::proc::ProcFs;

/// One established server-side connection of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExistingConnection {
    /// Process (thread group) id.
    pub tgid: u32,
    /// The connection's fd in that process.
    pub fd: u32,
}

/// Every TCP socket of `pid`'s network namespace, by inode.
fn tcp_sockets(proc: &ProcFs, pid: u32) -> HashMap<u64, TcpNetEntry> {
    proc.tcp_sockets(pid).into_iter().map(|socket| (socket.inode, socket)).collect()
}

/// Established server-side connections of `pids`: established sockets
/// whose local port the same namespace listens on.
pub fn existing_connections(proc: &ProcFs, pids: &[u32]) -> Vec<ExistingConnection> {
    let mut found = Vec::new();
    for &pid in pids {
        let sockets = tcp_sockets(proc, pid);
        let listening: HashSet<u16> =
            sockets.values().filter(|s| s.state == TcpState::Listen).map(|s| s.local_address.port()).collect();
        for (fd, inode) in proc.socket_fds(pid) {
            let Some(socket) = sockets.get(&inode) else { continue };
            if socket.state == TcpState::Established && listening.contains(&socket.local_address.port()) {
                found.push(ExistingConnection { tgid: pid, fd });
            }
        }
    }
    found
}

/// Looks up, through procfs, what the kernel side does not report.
#[derive(Debug)]
pub struct PortResolver {
    proc: ProcFs,
}

impl PortResolver {
    /// A resolver reading `proc` (the host's /proc).
    pub fn new(proc: ProcFs) -> Self {
        Self { proc }
    }

    fn socket(&self, tgid: u32, fd: u32) -> Option<TcpNetEntry> {
        let inode = self.proc.socket_inode(tgid, fd)?;
        tcp_sockets(&self.proc, tgid).remove(&inode)
    }

    /// The local port of socket `fd` of `tgid`, looked up now (for
    /// connections joined mid-stream, which have no accept to go by).
    pub fn socket_port(&self, tgid: u32, fd: u32) -> Option<u16> {
        self.socket(tgid, fd).map(|socket| socket.local_address.port())
    }

    /// Whether the peer of socket `fd` of `tgid` is on loopback (IPv4
    /// 127/8, `::1`, or IPv4-mapped 127/8); `false` when it cannot be told.
    pub fn peer_is_loopback(&self, tgid: u32, fd: u32) -> bool {
        let Some(socket) = self.socket(tgid, fd) else { return false };
        match socket.remote_address.ip() {
            IpAddr::V4(address) => address.is_loopback(),
            IpAddr::V6(address) => address.is_loopback() || address.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        }
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
        let rows6 = [
            "   0: 00000000000000000000000000000000:2382 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 400 1",
            "   1: 00000000000000000000000001000000:2382 00000000000000000000000001000000:C001 01 00000000:00000000 00:00000000 00000000     0        0 500 1",
            "   2: 00000000000000000000000001000000:2382 000080FE00000000FFFE0000010000FE:C002 01 00000000:00000000 00:00000000 00000000     0        0 600 1",
            "   3: 0000000000000000FFFF00000100007F:2382 0000000000000000FFFF00000100007F:C003 01 00000000:00000000 00:00000000 00000000     0        0 700 1",
        ];
        fs::write(base.join("net/tcp6"), format!("{header}{}\n", rows6.join("\n"))).unwrap();
        for (fd, inode) in [(3, 100), (7, 200), (9, 300), (4, 400), (10, 500), (11, 600), (12, 700)] {
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
        let mut found = existing_connections(&ProcFs::new(root.path()), &[42, 43]);
        found.sort_by_key(|connection| connection.fd);
        let fds: Vec<u32> = found.iter().map(|connection| connection.fd).collect();
        assert_eq!(fds, vec![7, 10, 11, 12]);
    }

    /// Connection fds resolve to their local port (IPv4 and IPv6 tables);
    /// non-sockets and unknown processes to nothing.
    #[test]
    fn resolves_ports() {
        let root = fake_proc();
        let resolver = PortResolver::new(ProcFs::new(root.path()));
        assert_eq!(resolver.socket_port(42, 3), Some(8080));
        assert_eq!(resolver.socket_port(42, 7), Some(8080));
        assert_eq!(resolver.socket_port(42, 10), Some(9090));
        assert_eq!(resolver.socket_port(42, 1), None);
        assert_eq!(resolver.socket_port(43, 3), None);
    }

    /// Peers on IPv4 loopback, `::1` and IPv4-mapped loopback are told
    /// from a link-local IPv6 peer and from nothing.
    #[test]
    fn tells_loopback_peers() {
        let root = fake_proc();
        let resolver = PortResolver::new(ProcFs::new(root.path()));
        assert!(resolver.peer_is_loopback(42, 7), "127.0.0.1");
        assert!(resolver.peer_is_loopback(42, 10), "::1");
        assert!(!resolver.peer_is_loopback(42, 11), "fe80::...");
        assert!(resolver.peer_is_loopback(42, 12), "::ffff:127.0.0.1");
        assert!(!resolver.peer_is_loopback(42, 1), "not a socket");
    }
}
