//! `cargo xtask bench-scaler`: what the scaler role costs and how fast
//! KEDA gets answers.
//!
//! 1. Scale: the scaler binary over 100 and 1,000 node agents of 20 pods.
//!    The node agents are stand-ins in their own process
//!    (`node-standins`), the scaler runs in another, and KEDA's load comes
//!    from this one, so the scaler's CPU and RSS (`/proc`) are its own.
//!    Bytes in and out are the protobuf bytes of the snapshots the nodes
//!    sent and the requests they received (HTTP/2 framing not counted). Each fetch mode runs in turn:
//!    `all` (every pod and metric, every poll) and `selected` (the pods and
//!    metrics live ScaledObjects ask for). The same command with
//!    `--clients 1000 --streams 100 --seconds 60` is the load test.
//! 2. Load step to answer: a real standalone agent watches a tenant pod;
//!    from the moment traffic starts, how long until GetMetrics reports
//!    requests in flight (median of repeated steps).
use std::time::{Duration, Instant};

use anyhow::Context as _;
use integration::agent::AgentProcess;
use integration::http::{drive_streams, get, metric_samples, StreamSpec};
use integration::keda::{scaled_object, KedaClient};
use integration::scale::{run_load, KedaLoad, NodeStandIns, ProcessSample};
use integration::scene::{GpuSetup, Scene, TenantSpec};
use integration::workspace_binary;

/// Benchmark options.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Node agent counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    nodes: Vec<usize>,
    /// Pods per node agent.
    #[arg(long, default_value_t = 20)]
    pods: usize,
    /// Deployments the pods belong to (`app=llm-K`), spread over the nodes.
    #[arg(long, default_value_t = 200)]
    deployments: usize,
    /// ScaledObjects, each selecting one deployment.
    #[arg(long, default_value_t = 50)]
    scaled_objects: usize,
    /// KEDA connections polling (0: one per ScaledObject).
    #[arg(long, default_value_t = 0)]
    clients: usize,
    /// Milliseconds between one client's polls.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// StreamIsActive streams held open.
    #[arg(long, default_value_t = 0)]
    streams: usize,
    /// Seconds measured per configuration (after a 5 s warm-up).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Fetch modes to compare.
    #[arg(long, value_delimiter = ',', default_value = "all,selected")]
    fetch: Vec<String>,
    /// CPUs to run the scaler on; the stand-ins and the load then run on
    /// the others, so the scaler's latency is not theirs (empty: share).
    #[arg(long, value_delimiter = ',')]
    scaler_cpus: Vec<usize>,
    /// Load steps to time (0: skip).
    #[arg(long, default_value_t = 5)]
    steps: u32,
}

/// One configuration's figures.
struct ScaleRow {
    nodes_covered: u64,
    rss_series: Vec<f64>,
    scaler_cores: f64,
    standin_cores: f64,
    read_per_s: f64,
    written_per_s: f64,
    rss_mib: (f64, f64),
    fds: (usize, usize),
    answered: u64,
    errors: u64,
    first_error: Option<String>,
    p50_ms: f64,
    p99_ms: f64,
    stream_messages: u64,
    streams_broken: u64,
    /// Inside the scaler (`podgpu_scaler_answer_seconds`): the bucket bound
    /// 99% of the run's answers fall within, ms, and the share within 2 ms.
    inside_p99_within_ms: f64,
    inside_within_2ms: f64,
}

/// The scaler's answer-time buckets, GetMetrics and IsActive together:
/// (upper bound in seconds, answers within it), cumulative.
async fn answer_buckets(http: std::net::SocketAddr) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for (labels, count) in metric_samples(http, "podgpu_scaler_answer_seconds_bucket").await? {
        let le = labels.split("le=\"").nth(1).and_then(|rest| rest.split('"').next()).context("le label")?;
        let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse()? };
        match buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some(bucket) => bucket.1 += count,
            None => buckets.push((le, count)),
        }
    }
    anyhow::ensure!(!buckets.is_empty(), "the scaler's /metrics has no podgpu_scaler_answer_seconds");
    Ok(buckets)
}

