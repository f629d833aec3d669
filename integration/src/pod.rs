//! A "pod" without a cluster: a cgroup v2 directory laid out as kubelet
//! (systemd driver) and containerd lay theirs out,
//! `kubepods.slice/kubepods-pod<uid_>.slice/cri-containerd-<id>.scope`,
//! with one process moved into it. Like a kubelet pod, it holds a pause
//! process in a sandbox container of its own from the moment it is
//! created (the agent does not count a pod cgroup that never held a
//! process). Dropping the pod kills its processes and removes the
//! directories.
use std::fs;
use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// One pod's cgroup and the process in it.
pub struct CgroupPod {
    /// Pod UID (dashed).
    pub uid: String,
    /// Container id (64 hex digits).
    pub container_id: String,
    /// Pod-level cgroup directory (absolute).
    pub pod_dir: PathBuf,
    /// Container-level cgroup directory (absolute).
    pub container_dir: PathBuf,
    /// The process, once started.
    child: Option<Child>,
    /// Processes started before the latest one (a container with several).
    earlier: Vec<Child>,
    /// The sandbox's pause process and its cgroup, held by the pod's first
    /// container (a sidecar created later shares it).
    sandbox: Option<(Child, PathBuf)>,
}

/// A fresh pod UID: pid, a counter and the clock make it unique per run
/// without a random number generator.
pub fn new_uid() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}-{:04x}-4000-8000-{:04x}{:08x}", std::process::id(), count & 0xffff, nanos >> 16 & 0xffff, nanos)
}

/// The pod-level cgroup of `uid`, relative to the v2 root, as kubelet's
/// systemd driver names it (and as simulator scenarios refer to it).
pub fn pod_slice_path(uid: &str) -> String {
    format!("kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_"))
}

impl CgroupPod {
    /// Creates the cgroup directories of pod `uid` under `cgroup_root` (v2).
    pub fn create(cgroup_root: &Path, uid: &str) -> io::Result<Self> {
        let container_id: String = uid.replace('-', "").repeat(2).chars().take(64).collect();
        Self::create_container(cgroup_root, uid, &container_id)
    }

    /// Creates container `container_id` (64 hex digits) of pod `uid`: a
    /// second container of a pod (a sidecar) shares the pod directory.
    pub fn create_container(cgroup_root: &Path, uid: &str, container_id: &str) -> io::Result<Self> {
        let container_id = container_id.to_string();
        let pod_dir = cgroup_root.join(pod_slice_path(uid));
        let container_dir = pod_dir.join(format!("cri-containerd-{container_id}.scope"));
        let sandbox = if pod_dir.exists() { None } else { Some(start_pause(&pod_dir, uid)?) };
        fs::create_dir_all(&container_dir)?;
        Ok(Self {
            uid: uid.to_string(),
            container_id,
            pod_dir,
            container_dir,
            child: None,
            earlier: Vec::new(),
            sandbox,
        })
    }

    /// Path of the pod cgroup relative to the v2 root (as scenarios name it).
    pub fn relative_pod_path(&self, cgroup_root: &Path) -> String {
        self.pod_dir.strip_prefix(cgroup_root).unwrap_or(&self.pod_dir).display().to_string()
    }

