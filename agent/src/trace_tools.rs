//! `podgpu-agent replay` and `record`: the attribution estimator's trace
//! tools (a trace through the estimator, scored against its truth, or the
//! generalisation sweep; and a trace recorded from a live agent).
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::parse_seconds;

#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// The agent's HTTP address.
    #[arg(long, default_value = "127.0.0.1:9102")]
    agent: SocketAddr,
    /// Seconds to record.
    #[arg(long, default_value_t = 60.0, value_parser = parse_seconds)]
    seconds: f64,
    /// Trace file to write; its launch file goes beside it (X-launch.jsonl).
    #[arg(long)]
    out: PathBuf,
    /// Scenario name written into the trace.
    #[arg(long, default_value = "recorded")]
    scenario: String,
    /// GPU UUID to record (default: the first the agent reports).
    #[arg(long)]
    gpu: Option<String>,
    /// Files where tenants report their true load (duty_worker.py's
    /// output), comma-separated; waited for after recording.
    #[arg(long, value_delimiter = ',')]
    truth: Vec<PathBuf>,
    /// Seconds to wait for the truth files after recording.
    #[arg(long, default_value_t = 30.0, value_parser = parse_seconds)]
    truth_wait_s: f64,
}

fn parse_setting(text: &str) -> Result<(String, f64), String> {
    let (name, value) = text.split_once('=').ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))?;
    let value: f64 = value.trim().parse().map_err(|_| format!("{name}: expected a number, got {value:?}"))?;
    // Checks the name and value now, so a typo fails before any replay.
    podgpu_agent::gpu::attribution::EstimatorConfig::default().set(name.trim(), value)?;
    Ok((name.trim().to_string(), value))
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// Trace to replay (its launch file is TRACE-launch.jsonl beside it).
    #[arg(
        required_unless_present_any = ["synthetic", "sweep", "generated", "leave_one_out"],
        conflicts_with_all = ["synthetic", "sweep", "generated", "leave_one_out"]
    )]
    trace: Option<PathBuf>,
    /// Print the generalisation scorecard over N seeded random scenarios
    /// (and the traces of --traces) instead of one trace's scores.
    #[arg(long, value_name = "N", conflicts_with_all = ["synthetic", "generated"])]
    sweep: Option<usize>,
    /// Replay one generated scenario of the sweep (`sweep-SEED-INDEX` in
    /// the scorecard), to look at its windows.
    #[arg(long, value_name = "INDEX", conflicts_with = "synthetic")]
    generated: Option<usize>,
    /// Seed of the sweep's scenarios.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A folder of recorded traces the sweep scores too (every *.json with
    /// its launch file).
    #[arg(long, value_name = "DIR")]
    traces: Option<PathBuf>,
    /// Leave-one-out over the traces of --traces: each scored with settings
    /// chosen on the others (one JSON line per trace).
    #[arg(long, requires = "traces", conflicts_with_all = ["sweep", "synthetic", "generated"])]
    leave_one_out: bool,
    /// Print the scorecard as one JSON object.
    #[arg(long, requires = "sweep")]
    json: bool,
    /// Drop the completion spans (of the generated scenarios, which are
    /// otherwise the same, or of the trace): what the estimator does where
    /// the wait probes see nothing.
    #[arg(long)]
    without_spans: bool,
    /// Change an estimator setting for this replay (repeatable), e.g.
    /// `--set fallback_scale=0`: to see what a setting does on a
    /// trace, or to score a trace with settings chosen without it.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_setting)]
    settings: Vec<(String, f64)>,
    /// Replay a built-in synthetic scenario instead (known costs).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(podgpu_agent::gpu::attribution::synthetic::Scenario::BUILTIN))]
    synthetic: Option<String>,
    /// Also print every window's attribution (one JSON line each) before
    /// the tenant lines.
    #[arg(long)]
    windows: bool,
    /// Write the synthetic or generated scenario's trace here (and its
    /// launch file beside it).
    #[arg(long)]
    write: Option<PathBuf>,
}

/// `podgpu-agent replay`: the trace through the live agent's estimator.
pub fn replay(args: &ReplayArgs) -> anyhow::Result<()> {
    use podgpu_agent::gpu::attribution::{generator, holdout, replay, sweep, synthetic, trace, EstimatorConfig};
    let mut config = EstimatorConfig::default();
    for (name, value) in &args.settings {
        config.set(name, *value).map_err(|e| anyhow::anyhow!(e))?;
    }
    let mut recorded = Vec::new();
    if let Some(dir) = &args.traces {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        paths.sort();
        for path in paths {
            let (trace, launches) = trace::read(&path)?;
            let name = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
            recorded.push((name, trace, launches));
        }
    }
    if args.leave_one_out {
        anyhow::ensure!(recorded.len() >= 2, "--leave-one-out needs at least two traces in --traces");
        for held in holdout::leave_one_out(&recorded) {
            println!("{}", serde_json::to_string(&held)?);
        }
        return Ok(());
    }
    if let Some(count) = args.sweep {
        let card = sweep::sweep(args.seed, count, &recorded, config, !args.without_spans);
        if args.json {
            println!("{}", serde_json::to_string(&card)?);
        } else {
            print!("{card}");
        }
        return Ok(());
    }
    if args.write.is_some() && args.trace.is_some() {
        anyhow::bail!("--write needs --synthetic or --generated (a recorded trace is already written)");
    }
    let scenario = match (&args.synthetic, args.generated) {
        (Some(name), _) => Some(synthetic::Scenario::builtin(name).context("unknown synthetic scenario")?),
        (None, Some(index)) => {
            let mut scenario = generator::draw(args.seed, index).scenario;
            if args.without_spans {
                scenario.span_models.clear();
            }
            Some(scenario)
        }
        (None, None) => None,
    };
    let (recorded, mut launches) = match (&args.trace, scenario) {
        (Some(path), _) => trace::read(path)?,
        (None, Some(scenario)) => {
            let generated = scenario.generate();
            if let Some(path) = &args.write {
                trace::write(path, &generated.0, &generated.1)?;
            }
            generated
        }
        (None, None) => anyhow::bail!("a trace, --synthetic or --generated is required"),
    };
    if args.without_spans {
        launches.iter_mut().for_each(|line| line.spans.clear());
    }
    let result = replay::replay(&recorded, &launches, config);
    let mut out = std::io::stdout().lock();
    if args.windows {
        for window in &result.windows {
            writeln!(out, "{}", serde_json::to_string(window)?)?;
        }
    }
    for tenant in &result.tenants {
        writeln!(out, "{}", serde_json::to_string(tenant)?)?;
    }
    if result.tenants.is_empty() {
        tracing::info!(windows = result.windows.len(), "the trace has no tenants with known load: nothing to score");
    }
    Ok(())
}

/// `podgpu-agent record`: a trace from the local agent's HTTP API.
pub fn record(args: &RecordArgs) -> anyhow::Result<()> {
    use podgpu_agent::gpu::attribution::record::{record, RecordConfig};
    let config = RecordConfig {
        agent: args.agent,
        duration: Duration::from_secs_f64(args.seconds),
        out: args.out.clone(),
        scenario: args.scenario.clone(),
        gpu: args.gpu.clone(),
        truth: args.truth.clone(),
        truth_wait: Duration::from_secs_f64(args.truth_wait_s),
    };
    let trace = record(&config)?;
    tracing::info!(
        out = %args.out.display(),
        device_util_samples = trace.device_util.len(),
        nvml_samples = trace.nvml_process_samples.len(),
        tenants = trace.tenants.len(),
        "trace recorded"
    );
    Ok(())
}
