//! The driver path's hooks: its programs live in the request probe's
//! object (they share its tail-call and statistics maps), and attach on
//! the per-syscall tracepoints of `ioctl` and `close` or, where tracefs
//! cannot be reached, on raw `sys_enter`/`sys_exit`.
use aya::maps::ProgramArray;

use super::RequestProbe;
use crate::probes::{self, ProbeError};

/// The raw fallback: (program, raw tracepoint).
const DRIVER_PROGRAMS: [(&str, &str); 2] = [("syscall_enter", "sys_enter"), ("syscall_exit", "sys_exit")];
/// The per-syscall tracepoints: (program, `syscalls:` event).
const DRIVER_TRACEPOINTS: [(&str, &str); 3] =
    [("ioctl_enter_tp", "sys_enter_ioctl"), ("ioctl_exit_tp", "sys_exit_ioctl"), ("close_enter_tp", "sys_enter_close")];
const DRIVER_DECODE_TP: &str = "driver_decode_tp";
const DRIVER_TP_TAIL_CALLS: &str = "DRIVER_TP_TAIL_CALLS";

/// Which hooks the driver path asks for (`--driver-hooks`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DriverHooks {
    /// The per-syscall tracepoints where tracefs can be reached, else raw.
    #[default]
    Auto,
    /// The per-syscall tracepoints or nothing.
    Tracepoints,
    /// Raw `sys_enter`/`sys_exit`.
    Raw,
}

/// Which hooks carry the driver path once attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverHooksUsed {
    /// `syscalls:sys_enter_ioctl`, `sys_exit_ioctl`, `sys_enter_close`.
    Tracepoints,
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
            Self::Tracepoints => {
                "ioctls decoded at the syscalls:sys_enter_ioctl/sys_exit_ioctl tracepoints (other syscalls run no program)"
                    .to_string()
            }
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
    /// which carry it. The per-syscall tracepoints (`ioctl` and `close`
    /// only) need tracefs; the raw `sys_enter`/`sys_exit` fallback runs for
    /// every syscall on the node, so only nodes that have an NVIDIA driver
    /// (or tests with stand-ins) attach either.
    pub fn attach_driver_path(&mut self, hooks: DriverHooks) -> Result<DriverHooksUsed, ProbeError> {
        match hooks {
            DriverHooks::Raw => {
                probes::attach_raw_tracepoints(&mut self.ebpf, &DRIVER_PROGRAMS)?;
                Ok(DriverHooksUsed::Raw { why: None })
            }
            DriverHooks::Tracepoints => {
                self.attach_driver_tracepoints()?;
                Ok(DriverHooksUsed::Tracepoints)
            }
            DriverHooks::Auto => match self.attach_driver_tracepoints() {
                Ok(()) => Ok(DriverHooksUsed::Tracepoints),
                Err(err) => {
                    probes::attach_raw_tracepoints(&mut self.ebpf, &DRIVER_PROGRAMS)?;
                    Ok(DriverHooksUsed::Raw { why: Some(err.to_string()) })
                }
            },
        }
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
        let name = DRIVER_DECODE_TP;
        let program = probes::load_tracepoint(&mut self.ebpf, name)?;
        let fd = program
            .fd()
            .map_err(|source| ProbeError::Program { name, source })?
            .try_clone()
            .map_err(|err| ProbeError::Program { name, source: aya::programs::ProgramError::IOError(err) })?;
        let map = self.ebpf.map_mut(DRIVER_TP_TAIL_CALLS).ok_or(ProbeError::MissingMap(DRIVER_TP_TAIL_CALLS))?;
        let mut tail_calls: ProgramArray<_> =
            ProgramArray::try_from(map).map_err(|source| ProbeError::Map { name: DRIVER_TP_TAIL_CALLS, source })?;
        tail_calls.set(0, &fd, 0).map_err(|source| ProbeError::Map { name: DRIVER_TP_TAIL_CALLS, source })?;
        for (name, event) in DRIVER_TRACEPOINTS {
            let program = probes::load_tracepoint(&mut self.ebpf, name)?;
            program.attach("syscalls", event).map_err(|source| ProbeError::Program { name, source })?;
        }
        Ok(())
    }
}
