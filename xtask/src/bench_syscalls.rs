//! `cargo xtask bench-syscalls`: what the agent costs a process it does not
//! watch. Every process on the node makes syscalls; the request and driver
//! probes hook syscalls, so each of them may pay for the agent even in a
//! process no pod of interest owns. This measures that tax on three cheap
//! calls made by this process (in no watched pod): `getppid`, a 64-byte
//! `read` of `/dev/zero`, and an `ioctl` (FIONREAD) on a pipe, the kind of
//! fd the driver probe must tell apart from an NVIDIA device; and, for the
//! price of the hooks on the calls they do act on, a 64-byte write and
//! read over a loopback TCP connection (a fiftieth as many of those);
//! and, for what a CUDA process pays per driver call, the same pipe
//! `ioctl` made through a stand-in driver library (`libcuda.so.1`, built
//! from `integration/driver/driver_calls.c`), the way libcuda calls the
//! driver.
//!
//! Each round measures, back to back: nothing attached; only the no-op
//! programs on the probes' raw `sys_enter`/`sys_exit` hooks (the floor
//! those hooks cost every syscall); no-op programs on the per-syscall
//! tracepoints of the dozen calls the probes need instead (what other
//! syscalls would pay if the probes moved there; needs tracefs); no-op
//! programs on the socket tracepoints `sock:sock_recv_length` and
//! `sock_send_length` (hooks off the syscall path; needs tracefs); the
//! agent as the chart ships it on a node without an NVIDIA driver (request
//! probe on the socket tracepoints, launch accounting on, driver path not
//! attached); and the same agent with the driver path on, as on a GPU
//! node: on uprobes on the driver library's calls to `ioctl` and `close`
//! (the chart's default where a libcuda is found), on the per-syscall
//! tracepoints of `ioctl` and `close` (its default where none is and
//! tracefs is mounted) and on the raw `sys_enter`/`sys_exit` fallback. Each figure is the median of `repeats` timed loops of
//! `calls` calls; the report gives each configuration's median over the
//! rounds and the difference against nothing attached.
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use integration::agent::AgentProcess;
use integration::workspace_binary;
use podgpu_agent::probes::baseline::{HookBaseline, PROBED_SYSCALLS};

/// Benchmark options.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Rounds of (nothing, no-op hooks of each kind, agent).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Timed loops per call and configuration (their median counts).
    #[arg(long, default_value_t = 7)]
    repeats: u32,
    /// Calls per timed loop.
    #[arg(long, default_value_t = 2_000_000)]
    calls: u64,
}

/// The cheap calls measured.
#[derive(Clone, Copy, Debug)]
enum Call {
    Getppid,
    ReadDevZero,
    IoctlPipe,
    TcpLoopback,
    LibraryIoctl,
}

const CALLS: [Call; 5] = [Call::Getppid, Call::ReadDevZero, Call::IoctlPipe, Call::TcpLoopback, Call::LibraryIoctl];

impl Call {
    fn label(self) -> &'static str {
        match self {
            Call::Getppid => "getppid()",
            Call::ReadDevZero => "read(/dev/zero, 64 B)",
            Call::IoctlPipe => "ioctl(pipe, FIONREAD)",
            Call::TcpLoopback => "TCP write+read 64 B",
            Call::LibraryIoctl => "ioctl via driver lib",
        }
    }
}

/// `nv_standin_ioctl` of the stand-in driver library.
type LibraryIoctl = unsafe extern "C" fn(libc::c_int, libc::c_ulong, *mut libc::c_void) -> libc::c_int;

/// File descriptors the calls use, open for the whole run.
struct Fds {
    zero: libc::c_int,
    pipe: [libc::c_int; 2],
    /// A loopback TCP connection: (client, server).
    tcp: (std::net::TcpStream, std::net::TcpStream),
    /// The stand-in driver library's `ioctl` (the library stays loaded).
    library_ioctl: LibraryIoctl,
}

