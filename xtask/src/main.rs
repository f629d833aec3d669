//! podgpu's developer commands, run with `cargo xtask <command>` (aya's
//! convention). One module per command.
mod bench_probes;
mod bench_scaler;
mod demo;

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo(options) => demo::run(options),
        Command::BenchProbes(options) => bench_probes::run(options),
        Command::BenchScaler(options) => bench_scaler::run(options),
    }
}
