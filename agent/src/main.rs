//! `podgpu-agent`: parses the command line and runs the agent until SIGINT
//! or SIGTERM.
mod trace_tools;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use podgpu_agent::cluster::{ClusterConfig, FetchMode};
use podgpu_agent::gpu::GpuSource;
use podgpu_agent::pods::kube_api::KubeAccess;
use podgpu_agent::pods::kubelet;
use podgpu_agent::probes::requests::traffic::ProbePaths;
use podgpu_agent::tls::{ClientTls, ServerTls};
use podgpu_agent::{run, run_scaler, Bound, Config, ScalerConfig};
use tokio_util::sync::CancellationToken;
use trace_tools::{record, replay, RecordArgs, ReplayArgs};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(name = "podgpu-agent", version, about = "Per-pod GPU and request signals for KEDA")]
struct Cli {
    #[command(subcommand)]
    role: Role,
    /// Log format on stderr: text, or json (one object per line, for log
    /// pipelines).
    #[arg(long, global = true, env = "PODGPU_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// Each role takes the flags it uses and no others: the scaler has no
/// probes, GPU or pods of its own.
#[derive(Subcommand, Debug)]
enum Role {
    /// Node agent and KEDA scaler in one process (one-node installs, the demo).
    Standalone(NodeArgs),
    /// Node agent (DaemonSet): probes, GPU, node API and KEDA for its own pods.
    Node(NodeArgs),
    /// Scaler (Deployment): merges every node agent's pods and answers KEDA.
    Scaler(ScalerArgs),
    /// Replays a recorded trace (TRACE.json beside TRACE-launch.jsonl)
    /// through the attribution estimator; prints one JSON line per tenant.
    Replay(ReplayArgs),
    /// A live terminal view of the agent on this node: GPUs, and per pod
    /// GPU share, memory, requests in flight, request rate and TTFT.
    Top(TopArgs),
    /// Records a replayable trace from the agent running on this node
    /// (its HTTP API): device utilization, NVML samples, launch counts, and
    /// the truth of tenants that report it.
    Record(RecordArgs),
    /// Prints the node agent's seccomp profile (the syscalls it uses), or
    /// writes it where the kubelet looks for Localhost profiles (the
    /// chart's init container does this on every node).
    SeccompProfile(SeccompArgs),
}

#[derive(clap::Args, Debug)]
struct SeccompArgs {
    /// Write the profile to this file (its directory is created) instead
    /// of printing it.
    #[arg(long)]
    write: Option<PathBuf>,
}

/// The node agent's seccomp profile (`chart/files/seccomp-agent.json`, in
/// the OCI / Kubernetes Localhost format).
const SECCOMP_PROFILE: &str = include_str!("../../chart/files/seccomp-agent.json");

fn seccomp_profile(args: &SeccompArgs) -> anyhow::Result<()> {
    let Some(path) = &args.write else {
        print!("{SECCOMP_PROFILE}");
        return Ok(());
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Written beside and renamed over, so a kubelet starting a container
    // never reads half a profile.
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, SECCOMP_PROFILE).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming onto {}", path.display()))?;
    tracing::info!(path = %path.display(), "seccomp profile written");
    Ok(())
}

#[derive(clap::Args, Debug)]
struct TopArgs {
    /// The agent's HTTP address.
    #[arg(long, default_value = "127.0.0.1:9102")]
    agent: SocketAddr,
    /// Window of the per-pod values, seconds.
    #[arg(long, default_value_t = 10.0, value_parser = parse_seconds)]
    window_s: f64,
    /// Only pods of this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only pods whose labels match this selector (`app=llm,tier!=batch`).
    #[arg(long, value_parser = podgpu_agent::pods::selector::LabelSelector::parse)]
    selector: Option<podgpu_agent::pods::selector::LabelSelector>,
    /// Quit on its own after this many seconds (default: run until q).
    #[arg(long, value_parser = parse_seconds)]
    exit_after_s: Option<f64>,
}

pub(crate) fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds <= 86_400.0 => Ok(seconds),
        _ => Err(format!("expected seconds in (0, 86400], got {text:?}")),
    }
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    #[command(flatten)]
    serving: ServingOptions,
    #[command(flatten)]
    node: NodeOptions,
}

#[derive(clap::Args, Debug)]
struct ScalerArgs {
    #[command(flatten)]
    serving: ServingOptions,
    #[command(flatten)]
    scaler: ScalerOptions,
}

