//! The one home for reading processes through procfs.
//!
//! Every read of another process's `/proc/PID` goes through [`ProcFs`],
//! which knows two things a bare path does not:
//! - the proc root (the host's `/proc` under `hostPID`, or a fixture in
//!   tests), and
//! - where the agent's own cgroup namespace sits in the host's cgroup tree.
//!   In a container with its own cgroup namespace (the DaemonSet), the
//!   kernel shows other processes' cgroups relative to the agent's, e.g.
//!   `0::/../../kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`;
//!   [`ProcFs::cgroups`] rebases such paths onto the host tree so the rest
//!   of the agent only ever sees host paths.
//!
//! The files' formats are parsed by the `procfs` crate (cgroup, maps, the
//! TCP tables); only the start time keeps a narrow parser of its own, on
//! the pid cache's hot path.
use std::fs;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};

use procfs::process::{MMapPath, MemoryMaps};
use procfs::FromBufRead as _;
use procfs::ProcessCGroups;

/// A procfs view: a root and the agent's cgroup namespace root.
#[derive(Clone, Debug)]
pub struct ProcFs {
    root: PathBuf,
    /// Host path (relative to the cgroup v2 root, starting with `/`) of
    /// this agent's cgroup namespace root; `/` outside a namespace.
    cgroup_ns_root: String,
}

/// A file mapped into a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedFile {
    /// Device, as maps writes it (`fd:01`).
    pub device: String,
    /// Inode on that device.
    pub inode: u64,
    /// Path inside the process's mount namespace.
    pub path: String,
}

/// An executable mapping of a file into a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeMapping {
    /// First address mapped.
    pub start: u64,
    /// First address after the mapping.
    pub end: u64,
    /// File offset mapped at `start`.
    pub offset: u64,
    /// The file.
    pub file: MappedFile,
}

impl CodeMapping {
    /// The file offset of `address`, if this mapping holds it.
    pub fn file_offset(&self, address: u64) -> Option<u64> {
        (self.start..self.end).contains(&address).then(|| address - self.start + self.offset)
    }
}

/// One line of `/proc/PID/cgroup`, with its path on the host tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLine {
    /// Hierarchy id: 0 is the v2 (unified) hierarchy.
    pub hierarchy: u32,
    /// Absolute path in the host's hierarchy.
    pub path: String,
}

