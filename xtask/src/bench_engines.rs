//! `cargo xtask bench-engines`: what reading inference engines' own
//! metrics costs the node agent, and how fresh the engine's gauges are
//! when KEDA reads them.
//!
//! 1. Cost: `--pods` tenant pods that run as vLLM does (the `tenant`
//!    binary under the program name `vllm`) and serve a vLLM-sized
//!    exposition (`vllm_body`: vLLM's gauges, counters and histograms with
//!    its buckets, about 30 KB). For each configuration (scraping off,
//!    every 1 s, every 100 ms) a fresh agent; once every engine is read,
//!    its CPU time (`/proc`) over `--seconds`. Per scraped pod per second
//!    is the difference from "off", divided by pods and seconds. Idle
//!    engines serve the same body each time (the scraper then skips the
//!    parse); busy ones change their queue every 50 ms, so every scrape
//!    parses.
//! 2. Freshness: the default schedule (1 s scrapes, 250 ms tick) behind a
//!    scaler (500 ms polls): the gauge changes at a random moment, and the
//!    time until GetMetrics through the scaler returns the new value is
//!    taken, `--steps` times.
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use integration::agent::AgentProcess;
use integration::keda::{scaled_object, KedaClient};
use integration::scale::ProcessSample;
use integration::scene::{GpuSetup, Scene, TenantSpec};
use integration::workspace_binary;
use podgpu_agent::engines::exposition::Exposition;

/// Benchmark options.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Engine pods scraped.
    #[arg(long, default_value_t = 50)]
    pods: usize,
    /// Seconds of agent CPU measured per configuration.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Gauge changes timed through the scaler (0: skip).
    #[arg(long, default_value_t = 20)]
    steps: usize,
}

const NAMESPACE: &str = "bench-engines";

/// A vLLM 0.11 /metrics body as its API server writes it for one model
/// and one engine, with `waiting` requests queued.
pub fn vllm_body(waiting: u32) -> String {
    vllm_body_with(waiting, 12, 0.62)
}

/// The same with `running` requests in the batch and the KV cache
/// `kv_fraction` full.
pub fn vllm_body_with(waiting: u32, running: u32, kv_fraction: f64) -> String {
    const TTFT: [f64; 22] = [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
        160.0, 640.0, 2560.0,
    ];
    const LATENCY: [f64; 20] = [
        0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
        1920.0,
    ];
    const TOKENS: [f64; 14] =
        [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0];
    let labels = "engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"";
    let mut body = String::new();
    body.push_str(
        "# HELP python_gc_objects_collected_total Objects collected during gc\n\
         # TYPE python_gc_objects_collected_total counter\n",
    );
    for generation in 0..3 {
        let _ = writeln!(body, "python_gc_objects_collected_total{{generation=\"{generation}\"}} 12345.0");
    }
    for (name, value) in [
        ("process_virtual_memory_bytes", "1.2e+10"),
        ("process_resident_memory_bytes", "3.1e+09"),
        ("process_start_time_seconds", "1.765e+09"),
        ("process_cpu_seconds_total", "4321.5"),
        ("process_open_fds", "187.0"),
    ] {
        let _ = write!(body, "# HELP {name} x\n# TYPE {name} gauge\n{name} {value}\n");
    }
    let gauges = [
        ("vllm:num_requests_running", f64::from(running)),
        ("vllm:num_requests_waiting", f64::from(waiting)),
        ("vllm:kv_cache_usage_perc", kv_fraction),
    ];
    for (name, value) in gauges {
        let _ = write!(body, "# HELP {name} x\n# TYPE {name} gauge\n{name}{{{labels}}} {value:?}\n");
    }
    for name in ["prompt_tokens", "generation_tokens", "num_preemptions", "prefix_cache_queries", "prefix_cache_hits"] {
        let _ = write!(
            body,
            "# HELP vllm:{name}_total x\n# TYPE vllm:{name}_total counter\nvllm:{name}_total{{{labels}}} 98765.0\n"
        );
    }
    body.push_str("# HELP vllm:request_success_total x\n# TYPE vllm:request_success_total counter\n");
    for reason in ["stop", "length", "abort", "error"] {
        let _ = writeln!(body, "vllm:request_success_total{{{labels},finished_reason=\"{reason}\"}} 321.0");
    }
    let histograms: [(&str, &[f64]); 12] = [
        ("time_to_first_token_seconds", &TTFT),
        ("inter_token_latency_seconds", &TTFT[..18]),
        ("e2e_request_latency_seconds", &LATENCY),
        ("request_queue_time_seconds", &LATENCY),
        ("request_inference_time_seconds", &LATENCY),
        ("request_prefill_time_seconds", &LATENCY),
        ("request_decode_time_seconds", &LATENCY),
        ("request_prompt_tokens", &TOKENS),
        ("request_generation_tokens", &TOKENS),
        ("request_max_num_generation_tokens", &TOKENS),
        ("request_params_max_tokens", &TOKENS),
        ("iteration_tokens_total", &TOKENS),
    ];
    for (name, bounds) in histograms {
        let _ = write!(body, "# HELP vllm:{name} x\n# TYPE vllm:{name} histogram\n");
        for (index, bound) in bounds.iter().enumerate() {
            let _ = writeln!(body, "vllm:{name}_bucket{{{labels},le=\"{bound:?}\"}} {:?}", (index * 37) as f64);
        }
        let _ = writeln!(body, "vllm:{name}_bucket{{{labels},le=\"+Inf\"}} {:?}", (bounds.len() * 37) as f64);
        let _ = writeln!(body, "vllm:{name}_count{{{labels}}} {:?}", (bounds.len() * 37) as f64);
        let _ = writeln!(body, "vllm:{name}_sum{{{labels}}} 1234.5");
    }
    body
}