#[derive(clap::Args, Debug)]
struct ScalerOptions {
    /// Node agents, `host:port` (gRPC port), comma-separated; a headless
    /// Service name resolving to every agent works too.
    #[arg(long, env = "PODGPU_NODES", value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// Milliseconds between polls of the node agents.
    #[arg(long, env = "PODGPU_POLL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    poll_ms: u64,
    /// Milliseconds a node agent has to answer one poll.
    #[arg(long, env = "PODGPU_NODE_DEADLINE_MS", default_value_t = 400, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    node_deadline_ms: u64,
    /// Seconds a silent node's last snapshot is still used.
    #[arg(long, env = "PODGPU_NODE_GRACE_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    node_grace_s: u64,
    /// Seconds after its last snapshot a silent node is forgotten; until
    /// then a query selecting pods it hosted is an error (KEDA's fallback).
    #[arg(long, env = "PODGPU_NODE_FORGET_S", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    node_forget_s: u64,
    /// What each poll fetches: `selected` (the pods and metrics live
    /// triggers ask for; the scaler's cost follows the triggers) or `all`
    /// (every pod with every metric, so the scaler's `/pods` shows the whole
    /// cluster; the cost follows every pod of the cluster).
    #[arg(long, env = "PODGPU_SCALER_FETCH", value_enum, default_value_t = FetchMode::Selected)]
    fetch: FetchMode,
    /// CA (PEM) that signed the node agents' certificates: dial them over TLS.
    #[arg(long, env = "PODGPU_NODE_TLS_CA")]
    node_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for node agents that require mTLS.
    #[arg(long, env = "PODGPU_NODE_TLS_CERT")]
    node_tls_cert: Option<PathBuf>,
    /// Key (PEM) of --node-tls-cert.
    #[arg(long, env = "PODGPU_NODE_TLS_KEY")]
    node_tls_key: Option<PathBuf>,
    /// Name the node agents' certificates are issued for (they are dialled by IP).
    #[arg(long, env = "PODGPU_NODE_TLS_SERVER_NAME")]
    node_tls_server_name: Option<String>,
}

/// What every role serves: KEDA's gRPC port (with TLS) and HTTP.
#[derive(clap::Args, Debug)]
struct ServingOptions {
    /// KEDA ExternalScaler gRPC listen address.
    #[arg(long, env = "PODGPU_KEDA_LISTEN", default_value = "0.0.0.0:6000")]
    keda_listen: SocketAddr,
    /// HTTP listen address (/healthz, /pods, /metrics).
    #[arg(long, env = "PODGPU_HTTP_LISTEN", default_value = "0.0.0.0:9102")]
    http_listen: SocketAddr,
    /// Certificate chain (PEM): serve TLS on the gRPC port (KEDA's `caCert` trusts its CA).
    #[arg(long, env = "PODGPU_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "PODGPU_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) client certificates must chain to: require mTLS (KEDA's `tlsClientCert`).
    #[arg(long, env = "PODGPU_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Seconds between checks of the TLS files for rotation (re-read when changed).
    #[arg(long, env = "PODGPU_TLS_RELOAD_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    tls_reload_s: u64,
}