impl ProcFs {
    /// procfs at `root`, read from outside any cgroup namespace.
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf(), cgroup_ns_root: "/".to_string() }
    }

    /// The same view, rebasing relative cgroup paths onto `ns_root` (a
    /// host path, relative to the cgroup v2 root).
    pub fn with_cgroup_ns_root(mut self, ns_root: &str) -> Self {
        self.cgroup_ns_root = normalize(ns_root);
        self
    }

    /// The proc root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The agent's cgroup namespace root on the host tree (`/` when none).
    pub fn cgroup_ns_root(&self) -> &str {
        &self.cgroup_ns_root
    }

    fn pid_dir(&self, pid: u32) -> PathBuf {
        self.root.join(pid.to_string())
    }

    /// Whether `pid` exists now.
    pub fn exists(&self, pid: u32) -> bool {
        self.pid_dir(pid).join("stat").exists()
    }

    /// Field 22 of `/proc/PID/stat` (clock ticks since boot at exec), or
    /// `None` when the process is gone or a zombie. Read
    /// with one small read: a process is (pid, start time), since pids are
    /// reused. This is the cost of every pid-cache hit, and procfs's full
    /// stat parse is several times slower (`cargo xtask bench-pods`).
    pub fn start_time(&self, pid: u32) -> Option<u64> {
        let mut buffer = [0u8; 1024];
        let mut file = fs::File::open(self.pid_dir(pid).join("stat")).ok()?;
        let len = file.read(&mut buffer).ok()?;
        let text = std::str::from_utf8(&buffer[..len]).ok()?;
        // comm (field 2) may hold spaces and parentheses: fields after it
        // are counted from the last ')'. Field 3 is the first after it.
        let mut fields = text[text.rfind(')')? + 1..].split_ascii_whitespace();
        // A zombie has released its fds and GPU contexts: it is gone for
        // every purpose here, though its parent has not reaped it yet.
        if matches!(fields.next()?, "Z" | "X") {
            return None;
        }
        fields.nth(22 - 4)?.parse().ok()
    }

    /// Every process now (the numeric entries of the proc root).
    pub fn pids(&self) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(&self.root) else { return Vec::new() };
        entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok()).collect()
    }

    /// The open fds of `pid` (none when it is gone or may not be read).
    pub fn fds(&self, pid: u32) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(self.pid_dir(pid).join("fd")) else { return Vec::new() };
        entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok()).collect()
    }

    /// Clock ticks since boot now (`uptime` times the tick rate): the
    /// scale of `start_time`.
    pub fn uptime_ticks(&self) -> Option<u64> {
        let text = fs::read_to_string(self.root.join("uptime")).ok()?;
        let seconds: f64 = text.split_ascii_whitespace().next()?.parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (ticks_per_second > 0 && seconds.is_finite()).then_some((seconds * ticks_per_second as f64) as u64)
    }

    /// The cgroups of `pid`, with host paths; `None` when it is gone (or
    /// its file does not parse).
    pub fn cgroups(&self, pid: u32) -> Option<Vec<CgroupLine>> {
        let text = fs::read_to_string(self.pid_dir(pid).join("cgroup")).ok()?;
        Some(parse_cgroup_file(&text, &self.cgroup_ns_root))
    }

    /// The socket inode behind `fd` of `pid` (`socket:[INODE]`); `None`
    /// when the fd is gone or is not a socket.
    pub fn socket_inode(&self, pid: u32, fd: u32) -> Option<u64> {
        socket_inode_of(&self.pid_dir(pid).join("fd").join(fd.to_string()))
    }

    /// What `fd` of `pid` points to (`socket:[INODE]`, a path, ...).
    /// NotFound means the fd (or process) is gone; PermissionDenied that
    /// this agent may not look (no ptrace access to the process).
    pub fn fd_target(&self, pid: u32, fd: u32) -> io::Result<PathBuf> {
        fs::read_link(self.pid_dir(pid).join("fd").join(fd.to_string()))
    }

    /// `stat` of what `fd` of `pid` opens (the magic link is followed, so
    /// a device node inside a container's mount namespace is seen with
    /// its real device numbers).
    pub fn fd_metadata(&self, pid: u32, fd: u32) -> io::Result<fs::Metadata> {
        fs::metadata(self.pid_dir(pid).join("fd").join(fd.to_string()))
    }

    /// Whether `pid` has a network namespace other than the host's: a
    /// pod's, not `hostNetwork`. The host's is read from kthreadd (pid 2,
    /// always in the initial namespaces, and readable where init may not
    /// be), else from pid 1. `None` when it cannot be told.
    pub fn has_own_network(&self, pid: u32) -> Option<bool> {
        let namespace = |pid: u32| fs::read_link(self.pid_dir(pid).join("ns/net")).ok();
        let host = namespace(2).or_else(|| namespace(1))?;
        Some(namespace(pid)? != host)
    }

    /// Whether `pid` is in this agent's own network namespace (so its
    /// listening addresses, loopback included, reach it from here).
    /// `None` when it cannot be told.
    pub fn shares_network_with_self(&self, pid: u32) -> Option<bool> {
        let namespace = |dir: PathBuf| fs::read_link(dir.join("ns/net")).ok();
        Some(namespace(self.pid_dir(pid))? == namespace(self.root.join("self"))?)
    }

    /// Files `pid` has mapped whose path contains `name` (one entry per
    /// file: device and inode from `/proc/PID/maps`, path as the process
    /// sees it). Empty when the process is gone or may not be read.
    pub fn mapped_files(&self, pid: u32, name: &str) -> Vec<MappedFile> {
        let Ok(text) = fs::read_to_string(self.pid_dir(pid).join("maps")) else { return Vec::new() };
        // Only the lines that name the file are handed to the parser: a
        // CUDA process maps thousands of regions.
        let wanted: String = text.lines().filter(|line| line.contains(name)).flat_map(|line| [line, "\n"]).collect();
        let Ok(maps) = MemoryMaps::from_buf_read(wanted.as_bytes()) else { return Vec::new() };
        let mut files: Vec<MappedFile> = Vec::new();
        for map in maps {
            let MMapPath::Path(path) = &map.pathname else { continue };
            let device = format!("{:02x}:{:02x}", map.dev.0, map.dev.1);
            if map.inode == 0 || files.iter().any(|f| f.inode == map.inode && f.device == device) {
                continue;
            }
            files.push(MappedFile { device, inode: map.inode, path: path.display().to_string() });
        }
        files
    }

    /// The executable file mappings of `pid` (its code and its
    /// libraries'), by address. Empty when the process is gone or may not
    /// be read.
    pub fn code_mappings(&self, pid: u32) -> Vec<CodeMapping> {
        let Ok(text) = fs::read_to_string(self.pid_dir(pid).join("maps")) else { return Vec::new() };
        // Permissions are the second field: only `r-xp`-like lines matter.
        let wanted: String = text
            .lines()
            .filter(|line| line.split_ascii_whitespace().nth(1).is_some_and(|perms| perms.contains('x')))
            .flat_map(|line| [line, "\n"])
            .collect();
        let Ok(maps) = MemoryMaps::from_buf_read(wanted.as_bytes()) else { return Vec::new() };
        let mut mappings: Vec<CodeMapping> = maps
            .into_iter()
            .filter_map(|map| {
                let MMapPath::Path(path) = &map.pathname else { return None };
                (map.inode != 0).then(|| CodeMapping {
                    start: map.address.0,
                    end: map.address.1,
                    offset: map.offset,
                    file: MappedFile {
                        device: format!("{:02x}:{:02x}", map.dev.0, map.dev.1),
                        inode: map.inode,
                        path: path.display().to_string(),
                    },
                })
            })
            .collect();
        mappings.sort_by_key(|mapping| mapping.start);
        mappings
    }

    /// A file as `pid` sees it, opened through its root (its container's
    /// files, whatever the agent's own mount namespace holds).
    pub fn open_mapped(&self, pid: u32, file: &MappedFile) -> io::Result<fs::File> {
        fs::File::open(self.pid_dir(pid).join("root").join(file.path.trim_start_matches('/')))
    }

    /// Every fd of `pid` that is a socket, with its inode.
    pub fn socket_fds(&self, pid: u32) -> Vec<(u32, u64)> {
        let Ok(entries) = fs::read_dir(self.pid_dir(pid).join("fd")) else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|entry| {
                let fd = entry.file_name().to_str()?.parse().ok()?;
                Some((fd, socket_inode_of(&entry.path())?))
            })
            .collect()
    }

    /// `pid`'s command line, argument by argument (empty for kernel
    /// threads and processes that are gone).
    pub fn cmdline(&self, pid: u32) -> Vec<String> {
        let Ok(process) = procfs::process::Process::new_with_root(self.pid_dir(pid)) else { return Vec::new() };
        process.cmdline().unwrap_or_default()
    }

    /// The TCP sockets `pids` (processes of one network namespace) hold
    /// in the listening state, with the address they listen on.
    pub fn listening_sockets(&self, pids: &[u32]) -> Vec<std::net::SocketAddr> {
        let Some(first) = pids.first() else { return Vec::new() };
        let owned: std::collections::HashSet<u64> =
            pids.iter().flat_map(|pid| self.socket_fds(*pid)).map(|(_, inode)| inode).collect();
        let mut listening: Vec<std::net::SocketAddr> = self
            .tcp_sockets(*first)
            .into_iter()
            .filter(|entry| entry.state == procfs::net::TcpState::Listen && owned.contains(&entry.inode))
            .map(|entry| entry.local_address)
            .collect();
        listening.sort();
        listening.dedup();
        listening
    }

    /// The TCP sockets of `pid`'s network namespace (`/proc/PID/net/tcp`
    /// and `tcp6`); a missing or unreadable table is skipped.
    pub fn tcp_sockets(&self, pid: u32) -> Vec<procfs::net::TcpNetEntry> {
        let Ok(process) = procfs::process::Process::new_with_root(self.pid_dir(pid)) else { return Vec::new() };
        let mut sockets = process.tcp().unwrap_or_default();
        sockets.extend(process.tcp6().unwrap_or_default());
        sockets
    }
}

