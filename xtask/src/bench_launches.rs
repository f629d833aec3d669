//! What launch accounting costs a launch-bound tenant, and what sampling
//! costs in accuracy, in one run: a stand-in libcuda (gcc) and a loop that
//! launches with a fixed amount of host work per launch run three times
//! in a cgroup pod: without the agent, with the probes always attached
//! (budget 100%), and with the default budget (sampling). Prints the
//! loop's throughput each time, the ns each probed launch adds, and how
//! far the agent's count or estimate is from the loop's own. Then twice
//! more with a `cuCtxSynchronize` after every launch, without the agent and
//! with the probes always on: what each probed wait (the completion span
//! probes, entry and return) adds beyond the launch.
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
}

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
    let bare = runtime.block_on(one_run(&options, tools.path(), None, false))?;
    println!("unprobed:              {:>9.0} launches/s", bare.rate);
    let always = runtime.block_on(one_run(&options, tools.path(), Some("100"), false))?;
    let sampled = runtime.block_on(one_run(&options, tools.path(), Some("1"), false))?;
    let bare_waits = runtime.block_on(one_run(&options, tools.path(), None, true))?;
    let always_waits = runtime.block_on(one_run(&options, tools.path(), Some("100"), true))?;
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
    Ok(())
}

/// One run of the loop, with an agent at `budget` percent (or none), and
/// with a wait after every launch when `waits`.
async fn one_run(options: &Options, tools: &Path, budget: Option<&str>, waits: bool) -> anyhow::Result<Run> {
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
    if waits {
        command.env("WAIT_EVERY", "1");
    }
    command.args([
        tools.join("libcuda.so.1").display().to_string(),
        options.spin_ns.to_string(),
        options.seconds.to_string(),
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
    let (mut counted, mut hit_cost_ns) = (None, None);
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
    }
    Ok(Run { rate, launches, counted, duty, hit_cost_ns })
}

async fn health(agent: &AgentProcess) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&integration::http::get(agent.http, "/healthz").await?.body)?)
}
