//! `cargo xtask demo`: a node in miniature. Two tenant pods (HTTP servers in
//! kubelet-shaped cgroups) get different, changing load; the agent watches
//! them with its real eBPF probes and a GPU backend (the embedded simulated
//! scenario, or real NVML when this machine has a GPU). On the simulated
//! GPU each pod also launches kernels through the libcuda stand-in
//! (`demo_gpu`), and the device runs what they launch. A live per-pod view
//! refreshes every second, and at the end (or on Ctrl-C) the demo asks the
//! agent's KEDA scaler what it would tell KEDA. Both tenants run under
//! vLLM's program name and serve vLLM's /metrics, whose queue and KV cache
//! follow their load, so the agent finds them as engines with no
//! configuration and shows their own gauges beside its signals.
//! Everything it started is stopped and its cgroups removed on the way out.
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use integration::http::{drive, drive_streams, get, Load, StreamSpec};
use integration::keda::{scaled_object, KedaClient};
use integration::scene::{GpuSetup, Scene, TenantSpec};

use crate::demo_gpu::GpuWork;
use podgpu_agent::gpu::NvmlBackend;

/// The pod UIDs the agent's embedded demo scenario gives GPU load to.
const TENANT_A_UID: &str = "7d1c2a4e-0000-4000-8000-00000000000a";
const TENANT_B_UID: &str = "7d1c2a4e-0000-4000-8000-00000000000b";
const NAMESPACE: &str = "demo";

/// Demo options.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(6..=3600))]
    seconds: u64,
    /// GPU backend for the agent (default: nvml when a GPU is present, else the embedded simulation).
    #[arg(long)]
    gpu: Option<String>,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    // The tenants run as `vllm`: engine discovery finds them by command
    // line, as it finds `vllm serve`. Set before the runtime's threads exist.
    let engines = tempfile::tempdir()?;
    let named = engines.path().join("vllm");
    std::os::unix::fs::symlink(integration::workspace_binary("tenant"), &named).context("naming the tenants vllm")?;
    std::env::set_var("PODGPU_TENANT_BIN", &named);
    let runtime = crate::root_runtime("the demo")?;
    runtime.block_on(demo(options, engines.path()))
}

/// The engine gauges each tenant serves: (waiting, running, KV fraction)
/// for A in the first and second half, and for B throughout. A's queue
/// builds when its clients go from 3 to 10.
const ENGINE_GAUGES: [(u32, u32, f64); 3] = [(0, 3, 0.24), (6, 4, 0.71), (0, 1, 0.06)];

fn publish_engine(file: &Path, (waiting, running, kv): (u32, u32, f64)) -> anyhow::Result<()> {
    crate::bench_engines::publish_as(file, &crate::bench_engines::vllm_body_with(waiting, running, kv))
}

fn gpu_choice(explicit: Option<String>) -> String {
    if let Some(gpu) = explicit {
        return gpu;
    }
    match NvmlBackend::open(Path::new("libnvidia-ml.so.1")) {
        Ok(_) => "nvml".to_string(),
        Err(_) => "sim".to_string(),
    }
}

