//! A stand-in for the NVIDIA driver's device nodes, for tests without a
//! GPU: a FUSE file system (`integration/driver/standin_device.c`,
//! libfuse3) whose files `nvidiactl`, `nvidia0` and `nvidia-uvm` answer
//! ioctls with success, and a client (`driver_client.c`) that makes the
//! calls a CUDA process makes. The agent is told to treat the files as
//! NVIDIA devices (`--driver-stand-in`).
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context as _};

/// Where in a client's container the stand-in driver library is mounted
/// (the client's run path has it after the host's `lib/`).
pub const LIBRARY_DIR_IN_CONTAINER: &str = "/stand-in-lib";

/// The stand-in driver library `build` puts in `dir`: the client's
/// ioctls and closes go through its PLT, as a CUDA process's go through
/// libcuda's.
pub fn library_dir(dir: &Path) -> PathBuf {
    dir.join("lib")
}

/// Builds the stand-in driver library alone into `dir/lib/libcuda.so.1`
/// and returns its path.
pub fn build_library(dir: &Path) -> anyhow::Result<PathBuf> {
    build_library_into(&library_dir(dir), &[])
}

/// Builds the stand-in driver library as `lib_dir/libcuda.so.1` with
/// extra compiler `flags` (`-fno-plt`: a libcuda whose calls into libc go
/// through the GOT, with no PLT stub to probe) and returns its path.
pub fn build_library_into(lib_dir: &Path, flags: &[&str]) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(lib_dir)?;
    let library = lib_dir.join("libcuda.so.1");
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("driver");
    let status = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(&library)
        .arg("driver_calls.c")
        .args(flags)
        .current_dir(&sources)
        .status()
        .context("gcc")?;
    if !status.success() {
        bail!("building the stand-in driver library {flags:?} failed");
    }
    Ok(library)
}

/// Builds `standin_device`, the stand-in driver library
/// (`lib/libcuda.so.1`) and `driver_client`, which calls the driver
/// through it, into `dir`.
pub fn build(dir: &Path) -> anyhow::Result<()> {
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("driver");
    let fuse = Command::new("pkg-config").args(["--cflags", "--libs", "fuse3"]).output().context("pkg-config")?;
    if !fuse.status.success() {
        bail!("no fuse3 for pkg-config: scripts/setup.sh installs libfuse3-dev");
    }
    let fuse_flags: Vec<String> = String::from_utf8(fuse.stdout)?.split_whitespace().map(String::from).collect();
    let gcc = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("gcc").args(args).current_dir(&sources).status().context("gcc")?;
        if !status.success() {
            bail!("gcc {args:?} failed");
        }
        Ok(())
    };
    let device = dir.join("standin_device").display().to_string();
    let mut device_args = vec!["-O2", "-Wall", "-o", &device, "standin_device.c"];
    device_args.extend(fuse_flags.iter().map(String::as_str));
    gcc(&device_args)?;
    let library = build_library(dir)?.display().to_string();
    let run_path = format!("-Wl,-rpath,{}:{LIBRARY_DIR_IN_CONTAINER}", library_dir(dir).display());
    let client = dir.join("driver_client").display().to_string();
    gcc(&["-O2", "-Wall", "-o", &client, "driver_client.c", &library, &run_path])
}

/// The mounted stand-in; unmounted (SIGTERM to its server, which unmounts,
/// then a lazy unmount in case it could not) when dropped.
pub struct StandInDevice {
    server: Child,
    /// Where the device files are.
    pub mountpoint: PathBuf,
}

impl StandInDevice {
    /// Mounts the stand-in (built by `build` into `tools`) at `tools/dev`.
    pub fn mount(tools: &Path) -> anyhow::Result<Self> {
        let mountpoint = tools.join("dev");
        std::fs::create_dir_all(&mountpoint)?;
        let mut server = Command::new(tools.join("standin_device"))
            .arg(&mountpoint)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the stand-in device")?;
        let mut line = String::new();
        BufReader::new(server.stdout.take().context("stand-in output")?).read_line(&mut line)?;
        if line.trim() != "mounted" {
            bail!("the stand-in device did not mount (FUSE): {line:?}");
        }
        Ok(Self { server, mountpoint })
    }

    /// `--driver-stand-in` values for the control and UVM files, as the
    /// agent sees them under `seen_at` (the mountpoint, or where a
    /// container mounts it).
    pub fn agent_args(seen_at: &Path) -> Vec<String> {
        [("ctl", "nvidiactl"), ("uvm", "nvidia-uvm")]
            .into_iter()
            .flat_map(|(kind, file)| {
                ["--driver-stand-in".to_string(), format!("{kind}={}", seen_at.join(file).display())]
            })
            .collect()
    }
}

impl Drop for StandInDevice {
    fn drop(&mut self) {
        // SAFETY: a signal to the child this guard started.
        unsafe { libc::kill(self.server.id() as i32, libc::SIGTERM) };
        let _ = self.server.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).stderr(Stdio::null()).status();
    }
}
