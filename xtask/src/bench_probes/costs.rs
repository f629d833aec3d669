//! eBPF cost per request, from probed runs with `kernel.bpf_stats_enabled`:
//! the agent's programs (this build's, a baseline binary's, and the agent
//! watching no pod) and the packet-layer candidate's, as tables appended
//! to the report.
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use integration::workspace_binary;
use podgpu_agent::probes::baseline::{HookBaseline, PacketProtocol};

use super::{load, scrape, set_bpf_stats, start_agent_binary, tempfile_path, BenchTenant, Options, ProgramCosts};

/// What one probed run with bpf_stats accounting measured.
struct CostRun {
    /// (program, ns, runs) over the run.
    programs: ProgramCosts,
    requests: u64,
    events: f64,
}

impl CostRun {
    fn totals(&self) -> (f64, f64) {
        self.programs.iter().fold((0.0, 0.0), |(ns, runs), (_, n, r)| (ns + n, runs + r))
    }

    /// eBPF ns per request answered.
    fn per_request_ns(&self) -> f64 {
        self.totals().0 / self.requests.max(1) as f64
    }
}

/// One load run against `binary` with `kernel.bpf_stats_enabled` (which
/// is not free, so never in the timed runs).
fn cost_run(
    binary: &std::path::PathBuf,
    extra_args: &[String],
    tenant: &BenchTenant,
    metadata: &Path,
    options: &Options,
) -> anyhow::Result<CostRun> {
    let previous_stats = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    let mut agent = start_agent_binary(binary, metadata, extra_args)?;
    set_bpf_stats(true)?;
    let before = scrape(agent.http)?;
    let costed = load(tenant, options)?;
    std::thread::sleep(Duration::from_millis(500));
    let after = scrape(agent.http)?;
    set_bpf_stats(false)?;
    agent.stop(Duration::from_secs(5));
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", previous_stats.trim());
    let mut programs = ProgramCosts::new();
    for (name, ns, runs) in after.programs {
        let (ns0, runs0) = before.programs.iter().find(|(n, _, _)| *n == name).map_or((0.0, 0.0), |(_, a, b)| (*a, *b));
        programs.push((name, ns - ns0, runs - runs0));
    }
    Ok(CostRun { programs, requests: costed.requests, events: after.events - before.events })
}

/// One load run of the packet-layer candidate.
struct CandidateRun {
    /// eBPF ns, all programs.
    ns: f64,
    program_runs: f64,
    /// Requests the load generator had answered.
    requests: u64,
    /// What the candidate counted, summed over the pods: (started,
    /// answered, aborted, ended untimed).
    counted: (u64, u64, u64, u64),
    /// What the HTTP/2 candidate could not follow.
    losses: Option<[u64; 3]>,
    /// Each program that ran: (name, runs, ns).
    programs: Vec<(String, u64, u64)>,
}

/// One load run with the packet-layer candidate attached and
/// `kernel.bpf_stats_enabled`.
fn packet_candidate_cost(tenant: &BenchTenant, options: &Options) -> anyhow::Result<CandidateRun> {
    let previous_stats = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    let protocol = tenant.packet_protocol();
    let candidate = HookBaseline::attach_packet_candidate(&tenant.pod.pod_dir, protocol)
        .context("attaching the packet-layer candidate")?;
    set_bpf_stats(true)?;
    let run = load(tenant, options);
    set_bpf_stats(false)?;
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", previous_stats.trim());
    let run = run?;
    let stats = candidate.program_stats();
    let (ns, runs) =
        stats.iter().fold((0.0, 0.0), |(ns, runs), p| (ns + p.run_time_ns as f64, runs + p.run_count as f64));
    let programs =
        stats.iter().filter(|p| p.run_count > 0).map(|p| (p.name.clone(), p.run_count, p.run_time_ns)).collect();
    let losses = (protocol == PacketProtocol::Http2).then(|| candidate.packet_h2_losses()).transpose()?;
    // The load generator's connections close as it exits: let their
    // closes reach the programs before the counts are read.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let counted = candidate.packet_pods()?.values().fold((0, 0, 0, 0), |(s, a, x, u), pod| {
        (s + pod.started, a + pod.answered(), x + pod.aborted, u + pod.ends_unknown)
    });
    Ok(CandidateRun { ns, program_runs: runs, requests: run.requests, counted, losses, programs })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Per-program eBPF cost, in probed runs of their own, appended to `out`