/// Writes `body` as `dir/metrics.prom` in one rename, as a gauge changes.
fn publish(dir: &Path, body: &str) -> anyhow::Result<()> {
    publish_as(&dir.join("metrics.prom"), body)
}

/// Writes `body` to `file` in one rename.
pub fn publish_as(file: &Path, body: &str) -> anyhow::Result<()> {
    let staged = file.with_extension("staged");
    std::fs::write(&staged, body)?;
    std::fs::rename(&staged, file)?;
    Ok(())
}

/// The pods, each serving `dir/metrics.prom` as vLLM would.
fn specs(pods: usize, dir: &Path) -> Vec<TenantSpec> {
    (0..pods)
        .map(|index| {
            let mut spec = TenantSpec::new(&format!("vllm-{index}"), &format!("vllm-{index}"));
            spec.env = vec![("PODGPU_TENANT_METRICS".into(), dir.join("metrics.prom").display().to_string())];
            spec
        })
        .collect()
}

/// Waits until every pod's engine is read (or 30 s).
async fn all_read(scene: &Scene) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = integration::http::get(scene.agent.http, "/pods").await?;
        let pods: serde_json::Value = serde_json::from_slice(&reply.body)?;
        let read = pods["pods"]
            .as_array()
            .map_or(0, |rows| rows.iter().filter(|row| row["engine"]["unavailable"].is_null()).count());
        if read >= scene.tenants.len() || Instant::now() > deadline {
            return Ok(read);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The agent's CPU cores over `seconds` with `args`; with `changing`, the
/// engines' queue changes every 50 ms (a busy engine: every scrape parses).
async fn agent_cpu(options: &Options, dir: &Path, args: &[&str], changing: bool) -> anyhow::Result<(f64, usize)> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let scene = Scene::start(NAMESPACE, &specs(options.pods, dir), GpuSetup::Arg("none".into()), &args)?;
    let read = if args.iter().any(|a| a == "off") { 0 } else { all_read(&scene).await? };
    // Discovery's first round is over; what is left is the steady cost.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writer = changing.then(|| {
        let dir = dir.to_path_buf();
        tokio::spawn(async move {
            for waiting in 0u32.. {
                let _ = publish(&dir, &vllm_body(waiting % 1000));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    });
    let before = ProcessSample::of(scene.agent.pid())?;
    tokio::time::sleep(Duration::from_secs(options.seconds)).await;
    let after = ProcessSample::of(scene.agent.pid())?;
    if let Some(writer) = writer {
        writer.abort();
    }
    Ok(((after.cpu_s - before.cpu_s) / after.at.duration_since(before.at).as_secs_f64(), read))
}

/// Times gauge changes through a scaler in front of a default agent.
async fn freshness(options: &Options, dir: &Path) -> anyhow::Result<Vec<f64>> {
    let scene = Scene::start(NAMESPACE, &specs(1, dir), GpuSetup::Arg("none".into()), &[])?;
    all_read(&scene).await?;
    let nodes = scene.agent.keda.to_string();
    let scaler = AgentProcess::start_role(&workspace_binary("podgpu-agent"), "scaler", &["--nodes".into(), nodes])?;
    let mut keda = KedaClient::connect(scaler.keda).await?;
    let trigger = scaled_object(
        NAMESPACE,
        "vllm-0",
        &[("metric", "engine_requests_waiting"), ("target", "1"), ("podSelector", "app=vllm-0")],
    );
    let mut waits = Vec::new();
    // A cheap, seeded spread of change moments over the scrape interval.
    let mut phase: u64 = 0x2545_f491_4f6c_dd1d;
    for step in 0..options.steps {
        phase ^= phase << 13;
        phase ^= phase >> 7;
        phase ^= phase << 17;
        tokio::time::sleep(Duration::from_millis(300 + phase % 1000)).await;
        let waiting = 100 + step as u32;
        let changed = Instant::now();
        publish(dir, &vllm_body(waiting))?;
        loop {
            if let Ok((_, value)) = keda.get_metrics(&trigger, "podgpu-engine-requests-waiting").await {
                if value == f64::from(waiting) {
                    waits.push(changed.elapsed().as_secs_f64());
                    break;
                }
            }
            anyhow::ensure!(changed.elapsed() < Duration::from_secs(10), "the change never reached KEDA");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(waits)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Runs the benchmark and prints its figures.
pub fn run(options: Options) -> anyhow::Result<()> {
    let runtime = crate::root_runtime("bench-engines")?;
    let files = tempfile::tempdir()?;
    // The tenant binary under vLLM's program name: discovery finds it by
    // its command line, as it finds `vllm serve`.
    let named = files.path().join("vllm");
    std::os::unix::fs::symlink(workspace_binary("tenant"), &named).context("naming the tenant vllm")?;
    std::env::set_var("PODGPU_TENANT_BIN", &named);
    publish(files.path(), &vllm_body(5))?;
    println!(
        "engine scraping benchmark: {} vLLM-shaped pods, {} B per /metrics body, {} s of agent CPU per configuration",
        options.pods,
        vllm_body(5).len(),
        options.seconds
    );
    // What the line filter saves: the parser given the whole body, and
    // given only the read families' lines (what a scrape does).
    let body = vllm_body(5);
    let time = |parse: &dyn Fn()| {
        let started = Instant::now();
        for _ in 0..200 {
            parse();
        }
        started.elapsed().as_secs_f64() / 200.0 * 1e6
    };
    let whole = time(&|| {
        std::hint::black_box(Exposition::parse_read_lines(&body, false).ok());
    });
    let filtered = time(&|| {
        std::hint::black_box(Exposition::parse(&body, false).ok());
    });
    println!("  parsing one body: {whole:.0} us whole, {filtered:.0} us for the read families (line filter included)");
    runtime.block_on(async {
        let (off, _) = agent_cpu(&options, files.path(), &["--engine-scrape", "off"], false).await?;
        println!("  scraping off:                  agent {:.4} cores", off);
        for interval_ms in ["1000", "100"] {
            for (bodies, changing) in [("idle", false), ("busy", true)] {
                let args = ["--engine-interval-ms", interval_ms];
                let (on, read) = agent_cpu(&options, files.path(), &args, changing).await?;
                let scrapes_per_s = options.pods as f64 * 1000.0 / interval_ms.parse::<f64>()?;
                println!(
                    "  every {interval_ms:>4} ms, {bodies} engines: agent {on:.4} cores ({read}/{} read); \
                     {:.1} us CPU per scrape, {:.4} % of a core per scraped pod",
                    options.pods,
                    (on - off) / scrapes_per_s * 1e6,
                    (on - off) / options.pods as f64 * 100.0
                );
            }
        }
        if options.steps > 0 {
            let mut waits = freshness(&options, files.path()).await?;
            waits.sort_by(f64::total_cmp);
            println!(
                "  freshness through the scaler (1 s scrapes, 250 ms tick, 500 ms scaler poll), {} changes: \
                 median {:.2} s, p90 {:.2} s, max {:.2} s",
                waits.len(),
                quantile(&waits, 0.5),
                quantile(&waits, 0.9),
                waits.last().copied().unwrap_or(f64::NAN)
            );
        }
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use podgpu_agent::engines::catalog::EngineKind;

    use super::Exposition;

    /// The benchmark's body reads as vLLM's, with its queue.
    #[test]
    fn the_body_reads_as_vllm() {
        let reading = Exposition::parse(&super::vllm_body(7), false).unwrap().read(None).unwrap();
        assert_eq!((reading.engine, reading.requests_waiting), (EngineKind::Vllm, Some(7.0)));
        assert_eq!(reading.ttft.unwrap().bounds_s.len(), 23);
    }
}
