//! podgpu's developer commands, run with `cargo xtask <command>` (aya's
//! convention). One module per command.
mod alloc_count;
mod bench_engines;
mod bench_launches;
mod bench_pods;
mod bench_probes;
mod bench_scaler;
mod bench_syscalls;
mod demo;
mod demo_gpu;

#[global_allocator]
static ALLOCATOR: alloc_count::Counting = alloc_count::Counting;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "podgpu developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Two tenant pods, the agent with real probes, a live view, KEDA's answers.
    Demo(demo::Options),
    /// What the eBPF probes cost a busy HTTP server (wrk, with vs without).
    BenchProbes(bench_probes::Options),
    /// How fast KEDA gets answers: GetMetrics latency over 1/10/100 nodes, load step to answer.
    BenchScaler(bench_scaler::Options),
    /// What launch accounting costs a launch-bound loop (always on vs sampled) and sampling's accuracy.
    BenchLaunches(bench_launches::Options),
    /// What pod identity costs: pid/cgroup lookups, rescans, memory per pod.
    BenchPods(bench_pods::Options),
    /// What the agent costs a process it does not watch, per cheap syscall.
    BenchSyscalls(bench_syscalls::Options),
    /// What reading engines' own metrics costs the agent, and how fresh KEDA's engine gauges are.
    BenchEngines(bench_engines::Options),
}

/// For commands that start agents: checks for root (eBPF, cgroups), keeps
/// the agents' logs to warnings unless RUST_LOG says otherwise, and builds
/// the runtime.
fn root_runtime(what: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("{what} loads eBPF programs and creates cgroups: run it as root (sudo)");
    }
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo(options) => demo::run(options),
        Command::BenchProbes(options) => bench_probes::run(options),
        Command::BenchScaler(options) => bench_scaler::run(options),
        Command::BenchPods(options) => bench_pods::run(options),
        Command::BenchLaunches(options) => bench_launches::run(options),
        Command::BenchSyscalls(options) => bench_syscalls::run(options),
        Command::BenchEngines(options) => bench_engines::run(options),
    }
}