    /// Starts `command` inside the container cgroup, so all its traffic is
    /// attributed to this pod. The child joins the cgroup before it execs,
    /// as a container's process does: a socket takes the cgroup of the
    /// task that creates it, and a server moved in after it had opened
    /// its listener would keep sockets outside the pod (what programs
    /// attached to the pod's cgroup then never see).
    pub fn spawn(&mut self, mut command: Command) -> io::Result<&mut Child> {
        crate::detach_from_terminal(&mut command);
        let procs =
            std::ffi::CString::new(self.container_dir.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cgroup path with a NUL byte"))?;
        // SAFETY: between fork and exec the closure only makes the
        // async-signal-safe calls open, write and close on memory prepared
        // before the fork.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
        if let Some(earlier) = self.child.replace(child) {
            self.earlier.push(earlier);
        }
        Ok(self.child.as_mut().expect("child was just stored"))
    }

    /// Kills the process with SIGKILL (what an OOM kill does: no close
    /// syscall for its sockets) and reaps it.
    pub fn kill(&mut self) {
        for child in self.child.iter_mut().chain(self.earlier.iter_mut()) {
            reap(child);
        }
    }

    /// Pids currently in the container cgroup.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.container_dir.join("cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for CgroupPod {
    fn drop(&mut self) {
        for mut child in self.child.take().into_iter().chain(self.earlier.drain(..)) {
            reap(&mut child);
        }
        if let Err(err) = remove_cgroup_dir(&self.container_dir) {
            eprintln!("warning: could not remove {}: {err}", self.container_dir.display());
        }
        if let Some((mut pause, dir)) = self.sandbox.take() {
            reap(&mut pause);
            if let Err(err) = remove_cgroup_dir(&dir) {
                eprintln!("warning: could not remove {}: {err}", dir.display());
            }
        }
        // Another container of the pod may still be there (a sidecar).
        let _ = remove_cgroup_dir(&self.pod_dir);
        // Shared parent: removed only when no other pod remains.
        if let Some(parent) = self.pod_dir.parent() {
            let _ = remove_cgroup_dir(parent);
        }
    }
}

/// SIGKILLs `child` (if it still runs) and reaps it.
fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts the pod's pause process in its sandbox container cgroup
/// (`cri-containerd-<sandbox id>.scope`), as a kubelet's runtime does
/// before any container of the pod: the pod cgroup is populated from now on.
fn start_pause(pod_dir: &Path, uid: &str) -> io::Result<(Child, PathBuf)> {
    let sandbox_id: String = format!("5a{}", uid.replace('-', "")).repeat(2).chars().take(64).collect();
    let dir = pod_dir.join(format!("cri-containerd-{sandbox_id}.scope"));
    fs::create_dir_all(&dir)?;
    let mut command = Command::new("sleep");
    command.arg("infinity");
    crate::detach_from_terminal(&mut command);
    let mut pause = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    if let Err(err) = fs::write(dir.join("cgroup.procs"), pause.id().to_string()) {
        reap(&mut pause);
        let _ = fs::remove_dir(&dir);
        return Err(err);
    }
    Ok((pause, dir))
}

/// Removes the cgroup directory `dir` once no process is left in it. The
/// kernel keeps a cgroup busy for a moment after its last process is
/// reaped, and a process the test's child forked may still be in it: those
/// are killed, and the removal retried for up to 2 s. A cgroup with child
/// cgroups (a sidecar's container, another pod) is left as it is.
pub fn remove_cgroup_dir(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let err = match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) => err,
        };
        let has_children =
            fs::read_dir(dir).map(|entries| entries.flatten().any(|e| e.path().is_dir())).unwrap_or(false);
        if err.raw_os_error() != Some(libc::EBUSY) || has_children || Instant::now() >= deadline {
            return Err(err);
        }
        let members = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in members.lines().filter_map(|line| line.trim().parse::<i32>().ok()) {
            // Only processes this test started live in its cgroups.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A cgroup subtree standing for one node: a test whose agent watches only
/// its own does not see the launches and sockets of tests running beside
/// it (on a one-GPU node every launching process is on that GPU).
/// Removed on drop, after the pods in it (drop those first).
pub struct NodeRoot(pub std::path::PathBuf);

impl NodeRoot {
    /// A fresh subtree named `name` and this test process's pid under the
    /// host's cgroup v2 root.
    pub fn create(name: &str) -> io::Result<Self> {
        let root = podgpu_agent::pods::cgroup_tree::host_v2_root()?.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&root)?;
        Ok(Self(root))
    }

    /// `--cgroup-root=` for an agent watching this node.
    pub fn agent_arg(&self) -> String {
        format!("--cgroup-root={}", self.0.display())
    }
}

impl Drop for NodeRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.0.join("kubepods.slice"));
        let _ = std::fs::remove_dir(&self.0);
    }
}
