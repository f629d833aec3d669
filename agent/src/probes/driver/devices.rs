//! Which fds are NVIDIA devices: `stat` of `/proc/PID/fd/N` against the
//! driver's device numbers (major 195: `/dev/nvidiactl` is minor 255,
//! `/dev/nvidiaN` minor N; `/dev/nvidia-uvm` has a dynamic major, read
//! from `/proc/devices`). Tests name stand-in files to treat as devices.
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use podgpu_common::driver::fd_kind;

use crate::proc::ProcFs;

/// The NVIDIA character devices' major number (`nv-chardev-numbers.h`).
const NVIDIA_MAJOR: u32 = 195;
const CONTROL_MINOR: u32 = 255;
/// Minors below this are GPUs; above, modeset and other nodes.
const FIRST_SPECIAL_MINOR: u32 = 254;

/// A file to treat as a driver device (`--driver-stand-in KIND=PATH`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandIn {
    /// `fd_kind::CONTROL`, `GPU` or `UVM`.
    pub kind: u32,
    /// The file.
    pub path: PathBuf,
}

impl std::str::FromStr for StandIn {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (kind, path) = text.split_once('=').ok_or_else(|| format!("expected KIND=PATH, got {text:?}"))?;
        let kind = match kind {
            "ctl" => fd_kind::CONTROL,
            "gpu" => fd_kind::GPU,
            "uvm" => fd_kind::UVM,
            other => return Err(format!("unknown device kind {other:?} (expected ctl, gpu or uvm)")),
        };
        Ok(StandIn { kind, path: PathBuf::from(path) })
    }
}

/// Tells NVIDIA fds from others.
#[derive(Clone, Debug)]
pub struct DeviceMatcher {
    proc: ProcFs,
    uvm_major: Option<u32>,
    /// (device, inode) of each stand-in, with its kind.
    stand_ins: Vec<(u64, u64, u32)>,
}

impl DeviceMatcher {
    /// Reads the UVM major from `devices` (the host's `/proc/devices`) and
    /// identifies the stand-ins.
    pub fn new(proc: ProcFs, devices: &Path, stand_ins: &[StandIn]) -> Self {
        let uvm_major = std::fs::read_to_string(devices).ok().and_then(|text| uvm_major(&text));
        let stand_ins = stand_ins
            .iter()
            .filter_map(|stand_in| match std::fs::metadata(&stand_in.path) {
                Ok(meta) => Some((meta.dev(), meta.ino(), stand_in.kind)),
                Err(err) => {
                    tracing::warn!(path = %stand_in.path.display(), error = %err, "driver stand-in not found");
                    None
                }
            })
            .collect();
        Self { proc, uvm_major, stand_ins }
    }

    /// Whether `pid` holds an NVIDIA device open (any fd of a driver
    /// kind): what a process that may hold GPU contexts and driver memory
    /// looks like from outside.
    pub fn holds_nvidia_fd(&self, pid: u32) -> bool {
        self.proc.fds(pid).into_iter().any(|fd| {
            matches!(self.classify(pid, fd), Some(kind) if kind != fd_kind::NOT_NVIDIA && kind != fd_kind::UNVERIFIED)
        })
    }

    /// The `fd_kind` of `fd` of `pid`; `None` when it cannot be told (the
    /// fd or process is gone, or may not be read).
    pub fn classify(&self, pid: u32, fd: u32) -> Option<u32> {
        let meta = self.proc.fd_metadata(pid, fd).ok()?;
        if let Some(&(_, _, kind)) =
            self.stand_ins.iter().find(|(dev, ino, _)| *dev == meta.dev() && *ino == meta.ino())
        {
            return Some(kind);
        }
        if !meta.file_type().is_char_device() {
            return Some(fd_kind::NOT_NVIDIA);
        }
        let rdev = meta.rdev();
        let (major, minor) = (libc_major(rdev), libc_minor(rdev));
        Some(match major {
            NVIDIA_MAJOR if minor == CONTROL_MINOR => fd_kind::CONTROL,
            NVIDIA_MAJOR if minor < FIRST_SPECIAL_MINOR => fd_kind::GPU,
            NVIDIA_MAJOR => fd_kind::OTHER,
            major if Some(major) == self.uvm_major => {
                if minor == 0 {
                    fd_kind::UVM
                } else {
                    fd_kind::OTHER
                }
            }
            _ => fd_kind::NOT_NVIDIA,
        })
    }
}

