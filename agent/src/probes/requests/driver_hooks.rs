//! The driver path's hooks: its programs live in the request probe's
//! object (they share its tail-call and statistics maps), and attach as
//! uprobes on the driver libraries' PLT stubs of `ioctl` and `close`
//! (nothing else on the node pays for them), on the per-syscall
//! tracepoints of `ioctl` and `close`, or, where tracefs cannot be
//! reached, on raw `sys_enter`/`sys_exit`.
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::programs::uprobe::{UProbeAttachLocation, UProbeScope};
use aya::programs::UProbe;

use super::RequestProbe;
use crate::probes::driver::libraries;
use crate::probes::{self, ProbeError};

/// The raw fallback: (program, raw tracepoint).
const DRIVER_PROGRAMS: [(&str, &str); 2] = [("syscall_enter", "sys_enter"), ("syscall_exit", "sys_exit")];
/// The per-syscall tracepoints: (program, `syscalls:` event).
const DRIVER_TRACEPOINTS: [(&str, &str); 3] =
    [("ioctl_enter_tp", "sys_enter_ioctl"), ("ioctl_exit_tp", "sys_exit_ioctl"), ("close_enter_tp", "sys_enter_close")];
const DRIVER_DECODE_TP: &str = "driver_decode_tp";
const DRIVER_TP_TAIL_CALLS: &str = "DRIVER_TP_TAIL_CALLS";
/// The library path: (program, the import whose PLT stub it probes).
const DRIVER_UPROBES: [(&str, &str); 3] =
    [("ioctl_enter_up", "ioctl"), ("ioctl_exit_up", "ioctl"), ("close_enter_up", "close")];
const DRIVER_DECODE_UP: &str = "driver_decode_up";
const DRIVER_UP_TAIL_CALLS: &str = "DRIVER_UP_TAIL_CALLS";
/// The imports a driver library must call through PLT stubs.
const DRIVER_IMPORTS: [&str; 2] = ["ioctl", "close"];

/// A driver library the library path probes: kept open, so that its
/// attachments (made through `/proc/self/fd/N`) outlive the path used to
/// find it.
pub struct DriverLibrary {
    /// (device, inode): one attachment per file.
    key: (u64, u64),
    /// Where it was found.
    pub path: PathBuf,
    _file: std::fs::File,
}

/// Which hooks the driver path asks for (`--driver-hooks`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DriverHooks {
    /// The driver libraries where one is found and can be probed, else the
    /// per-syscall tracepoints where tracefs can be reached, else raw.
    #[default]
    Auto,
    /// Uprobes on the driver libraries or nothing.
    Libraries,
    /// The per-syscall tracepoints or nothing.
    Tracepoints,
    /// Raw `sys_enter`/`sys_exit`.
    Raw,
}

/// Which hooks carry the driver path once attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverHooksUsed {
    /// Uprobes on the PLT stubs of `ioctl` and `close` in these libraries.
    Libraries {
        /// The libraries probed.
        paths: Vec<String>,
    },
    /// `syscalls:sys_enter_ioctl`, `sys_exit_ioctl`, `sys_enter_close`;
    /// `why` the libraries were not used when `Auto` tried them.
    Tracepoints {
        /// Why no driver library was probed.
        why: Option<String>,
    },
    /// Raw `sys_enter`/`sys_exit`; `why` the tracepoints were not used
    /// when they were wanted.
    Raw {
        /// Why the per-syscall tracepoints did not attach.
        why: Option<String>,
    },
}

impl DriverHooksUsed {
    /// For `/healthz`: where the driver calls are read, and what it costs.
    pub fn describe(&self) -> String {
        match self {
            Self::Libraries { paths } => format!(
                "ioctls decoded at uprobes on the driver libraries' calls to ioctl and close ({}): other processes and syscalls pay nothing",
                paths.join(", ")
            ),
            Self::Tracepoints { why: None } => {
                "ioctls decoded at the syscalls:sys_enter_ioctl/sys_exit_ioctl tracepoints (other syscalls run no program)"
                    .to_string()
            }
            Self::Tracepoints { why: Some(why) } => format!(
                "ioctls decoded at the syscalls:sys_enter_ioctl/sys_exit_ioctl tracepoints (other syscalls run no program, but every syscall takes the kernel's tracing slow path): no driver library was probed ({why})"
            ),
            Self::Raw { why: None } => {
                "ioctls decoded at the raw sys_enter/sys_exit tracepoints (every syscall on the node runs them)".to_string()
            }
            Self::Raw { why: Some(why) } => format!(
                "ioctls decoded at the raw sys_enter/sys_exit tracepoints, which every syscall on the node runs: the per-syscall tracepoints did not attach ({why}); mount tracefs at /sys/kernel/tracing on the host"
            ),
        }
    }
}