fn socket_inode_of(fd_path: &Path) -> Option<u64> {
    let target = fs::read_link(fd_path).ok()?;
    target.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Parses `/proc/PID/cgroup` ("ID:controllers:path" lines), rebasing
/// namespace-relative paths onto `ns_root`. A file that does not parse
/// gives no lines (the kernel writes none such; a fixture might).
pub fn parse_cgroup_file(text: &str, ns_root: &str) -> Vec<CgroupLine> {
    let Ok(cgroups) = ProcessCGroups::from_buf_read(text.as_bytes()) else { return Vec::new() };
    cgroups
        .into_iter()
        .map(|cgroup| {
            let path = if cgroup.hierarchy == 0 {
                normalize(&format!("{ns_root}/{}", cgroup.pathname))
            } else {
                cgroup.pathname
            };
            CgroupLine { hierarchy: cgroup.hierarchy, path }
        })
        .collect()
}

/// Resolves `.` and `..` components of an absolute cgroup path (never
/// above `/`).
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The agent's own mount table (`/proc/self/mountinfo`): always this
/// process's, whatever the proc root.
pub fn self_mountinfo() -> io::Result<String> {
    fs::read_to_string("/proc/self/mountinfo")
}

/// The host name the kernel reports (the node's, under hostNetwork or not:
/// the UTS name).
pub fn hostname() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|name| name.trim().to_string())
}