/// What a node agent (or standalone) reads: GPU, probes, pods.
#[derive(clap::Args, Debug)]
struct NodeOptions {
    /// GPU backend: nvml, nvml:LIBRARY, sim, sim:SCENARIO.yaml or none.
    #[arg(long, env = "PODGPU_GPU", default_value = "nvml")]
    gpu: GpuSource,
    /// Static pod metadata file (YAML or JSON).
    #[arg(long, env = "PODGPU_POD_METADATA")]
    pod_metadata: Option<PathBuf>,
    /// cgroup v2 root (default: found in /proc/self/mountinfo).
    #[arg(long, env = "PODGPU_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// procfs root (the host's /proc).
    #[arg(long, env = "PODGPU_PROC_ROOT", default_value = "/proc")]
    proc_root: PathBuf,
    /// Collector tick in milliseconds (probe reads and publication).
    #[arg(long, env = "PODGPU_TICK_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    tick_ms: u64,
    /// Seconds a pod cgroup that held processes may sit empty before it
    /// stops counting as a pod (one that never held a process never counts).
    #[arg(long, env = "PODGPU_EMPTY_POD_GRACE_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    empty_pod_grace_s: u64,
    /// A file where learned kernel costs are kept across restarts (per GPU
    /// model and kernel; written atomically every 30 s, bounded). The chart
    /// puts it on a host path. Unset: costs are relearned after a restart.
    #[arg(long, env = "PODGPU_COST_CATALOG")]
    cost_catalog: Option<PathBuf>,
    /// GPU poll interval in milliseconds.
    #[arg(long, env = "PODGPU_GPU_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    gpu_interval_ms: u64,
    /// Exit with an error when the eBPF probes cannot load instead of degrading.
    #[arg(long, env = "PODGPU_REQUIRE_EBPF", action = clap::ArgAction::SetTrue, value_parser = clap::builder::FalseyValueParser::new())]
    require_ebpf: bool,
    /// Container cgroups the request probe can watch at once (the kernel
    /// map's size). A pod beyond it has no request metrics, an error to
    /// KEDA rather than a 0, until a watched cgroup goes away.
    #[arg(long, env = "PODGPU_MAX_WATCHED_CGROUPS", default_value_t = podgpu_common::MAX_WATCHED_CGROUPS, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    max_watched_cgroups: u32,
    /// Connections the request probe tracks at once (the kernel map's
    /// size, an LRU). A new connection beyond it evicts the least recently
    /// used; one evicted with requests open is ended by the next sweep and
    /// counted (`podgpu_agent_missed_connection_endings_total{reason="kernel_evicted"}`).
    #[arg(long, env = "PODGPU_MAX_TRACKED_CONNECTIONS", default_value_t = podgpu_common::MAX_TRACKED_CONNECTIONS, value_parser = clap::value_parser!(u32).range(16..=4_194_304))]
    max_tracked_connections: u32,
    /// Kubernetes API for pod names, labels and owners: auto (in-cluster
    /// when running in a pod), off, or kubeconfig:PATH.
    #[arg(long, env = "PODGPU_KUBE_API", default_value = "auto")]
    kube_api: KubeAccess,
    /// Kubelet pod-resources socket (GPU devices per container); "off" disables it.
    #[arg(long, env = "PODGPU_KUBELET_SOCKET", default_value = kubelet::DEFAULT_SOCKET)]
    kubelet_socket: String,
    /// Seconds between full kubelet pod-resources lists.
    #[arg(long, env = "PODGPU_KUBELET_INTERVAL_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    kubelet_interval_s: u64,
    /// This node's name (Kubernetes API field selector, node API); defaults to the host name.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Request paths counted as probe traffic (health checks, metrics
    /// scrapes), comma-separated prefixes; "" counts every request as an
    /// inference request. Triggers include them with includeProbeRequests.
    #[arg(long, env = "PODGPU_PROBE_PATHS", default_value = podgpu_agent::probes::requests::traffic::DEFAULT_PROBE_PATHS, value_parser = parse_probe_paths)]
    probe_paths: ProbePaths,
    /// Kernel launch accounting with uprobes on libcuda (gpu_launch_rate,
    /// /launches, and the launch counts the attribution estimator splits
    /// each GPU's utilization by): on or off. A probed launch costs the
    /// launching thread a uprobe trap (~1 µs on an H200 host; calibrated
    /// at start on each node); above --launch-overhead-budget the probes
    /// are attached for part of each interval and counts are scaled from
    /// that sample (docs/gpu.md, "Launch accounting"). Off: gpu_sm_util
    /// falls back to NVML's per-process samples.
    #[arg(long, env = "PODGPU_LAUNCH_ACCOUNTING", default_value = "on", value_parser = ["on", "off"])]
    launch_accounting: String,
    /// Most a launch-bound tenant may lose to launch accounting, percent of
    /// its time (full counting below it, sampling above).
    #[arg(long, env = "PODGPU_LAUNCH_OVERHEAD_BUDGET", default_value_t = 1.0, value_parser = parse_budget)]
    launch_overhead_budget: f64,
    /// Treat a file as an NVIDIA device node, KIND=PATH with KIND ctl, gpu
    /// or uvm (repeatable): tests drive the driver decoder with crafted
    /// ioctls on a stand-in device.
    #[arg(long, hide = true)]
    driver_stand_in: Vec<podgpu_agent::probes::driver::devices::StandIn>,
    /// The NVIDIA driver path (per-pod contexts, driver memory, calls and
    /// time blocked in the driver): auto, on or off. Its hooks cost the
    /// syscall path (docs/requests.md, "The node's tax"), so `auto`
    /// attaches them only where `/proc/devices` lists an NVIDIA driver (or
    /// stand-ins are given).
    #[arg(long, env = "PODGPU_DRIVER_PATH", default_value = "auto", value_parser = ["auto", "on", "off"])]
    driver_path: String,
    /// Which hooks carry the driver path: `libraries` (uprobes on the
    /// driver libraries' calls to ioctl and close: no other process or
    /// syscall pays), `tracepoints` (the per-syscall
    /// `syscalls:sys_enter_ioctl`/`sys_exit_ioctl`/`sys_enter_close`; other
    /// syscalls run no program but take the kernel's tracing slow path;
    /// needs tracefs at /sys/kernel/tracing), `raw` (`sys_enter`/`sys_exit`,
    /// which every syscall runs), or `auto` (libraries where a libcuda is
    /// found and can be probed, else tracepoints where tracefs can be
    /// reached, else raw; said in /healthz).
    #[arg(long, env = "PODGPU_DRIVER_HOOKS", default_value = "auto", value_parser = ["auto", "libraries", "tracepoints", "raw"])]
    driver_hooks: String,
    /// Driver libraries for the library hooks: files, or directories to
    /// search for libcuda.so* and libnvidia-ml.so*, comma-separated. Empty:
    /// LD_LIBRARY_PATH's directories and the usual install directories.
    #[arg(long, env = "PODGPU_DRIVER_LIBRARIES", value_delimiter = ',')]
    driver_libraries: Vec<std::path::PathBuf>,
    /// Read each pod's inference engine's own metrics (queue, batch, KV
    /// cache, TTFT): on or off. Engines are found with no configuration
    /// (docs/engines.md); pods where none is found are not scraped.
    #[arg(long, env = "PODGPU_ENGINE_SCRAPE", default_value = "on", value_parser = ["on", "off"])]
    engine_scrape: String,
    /// Time between scrapes of one engine, ms (100 at least).
    #[arg(long, env = "PODGPU_ENGINE_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    engine_interval_ms: u64,
    /// Deadline of one engine scrape, connect to last byte, ms.
    #[arg(long, env = "PODGPU_ENGINE_TIMEOUT_MS", default_value_t = 800, value_parser = clap::value_parser!(u64).range(10..=30_000))]
    engine_timeout_ms: u64,
    /// Largest engine metrics body read, bytes; a larger one is an error.
    #[arg(long, env = "PODGPU_ENGINE_BODY_LIMIT", default_value_t = 8 << 20, value_parser = clap::value_parser!(u64).range(4096..=(256 << 20)))]
    engine_body_limit: u64,
    /// Engine scrapes in flight at most.
    #[arg(long, env = "PODGPU_ENGINE_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    engine_concurrency: u64,
    /// How often pods without a found engine (or whose endpoint keeps
    /// failing) are looked at again, ms (tests shorten it).
    #[arg(long, hide = true, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    engine_rediscover_ms: u64,
}