impl RequestProbe {
    /// Attaches the driver path on the hooks `hooks` asks for and says
    /// which carry it. The library path needs uprobes (`libraries` is why
    /// not, where they are refused) and a driver library among
    /// `libraries` (files found by `libraries::candidates`) whose calls
    /// to `ioctl` and `close` go through PLT stubs; under `Auto`, a
    /// libcuda. The per-syscall tracepoints (`ioctl` and `close` only)
    /// need tracefs; the raw `sys_enter`/`sys_exit` fallback runs for every
    /// syscall on the node. Either syscall path costs every syscall on the
    /// node something, so only nodes that have an NVIDIA driver (or tests
    /// with stand-ins) attach the driver path at all.
    pub fn attach_driver_path(
        &mut self,
        hooks: DriverHooks,
        libraries: Result<Vec<PathBuf>, String>,
    ) -> Result<DriverHooksUsed, ProbeError> {
        let used = self.attach_driver_hooks(hooks, libraries)?;
        self.driver_hooks = Some(used.clone());
        Ok(used)
    }

    /// A libcuda found in a pod's process (`path`: the launch probe's open
    /// file) after the driver path attached. On the library hooks it is
    /// probed too, unless it is a file probed already (the host's, mounted
    /// into the pod); one that cannot be probed (no PLT stubs) moves the
    /// driver path onto the syscall hooks as well, so that its calls are
    /// seen. The hooks now in use if they changed. Calls its process made
    /// before are not seen (as for processes older than the agent).
    pub fn driver_library_found(&mut self, path: &Path, found_at: &Path) -> Option<DriverHooksUsed> {
        if !matches!(self.driver_hooks, Some(DriverHooksUsed::Libraries { .. })) {
            return None;
        }
        let refused = match self.attach_driver_library(path, found_at) {
            Ok(true) => {
                tracing::warn!(path = %found_at.display(), "a pod uses a libcuda of its own: probed from now on; calls its processes made before are not seen");
                let used = self.libraries_used();
                self.driver_hooks = Some(used.clone());
                return Some(used);
            }
            Ok(false) => return None,
            Err(err) => probes::with_causes(&err),
        };
        let why = format!("a pod's libcuda {} cannot be probed ({refused})", found_at.display());
        tracing::warn!(reason = %why, "the driver path adds the syscall hooks");
        let used = match self.attach_syscall_hooks(why) {
            Ok(used) => used,
            Err(err) => {
                tracing::warn!(error = %err, "the driver path's syscall hooks did not attach: that pod's driver calls are not seen");
                return None;
            }
        };
        self.driver_hooks = Some(used.clone());
        Some(used)
    }

    fn attach_driver_hooks(
        &mut self,
        hooks: DriverHooks,
        libraries: Result<Vec<PathBuf>, String>,
    ) -> Result<DriverHooksUsed, ProbeError> {
        match hooks {
            DriverHooks::Raw => {
                probes::attach_raw_tracepoints(&mut self.ebpf, &DRIVER_PROGRAMS)?;
                Ok(DriverHooksUsed::Raw { why: None })
            }
            DriverHooks::Tracepoints => {
                self.attach_driver_tracepoints()?;
                Ok(DriverHooksUsed::Tracepoints { why: None })
            }
            DriverHooks::Libraries => {
                let libraries = libraries.map_err(ProbeError::DriverLibraries)?;
                self.attach_driver_libraries(&libraries, false)?;
                Ok(self.libraries_used())
            }
            DriverHooks::Auto => {
                let attached = libraries
                    .map_err(ProbeError::DriverLibraries)
                    .and_then(|libraries| self.attach_driver_libraries(&libraries, true));
                let why = match attached {
                    Ok(()) => return Ok(self.libraries_used()),
                    Err(err) => err.to_string(),
                };
                self.attach_syscall_hooks(why)
            }
        }
    }

    /// The syscall hooks, where the library hooks could not do (`why`):
    /// the per-syscall tracepoints, else raw `sys_enter`/`sys_exit`.
    fn attach_syscall_hooks(&mut self, why: String) -> Result<DriverHooksUsed, ProbeError> {
        match self.attach_driver_tracepoints() {
            Ok(()) => Ok(DriverHooksUsed::Tracepoints { why: Some(why) }),
            Err(err) => {
                probes::attach_raw_tracepoints(&mut self.ebpf, &DRIVER_PROGRAMS)?;
                Ok(DriverHooksUsed::Raw { why: Some(format!("{why}; {err}")) })
            }
        }
    }

    fn libraries_used(&self) -> DriverHooksUsed {
        DriverHooksUsed::Libraries {
            paths: self.driver_libraries.iter().map(|library| library.path.display().to_string()).collect(),
        }
    }