async fn demo(options: Options, engines: &Path) -> anyhow::Result<()> {
    let gpu = gpu_choice(options.gpu);
    let backend =
        if gpu == "sim" { "simulated (embedded demo scenario; no GPU on this machine)" } else { gpu.as_str() };
    println!("GPU backend: {backend}");
    let (metrics_a, metrics_b) = (engines.join("llm-a.prom"), engines.join("llm-b.prom"));
    publish_engine(&metrics_a, ENGINE_GAUGES[0])?;
    publish_engine(&metrics_b, ENGINE_GAUGES[2])?;
    let tenant = |uid: &str, name: &str, app: &str, metrics: &Path| TenantSpec {
        uid: Some(uid.to_string()),
        env: vec![("PODGPU_TENANT_METRICS".to_string(), metrics.display().to_string())],
        ..TenantSpec::new(name, app)
    };
    let specs =
        [tenant(TENANT_A_UID, "llm-a-0", "llm-a", &metrics_a), tenant(TENANT_B_UID, "llm-b-0", "llm-b", &metrics_b)];
    let scene = Scene::start(NAMESPACE, &specs, GpuSetup::Arg(gpu.clone()), &[])
        .context("starting the demo scene (tenants, cgroups, agent)")?;
    let duration = Duration::from_secs(options.seconds);
    // On the simulated GPU the pods' load is what they launch: A (1 ms a
    // launch) runs 30 % and stops by turns every 3 s for the first half,
    // then holds 25 %; B (0.4 ms a launch) holds 12 % throughout.
    let gpu_work = if gpu == "sim" {
        let schedules = [GpuWork::schedule(duration, Some(300), 250), GpuWork::schedule(duration, None, 300)];
        let work = GpuWork::start(&scene.tenants, &schedules).context("starting the pods' GPU work")?;
        println!(
            "GPU work: llm-a launches 300/s and stops by turns for {} s, then 250/s; llm-b 300/s (1 ms and 0.4 ms of GPU a launch)",
            duration.as_secs() / 2
        );
        Some(work)
    } else {
        None
    };
    println!(
        "agent pid {} serving KEDA gRPC on {} and HTTP on {}",
        scene.agent.pid(),
        scene.agent.keda,
        scene.agent.http
    );
    for tenant in &scene.tenants {
        println!(
            "pod {}/{} (uid {}) serves on {} from cgroup {}",
            NAMESPACE,
            tenant.spec.name,
            tenant.pod.uid,
            tenant.addr,
            tenant.pod.container_dir.display()
        );
    }
    if !std::io::stdout().is_terminal() {
        println!(
            "on a terminal the demo shows `podgpu-agent top --agent {} --namespace {NAMESPACE}` while it runs",
            scene.agent.http
        );
    }

    // Tenant A serves streamed completions (first token after 80 ms, then
    // 8 tokens 15 ms apart) to 3 clients, then to 10 half-way through;
    // tenant B answers small requests at a steady 10/s.
    let half = duration / 2;
    let a = scene.tenant("llm-a-0").addr;
    let b = scene.tenant("llm-b-0").addr;
    let completion = StreamSpec { first_ms: 80, chunks: 8, chunk_ms: 15 };
    let load = tokio::spawn(async move {
        let steady_b = tokio::spawn(drive(b, Load { rate: 10.0, request_bytes: 300, connections: 1, duration }));
        let first = drive_streams(a, completion, 3, half).await;
        let _ = publish_engine(&metrics_a, ENGINE_GAUGES[1]);
        let second = drive_streams(a, completion, 10, duration - half).await;
        (first + second, steady_b.await.map(|r| r.ok).unwrap_or(0))
    });

    // KEDA is asked while the load still runs (its last 3 s): asked after
    // it, every in-flight count would read 0.
    let started = Instant::now();
    let ask_at = duration.saturating_sub(Duration::from_secs(3));
    let interrupted = tokio::select! {
        _ = live_view(scene.agent.http, started, ask_at) => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        println!("\ninterrupted: asking the scaler once, then cleaning up");
        load.abort();
        keda_answers(scene.agent.keda).await?;
    } else {
        println!(
            "\nasking the scaler while the load still runs ({:.0} s left)",
            (duration - started.elapsed()).as_secs_f64()
        );
        keda_answers(scene.agent.keda).await?;
        if let Ok((a_streams, b_requests)) = load.await {
            println!("\nload sent: llm-a {a_streams} streamed completions, llm-b {b_requests} requests");
        }
    }
    println!("stopping the agent and tenants, removing their cgroups");
    drop(gpu_work);
    drop(scene);
    println!("done");
    Ok(())
}

/// Shows the load live until `duration` has passed: on a terminal,
/// `podgpu-agent top` itself (q ends it early); otherwise (logs, CI) a
/// plain per-pod table every second.
async fn live_view(http: SocketAddr, started: Instant, duration: Duration) {
    if std::io::stdout().is_terminal() {
        let left = duration.saturating_sub(started.elapsed()).as_secs_f64();
        let shown = tokio::process::Command::new(integration::workspace_binary("podgpu-agent"))
            .args(["top", "--agent", &http.to_string(), "--namespace", NAMESPACE, "--window-s", "5"])
            .args(["--exit-after-s", &format!("{left:.1}")])
            .status()
            .await;
        match shown {
            Ok(status) if status.success() => return,
            Ok(status) => println!("podgpu-agent top ended with {status}: falling back to the plain table"),
            Err(err) => println!("could not start podgpu-agent top ({err}): falling back to the plain table"),
        }
    }
    plain_table(http, started, duration).await;
}

/// Prints the per-pod table every second until `duration` has passed.
async fn plain_table(http: SocketAddr, started: Instant, duration: Duration) {
    let redraw = std::io::stdout().is_terminal();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < duration {
        ticker.tick().await;
        let table = match get(http, "/pods?window=5").await {
            Ok(reply) if reply.status == 200 => render(&reply.body, started.elapsed(), duration),
            Ok(reply) => format!("agent answered /pods with HTTP {}\n", reply.status),
            Err(err) => format!("agent not reachable: {err}\n"),
        };
        let mut out = std::io::stdout().lock();
        if redraw {
            // Clear the screen and home the cursor, then draw.
            let _ = write!(out, "\x1b[2J\x1b[H");
        }
        let _ = write!(out, "{table}");
        let _ = out.flush();
    }
}