fn parse_budget(text: &str) -> Result<f64, String> {
    match text.trim_end_matches('%').parse::<f64>() {
        Ok(percent) if percent > 0.0 && percent <= 100.0 => Ok(percent),
        _ => Err(format!("expected a percentage in (0, 100], got {text:?}")),
    }
}

fn parse_probe_paths(text: &str) -> Result<ProbePaths, String> {
    ProbePaths::parse(text)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    raise_open_file_limit();
    if let Role::Replay(args) = &cli.role {
        return replay(args);
    }
    if let Role::SeccompProfile(args) = &cli.role {
        return seccomp_profile(args);
    }
    if let Role::Record(args) = &cli.role {
        return record(args);
    }
    if let Role::Top(args) = &cli.role {
        return podgpu_agent::top::run(&podgpu_agent::top::TopConfig {
            agent: args.agent,
            window_s: args.window_s,
            namespace: args.namespace.clone(),
            selector: args.selector.clone(),
            interval: Duration::from_secs(1),
            exit_after: args.exit_after_s.map(Duration::from_secs_f64),
        });
    }
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    // One machine-readable line on stdout for scripts and tests that start
    // the agent on port 0.
    let ready = |bound: Bound| {
        println!("{{\"event\":\"ready\",\"keda\":\"{}\",\"http\":\"{}\"}}", bound.keda, bound.http);
    };
    let tls = |serving: &ServingOptions| ServerTls {
        cert: serving.tls_cert.clone(),
        key: serving.tls_key.clone(),
        client_ca: serving.tls_client_ca.clone(),
    };
    let (serving, options) = match cli.role {
        Role::Standalone(args) | Role::Node(args) => (args.serving, args.node),
        Role::Replay(_) | Role::Record(_) | Role::Top(_) | Role::SeccompProfile(_) => unreachable!("handled above"),
        Role::Scaler(ScalerArgs { serving, scaler }) => {
            let node_tls = ClientTls {
                ca: scaler.node_tls_ca,
                cert: scaler.node_tls_cert,
                key: scaler.node_tls_key,
                server_name: scaler.node_tls_server_name,
            };
            // Bad files fail the start, naming the flag; later rotations are
            // picked up by the scaler itself.
            node_tls.config()?;
            let config = ScalerConfig {
                keda_listen: serving.keda_listen,
                http_listen: serving.http_listen,
                cluster: ClusterConfig {
                    nodes: scaler.nodes,
                    poll_interval: Duration::from_millis(scaler.poll_ms),
                    deadline: Duration::from_millis(scaler.node_deadline_ms),
                    grace: Duration::from_secs(scaler.node_grace_s),
                    forget: Duration::from_secs(scaler.node_forget_s.max(scaler.node_grace_s)),
                    node_tls,
                    fetch: scaler.fetch,
                },
                tls: tls(&serving),
                tls_reload: Duration::from_secs(serving.tls_reload_s),
            };
            return run_scaler(config, shutdown, ready).await;
        }
    };
    let config = Config {
        keda_listen: serving.keda_listen,
        http_listen: serving.http_listen,
        gpu: options.gpu,
        pod_metadata: options.pod_metadata,
        cgroup_root: options.cgroup_root,
        proc_root: options.proc_root,
        tick: Duration::from_millis(options.tick_ms),
        gpu_interval: Duration::from_millis(options.gpu_interval_ms),
        empty_pod_grace: Duration::from_secs(options.empty_pod_grace_s),
        cost_catalog: options.cost_catalog,
        require_ebpf: options.require_ebpf,
        request_maps: podgpu_agent::probes::requests::MapSizes {
            watched_cgroups: options.max_watched_cgroups,
            connections: options.max_tracked_connections,
        },
        node_name: options.node_name.unwrap_or_else(hostname),
        tls: tls(&serving),
        tls_reload: Duration::from_secs(serving.tls_reload_s),
        kube_api: options.kube_api,
        kubelet_socket: kubelet_socket(&options.kubelet_socket),
        kubelet_interval: Duration::from_secs(options.kubelet_interval_s),
        probe_paths: options.probe_paths,
        launch_accounting: options.launch_accounting == "on",
        launch_overhead_budget: options.launch_overhead_budget / 100.0,
        driver_stand_ins: options.driver_stand_in.clone(),
        driver_libraries: options.driver_libraries.clone(),
        driver_hooks: match options.driver_hooks.as_str() {
            "libraries" => podgpu_agent::probes::requests::DriverHooks::Libraries,
            "tracepoints" => podgpu_agent::probes::requests::DriverHooks::Tracepoints,
            "raw" => podgpu_agent::probes::requests::DriverHooks::Raw,
            _ => podgpu_agent::probes::requests::DriverHooks::Auto,
        },
        driver_path: match options.driver_path.as_str() {
            "on" => podgpu_agent::roles::node::DriverPath::On,
            "off" => podgpu_agent::roles::node::DriverPath::Off,
            _ => podgpu_agent::roles::node::DriverPath::Auto,
        },
        engine_scrape: (options.engine_scrape == "on").then(|| podgpu_agent::roles::node::EngineScrape {
            interval: Duration::from_millis(options.engine_interval_ms),
            timeout: Duration::from_millis(options.engine_timeout_ms),
            body_limit: usize::try_from(options.engine_body_limit).unwrap_or(usize::MAX),
            concurrency: usize::try_from(options.engine_concurrency).unwrap_or(16),
            rediscover: Duration::from_millis(options.engine_rediscover_ms),
        }),
    };

    run(config, shutdown, ready).await
}

/// The default socket is only used where its directory exists (a
/// Kubernetes node; the socket itself vanishes while kubelet restarts); an
/// explicitly named one is used (and reported failing) even if missing.
fn kubelet_socket(flag: &str) -> Option<PathBuf> {
    match flag {
        "off" => None,
        path if path == kubelet::DEFAULT_SOCKET && !std::path::Path::new(path).parent().is_some_and(|d| d.is_dir()) => {
            tracing::info!(socket = path, "no kubelet pod-resources socket: GPU devices per container unknown");
            None
        }
        path => Some(PathBuf::from(path)),
    }
}

/// The host's name, for the node API when NODE_NAME is not set.
fn hostname() -> String {
    podgpu_agent::proc::hostname().unwrap_or_else(|| "unknown".into())
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

/// Raises the soft open-file limit to the hard one: the scaler holds a
/// connection per node agent and per KEDA client, more than the usual soft
/// 1,024 at a thousand nodes. (Go programs do this at start too.)
fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write `limit`.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max && {
            let wanted = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0
        }
    };
    if raised {
        tracing::debug!(from = limit.rlim_cur, to = limit.rlim_max, "raised the open-file limit");
    }
}
