//! What launch accounting costs a launch-bound tenant, and what sampling
//! costs in accuracy, in one run: a stand-in libcuda (gcc) and a loop that
//! launches with a fixed amount of host work per launch run three times
//! in a cgroup pod: without the agent, with the probes always attached
//! (budget 100%), and with the default budget (sampling). Prints the
//! loop's throughput each time, the ns each probed launch adds, and how
//! far the agent's count or estimate is from the loop's own. Then twice
//! more with a `cuCtxSynchronize` after every launch, without the agent and
//! with the probes always on: what each probed wait (the completion span
//! probes, entry and return) adds beyond the launch. Last, with
//! `kernel.bpf_stats_enabled`, the launch program's own time per launch
//! when every launch is a handle's first (a new count key, and the launch
//! site kept for identity) against launches of one handle.
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use integration::agent::{AgentProcess, PodEntry};
use integration::pod::{new_uid, CgroupPod};

#[derive(clap::Args)]
pub struct Options {
    /// Host work per launch, ns (7600: a small kernel's launch on an H200
    /// host, 132k launches/s unprobed).
    #[arg(long, default_value_t = 7_600)]
    spin_ns: u64,
    /// Seconds per run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

struct Run {
    rate: f64,
    launches: u64,
    /// The agent's count or estimate (runs with the agent).
    counted: Option<u64>,
    duty: Option<f64>,
    hit_cost_ns: Option<u64>,
    /// The `cuLaunchKernel` program's (ns, runs) over the run (non-zero
    /// while `kernel.bpf_stats_enabled`).
    launch_program: (f64, f64),
}

/// How the loop launches in one run.
#[derive(Default)]
struct LoopSetup {
    /// A wait after every launch.
    waits: bool,
    /// Distinct handles to cycle through (0: one fixed handle).
    handles: u32,
    /// `LAUNCH_SCHEDULE`, when paced.
    schedule: Option<String>,
    /// Seconds the loop runs (default: `--seconds`).
    seconds: Option<u64>,
}

/// Handles launched once each in the first-launch runs: under the launch
/// site map's 4,096 entries, so every one is kept.
const FIRST_LAUNCHES: u32 = 4_000;

pub fn run(options: Options) -> anyhow::Result<()> {
    let runtime = crate::root_runtime("bench-launches")?;
    let tools = tempfile::tempdir()?;
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/cuda");
    for args in
        [vec!["-shared", "-fPIC", "-O2", "-o", "LIB", "libcuda.c"], vec!["-O2", "-o", "LOOP", "launch_loop.c", "-ldl"]]
    {
        let lib = tools.path().join("libcuda.so.1").display().to_string();
        let looper = tools.path().join("launch_loop").display().to_string();
        let args: Vec<String> = args.iter().map(|a| a.replace("LIB", &lib).replace("LOOP", &looper)).collect();
        let status = Command::new("gcc").args(&args).current_dir(&sources).status().context("gcc")?;
        if !status.success() {
            bail!("gcc {args:?} failed");
        }
    }
    println!(
        "launch-bound loop: {} ns of host work per launch, {} s per run (stand-in libcuda)",
        options.spin_ns, options.seconds
    );
    let plain = LoopSetup::default;
    let with_waits = || LoopSetup { waits: true, ..LoopSetup::default() };
    let bare = runtime.block_on(one_run(&options, tools.path(), None, plain()))?;
    println!("unprobed:              {:>9.0} launches/s", bare.rate);
    let always = runtime.block_on(one_run(&options, tools.path(), Some("100"), plain()))?;
    let sampled = runtime.block_on(one_run(&options, tools.path(), Some("1"), plain()))?;
    let bare_waits = runtime.block_on(one_run(&options, tools.path(), None, with_waits()))?;
    let always_waits = runtime.block_on(one_run(&options, tools.path(), Some("100"), with_waits()))?;
    let added_ns = (1.0 / always.rate - 1.0 / bare.rate) * 1e9;
    let report = |name: &str, run: &Run| {
        let counted = run.counted.unwrap_or(0);
        println!(
            "{name:<22} {:>9.0} launches/s  ratio {:.3}  counted {counted} of {} ({:+.1}%)  duty {:.3}",
            run.rate,
            run.rate / bare.rate,
            run.launches,
            (counted as f64 / run.launches as f64 - 1.0) * 100.0,
            run.duty.unwrap_or(f64::NAN),
        );
    };
    report("probes always on:", &always);
    report("sampled (1% budget):", &sampled);
    println!(
        "ns added per probed launch: {added_ns:.0} (the agent's calibration on its own function: {} ns)",
        always.hit_cost_ns.unwrap_or(0)
    );
    let added_with_waits_ns = (1.0 / always_waits.rate - 1.0 / bare_waits.rate) * 1e9;
    println!(
        "with a wait per launch: {:.0} unprobed, {:.0} probed launches/s; ns added per probed wait: {:.0}",
        bare_waits.rate,
        always_waits.rate,
        added_with_waits_ns - added_ns
    );
    first_launch_cost(&options, tools.path(), &runtime)
}

/// The launch program's ns per launch when each launch is a handle's
/// first, against launches of one handle, from `kernel.bpf_stats_enabled`
/// (not free, so never in the timed runs above). Each run launches
/// `FIRST_LAUNCHES` times in one paced second.
fn first_launch_cost(options: &Options, tools: &Path, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let previous_stats = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    crate::bench_probes::set_bpf_stats(true)?;
    let paced = |handles: u32| LoopSetup {
        handles,
        schedule: Some(format!("{FIRST_LAUNCHES}:1,0:86400")),
        seconds: Some(3),
        ..LoopSetup::default()
    };
    let runs = (|| -> anyhow::Result<(Run, Run)> {
        let first = runtime.block_on(one_run(options, tools, Some("100"), paced(FIRST_LAUNCHES)))?;
        let repeat = runtime.block_on(one_run(options, tools, Some("100"), paced(0)))?;
        Ok((first, repeat))
    })();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", previous_stats.trim());
    let (first, repeat) = runs?;
    if first.launch_program.1 <= 0.0 || repeat.launch_program.1 <= 0.0 {
        bail!("the agent's /metrics counted no cu_launch_kernel runs (kernel.bpf_stats_enabled)");
    }
    // Both totals include the agent's calibration at start (its own
    // function, probed by the same program); the difference is the
    // launches'. Per launch, so that a launch or two more in one run
    // does not count as a handle's cost.
    let per_launch = |run: &Run| run.launch_program.0 / run.launches.max(1) as f64;
    let calibration_runs = repeat.launch_program.1 - repeat.launches as f64;
    println!(
        "launch program (eBPF, bpf_stats): {} launches each a new handle {:.2} ms, {} launches of one handle \
         {:.2} ms (each with the agent's ~{calibration_runs:.0} calibration runs): a handle's first launch \
         costs {:.0} ns more (its count key and its launch site)",
        first.launches,
        first.launch_program.0 / 1e6,
        repeat.launches,
        repeat.launch_program.0 / 1e6,
        per_launch(&first) - per_launch(&repeat),
    );
    Ok(())
}

/// One run of the loop as `setup` says, with an agent at `budget` percent
/// (or none).
async fn one_run(options: &Options, tools: &Path, budget: Option<&str>, setup: LoopSetup) -> anyhow::Result<Run> {
    let cgroup_root = podgpu_agent::pods::cgroup_tree::host_v2_root().context("cgroup v2 root")?;
    let uid = new_uid();
    let mut pod = CgroupPod::create(&cgroup_root, &uid)?;
    let pods = [PodEntry { uid: &uid, namespace: "bench", name: "loop", app: "loop" }];
    let agent = match budget {
        Some(budget) => Some(AgentProcess::start_for_pods(
            &pods,
            &["--launch-accounting", "on", "--launch-overhead-budget", budget],
        )?),
        None => None,
    };
    let go = tools.join(format!("go-{uid}"));
    let mut command = Command::new(tools.join("launch_loop"));
    if setup.waits {
        command.env("WAIT_EVERY", "1");
    }
    if setup.handles > 0 {
        command.env("HANDLES", setup.handles.to_string());
    }
    if let Some(schedule) = &setup.schedule {
        command.env("LAUNCH_SCHEDULE", schedule);
    }
    command.args([
        tools.join("libcuda.so.1").display().to_string(),
        options.spin_ns.to_string(),
        setup.seconds.unwrap_or(options.seconds).to_string(),
        go.display().to_string(),
    ]);
    let child = pod.spawn(command)?;
    let pid = child.id();
    let mut output = BufReader::new(child.stdout.take().context("loop output")?);
    let mut line = String::new();
    output.read_line(&mut line)?;
    if let Some((agent, _)) = &agent {
        // Launches start once the probes have the library.
        for _ in 0..100 {
            if health(agent).await?["launch_libraries"].as_u64() >= Some(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    std::fs::write(&go, b"go")?;
    let mut duty = None;
    loop {
        line.clear();
        if output.read_line(&mut line)? == 0 {
            bail!("the loop ended early");
        }
        if line.starts_with("done") {
            break;
        }
        if let Some((agent, _)) = &agent {
            let seen = health(agent).await?["launch_duty"].as_f64();
            duty = Some(duty.unwrap_or(1.0f64).min(seen.unwrap_or(1.0)));
        }
    }
    let mut fields = line.split_whitespace().skip(1);
    let launches: u64 = fields.next().context("count")?.parse()?;
    let rate: f64 = fields.next().context("rate")?.parse()?;
    let (mut counted, mut hit_cost_ns, mut launch_program) = (None, None, (0.0, 0.0));
    if let Some((agent, _)) = &agent {
        // Sampled reads come every 4 s: settled means unchanged for longer.
        let (mut settled, mut unchanged_since) = (0, std::time::Instant::now());
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let body = integration::http::get(agent.http, "/launches").await?.body;
            let view: serde_json::Value = serde_json::from_slice(&body)?;
            let now: u64 = view["rows"]
                .as_array()
                .map(|rows| rows.iter().filter(|r| r["pid"] == pid).filter_map(|r| r["launches"].as_u64()).sum())
                .unwrap_or(0);
            if now != settled {
                (settled, unchanged_since) = (now, std::time::Instant::now());
            } else if settled > 0 && unchanged_since.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        counted = Some(settled);
        hit_cost_ns = health(agent).await?["launch_hit_cost_ns"].as_u64();
        let metrics = integration::http::get(agent.http, "/metrics").await?.body;
        launch_program = crate::bench_probes::program_costs_of(&String::from_utf8_lossy(&metrics))
            .into_iter()
            .find(|(name, _, _)| name == "cu_launch_kernel")
            .map_or((0.0, 0.0), |(_, ns, runs)| (ns, runs));
    }
    Ok(Run { rate, launches, counted, duty, hit_cost_ns, launch_program })
}

async fn health(agent: &AgentProcess) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&integration::http::get(agent.http, "/healthz").await?.body)?)
}
