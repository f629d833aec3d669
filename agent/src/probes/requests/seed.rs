//! Finds server-side connections that were accepted before the agent
//! started watching a pod, so the probe can follow them too (long-lived
//! keep-alive connections from a gateway would otherwise stay invisible).
//!
//! A socket fd of a process counts when its TCP connection is established
//! and its local port is one the same network namespace listens on.
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;

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

/// Parses `/proc/PID/net/tcp{,6}`: (inode -> local port) of established
/// sockets, and the set of listening ports.
fn parse_tcp_table(text: &str, established: &mut HashMap<u64, u16>, listening: &mut HashSet<u16>) {
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 10 {
            continue;
        }
        let Some(port) = fields[1].rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok()) else {
            continue;
        };
        match fields[3] {
            TCP_LISTEN => {
                listening.insert(port);
            }
            TCP_ESTABLISHED => {
                if let Ok(inode) = fields[9].parse::<u64>() {
                    established.insert(inode, port);
                }
            }
            _ => {}
        }
    }
}

/// Established server-side connections of `pids`, read from `proc_root`.
pub fn existing_connections(proc_root: &Path, pids: &[u32]) -> Vec<ExistingConnection> {
    let mut found = Vec::new();
    for &pid in pids {
        let base = proc_root.join(pid.to_string());
        let (mut established, mut listening) = (HashMap::new(), HashSet::new());
        for table in ["net/tcp", "net/tcp6"] {
            if let Ok(text) = fs::read_to_string(base.join(table)) {
                parse_tcp_table(&text, &mut established, &mut listening);
            }
        }
        let Ok(fds) = fs::read_dir(base.join("fd")) else { continue };
        for entry in fds.flatten() {
            let Ok(fd) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(target) = fs::read_link(entry.path()) else { continue };
            let target = target.to_string_lossy();
            let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) else { continue };
            let Ok(inode) = inode.parse::<u64>() else { continue };
            if established.get(&inode).is_some_and(|port| listening.contains(port)) {
                found.push(ExistingConnection { tgid: pid, fd });
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only established sockets on a listening port count (not outbound
    /// client connections, not listeners themselves).
    #[test]
    fn finds_server_side_established_sockets() {
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
        for (fd, inode) in [(3, 100), (7, 200), (9, 300)] {
            std::os::unix::fs::symlink(format!("socket:[{inode}]"), base.join(format!("fd/{fd}"))).unwrap();
        }
        std::os::unix::fs::symlink("/dev/null", base.join("fd/1")).unwrap();
        assert_eq!(existing_connections(root.path(), &[42, 43]), vec![ExistingConnection { tgid: 42, fd: 7 }]);
    }
}
