//! Which files are the NVIDIA driver's user-space libraries: the ones
//! whose calls into libc's `ioctl` and `close` the driver path can probe
//! instead of the syscalls (`probes::requests::driver_hooks`).
//!
//! CUDA processes reach the driver through `libcuda.so` (contexts, memory,
//! UVM) and monitors through `libnvidia-ml.so`. In a cluster the container
//! runtime's NVIDIA hook bind-mounts the host's copies into every GPU
//! container, so the files in the host's library directory (the chart
//! mounts it and puts it on `LD_LIBRARY_PATH`) are the very inodes the
//! pods run: a uprobe there covers every pod from its first call.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// File name prefixes of the driver libraries.
pub const DRIVER_LIBRARY_NAMES: [&str; 2] = ["libcuda.so", "libnvidia-ml.so"];

/// Where distributions, the GPU operator's driver container and managed
/// clusters install them, after `LD_LIBRARY_PATH`'s directories.
const DEFAULT_DIRS: [&str; 4] = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/local/nvidia/lib64",
    "/run/nvidia/driver/usr/lib/x86_64-linux-gnu",
];

/// Whether `path`'s file name is a libcuda (what the contexts go through).
pub fn is_libcuda(path: &Path) -> bool {
    path.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with(DRIVER_LIBRARY_NAMES[0]))
}

/// The driver libraries to probe, one path per file (device, inode).
/// `given` (`--driver-libraries`) lists files, taken as they are, and
/// directories, searched; when empty, `ld_library_path`'s directories and
/// the default ones are searched.
pub fn candidates(given: &[PathBuf], ld_library_path: Option<&str>) -> Vec<PathBuf> {
    let searched: Vec<PathBuf> = if given.is_empty() {
        ld_library_path
            .unwrap_or_default()
            .split(':')
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .chain(DEFAULT_DIRS.iter().map(PathBuf::from))
            .collect()
    } else {
        given.to_vec()
    };
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::new();
    for path in searched {
        let files = if path.is_dir() { library_files_in(&path) } else { vec![path] };
        for file in files {
            // Symlinks (libcuda.so.1 -> libcuda.so.580.95.05) lead to one file.
            let Ok(metadata) = std::fs::metadata(&file) else { continue };
            if metadata.is_file() && seen.insert((metadata.dev(), metadata.ino())) {
                found.push(file);
            }
        }
    }
    found
}

/// The driver libraries directly in `dir`, in name order.
fn library_files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            DRIVER_LIBRARY_NAMES.iter().any(|prefix| name.starts_with(prefix))
        })
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_path_per_library_file() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("libcuda.so.580.95.05");
        std::fs::write(&real, b"\x7fELF").unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("libcuda.so.1")).unwrap();
        std::fs::write(dir.path().join("libnvidia-ml.so.1"), b"\x7fELF").unwrap();
        std::fs::write(dir.path().join("libcudart.so.12"), b"\x7fELF").unwrap();
        std::fs::write(dir.path().join("libc.so.6"), b"\x7fELF").unwrap();
        let found = candidates(&[], Some(&format!("{}:", dir.path().display())));
        let names: Vec<_> = found
            .iter()
            .filter(|path| path.starts_with(dir.path()))
            .map(|path| path.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        // libcudart is the runtime, not the driver: it calls libcuda.
        assert_eq!(names, ["libcuda.so.1", "libnvidia-ml.so.1"]);
        assert!(is_libcuda(&found[0]));
        assert!(!is_libcuda(Path::new("/x/libnvidia-ml.so.1")));
    }

    #[test]
    fn given_files_are_taken_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let stand_in = dir.path().join("libnvcalls.so");
        std::fs::write(&stand_in, b"\x7fELF").unwrap();
        let missing = dir.path().join("absent.so");
        assert_eq!(candidates(&[stand_in.clone(), missing, stand_in.clone()], None), vec![stand_in]);
    }
}
