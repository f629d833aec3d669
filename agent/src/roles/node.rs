//! The node role (DaemonSet; also `standalone`): loads the eBPF probes,
//! starts the GPU poller, the pod sources and the collector, and serves the
//! node's pods over KEDA gRPC, the node API and HTTP.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use podgpu_proto::externalscaler::external_scaler_server::ExternalScalerServer;
use podgpu_proto::node::node_signals_server::NodeSignalsServer;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::engines::scraper::{EngineSnapshot, ScraperConfig};
use crate::gpu::poller::{self, PollerConfig};
use crate::gpu::GpuSource;
use crate::signals::collector::{Collector, CollectorConfig, Probes};
use crate::signals::view::SourceStatus;
use crate::{engines, pods, probes, proc, serve};

use super::{bind, serve_grpc, Bound};

/// Everything `run` needs; built from the command line by `main`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address of the KEDA ExternalScaler gRPC server.
    pub keda_listen: SocketAddr,
    /// Address of the HTTP server (/healthz, /pods, /metrics).
    pub http_listen: SocketAddr,
    /// GPU backend.
    pub gpu: GpuSource,
    /// Static pod metadata file.
    pub pod_metadata: Option<PathBuf>,
    /// cgroup v2 root; found from /proc/self/mountinfo when absent.
    pub cgroup_root: Option<PathBuf>,
    /// procfs root (host's /proc under hostPID).
    pub proc_root: PathBuf,
    /// Collector tick.
    pub tick: Duration,
    /// GPU poll interval.
    pub gpu_interval: Duration,
    /// How long an emptied pod cgroup still counts as a pod.
    pub empty_pod_grace: Duration,
    /// Where learned kernel costs are kept across restarts (`None`: not kept).
    pub cost_catalog: Option<PathBuf>,
    /// Exit instead of degrading when the eBPF probes cannot load.
    pub require_ebpf: bool,
    /// Sizes of the request probe's kernel maps (watched cgroups,
    /// tracked connections).
    pub request_maps: probes::requests::MapSizes,
    /// Name this agent reports in the node API.
    pub node_name: String,
    /// TLS (and mTLS) on the gRPC port.
    pub tls: crate::tls::ServerTls,
    /// How often TLS files are checked for rotation.
    pub tls_reload: Duration,
    /// Kubernetes API access for pod metadata.
    pub kube_api: pods::kube_api::KubeAccess,
    /// Kubelet pod-resources socket; `None` turns the source off.
    pub kubelet_socket: Option<PathBuf>,
    /// Time between full kubelet pod-resources lists.
    pub kubelet_interval: Duration,
    /// Request paths counted as probe traffic, not inference.
    pub probe_paths: probes::requests::traffic::ProbePaths,
    /// Count kernel launches with uprobes on libcuda.
    pub launch_accounting: bool,
    /// Fraction of a launch-bound tenant's time launch accounting may cost.
    pub launch_overhead_budget: f64,
    /// Files to treat as NVIDIA devices (tests without a GPU).
    pub driver_stand_ins: Vec<probes::driver::devices::StandIn>,
    /// Whether the driver path's syscall tracepoints are attached.
    pub driver_path: DriverPath,
    /// Which hooks carry the driver path (`--driver-hooks`).
    pub driver_hooks: probes::requests::DriverHooks,
    /// Driver library files or directories for the library hooks
    /// (`--driver-libraries`; empty: `LD_LIBRARY_PATH` and the usual ones).
    pub driver_libraries: Vec<std::path::PathBuf>,
    /// How engines' own metrics are scraped (`None`: not at all).
    pub engine_scrape: Option<EngineScrape>,
}

/// The engine scraper's schedule and bounds (`--engine-*`).
#[derive(Clone, Copy, Debug)]
pub struct EngineScrape {
    /// Time between scrapes of one engine.
    pub interval: Duration,
    /// Deadline of one scrape.
    pub timeout: Duration,
    /// Largest body read.
    pub body_limit: usize,
    /// Scrapes in flight at most.
    pub concurrency: usize,
    /// How often pods without a found engine are looked at again
    /// (engines load their model for minutes before they listen).
    pub rediscover: Duration,
}

/// When to attach the driver path (`--driver-path`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DriverPath {
    /// Where the node has an NVIDIA driver, or stand-ins are given.
    #[default]
    Auto,
    /// Always (the driver may be loaded after the agent starts).
    On,
    /// Never: no syscall tracepoint at all.
    Off,
}