    /// The library path on every library of `paths` that can be probed;
    /// an error naming each that could not when none was (with
    /// `need_libcuda`, when no libcuda was: a monitoring library alone
    /// does not see the contexts).
    fn attach_driver_libraries(&mut self, paths: &[PathBuf], need_libcuda: bool) -> Result<(), ProbeError> {
        if paths.is_empty() {
            return Err(ProbeError::DriverLibraries("no driver library (libcuda.so*) found".to_string()));
        }
        self.load_driver_uprobes()?;
        let mut refused = Vec::new();
        for path in paths {
            if let Err(err) = self.attach_driver_library(path, path) {
                refused.push(probes::with_causes(&err));
            }
        }
        let libcuda = self.driver_libraries.iter().any(|library| libraries::is_libcuda(&library.path));
        if self.driver_libraries.is_empty() || (need_libcuda && !libcuda) {
            self.driver_libraries.clear();
            for (name, _) in DRIVER_UPROBES {
                if let Ok(program) = probes::program_of::<UProbe>(&mut self.ebpf, name) {
                    let _ = program.unload();
                }
            }
            if refused.is_empty() {
                refused.push("no libcuda among the driver libraries found".to_string());
            }
            return Err(ProbeError::DriverLibraries(refused.join("; ")));
        }
        Ok(())
    }

    /// Adds the library path on one more driver library, opened as `path`
    /// and known to the operator as `shown`; `false` if this file is
    /// probed already.
    fn attach_driver_library(&mut self, path: &Path, shown: &Path) -> Result<bool, ProbeError> {
        let library_error = |source| ProbeError::Library { path: shown.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(library_error)?;
        let metadata = file.metadata().map_err(library_error)?;
        let key = (metadata.dev(), metadata.ino());
        if self.driver_libraries.iter().any(|library| library.key == key) {
            return Ok(false);
        }
        let stubs = probes::elf::plt_stubs(&file, &DRIVER_IMPORTS).map_err(library_error)?;
        let missing: Vec<&str> = DRIVER_IMPORTS.into_iter().filter(|import| !stubs.contains_key(*import)).collect();
        if !missing.is_empty() {
            return Err(library_error(std::io::Error::other(format!(
                "no PLT stub for {} (not called, or called through the GOT)",
                missing.join(", ")
            ))));
        }
        let target = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        // All three or none: an entry probe without its return probe would
        // stash calls nobody decodes.
        let mut links = Vec::with_capacity(DRIVER_UPROBES.len());
        for (name, import) in DRIVER_UPROBES {
            let program: &mut UProbe = probes::program_of(&mut self.ebpf, name)?;
            match program.attach(
                UProbeAttachLocation::AbsoluteOffset(stubs[import]),
                &target,
                UProbeScope::AllProcesses,
            ) {
                Ok(link) => links.push((name, link)),
                Err(source) => {
                    for (attached, link) in links {
                        if let Ok(program) = probes::program_of::<UProbe>(&mut self.ebpf, attached) {
                            let _ = program.detach(link);
                        }
                    }
                    return Err(ProbeError::Program { name, source });
                }
            }
        }
        tracing::info!(path = %shown.display(), ioctl_stub = stubs["ioctl"], "driver library probed");
        self.driver_libraries.push(DriverLibrary { key, path: shown.to_path_buf(), _file: file });
        Ok(true)
    }

    /// Loads the library path's programs and its decoder's tail call
    /// (once).
    fn load_driver_uprobes(&mut self) -> Result<(), ProbeError> {
        let decoder: &mut UProbe = probes::program_of(&mut self.ebpf, DRIVER_DECODE_UP)?;
        if decoder.fd().is_ok() {
            return Ok(());
        }
        decoder.load().map_err(|source| ProbeError::Program { name: DRIVER_DECODE_UP, source })?;
        probes::set_tail_call(&mut self.ebpf, DRIVER_UP_TAIL_CALLS, 0, DRIVER_DECODE_UP)?;
        for (name, _) in DRIVER_UPROBES {
            let program: &mut UProbe = probes::program_of(&mut self.ebpf, name)?;
            program.load().map_err(|source| ProbeError::Program { name, source })?;
        }
        Ok(())
    }

    /// The driver path on `syscalls:sys_enter_ioctl`, `sys_exit_ioctl` and
    /// `sys_enter_close`, with its decoder in its own tail-call array. All
    /// or nothing: a failure unloads what was attached.
    fn attach_driver_tracepoints(&mut self) -> Result<(), ProbeError> {
        let result = self.try_attach_driver_tracepoints();
        if result.is_err() {
            for (name, _) in DRIVER_TRACEPOINTS {
                if let Ok(program) = probes::program_of::<aya::programs::TracePoint>(&mut self.ebpf, name) {
                    let _ = program.unload();
                }
            }
        }
        result
    }

    fn try_attach_driver_tracepoints(&mut self) -> Result<(), ProbeError> {
        probes::load_tracepoint(&mut self.ebpf, DRIVER_DECODE_TP)?;
        probes::set_tail_call(&mut self.ebpf, DRIVER_TP_TAIL_CALLS, 0, DRIVER_DECODE_TP)?;
        for (name, event) in DRIVER_TRACEPOINTS {
            let program = probes::load_tracepoint(&mut self.ebpf, name)?;
            program.attach("syscalls", event).map_err(|source| ProbeError::Program { name, source })?;
        }
        Ok(())
    }
}