async fn measure_scale(options: &Options, nodes: usize, fetch: &str) -> anyhow::Result<ScaleRow> {
    let standins = NodeStandIns::start(nodes, options.pods, options.deployments)?;
    let args = ["--nodes", &standins.addresses.join(","), "--fetch", fetch].map(String::from);
    // A child inherits the CPUs of the thread that spawns it.
    if !options.scaler_cpus.is_empty() {
        pin_current_thread(&options.scaler_cpus)?;
    }
    let scaler = AgentProcess::start_role(&workspace_binary("podgpu-agent"), "scaler", &args);
    if !options.scaler_cpus.is_empty() {
        pin_current_thread(&other_cpus(&options.scaler_cpus))?;
    }
    let scaler = scaler?;
    let covered = || async {
        get(scaler.http, "/healthz")
            .await
            .ok()
            .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
            .and_then(|v| v["nodes_covered"].as_u64())
            .unwrap_or(0)
    };
    // An overloaded scaler may never cover every node: that is a result,
    // printed, not a reason to stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    while covered().await < nodes as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut load = KedaLoad {
        clients: if options.clients == 0 { options.scaled_objects } else { options.clients },
        scaled_objects: options.scaled_objects,
        interval: Duration::from_millis(options.interval_ms),
        streams: options.streams,
        duration: Duration::from_secs(5),
    };
    // Warm-up: every trigger asked once, so polls carry them.
    run_load(scaler.keda, &load).await?;
    load.duration = Duration::from_secs(options.seconds);
    let (scaler_before, standins_before) = (ProcessSample::of(scaler.pid())?, ProcessSample::of(standins.pid())?);
    let traffic_before = standins.traffic()?;
    // RSS at each quarter of the run: flat, or growing?
    let scaler_pid = scaler.pid();
    let quarter = load.duration / 4;
    let rss_series = tokio::spawn(async move {
        let mut series = Vec::new();
        for _ in 0..4 {
            tokio::time::sleep(quarter).await;
            series.push(ProcessSample::of(scaler_pid).map_or(0.0, |s| s.rss_kib as f64 / 1024.0));
        }
        series
    });
    let buckets_before = answer_buckets(scaler.http).await?;
    let report = run_load(scaler.keda, &load).await?;
    let buckets_after = answer_buckets(scaler.http).await?;
    let rss_series = rss_series.await?;
    let run_buckets: Vec<(f64, f64)> =
        buckets_after.iter().zip(&buckets_before).map(|(after, before)| (after.0, after.1 - before.1)).collect();
    let total = run_buckets.last().map_or(0.0, |bucket| bucket.1).max(1.0);
    let inside_p99_within_ms =
        run_buckets.iter().find(|(_, within)| within / total >= 0.99).map_or(f64::INFINITY, |(bound, _)| bound * 1e3);
    let inside_within_2ms =
        run_buckets.iter().find(|(bound, _)| *bound >= 0.002).map_or(0.0, |(_, within)| within / total);
    let (scaler_after, standins_after) = (ProcessSample::of(scaler.pid())?, ProcessSample::of(standins.pid())?);
    let traffic_after = standins.traffic()?;
    let nodes_covered = covered().await;
    let seconds = scaler_after.seconds_since(&scaler_before);
    let read_per_s = traffic_after.0.saturating_sub(traffic_before.0) as f64 / seconds;
    let written_per_s = traffic_after.1.saturating_sub(traffic_before.1) as f64 / seconds;
    Ok(ScaleRow {
        nodes_covered,
        rss_series,
        scaler_cores: scaler_after.cores_since(&scaler_before),
        standin_cores: standins_after.cores_since(&standins_before),
        read_per_s,
        written_per_s,
        rss_mib: (scaler_before.rss_kib as f64 / 1024.0, scaler_after.rss_kib as f64 / 1024.0),
        fds: (scaler_before.fds, scaler_after.fds),
        answered: report.answered,
        errors: report.errors,
        p50_ms: report.latency_ms(0.5),
        p99_ms: report.latency_ms(0.99),
        first_error: report.first_error,
        stream_messages: report.stream_messages,
        streams_broken: report.streams_broken,
        inside_p99_within_ms,
        inside_within_2ms,
    })
}

async fn load_step(steps: u32) -> anyhow::Result<Vec<f64>> {
    let ns = format!("step-{}", std::process::id());
    let scene = Scene::start(&ns, &[TenantSpec::new("llm-0", "llm")], GpuSetup::Arg("none".into()), &[])?;
    let mut keda = KedaClient::connect(scene.agent.keda).await?;
    let trigger =
        scaled_object(&ns, "llm", &[("metric", "requests_in_flight"), ("target", "1"), ("podSelector", "app=llm")]);
    let addr = scene.tenant("llm-0").addr;
    let mut visible = Vec::new();
    for _ in 0..steps {
        // Streams held for 2 s: in flight from their first byte.
        let started = Instant::now();
        let load = tokio::spawn(drive_streams(
            addr,
            StreamSpec { first_ms: 2000, chunks: 1, chunk_ms: 0 },
            4,
            Duration::from_millis(100),
        ));
        loop {
            if keda.poll(&trigger, "m").await.map(|p| p.value).unwrap_or(0.0) > 0.0 {
                visible.push(started.elapsed().as_secs_f64() * 1e3);
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(5), "load step never became visible");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        load.await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(visible)
}

/// The online CPUs not in `cpus`.
fn other_cpus(cpus: &[usize]) -> Vec<usize> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..online).filter(|cpu| !cpus.contains(cpu)).collect()
}