/// as a table (the median run by ns per request); with a baseline agent,
/// its runs alternate with this build's and both medians are printed.
pub(super) fn program_costs(
    out: &mut String,
    tenant: &BenchTenant,
    metadata: &Path,
    options: &Options,
    label: &str,
) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let this_build = workspace_binary("podgpu-agent");
    let (mut runs, mut baseline_runs) = (Vec::new(), Vec::new());
    for _ in 0..options.cost_runs.max(1) {
        if let Some(baseline) = &options.baseline_agent {
            baseline_runs.push(cost_run(baseline, &[], tenant, metadata, options)?);
        }
        runs.push(cost_run(&this_build, &[], tenant, metadata, options)?);
    }
    // The same load with the agent watching no pod (an empty cgroup root):
    // every socket call, the server's too, is one the filter turns away,
    // which is what the socket I/O of every other process on a node pays.
    let empty_root = tempfile_path("podgpu-bench-empty-cgroup-root");
    std::fs::create_dir_all(&empty_root)?;
    let unwatched_args = ["--cgroup-root".to_string(), empty_root.display().to_string()];
    let unwatched = cost_run(&this_build, &unwatched_args, tenant, metadata, options);
    let _ = std::fs::remove_dir(&empty_root);
    let unwatched = unwatched?;
    runs.sort_by(|a, b| a.per_request_ns().total_cmp(&b.per_request_ns()));
    let Some(run) = runs.get(runs.len() / 2) else { return Ok(()) };
    writeln!(
        out,
        "\n{:<22} {:>14} {:>12}   (kernel.bpf_stats_enabled, median of {} probed runs, {label})",
        "eBPF program",
        "runs",
        "mean ns/run",
        runs.len()
    )?;
    let mut costs = run.programs.clone();
    costs.sort_by(|a, b| b.2.total_cmp(&a.2));
    for (name, ns, runs) in costs.iter().filter(|(_, _, runs)| *runs > 0.0) {
        writeln!(out, "{name:<22} {runs:>14.0} {:>12.0}", ns / runs)?;
    }
    let (ns, program_runs) = run.totals();
    writeln!(
        out,
        "{:<22} {program_runs:>14.0} {:>12.0}   (per request: target <= 500 ns)",
        "all programs",
        ns / program_runs.max(1.0)
    )?;
    let requests = run.requests.max(1) as f64;
    writeln!(
        out,
        "eBPF time per request: {:.2} us over {:.1} program runs; per event emitted: {:.0} ns ({} requests, {:.0} events)",
        ns / requests / 1000.0,
        program_runs / requests,
        ns / run.events.max(1.0),
        run.requests,
        run.events
    )?;
    let (unwatched_ns, unwatched_runs) = unwatched.totals();
    let turned_away = unwatched_ns / unwatched_runs.max(1.0);
    let client_runs = (program_runs / requests / 2.0).max(0.0);
    writeln!(
        out,
        "a socket call the filter turns away (agent watching no pod): {turned_away:.0} ns per program run; \
         so the watched server's own runs: {:.0} ns per request (total less the load generator's {client_runs:.1} runs)",
        (ns / requests - client_runs * turned_away).max(0.0)
    )?;
    let CandidateRun { ns, program_runs, requests, counted: (started, answered, aborted, untimed), losses, programs } =
        packet_candidate_cost(tenant, options)?;
    writeln!(
        out,
        "packet-layer candidate (cgroup_skb on the pod's cgroup): {:.0} ns of eBPF per request over {:.1} \
         program runs, {:.0} ns per run ({requests} requests; the load generator's packets never run it)",
        ns / requests.max(1) as f64,
        program_runs / requests.max(1) as f64,
        ns / program_runs.max(1.0)
    )?;
    for (name, runs, program_ns) in programs {
        writeln!(out, "  {name:<22} {runs:>9} runs {:>6.0} ns/run", program_ns as f64 / runs.max(1) as f64)?;
    }
    writeln!(
        out,
        "  its per-pod counts: {started} started, {answered} answered to their end, {aborted} aborted by a \
         close, {untimed} ended untimed"
    )?;
    if let Some([lost, reset, beyond]) = losses {
        writeln!(
            out,
            "  HTTP/2 candidate: frame boundary lost on {lost} connections, {reset} open requests reset or \
             pushed out of their slot, {beyond} packets with more frames than one run reads"
        )?;
    }
    if let Some(baseline) = &options.baseline_agent {
        let per_request = |runs: &[CostRun]| runs.iter().map(CostRun::per_request_ns).collect::<Vec<_>>();
        let (this, before) = (per_request(&runs), per_request(&baseline_runs));
        let list = |values: &[f64]| values.iter().map(|v| format!("{:.0}", v)).collect::<Vec<_>>().join(", ");
        writeln!(
            out,
            "eBPF ns per request, runs alternating: this build {} (median {:.0}); {} {} (median {:.0}); ratio {:.3}",
            list(&this),
            median(this.clone()),
            baseline.display(),
            list(&before),
            median(before.clone()),
            median(this.clone()) / median(before.clone())
        )?;
    }
    Ok(())
}