/// procfs as this agent sees it, with its cgroup namespace found: in the
/// DaemonSet the agent has its own, and other pods' cgroups read relative.
fn host_proc(proc_root: &std::path::Path, cgroup_root: &std::path::Path) -> proc::ProcFs {
    let plain = proc::ProcFs::new(proc_root);
    match proc::detect_cgroup_ns_root(&plain, cgroup_root, std::process::id()) {
        Some(ns_root) => {
            if ns_root != "/" {
                tracing::info!(%ns_root, "cgroup paths of other processes are rebased on this agent's cgroup namespace");
            }
            plain.with_cgroup_ns_root(&ns_root)
        }
        None => {
            tracing::warn!(
                "could not tell where this agent's cgroup namespace sits in the host tree; relative cgroup paths are read as host paths"
            );
            plain
        }
    }
}

/// Starts the agent and serves until `shutdown` is cancelled. `on_ready`
/// gets the bound addresses once both servers accept connections.
pub async fn run(config: Config, shutdown: CancellationToken, on_ready: impl FnOnce(Bound)) -> anyhow::Result<()> {
    let cgroup_root = match &config.cgroup_root {
        Some(root) => root.clone(),
        None => pods::cgroup_tree::host_v2_root().context("finding the cgroup v2 mount")?,
    };
    let proc = host_proc(&config.proc_root, &cgroup_root);
    let shared = Shared::default();
    // What the node role starts, in order:
    // 1. the pod metadata sources (static file, Kubernetes API, kubelet);
    let directory = pod_directory(&config, &shutdown).await?;
    // 2. the eBPF probes: requests (with the driver path where wanted)
    //    and launch accounting;
    let probes = load_probes(&config)?;
    // 3. the listeners, so that a port in use fails before anything runs;
    let tls = crate::tls::ServerAcceptor::load(&config.tls).context("gRPC TLS")?;
    let (keda_listener, http_listener, bound) = bind(config.keda_listen, config.http_listen).await?;
    // 4. the GPU poller (its own thread);
    // Bounded: a stalled collector drops GPU updates (counted) instead of
    // queueing them without limit.
    let (gpu_tx, gpu_rx) = mpsc::channel(4);
    let gpu_dropped = Arc::new(AtomicU64::new(0));
    let mut threads = vec![poller::spawn(
        PollerConfig {
            source: config.gpu.clone(),
            cgroup_root: cgroup_root.clone(),
            proc: proc.clone(),
            interval: config.gpu_interval,
            poll_now: shared.poll_gpu_now.clone(),
            launches: shared.launches.clone(),
            cost_catalog: config.cost_catalog.clone(),
        },
        gpu_tx,
        gpu_dropped.clone(),
    )];
    // 5. the collector, which owns every pod's state, with a first tick:
    //    ready means watching (existing pods are in the probes' watch sets)
    //    and a view is published (/healthz judges its age from the start);
    let mut collector = Collector::new(
        CollectorConfig {
            tick: config.tick,
            rescan: Duration::from_secs(2),
            retention: serve::trigger::MAX_WINDOW + Duration::from_secs(5),
            cgroup_root: cgroup_root.clone(),
            // Three missed polls: a slow NVML call is not yet an outage.
            gpu_stale_after: config.gpu_interval * 3 + Duration::from_secs(1),
            proc: proc.clone(),
            empty_pod_grace: config.empty_pod_grace,
        },
        directory,
        Probes {
            requests: probes.requests,
            status: probes.request_status,
            reader: shared.reader_stats.clone(),
            launches: shared.launches.clone(),
            launch_status: probes.launch_status,
            driver: shared.driver.clone(),
            driver_status: probes.driver_status,
            driver_adopt_now: shared.driver_adopt_now.clone(),
        },
        gpu_dropped,
    );
    let (engine_tx, engine_rx) =
        watch::channel(Arc::new(EngineSnapshot::disabled(SourceStatus::Degraded { reason: "starting".to_string() })));
    if config.engine_scrape.is_some() {
        collector = collector.with_engines(engine_rx);
    }
    collector.tick();
    let (view_tx, view_rx) = watch::channel(Arc::new(collector.view()));
    let mut tasks = tokio::task::JoinSet::new();
    // Bounded: a stalled collector drops probe updates (counted).
    // Batches arrive every ~20 ms; 256 of them is seconds of backlog.
    let (request_tx, request_rx) = mpsc::channel(256);
    tasks.spawn(collector.run(gpu_rx, request_rx, view_tx, shutdown.clone()).into_future_ok());
    // 6. the probes' readers: requests and the programs' own log (tasks),
    //    launches and the driver path (threads);
    if let Some(ring) = probes.request_ring {
        let reader = probes::requests::run_reader(
            ring,
            proc.clone(),
            config.probe_paths.clone(),
            probes.kernel_maps,
            request_tx,
            shared.reader_stats.clone(),
            shutdown.clone(),
        );
        tasks.spawn(async move { reader.await.context("request probe reader") });
    }
    if let Some(log) = probes.program_log {
        tasks.spawn(probes::ebpf_log::run(log, shutdown.clone()).into_future_ok());
    }
    if let Some(probe) = probes.launch_probe {
        threads.push(probes::launch_reader::spawn(
            probe,
            probes::launch_reader::LaunchReaderConfig {
                proc: proc.clone(),
                cgroup_root: cgroup_root.clone(),
                overhead_budget: config.launch_overhead_budget,
                // Beside the cost catalog: both are what the node learned.
                site_book: config.cost_catalog.as_ref().map(|catalog| catalog.with_file_name("launch-sites.json")),
            },
            shared.launches.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(maps) = probes.driver_maps {
        let matcher = probes::driver::devices::DeviceMatcher::new(
            proc.clone(),
            &config.proc_root.join("devices"),
            &config.driver_stand_ins,
        );
        threads.push(probes::driver::spawn(
            maps,
            probes::driver::DriverReaderConfig {
                proc: proc.clone(),
                matcher,
                poll_gpu_now: shared.poll_gpu_now,
                adopt_now: shared.driver_adopt_now,
            },
            shared.driver,
            shutdown.clone(),
        ));
    }
    // 7. the engine scraper, which reads the pods from the published view;
    if let Some(scrape) = config.engine_scrape {
        let scraper = ScraperConfig {
            interval: scrape.interval,
            timeout: scrape.timeout,
            body_limit: scrape.body_limit,
            concurrency: scrape.concurrency,
            rediscover: scrape.rediscover,
            retention: serve::trigger::MAX_WINDOW + Duration::from_secs(5),
            cgroup_root: cgroup_root.clone(),
            proc: proc.clone(),
        };
        tasks.spawn(engines::scraper::run(scraper, view_rx.clone(), engine_tx, shutdown.clone()).into_future_ok());
    }
    // 8. the servers: KEDA's ExternalScaler and the node API share the gRPC
    //    port; HTTP serves /healthz, /metrics and the JSON views.
    let router = tonic::transport::Server::builder()
        .add_service(ExternalScalerServer::new(serve::keda::KedaScaler::new(view_rx.clone())))
        .add_service(NodeSignalsServer::new(serve::node_api::NodeApi::new(config.node_name.clone(), view_rx.clone())));
    tasks.spawn(serve_grpc(router, keda_listener, tls, config.tls_reload, shutdown.clone()));
    let http = axum::serve(http_listener, serve::http::router(view_rx, config.tick))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tasks.spawn(async move { http.await.context("HTTP server") });

    tracing::info!(keda = %bound.keda, http = %bound.http, cgroup_root = %cgroup_root.display(), gpu = ?config.gpu, "podgpu agent serving");
    on_ready(bound);
    wait_for_the_end(tasks, threads, &shutdown).await
}

/// What the collector, the GPU poller and the probes' readers share.
#[derive(Default)]
struct Shared {
    reader_stats: Arc<probes::requests::ReaderStats>,
    launches: Arc<std::sync::Mutex<probes::launches::LaunchSnapshot>>,
    driver: Arc<std::sync::Mutex<probes::driver::DriverSnapshot>>,
    /// Set by the driver reader at a process's first context.
    poll_gpu_now: Arc<std::sync::atomic::AtomicBool>,
    /// Set by the collector when the driver path starts reading a pod's
    /// own libcuda: the driver reader then looks for processes it missed.
    driver_adopt_now: Arc<std::sync::atomic::AtomicBool>,
}

/// The pod metadata sources merged into one directory.
async fn pod_directory(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<pods::directory::Directory> {
    let static_pods = match &config.pod_metadata {
        Some(path) => pods::static_source::load(path)?,
        None => HashMap::new(),
    };
    let kube_pods = pods::kube_api::spawn(&config.kube_api, &config.node_name, shutdown.clone()).await;
    let kubelet = config.kubelet_socket.clone().map(|socket| {
        pods::kubelet::spawn(
            pods::kubelet::KubeletConfig { socket, interval: config.kubelet_interval },
            shutdown.clone(),
        )
    });
    if config.pod_metadata.is_none() && kube_pods.is_none() {
        tracing::info!("no pod metadata source (static file or Kubernetes API): pods carry their UID and cgroup only and match no namespace");
    }
    Ok(pods::directory::Directory::new(static_pods, kube_pods, kubelet))
}

/// The eBPF probes as loaded (or not, with why), taken apart for their
/// readers and the collector.
struct LoadedProbes {
    /// The programs' own log (aya-log).
    program_log: Option<probes::ebpf_log::ProgramLog>,
    requests: Option<probes::requests::RequestProbe>,
    request_status: SourceStatus,
    request_ring: Option<aya::maps::RingBuf<aya::maps::MapData>>,
    kernel_maps: Option<probes::requests::KernelMaps>,
    launch_probe: Option<probes::launches::LaunchProbe>,
    launch_status: SourceStatus,
    driver_maps: Option<probes::driver::DriverMaps>,
    driver_status: SourceStatus,
}

fn load_probes(config: &Config) -> anyhow::Result<LoadedProbes> {
    let (mut requests, request_status) =
        load_probe("request", probes::requests::RequestProbe::load(config.request_maps), config.require_ebpf)?;
    // Launch accounting (libcuda uprobes), when asked for: it costs every
    // launch a uprobe trap (docs/gpu.md, "Launch accounting").
    // Uprobes (launch accounting, the driver path's library hooks) need
    // CAP_SYS_ADMIN on current kernels: asked once, up front.
    let uprobes = probes::privileges::uprobes_permitted();
    if let Err(why) = &uprobes {
        tracing::warn!(reason = %why, "uprobes unavailable: no launch accounting, and the driver path stays on the syscall hooks");
    }
    let (launch_probe, launch_status) = match (&uprobes, config.launch_accounting) {
        (_, false) => (None, SourceStatus::Disabled),
        (Err(why), true) if config.require_ebpf => {
            bail!("launch accounting needs uprobes (PODGPU_REQUIRE_EBPF): {why}")
        }
        (Err(why), true) => (None, SourceStatus::Degraded { reason: format!("launch probe: {why}") }),
        (Ok(()), true) => load_probe("launch", probes::launches::LaunchProbe::load(), config.require_ebpf)?,
    };
    let kernel_maps = requests.as_ref().and_then(|probe| match probe.kernel_maps() {
        Ok(maps) => Some(maps),
        Err(err) => {
            tracing::warn!(error = %err, "no second handle on the request probe's maps: evicted connections are found only when idle, ring losses only by the sweep's recount");
            None
        }
    });
    // The library hooks see a pod that brings its own libcuda only once
    // the launch probe finds that file: without launch accounting, such a
    // pod's driver calls would go unseen, so `auto` keeps the syscall hooks.
    let library_hooks = uprobes.and_then(|()| match (&launch_probe, config.driver_hooks) {
        (None, probes::requests::DriverHooks::Auto) => {
            Err("launch accounting is off, and it is what finds the libcuda files pods bring".to_string())
        }
        _ => Ok(()),
    });
    let (driver_maps, driver_status) = driver_path(config, requests.as_mut(), &request_status, library_hooks)?;
    let program_log = requests.as_mut().and_then(|probe| probe.take_log());
    let request_ring = match requests.as_mut().map(|probe| probe.take_events()) {
        Some(Ok(ring)) => Some(ring),
        Some(Err(err)) => return Err(anyhow::Error::new(err).context("taking the request probe's ring buffer")),
        None => None,
    };
    Ok(LoadedProbes {
        program_log,
        requests,
        request_status,
        request_ring,
        kernel_maps,
        launch_probe,
        launch_status,
        driver_maps,
        driver_status,
    })
}

/// Waits for every task: a failing one takes the agent down with it (and
/// says why); a clean shutdown waits for all, then for the threads.
async fn wait_for_the_end(
    mut tasks: tokio::task::JoinSet<anyhow::Result<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.context("agent task panicked").and_then(|r| r);
        if let Err(err) = outcome {
            tracing::error!(error = %format!("{err:#}"), "agent task failed; shutting down");
            shutdown.cancel();
            if result.is_ok() {
                result = Err(err);
            }
        }
    }
    // The GPU poller notices the closed channel within 100 ms; the readers
    // check the shutdown token once a second.
    for thread in threads {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    if result.is_ok() && !shutdown.is_cancelled() {
        bail!("agent tasks ended without a shutdown request");
    }
    result
}

/// A loaded probe and its status; with `required`, a failure is fatal.
fn load_probe<P>(
    what: &str,
    loaded: Result<P, probes::ProbeError>,
    required: bool,
) -> anyhow::Result<(Option<P>, SourceStatus)> {
    match loaded {
        Ok(probe) => Ok((Some(probe), SourceStatus::Ok { detail: format!("eBPF {what} probe") })),
        Err(err) if required => Err(anyhow::Error::new(err)
            .context(format!("the eBPF {what} probe is required (PODGPU_REQUIRE_EBPF) but did not load"))),
        Err(err) => {
            tracing::warn!(error = %err, probe = what, "eBPF probe did not load: its signals are unavailable");
            Ok((None, SourceStatus::Degraded { reason: err.to_string() }))
        }
    }
}

/// Attaches the driver path (its programs live in the request probe's
/// object) when `config` asks for it; its maps and its health line.
/// `library_hooks` says why the library hooks cannot be used, if so.
fn driver_path(
    config: &Config,
    requests: Option<&mut probes::requests::RequestProbe>,
    probe_status: &SourceStatus,
    library_hooks: Result<(), String>,
) -> anyhow::Result<(Option<probes::driver::DriverMaps>, SourceStatus)> {
    let Some(probe) = requests else {
        let status = match probe_status {
            SourceStatus::Degraded { reason } => SourceStatus::Degraded { reason: reason.clone() },
            _ => SourceStatus::Disabled,
        };
        return Ok((None, status));
    };
    let devices = config.proc_root.join("devices");
    let driver_loaded = probes::driver::devices::nvidia_driver_listed(&devices);
    let wanted = match config.driver_path {
        DriverPath::On => true,
        DriverPath::Off => false,
        DriverPath::Auto => driver_loaded || !config.driver_stand_ins.is_empty(),
    };
    if !wanted {
        let status = match config.driver_path {
            DriverPath::Off => SourceStatus::Disabled,
            _ => SourceStatus::Inactive {
                reason: format!("no NVIDIA driver in {}: syscall tracepoints not attached", devices.display()),
            },
        };
        return Ok((None, status));
    }
    let libraries = library_hooks.map(|()| {
        probes::driver::libraries::candidates(
            &config.driver_libraries,
            std::env::var("LD_LIBRARY_PATH").ok().as_deref(),
        )
    });
    let hooks = match probe.attach_driver_path(config.driver_hooks, libraries) {
        Ok(hooks) => hooks,
        Err(err) => {
            if config.require_ebpf {
                return Err(anyhow::Error::new(err).context("attaching the driver path (PODGPU_REQUIRE_EBPF)"));
            }
            tracing::warn!(error = %err, "the driver path did not attach: its signals are unavailable");
            return Ok((None, SourceStatus::Degraded { reason: format!("driver path: {err}") }));
        }
    };
    if let probes::requests::DriverHooksUsed::Raw { why: Some(why) } = &hooks {
        tracing::warn!(reason = %why, "driver path on raw sys_enter/sys_exit: every syscall on the node pays for it; mount tracefs at /sys/kernel/tracing on the host");
    }
    let maps = probe.take_driver_maps().context("taking the driver path's maps")?;
    Ok((Some(maps), SourceStatus::Ok { detail: hooks.describe() }))
}

/// Adapts a `()` future to the `anyhow::Result` the task set expects.
trait IntoFutureOk: std::future::Future<Output = ()> + Sized {
    fn into_future_ok(self) -> impl std::future::Future<Output = anyhow::Result<()>> {
        async move {
            self.await;
            Ok(())
        }
    }
}

impl<F: std::future::Future<Output = ()>> IntoFutureOk for F {}