/// Restricts the calling thread, and what it starts from now on, to `cpus`.
fn pin_current_thread(cpus: &[usize]) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it
    // for indexes below CPU_SETSIZE, which the check below ensures.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        anyhow::ensure!(cpu < libc::CPU_SETSIZE as usize, "CPU {cpu} out of range");
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    anyhow::ensure!(rc == 0, "pinning to CPUs {cpus:?}: {}", std::io::Error::last_os_error());
    Ok(())
}

pub fn run(options: Options) -> anyhow::Result<()> {
    // Before the runtime: its threads, and the stand-ins, inherit this.
    if !options.scaler_cpus.is_empty() {
        let others = other_cpus(&options.scaler_cpus);
        anyhow::ensure!(!others.is_empty(), "--scaler-cpus leaves no CPU for the stand-ins and the load");
        pin_current_thread(&others)?;
        println!("scaler on CPUs {:?}; node stand-ins and KEDA load on {others:?}", options.scaler_cpus);
    }
    let runtime = crate::root_runtime("the load-step part")?;
    runtime.block_on(async {
        let clients = if options.clients == 0 { options.scaled_objects } else { options.clients };
        println!(
            "scaler over node stand-ins ({} pods each, {} deployments; {} ScaledObjects, {clients} KEDA clients \
             polling GetMetrics+IsActive every {} ms, {} StreamIsActive streams; {} s measured):",
            options.pods, options.deployments, options.scaled_objects, options.interval_ms, options.streams, options.seconds
        );
        println!(
            "{:>8} {:>6} {:>7} {:>7} {:>12} {:>11} {:>11} {:>15} {:>9} {:>8} {:>6} {:>16} {:>11}",
            "fetch", "nodes", "pods", "covered", "scaler cores", "in MB/s", "out kB/s", "RSS MiB", "fds", "answers", "errors",
            "p50 / p99 ms", "stand-ins"
        );
        for &nodes in &options.nodes {
            for fetch in &options.fetch {
                let row = measure_scale(&options, nodes, fetch).await.with_context(|| format!("{fetch} at {nodes} nodes"))?;
                println!(
                    "{fetch:>8} {nodes:>6} {:>7} {:>7} {:>12.3} {:>11.2} {:>11.2} {:>7.1} -> {:<6.1} {:>4}->{:<4} {:>8} {:>6} {:>7.3} / {:<7.3} {:>10.2}",
                    nodes * options.pods,
                    row.nodes_covered,
                    row.scaler_cores,
                    row.read_per_s / 1e6,
                    row.written_per_s / 1e3,
                    row.rss_mib.0,
                    row.rss_mib.1,
                    row.fds.0,
                    row.fds.1,
                    row.answered,
                    row.errors,
                    row.p50_ms,
                    row.p99_ms,
                    row.standin_cores,
                );
                println!(
                    "         inside the scaler: 99% of answers within {} ms; {:.2}% within 2 ms",
                    row.inside_p99_within_ms,
                    row.inside_within_2ms * 100.0
                );
                let series: Vec<String> = row.rss_series.iter().map(|mib| format!("{mib:.1}")).collect();
                println!("         scaler RSS at each quarter of the run: {} MiB", series.join(", "));
                if options.streams > 0 {
                    println!("         StreamIsActive: {} messages, {} streams broken", row.stream_messages, row.streams_broken);
                }
                if let Some(error) = row.first_error {
                    println!("         first error: {error}");
                }
            }
        }
        if options.steps > 0 {
            let mut visible = load_step(options.steps).await?;
            visible.sort_by(f64::total_cmp);
            let median = integration::percentile(visible.clone(), 0.5);
            println!("\nload step -> requests_in_flight > 0 over GetMetrics (standalone agent, tick 250 ms):");
            println!(
                "median {median:.0} ms, max {:.0} ms over {} steps (target <= 1000 ms)",
                visible.last().copied().unwrap_or(0.0),
                visible.len()
            );
        }
        Ok(())
    })
}
