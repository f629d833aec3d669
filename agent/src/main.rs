//! `podgpu-agent`: parses the command line and runs the agent until SIGINT
//! or SIGTERM.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use podgpu_agent::gpu::GpuSource;
use podgpu_agent::{run, Bound, Config};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(name = "podgpu-agent", version, about = "Per-pod GPU and request signals for KEDA")]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    options: Options,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// Node agent and KEDA scaler in one process (one-node installs, the demo).
    Standalone,
}

#[derive(clap::Args, Debug)]
struct Options {
    /// KEDA ExternalScaler gRPC listen address.
    #[arg(long, env = "PODGPU_KEDA_LISTEN", default_value = "0.0.0.0:6000", global = true)]
    keda_listen: SocketAddr,
    /// HTTP listen address (/healthz, /pods, /metrics).
    #[arg(long, env = "PODGPU_HTTP_LISTEN", default_value = "0.0.0.0:9102", global = true)]
    http_listen: SocketAddr,
    /// GPU backend: nvml, nvml:LIBRARY, sim, sim:SCENARIO.yaml or none.
    #[arg(long, env = "PODGPU_GPU", default_value = "nvml", global = true)]
    gpu: GpuSource,
    /// Static pod metadata file (YAML or JSON).
    #[arg(long, env = "PODGPU_POD_METADATA", global = true)]
    pod_metadata: Option<PathBuf>,
    /// cgroup v2 root (default: found in /proc/self/mountinfo).
    #[arg(long, env = "PODGPU_CGROUP_ROOT", global = true)]
    cgroup_root: Option<PathBuf>,
    /// procfs root (the host's /proc).
    #[arg(long, env = "PODGPU_PROC_ROOT", default_value = "/proc", global = true)]
    proc_root: PathBuf,
    /// Collector tick in milliseconds (probe reads and publication).
    #[arg(long, env = "PODGPU_TICK_MS", default_value_t = 250, global = true, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    tick_ms: u64,
    /// GPU poll interval in milliseconds.
    #[arg(long, env = "PODGPU_GPU_INTERVAL_MS", default_value_t = 1000, global = true, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    gpu_interval_ms: u64,
    /// Exit with an error when the eBPF probes cannot load instead of degrading.
    #[arg(long, env = "PODGPU_REQUIRE_EBPF", global = true, action = clap::ArgAction::SetTrue, value_parser = clap::builder::FalseyValueParser::new())]
    require_ebpf: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let Role::Standalone = cli.role.unwrap_or(Role::Standalone);
    let options = cli.options;
    let config = Config {
        keda_listen: options.keda_listen,
        http_listen: options.http_listen,
        gpu: options.gpu,
        pod_metadata: options.pod_metadata,
        cgroup_root: options.cgroup_root,
        proc_root: options.proc_root,
        tick: Duration::from_millis(options.tick_ms),
        gpu_interval: Duration::from_millis(options.gpu_interval_ms),
        require_ebpf: options.require_ebpf,
    };

    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    run(config, shutdown, |bound: Bound| {
        // One machine-readable line on stdout for scripts and tests that
        // start the agent on port 0.
        println!("{{\"event\":\"ready\",\"keda\":\"{}\",\"http\":\"{}\"}}", bound.keda, bound.http);
    })
    .await
}

async fn wait_for_signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