/// Where this agent's cgroup namespace root sits in the host tree at
/// `cgroup_root` (the host's v2 hierarchy, e.g. a hostPath mount).
///
/// Outside a namespace the agent's own v2 path is absolute and the answer
/// is `/`. Inside one, `/proc/self/cgroup` reads `0::/` and the host's
/// init reads `0::/../..`: the root is then the host directory whose
/// `cgroup.procs` holds this process (at most as deep as init's path has
/// `..` steps). `None` when that cannot be told.
pub fn detect_cgroup_ns_root(proc: &ProcFs, cgroup_root: &Path, own_pid: u32) -> Option<String> {
    let raw_v2_path = |pid: u32| -> Option<String> {
        let text = fs::read_to_string(proc.root().join(pid.to_string()).join("cgroup")).ok()?;
        text.lines().find_map(|line| line.strip_prefix("0::").map(str::to_string))
    };
    let init = raw_v2_path(1)?;
    let depth = init.split('/').filter(|component| *component == "..").count();
    if depth == 0 {
        return raw_v2_path(own_pid).map(|path| normalize(&path));
    }
    find_cgroup_of(cgroup_root, cgroup_root, own_pid, depth)
}

/// The directory below `root` (at most `depth` levels) whose
/// `cgroup.procs` lists `pid`, as a path relative to `root`.
fn find_cgroup_of(root: &Path, dir: &Path, pid: u32, depth: usize) -> Option<String> {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    if procs.lines().any(|line| line.trim().parse() == Ok(pid)) {
        return Some(format!("/{}", dir.strip_prefix(root).ok()?.display()));
    }
    if depth == 0 {
        return None;
    }
    for entry in fs::read_dir(dir).ok()?.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            if let Some(found) = find_cgroup_of(root, &entry.path(), pid, depth - 1) {
                return Some(found);
            }
        }
    }
    None
}