/// Whether `devices` (the host's `/proc/devices`) lists a character device
/// of the NVIDIA driver (`nvidia-frontend`, `nvidia`, `nvidia-uvm`, ...).
pub fn nvidia_driver_listed(devices: &Path) -> bool {
    std::fs::read_to_string(devices)
        .is_ok_and(|text| character_devices(&text).any(|(_, name)| name.starts_with("nvidia")))
}

/// (major, name) of each character device in a `/proc/devices` text.
fn character_devices(devices: &str) -> impl Iterator<Item = (&str, &str)> {
    devices.lines().take_while(|line| !line.starts_with("Block devices")).filter_map(|line| line.trim().split_once(' '))
}

/// The major of `nvidia-uvm` in a `/proc/devices` text.
fn uvm_major(devices: &str) -> Option<u32> {
    character_devices(devices).find(|(_, name)| *name == "nvidia-uvm").and_then(|(major, _)| major.parse().ok())
}

/// `major()` / `minor()` of glibc's encoding of a 64-bit `dev_t`.
fn libc_major(rdev: u64) -> u32 {
    (((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff)) as u32
}

fn libc_minor(rdev: u64) -> u32 {
    (((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_uvm_major_among_character_devices_only() {
        let devices =
            "Character devices:\n  1 mem\n195 nvidia-frontend\n508 nvidia-uvm\n\nBlock devices:\n 9 nvidia-uvm\n";
        assert_eq!(uvm_major(devices), Some(508));
        assert_eq!(uvm_major("Character devices:\n  1 mem\n"), None);
    }

    #[test]
    fn device_numbers_decode_like_glibc() {
        // makedev(195, 255) and makedev(511, 1).
        assert_eq!((libc_major(0xc3ff), libc_minor(0xc3ff)), (195, 255));
        let rdev = ((511u64 & 0xfff) << 8) | 1;
        assert_eq!((libc_major(rdev), libc_minor(rdev)), (511, 1));
    }

    #[test]
    fn stand_ins_parse_and_bad_kinds_are_refused() {
        let parsed: StandIn = "ctl=/tmp/x".parse().unwrap();
        assert_eq!(parsed, StandIn { kind: fd_kind::CONTROL, path: PathBuf::from("/tmp/x") });
        assert!("gpu0=/tmp/x".parse::<StandIn>().unwrap_err().contains("gpu0"));
        assert!("/tmp/x".parse::<StandIn>().is_err());
    }

    #[test]
    fn files_sockets_and_stand_ins_classify() {
        let dir = tempfile::tempdir().unwrap();
        let stand_in = dir.path().join("nvidiactl");
        std::fs::write(&stand_in, b"").unwrap();
        let other = dir.path().join("plain");
        std::fs::write(&other, b"").unwrap();
        let proc = ProcFs::new(Path::new("/proc"));
        let matcher = DeviceMatcher::new(
            proc,
            Path::new("/proc/devices"),
            &[StandIn { kind: fd_kind::CONTROL, path: stand_in.clone() }],
        );
        let pid = std::process::id();
        let open = |path: &Path| std::fs::File::open(path).unwrap();
        let (stand_in_file, other_file) = (open(&stand_in), open(&other));
        use std::os::fd::AsRawFd;
        assert_eq!(matcher.classify(pid, stand_in_file.as_raw_fd() as u32), Some(fd_kind::CONTROL));
        assert_eq!(matcher.classify(pid, other_file.as_raw_fd() as u32), Some(fd_kind::NOT_NVIDIA));
        let null = open(Path::new("/dev/null"));
        assert_eq!(matcher.classify(pid, null.as_raw_fd() as u32), Some(fd_kind::NOT_NVIDIA));
        assert_eq!(matcher.classify(pid, 999_999), None);
    }
}
