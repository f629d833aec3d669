//! podgpu's end-to-end harness, shared by the root-only integration tests
//! (`tests/`) and the demo (`cargo xtask demo`).
//!
//! - `pod`: cgroup directories laid out like kubelet's, with a process in
//!   them ("pods" without a cluster).
//! - `http`: a minimal HTTP/1.1 server (the tenant) and client (load, and
//!   reading the agent's JSON).
//! - `agent`: runs the built `podgpu-agent` binary and waits until it serves.
//! - `keda`: a client that calls the ExternalScaler exactly as KEDA does.
//! - `scene`: tenants + metadata + (simulated) GPU + agent, started together.
//! - `fake_kubelet`, `fake_apiserver`: kubelet pod-resources and the
//!   Kubernetes API's pod list/watch, served from test data.
//! - `scale`: the scaler on its own: node stand-ins in a child process,
//!   KEDA-shaped load, `/proc` counters of a process.
//! - `engine_standin`: inference engines' metrics endpoints, under their
//!   own command lines.
//! - `stacks`: real server stacks (grpcio, uvicorn, hypercorn, Node) as
//!   tenants, and clients that time calls to them.
pub mod agent;
pub mod container;
pub mod cuda_standin;
pub mod driver_standin;
pub mod engine_standin;
pub mod fake_apiserver;
pub mod fake_kubelet;
pub mod http;
pub mod keda;
pub mod pod;
pub mod scale;
pub mod scene;
pub mod stacks;

use std::path::PathBuf;

/// Fails the test unless it runs as root: the integration tests load eBPF
/// programs and create cgroups, and must fail (not skip) without them.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and no side effects.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "run as root (scripts/test.sh): these tests load eBPF programs and create cgroups");
}

/// Mounts tracefs at `/sys/kernel/tracing` unless it is there, as systemd
/// does at boot on a node (these VMs do not): the driver path's
/// per-syscall tracepoints, and the chart's mount of the host's tracefs,
/// need it. A node without it is tested too (`--driver-hooks raw`).
pub fn ensure_tracefs() {
    let tracing = std::path::Path::new("/sys/kernel/tracing");
    if tracing.join("events").is_dir() {
        return;
    }
    let status =
        std::process::Command::new("mount").args(["-t", "tracefs", "nodev"]).arg(tracing).status().expect("mount runs");
    assert!(status.success() && tracing.join("events").is_dir(), "mounting tracefs at {}", tracing.display());
}

/// Raises this process's open-file limit to its hard limit (children
/// inherit it): tests that hold thousands of connections need more than
/// the usual soft 1,024.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write and read only `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    limit.rlim_cur
}

/// Makes a child independent of the terminal's Ctrl-C (its own process
/// group, so the harness decides when it stops) without outliving the
/// harness (SIGTERM when the parent dies).
pub fn detach_from_terminal(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    command.process_group(0);
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Directory of the cargo profile the calling binary was built in
/// (`target/debug` or `target/release`), where sibling binaries live.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current executable path");
    let dir = exe.parent().expect("executable has a directory").to_path_buf();
    // Test binaries live one level deeper, in `deps/`.
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir
    }
}

/// Path of a workspace binary built in the same profile, overridable with
/// `PODGPU_<NAME>_BIN` (e.g. `PODGPU_TENANT_BIN`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let variable = format!("PODGPU_{}_BIN", name.to_ascii_uppercase().replace('-', "_"));
    std::env::var_os(variable).map(PathBuf::from).unwrap_or_else(|| profile_dir().join(name))
}

/// Polls `check` every 100 ms until it holds or `within` has passed;
/// whether it held.
pub async fn eventually(within: std::time::Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The `q` quantile of client-side samples, by the rank rule HDR
/// histograms use (the smallest value with at least `q` of the samples at
/// or below it), so a client's truth compares with the probe's percentiles.
pub fn percentile(mut values: Vec<f64>, q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1]
}