/// Writes a fake `/proc/PID` (stat and cgroup) for tests and benchmarks.
pub fn write_fake_process(proc_root: &Path, pid: u32, start_time: u64, cgroup: &str) -> io::Result<()> {
    let dir = proc_root.join(pid.to_string());
    fs::create_dir_all(&dir)?;
    // 52 fields; start time is field 22. comm holds a space and a ')'.
    let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
    fields[0] = "S".to_string();
    fields[22 - 3] = start_time.to_string();
    fs::write(dir.join("stat"), format!("{pid} (fake) proc) {}\n", fields.join(" ")))?;
    fs::write(dir.join("cgroup"), cgroup)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inside a cgroup namespace, other processes' v2 paths are relative
    /// to the agent's cgroup; rebased, they name the host directory, while
    /// v1 lines and paths outside a namespace are kept as they are.
    #[test]
    fn relative_cgroup_paths_are_rebased() {
        let agent = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poda.slice/cri-containerd-1.scope";
        let text = "12:cpu,cpuacct:/kubepods/x\n0::/../../kubepods-burstable-podb.slice/cri-containerd-2.scope\n";
        let lines = parse_cgroup_file(text, agent);
        assert_eq!(lines[0], CgroupLine { hierarchy: 12, path: "/kubepods/x".into() });
        assert_eq!(
            lines[1].path,
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podb.slice/cri-containerd-2.scope"
        );
        assert_eq!(parse_cgroup_file("0::/a/b\n", "/")[0].path, "/a/b");
        assert_eq!(normalize("/../../x"), "/x");
    }

    /// The stat start time survives a comm with spaces and parentheses.
    #[test]
    fn start_time_after_odd_comm() {
        let root = tempfile::tempdir().unwrap();
        write_fake_process(root.path(), 42, 123456, "0::/\n").unwrap();
        let proc = ProcFs::new(root.path());
        assert_eq!(proc.start_time(42), Some(123456));
        assert!(proc.exists(42));
        assert!(!proc.exists(43));
        assert_eq!(proc.start_time(43), None);
        let stat = fs::read_to_string(root.path().join("42/stat")).unwrap();
        fs::write(root.path().join("42/stat"), stat.replacen(") S ", ") Z ", 1)).unwrap();
        assert_eq!(proc.start_time(42), None, "a zombie is gone");
    }

    /// A namespaced agent finds its root as the host directory that lists
    /// its pid; outside a namespace the root is its own absolute path.
    #[test]
    fn namespace_root_detection() {
        let proc_root = tempfile::tempdir().unwrap();
        let cgroups = tempfile::tempdir().unwrap();
        let agent_dir = "kubepods.slice/kubepods-podx.slice/cri-containerd-1.scope";
        fs::create_dir_all(cgroups.path().join(agent_dir)).unwrap();
        fs::write(cgroups.path().join(agent_dir).join("cgroup.procs"), "7\n").unwrap();
        write_fake_process(proc_root.path(), 7, 1, "0::/\n").unwrap();
        write_fake_process(proc_root.path(), 1, 1, "0::/../../../init.scope\n").unwrap();
        let proc = ProcFs::new(proc_root.path());
        assert_eq!(detect_cgroup_ns_root(&proc, cgroups.path(), 7).as_deref(), Some(&format!("/{agent_dir}")[..]));
        write_fake_process(proc_root.path(), 1, 1, "0::/init.scope\n").unwrap();
        write_fake_process(proc_root.path(), 7, 1, "0::/system.slice/podgpu.service\n").unwrap();
        assert_eq!(detect_cgroup_ns_root(&proc, cgroups.path(), 7).as_deref(), Some("/system.slice/podgpu.service"));
    }
}