impl Fds {
    fn open(library: &Path) -> anyhow::Result<Self> {
        let library_ioctl = load_library_ioctl(library)?;
        // SAFETY: a NUL-terminated path; the fd is closed on drop.
        let zero = unsafe { libc::open(c"/dev/zero".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if zero < 0 {
            bail!("open /dev/zero: {}", std::io::Error::last_os_error());
        }
        let mut pipe = [0; 2];
        // SAFETY: pipe writes two fds into the array.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            bail!("pipe: {}", std::io::Error::last_os_error());
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("a loopback listener")?;
        let client = std::net::TcpStream::connect(listener.local_addr()?).context("connecting on loopback")?;
        let (server, _) = listener.accept().context("accepting on loopback")?;
        client.set_nodelay(true)?;
        Ok(Self { zero, pipe, tcp: (client, server), library_ioctl })
    }

    /// Nanoseconds per call of `call`, over `calls` calls.
    fn time(&self, call: Call, calls: u64) -> f64 {
        let mut buffer = [0u8; 64];
        let mut pending: libc::c_int = 0;
        let started = Instant::now();
        for _ in 0..calls {
            // SAFETY: plain syscalls on fds this struct owns, into buffers
            // that outlive them.
            unsafe {
                match call {
                    Call::Getppid => {
                        libc::syscall(libc::SYS_getppid);
                    }
                    Call::ReadDevZero => {
                        libc::read(self.zero, buffer.as_mut_ptr().cast(), buffer.len());
                    }
                    Call::IoctlPipe => {
                        libc::ioctl(self.pipe[0], libc::FIONREAD, &mut pending);
                    }
                    Call::LibraryIoctl => {
                        (self.library_ioctl)(self.pipe[0], libc::FIONREAD, (&mut pending as *mut libc::c_int).cast());
                    }
                    Call::TcpLoopback => {
                        use std::os::fd::AsRawFd;
                        libc::write(self.tcp.0.as_raw_fd(), buffer.as_ptr().cast(), buffer.len());
                        libc::read(self.tcp.1.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len());
                    }
                }
            }
        }
        started.elapsed().as_nanos() as f64 / calls as f64
    }
}

/// Loads `library` for good and returns its `nv_standin_ioctl`.
fn load_library_ioctl(library: &Path) -> anyhow::Result<LibraryIoctl> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(library.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path; the handle is never closed, so the
    // function pointer stays valid.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
    if handle.is_null() {
        bail!("dlopen {}", library.display());
    }
    // SAFETY: a NUL-terminated name in a loaded library.
    let symbol = unsafe { libc::dlsym(handle, c"nv_standin_ioctl".as_ptr()) };
    if symbol.is_null() {
        bail!("{} has no nv_standin_ioctl", library.display());
    }
    // SAFETY: the symbol is `driver_calls.c`'s function of this signature.
    Ok(unsafe { std::mem::transmute::<*mut libc::c_void, LibraryIoctl>(symbol) })
}

impl Drop for Fds {
    fn drop(&mut self) {
        // SAFETY: fds this struct opened.
        unsafe {
            libc::close(self.zero);
            libc::close(self.pipe[0]);
            libc::close(self.pipe[1]);
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The three configurations of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attached {
    Nothing,
    NoopHooks,
    NoopPerSyscall,
    NoopSocket,
    Agent,
    AgentWithDriverPath,
    AgentWithTracepointDriverPath,
    AgentWithRawDriverPath,
}

const CONFIGS: [Attached; 8] = [
    Attached::Nothing,
    Attached::NoopHooks,
    Attached::NoopPerSyscall,
    Attached::NoopSocket,
    Attached::Agent,
    Attached::AgentWithDriverPath,
    Attached::AgentWithTracepointDriverPath,
    Attached::AgentWithRawDriverPath,
];

impl Attached {
    fn label(self) -> &'static str {
        match self {
            Attached::Nothing => "nothing attached",
            Attached::NoopHooks => "no-op raw sys_enter/exit",
            Attached::NoopPerSyscall => "no-op per-syscall tps",
            Attached::NoopSocket => "no-op sock:sock_*_length",
            Attached::Agent => "agent (chart, no NVIDIA)",
            Attached::AgentWithDriverPath => "agent + driver (libs)",
            Attached::AgentWithTracepointDriverPath => "agent + driver (tps)",
            Attached::AgentWithRawDriverPath => "agent + driver (raw)",
        }
    }
}

/// The per-syscall tracepoints, where tracefs is mounted.
const SYSCALL_EVENTS: &str = "/sys/kernel/tracing/events/syscalls";

/// Runs every call under one configuration: per call, the median of the
/// timed loops.
fn measure(fds: &Fds, options: &Options) -> Vec<f64> {
    CALLS
        .iter()
        .map(|&call| {
            // A loopback round trip costs ~50x a cheap call: fewer of them.
            let calls = if matches!(call, Call::TcpLoopback) { (options.calls / 50).max(1) } else { options.calls };
            let mut loops: Vec<f64> = (0..options.repeats).map(|_| fds.time(call, calls)).collect();
            median(&mut loops)
        })
        .collect()
}

/// Whether a program on the socket tracepoints (off the syscall path) can
/// still see the syscall's fd and buffer, which request probes there
/// would need: prints what it read for one 64-byte TCP read.
fn socket_args_feasibility(fds: &Fds) {
    use std::os::fd::AsRawFd;
    let mut buffer = [0u8; 64];
    let (client, server) = (fds.tcp.0.as_raw_fd(), fds.tcp.1.as_raw_fd());
    // SAFETY: plain syscalls on connected sockets this process owns.
    unsafe { libc::write(client, buffer.as_ptr().cast(), buffer.len()) };
    let read = HookBaseline::socket_call_args(|| {
        // SAFETY: as above; 64 bytes are waiting.
        unsafe { libc::read(server, buffer.as_mut_ptr().cast(), buffer.len()) };
    });
    match read {
        Ok(Some([count, buffer_address, fd, nr])) => eprintln!(
            "socket tracepoint read the syscall's registers: nr {nr} (read is 0), fd {fd} (expected {server}), count {count}, buffer {buffer_address:#x} (expected {:#x})",
            buffer.as_ptr() as u64
        ),
        Ok(None) => eprintln!("socket tracepoint attached but saw no call of this process"),
        Err(err) => eprintln!("socket tracepoint with task registers not loaded: {err}"),
    }
}

/// The agent as the chart runs it, less what needs a cluster: request
/// probe, launch accounting on (its default), no GPU on this machine. The
/// driver path is `auto` in the chart: off here (no NVIDIA driver), on on a
/// GPU node, which `driver_path` stands for, on the hooks `driver_hooks`
/// names (the chart's `auto` takes the driver libraries where a libcuda
/// is found, here `library`, else the per-syscall tracepoints where
/// tracefs is mounted, else raw).
fn start_agent(driver_path: bool, driver_hooks: &str, library: &Path) -> anyhow::Result<AgentProcess> {
    let path = if driver_path { "on" } else { "auto" };
    let mut args: Vec<String> =
        ["--gpu", "none", "--launch-accounting", "on", "--driver-path", path, "--driver-hooks", driver_hooks]
            .map(String::from)
            .to_vec();
    args.push(format!("--driver-libraries={}", library.display()));
    let agent = AgentProcess::start(&workspace_binary("podgpu-agent"), &args)?;
    // The probes attach before the agent serves; let the first tick run.
    std::thread::sleep(Duration::from_millis(500));
    Ok(agent)
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let _runtime = crate::root_runtime("bench-syscalls")?;
    if options.repeats == 0 || options.calls == 0 {
        bail!("--repeats and --calls must be at least 1");
    }
    if !Path::new(&workspace_binary("podgpu-agent")).exists() {
        bail!("build the agent first (cargo build --release)");
    }
    let library_dir = tempfile::tempdir()?;
    let library = integration::driver_standin::build_library(library_dir.path())?;
    let fds = Fds::open(&library)?;
    socket_args_feasibility(&fds);
    // per configuration, per call: one figure per round
    let mut figures: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); CALLS.len()]; CONFIGS.len()];
    for round in 0..options.rounds {
        for (index, config) in CONFIGS.iter().enumerate() {
            let measured = match config {
                Attached::Nothing => measure(&fds, &options),
                Attached::NoopHooks => {
                    let _hooks = HookBaseline::attach_syscall_hooks().context("attaching the no-op hook programs")?;
                    measure(&fds, &options)
                }
                // Need tracefs; without it the row says so and the rest runs.
                Attached::NoopPerSyscall | Attached::NoopSocket => {
                    let hooks = if *config == Attached::NoopPerSyscall {
                        HookBaseline::attach_per_syscall(&PROBED_SYSCALLS)
                    } else {
                        HookBaseline::attach_socket_tracepoints()
                    };
                    match hooks {
                        Ok(_hooks) => measure(&fds, &options),
                        Err(err) => {
                            eprintln!(
                                "{} not attached ({err}): mount tracefs (mount -t tracefs nodev /sys/kernel/tracing) to measure them",
                                config.label()
                            );
                            vec![f64::NAN; CALLS.len()]
                        }
                    }
                }
                Attached::Agent
                | Attached::AgentWithDriverPath
                | Attached::AgentWithTracepointDriverPath
                | Attached::AgentWithRawDriverPath => {
                    let hooks = match config {
                        Attached::AgentWithRawDriverPath => "raw",
                        Attached::AgentWithTracepointDriverPath => "tracepoints",
                        _ => "auto",
                    };
                    // Only the tracepoints need tracefs (the agent would fall
                    // back to nothing): without it the row says n/a.
                    if hooks == "tracepoints" && !Path::new(SYSCALL_EVENTS).exists() {
                        eprintln!("{} not measured: mount tracefs to measure it", config.label());
                        figures[index].iter_mut().for_each(|rounds| rounds.push(f64::NAN));
                        continue;
                    }
                    let mut agent = start_agent(*config != Attached::Agent, hooks, &library)?;
                    let measured = measure(&fds, &options);
                    agent.stop(Duration::from_secs(5));
                    measured
                }
            };
            eprintln!(
                "round {}/{}: {:<24} {}",
                round + 1,
                options.rounds,
                config.label(),
                measured.iter().map(|ns| format!("{ns:.0} ns")).collect::<Vec<_>>().join(" / ")
            );
            for (call, ns) in measured.into_iter().enumerate() {
                figures[index][call].push(ns);
            }
        }
    }
    println!(
        "syscall tax on a process in no watched pod: ns per call, median of {} rounds ({} loops of {} calls each)",
        options.rounds, options.repeats, options.calls
    );
    println!("{:<26} {}", "", CALLS.iter().map(|c| format!("{:>24}", c.label())).collect::<String>());
    let medians: Vec<Vec<f64>> =
        figures.iter_mut().map(|per_call| per_call.iter_mut().map(|rounds| median(rounds)).collect()).collect();
    for (index, config) in CONFIGS.iter().enumerate() {
        let cells: Vec<String> = medians[index]
            .iter()
            .zip(&medians[0])
            .map(|(ns, bare)| match (ns.is_nan(), index) {
                (true, _) => "n/a".to_string(),
                (false, 0) => format!("{ns:.0}"),
                (false, _) => format!("{ns:.0} ({:+.0})", ns - bare),
            })
            .collect();
        println!("{:<26} {}", config.label(), cells.iter().map(|c| format!("{c:>24}")).collect::<String>());
    }
    println!("(goal: the agent adds at most 20 ns per unrelated syscall; docs/requests.md, \"The node's tax\")");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_the_middle_value() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [5.0]), 5.0);
    }
}