fn render(body: &[u8], elapsed: Duration, duration: Duration) -> String {
    let Ok(view) = serde_json::from_slice::<serde_json::Value>(body) else {
        return "unreadable /pods answer\n".to_string();
    };
    let health = &view["health"];
    let mut out = format!(
        "podgpu demo  t={:>3}s/{}s  eBPF: {}  GPU: {}\n",
        elapsed.as_secs(),
        duration.as_secs(),
        health["probes"]["state"].as_str().unwrap_or("?"),
        health["gpu"]["detail"].as_str().or(health["gpu"]["reason"].as_str()).unwrap_or("?"),
    );
    let columns = [
        "pod (5 s window)",
        "in flight",
        "req/s",
        "TTFT p50",
        "latency p99",
        "recv B/s",
        "GPU SM %",
        "conf",
        "NVML SM %",
        "GPU mem",
        "engine queue",
        "KV %",
    ];
    out.push_str(&format!(
        "{:<18} {:>9} {:>7} {:>10} {:>11} {:>10} {:>9} {:>5} {:>9} {:>9} {:>12} {:>5}\n",
        columns[0],
        columns[1],
        columns[2],
        columns[3],
        columns[4],
        columns[5],
        columns[6],
        columns[7],
        columns[8],
        columns[9],
        columns[10],
        columns[11]
    ));
    let fixed = |value: &serde_json::Value, digits: usize, unit: &str| {
        value.as_f64().map_or("-".to_string(), |v| format!("{v:.digits$}{unit}"))
    };
    for pod in view["pods"].as_array().into_iter().flatten() {
        if pod["namespace"] != NAMESPACE {
            continue;
        }
        let values = &pod["values"];
        let memory = values["gpu_mem_used_bytes"].as_f64().map(|b| serde_json::json!(b / (1u64 << 30) as f64));
        out.push_str(&format!(
            "{:<18} {:>9} {:>7} {:>10} {:>11} {:>10} {:>9} {:>5} {:>9} {:>9} {:>12} {:>5}\n",
            format!("{}/{}", NAMESPACE, pod["name"].as_str().unwrap_or("?")),
            fixed(&values["requests_in_flight"], 0, ""),
            fixed(&values["request_rate"], 1, ""),
            fixed(&values["ttft_ms_p50"], 1, " ms"),
            fixed(&values["latency_ms_p99"], 1, " ms"),
            fixed(&values["socket_recv_bytes_rate"], 0, ""),
            fixed(&values["gpu_sm_util"], 1, ""),
            fixed(&values["gpu_attribution_confidence"], 2, ""),
            fixed(&values["gpu_sm_util_nvml"], 1, ""),
            fixed(&memory.unwrap_or_default(), 1, " GiB"),
            fixed(&values["engine_requests_waiting"], 0, ""),
            fixed(&values["kv_cache_usage"], 0, ""),
        ));
    }
    out
}

/// Asks the scaler what KEDA would get for each workload, as KEDA asks.
async fn keda_answers(keda: SocketAddr) -> anyhow::Result<()> {
    let mut client = KedaClient::connect(keda).await.context("connecting to the scaler")?;
    println!("\nKEDA ExternalScaler answers (GetMetricSpec, then GetMetrics + IsActive; window 10 s;");
    println!("percentiles come back times the pod count, so AverageValue scales proportionally):");
    println!("{:<8} {:<24} {:>8} {:>10} {:>7} {:>9}", "app", "metric", "target", "value", "active", "replicas");
    for app in ["llm-a", "llm-b"] {
        let metrics = [
            ("requests_in_flight", "4"),
            ("ttft_ms_p90", "150"),
            ("gpu_sm_util", "30"),
            ("engine_requests_waiting", "5"),
            ("kv_cache_usage", "60"),
        ];
        for (metric, target) in metrics {
            let selector = format!("app={app}");
            let trigger =
                scaled_object(NAMESPACE, app, &[("metric", metric), ("target", target), ("podSelector", &selector)]);
            let spec = client.metric_spec(&trigger).await?;
            let Some(spec) = spec.first() else { continue };
            match client.poll(&trigger, &spec.metric_name).await {
                Ok(poll) => {
                    // What the HPA does with an AverageValue target.
                    let replicas = (poll.value / spec.target_size_float).ceil().max(1.0);
                    println!("{app:<8} {metric:<24} {target:>8} {:>10.1} {:>7} {replicas:>9}", poll.value, poll.active);
                }
                Err(status) => println!("{app:<8} {metric:<24} {target:>8} unavailable: {}", status.message()),
            }
        }
    }
    Ok(())
}
