//! The cgroup v2 tree: where it is mounted, which directories belong to
//! pods, and their cgroup ids (the directory inode, which is what
//! `bpf_get_current_cgroup_id` returns in the probes).
//!
//! Walks only the `kubepods` subtrees, on the collector's schedule (every
//! few seconds), never per event.
use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::cgroup_path::{self, CgroupOwner};

/// Deepest level below the root a pod's container cgroup can sit at
/// (kubepods.slice/kubepods-burstable.slice/<pod>.slice/<container>.scope),
/// plus one for runtimes that nest a level below the container.
const MAX_DEPTH: usize = 5;

/// Finds the cgroup v2 mount: `/sys/fs/cgroup` on pure v2 nodes,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn find_v2_root(mountinfo: &str) -> Option<PathBuf> {
    let mut mounts = mountinfo.lines().filter_map(|line| {
        // "36 25 0:30 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(mount_point)))
    });
    let first = mounts.next()?;
    Some(std::iter::once(first.clone()).chain(mounts).find(|m| m == Path::new("/sys/fs/cgroup")).unwrap_or(first))
}

/// mountinfo escapes spaces and a few other bytes as `\ooo`.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 mount of this host, from `/proc/self/mountinfo`.
pub fn host_v2_root() -> io::Result<PathBuf> {
    let mountinfo = crate::proc::self_mountinfo()?;
    find_v2_root(&mountinfo)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount in /proc/self/mountinfo"))
}

/// One pod-owned cgroup directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// Path relative to the v2 root, starting with `/`.
    pub path: String,
    /// Pod and container it belongs to.
    pub owner: CgroupOwner,
}

/// Every pod-owned cgroup under `root`, keyed by cgroup id (inode).
pub fn scan(root: &Path) -> HashMap<u64, PodCgroup> {
    let mut found = HashMap::new();
    for top in ["kubepods.slice", "kubepods"] {
        walk(root, &root.join(top), 0, &mut found);
    }
    found
}

fn walk(root: &Path, dir: &Path, depth: usize, found: &mut HashMap<u64, PodCgroup>) {
    let Ok(meta) = fs::metadata(dir) else { return };
    if !meta.is_dir() {
        return;
    }
    let relative = format!("/{}", dir.strip_prefix(root).unwrap_or(dir).display());
    if let Some(owner) = cgroup_path::parse(&relative) {
        found.insert(meta.ino(), PodCgroup { path: relative, owner });
    }
    if depth >= MAX_DEPTH {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            walk(root, &entry.path(), depth + 1, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a hybrid host the unified mount is found; on a pure v2 host
    /// /sys/fs/cgroup wins even if another cgroup2 mount is listed first.
    #[test]
    fn finds_v2_mount() {
        let hybrid = "25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n30 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(find_v2_root(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let pure = "40 1 0:50 / /run/other\\040cg rw - cgroup2 cgroup2 rw\n26 1 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_v2_root(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(find_v2_root("26 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"), None);
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
    }

    /// A scan finds pod and container directories (keyed by inode) and
    /// ignores everything else.
    #[test]
    fn scan_finds_pod_cgroups_by_inode() {
        let root = tempfile::tempdir().unwrap();
        let uid = "7d1c2a4e_0000_4000_8000_00000000000b";
        let id = "ab".repeat(32);
        let container = root.path().join(format!("kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{id}.scope"));
        fs::create_dir_all(&container).unwrap();
        fs::create_dir_all(root.path().join("system.slice/foo.service")).unwrap();
        let found = scan(root.path());
        assert_eq!(found.len(), 2, "{found:?}");
        let inode = fs::metadata(&container).unwrap().ino();
        let entry = &found[&inode];
        assert_eq!(entry.owner.container_id.as_deref(), Some(id.as_str()));
        assert_eq!(entry.owner.pod_uid, uid.replace('_', "-"));
        assert!(entry.path.starts_with("/kubepods.slice/"));
    }
}
