//! What the kernel lets this process attach, asked before relying on it.
//!
//! Uprobes are the one hook whose privilege moved: since the 2025 fix
//! "perf: Require CAP_SYS_ADMIN for uprobes" (mainline, and backported to
//! the stable kernels), creating one needs `CAP_SYS_ADMIN`; `CAP_PERFMON`,
//! which still opens tracepoints, no longer does. Without it the launch
//! probe and the driver path's library hooks cannot work, and must say so
//! instead of serving nothing as if it were the truth.

/// Where the kernel says which perf event type creates uprobes.
const UPROBE_TYPE: &str = "/sys/bus/event_source/devices/uprobe/type";

/// `struct perf_event_attr` up to `config2` (`PERF_ATTR_SIZE_VER1`, 72
/// bytes, which every kernel with the uprobe PMU accepts).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// Bit 0: `disabled`.
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
}

/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// Whether this process may create uprobes: one is created (disabled) on
/// this binary's entry point and closed at once. The error says why not.
pub fn uprobes_permitted() -> Result<(), String> {
    let kind: u32 = std::fs::read_to_string(UPROBE_TYPE)
        .map_err(|err| format!("reading {UPROBE_TYPE}: {err}"))?
        .trim()
        .parse()
        .map_err(|err| format!("{UPROBE_TYPE}: {err}"))?;
    let exe = std::fs::File::open("/proc/self/exe").map_err(|err| format!("opening /proc/self/exe: {err}"))?;
    let offset = super::elf::entry_offset(&exe).map_err(|err| format!("reading /proc/self/exe: {err}"))?;
    let path = c"/proc/self/exe";
    // The uprobe PMU's fields: the path in config1, the file offset in
    // config2; created disabled, so it never fires.
    let attr = PerfEventAttr {
        kind,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        flags: 1,
        config1: path.as_ptr() as u64,
        config2: offset,
        ..PerfEventAttr::default()
    };
    // SAFETY: `attr` and the path it points to outlive the call; any
    // CPU, all processes, no group, no flags.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr as *const _, -1, 0, -1, PERF_FLAG_FD_CLOEXEC) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => format!(
                "the kernel refuses uprobes to this process ({err}): kernels since the 2025 fix require CAP_SYS_ADMIN for them (the chart's uprobes: true adds it)"
            ),
            _ => format!("creating a uprobe: {err}"),
        });
    }
    // SAFETY: the fd the call just returned.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests run as root (CI): uprobes are allowed, and the check
    /// leaves nothing behind that a second check would trip on.
    #[test]
    fn root_may_create_uprobes() {
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        assert_eq!(uprobes_permitted(), Ok(()));
        assert_eq!(uprobes_permitted(), Ok(()));
    }
}
