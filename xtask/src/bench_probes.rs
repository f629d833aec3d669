//! `cargo xtask bench-probes`: what the eBPF probes cost a busy server.
//!
//! A tenant HTTP server runs in a cgroup pod; wrk drives it with keep-alive
//! connections. Each round runs wrk three times, back to back: without
//! anything attached, with only no-op programs on the request probe's hooks
//! (the floor: what its four socket-layer raw tracepoints cost with nothing
//! in them), and with the agent watching the pod. Every profile adds a
//! fourth run with the packet-layer candidate for its protocol instead of
//! the agent (`cgroup_skb` programs on the pod's cgroup that delimit
//! requests in the kernel and send nothing per request;
//! `HookBaseline::attach_packet_candidate`): the design issue 25's
//! per-request goal points to, priced on the same load.
//! Three server profiles run in one go: an empty answer (the worst case: the
//! probe's cost against almost nothing), one with `--work-us` of CPU per
//! request (a stand-in for a real inference front end's per-request work),
//! and HTTP/2: Node.js's `http2` (nghttp2) server driven by h2load with
//! many streams per connection, so every write goes through the kernel's
//! frame walker.
//! Printed: throughput and p99 ratios (median of adjacent runs), how many
//! requests the probe counted against what wrk reported, the agent's CPU,
//! and, from one extra probed run with `kernel.bpf_stats_enabled=1` (which
//! itself slows every program, so it is kept out of the timed runs), each
//! eBPF program's mean ns per run and the eBPF time per request.
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use integration::agent::AgentProcess;
use integration::pod::{new_uid, CgroupPod};
use integration::stacks::Stack;
use integration::workspace_binary;
use podgpu_agent::probes::baseline::{HookBaseline, PacketProtocol};

mod costs;
use costs::program_costs;

/// Benchmark options.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Rounds of (without, with) runs.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Busy CPU microseconds per request in the second server profile.
    #[arg(long, default_value_t = 100)]
    work_us: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Profiles to run: `empty`, `work`, `http2` (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "empty,work,http2")]
    profiles: Vec<String>,
    /// Another agent binary (say, main's) whose eBPF cost per request is
    /// measured in the same run, its probed runs alternating with this
    /// build's: a before/after that the VM's drift does not blur.
    #[arg(long)]
    baseline_agent: Option<std::path::PathBuf>,
    /// Probed runs with `kernel.bpf_stats_enabled` per binary (medians).
    #[arg(long, default_value_t = 1)]
    cost_runs: u32,
}

/// Which load generator drives a tenant.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LoadTool {
    /// wrk, HTTP/1.1 keep-alive.
    Wrk,
    /// h2load, HTTP/2: `connections / 2` connections of 16 streams each.
    H2load,
}

struct WrkRun {
    requests_per_s: f64,
    /// p99 for wrk; h2load prints no percentiles, so its mean.
    p99_ms: f64,
    requests: u64,
    /// Requests sent: `requests` plus those in flight when the load
    /// generator stopped, which the server may still answer (and the
    /// probe count) while the generator no longer reads them.
    sent: u64,
}

fn load(tenant: &BenchTenant, options: &Options) -> anyhow::Result<WrkRun> {
    match tenant.tool {
        LoadTool::Wrk => wrk(tenant.addr, options),
        LoadTool::H2load => h2load(tenant.addr, options),
    }
}

fn h2load(addr: SocketAddr, options: &Options) -> anyhow::Result<WrkRun> {
    let output = Command::new("h2load")
        .args([&format!("-c{}", (options.connections / 2).max(1)), "-m16", &format!("-D{}", options.seconds)])
        .arg(format!("http://{addr}/stream/0/1/0"))
        .output()
        .context("running h2load (apt-get install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = |prefix: &str| text.lines().find(|l| l.trim_start().starts_with(prefix)).unwrap_or("");
    // "finished in 5.00s, 12345.67 req/s, 1.23MB/s"
    let requests_per_s: f64 = line("finished in")
        .split(", ")
        .find_map(|part| part.strip_suffix(" req/s"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no req/s in h2load output:\n{text}"))?;
    // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, ..."
    let requests = line("requests:")
        .split(", ")
        .find_map(|part| part.strip_suffix(" succeeded"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| anyhow!("no succeeded count in h2load output:\n{text}"))?;
    let started = line("requests:")
        .split(", ")
        .find_map(|part| part.strip_suffix(" started"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(requests);
    // "time for request:   1.2ms   30.1ms   4.5ms   2.1ms  70.00%": min max mean sd.
    let mean = line("time for request:").split_whitespace().nth(5).unwrap_or("0ms");
    Ok(WrkRun { requests_per_s, p99_ms: parse_wrk_duration(mean)?, requests, sent: started.max(requests) })
}

fn wrk(addr: SocketAddr, options: &Options) -> anyhow::Result<WrkRun> {
    let output = Command::new("wrk")
        .args(["-t2", &format!("-c{}", options.connections), &format!("-d{}s", options.seconds), "--latency"])
        .arg(format!("http://{addr}/"))
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let number_after =
        |label: &str| -> Option<&str> { text.lines().find_map(|l| l.trim().strip_prefix(label)).map(str::trim) };
    let requests_per_s: f64 =
        number_after("Requests/sec:").ok_or_else(|| anyhow!("no Requests/sec in wrk output:\n{text}"))?.parse()?;
    let p99 = number_after("99%").ok_or_else(|| anyhow!("no 99% line in wrk output:\n{text}"))?;
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no request total in wrk output"))?;
    // wrk keeps at most one request in flight per connection.
    let sent = requests + u64::from(options.connections);
    Ok(WrkRun { requests_per_s, p99_ms: parse_wrk_duration(p99)?, requests, sent })
}

/// wrk prints durations as `850.00us`, `1.23ms` or `2.00s`.
fn parse_wrk_duration(text: &str) -> anyhow::Result<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic()).ok_or_else(|| anyhow!("duration without unit: {text}"))?;
    let value: f64 = text[..split].parse()?;
    Ok(match &text[split..] {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        "m" => value * 60_000.0,
        unit => bail!("unknown wrk unit {unit}"),
    })
}

/// (program, kernel ns, runs) of each eBPF program.
pub(crate) type ProgramCosts = Vec<(String, f64, f64)>;

/// What the benchmark reads from the agent's /metrics.
struct Scrape {
    programs: ProgramCosts,
    /// Completed requests of all pods.
    completed: f64,
    /// Events the request probe wrote to its ring.
    events: f64,
}

/// Each eBPF program's (name, ns run, runs) from the agent's /metrics
/// text (counted while `kernel.bpf_stats_enabled` was on).
pub(crate) fn program_costs_of(metrics: &str) -> ProgramCosts {
    let value_of = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let mut programs = ProgramCosts::new();
    for line in metrics.lines() {
        let program =
            |prefix: &str| line.strip_prefix(prefix).and_then(|rest| rest.split('"').next()).map(str::to_string);
        if let Some(name) = program("podgpu_agent_bpf_run_seconds_total{program=\"") {
            programs.push((name, value_of(line) * 1e9, 0.0));
        } else if let Some(name) = program("podgpu_agent_bpf_runs_total{program=\"") {
            if let Some(entry) = programs.iter_mut().find(|(n, _, _)| *n == name) {
                entry.2 = value_of(line);
            }
        }
    }
    programs
}

fn scrape(http: SocketAddr) -> anyhow::Result<Scrape> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply = runtime.block_on(integration::http::get(http, "/metrics"))?;
    let text = String::from_utf8_lossy(&reply.body).to_string();
    let value_of = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let programs = program_costs_of(&text);
    let completed = text
        .lines()
        .filter(|l| l.starts_with("podgpu_pod_requests_total{") && l.contains("outcome=\"completed\""))
        .map(value_of)
        .sum();
    let events = text
        .lines()
        .find(|l| l.starts_with("podgpu_agent_request_events_total "))
        .map(value_of)
        .ok_or_else(|| anyhow!("podgpu_agent_request_events_total missing from /metrics"))?;
    Ok(Scrape { programs, completed, events })
}

fn start_agent(metadata: &Path) -> anyhow::Result<AgentProcess> {
    start_agent_binary(&workspace_binary("podgpu-agent"), metadata, &[])
}

fn start_agent_binary(binary: &std::path::PathBuf, metadata: &Path, extra: &[String]) -> anyhow::Result<AgentProcess> {
    let mut args = ["--gpu", "none", "--pod-metadata", &metadata.display().to_string()].map(String::from).to_vec();
    args.extend_from_slice(extra);
    let agent = AgentProcess::start(binary, &args)?;
    // Let the first tick publish before scraping.
    std::thread::sleep(Duration::from_millis(500));
    Ok(agent)
}

/// User + system CPU seconds of a process, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, in clock ticks.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).ok_or_else(|| anyhow!("bad stat line"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / per_second)
}

pub(crate) fn set_bpf_stats(enabled: bool) -> anyhow::Result<()> {
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", if enabled { "1" } else { "0" })
        .context("kernel.bpf_stats_enabled")
}

/// A tenant server in its own cgroup pod.
struct BenchTenant {
    addr: SocketAddr,
    tool: LoadTool,
    /// Owns the server process; dropping it ends the server.
    pod: CgroupPod,
}

/// The HTTP/1.1 tenant with `work_us` of CPU per request, or (`None`)
/// Node.js's HTTP/2 server.
fn start_tenant(cgroup_root: &Path, uid: &str, work_us: Option<u64>) -> anyhow::Result<BenchTenant> {
    let mut pod = CgroupPod::create(cgroup_root, uid)?;
    let (command, tool) = match work_us {
        Some(work_us) => {
            let mut command = Command::new(workspace_binary("tenant"));
            command.args(["127.0.0.1:0", "256", "0", "-", &work_us.to_string()]);
            (command, LoadTool::Wrk)
        }
        None => (Stack::NodeHttp2.command(0, false), LoadTool::H2load),
    };
    let child = pod.spawn(command)?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("tenant stdout"))?).read_line(&mut line)?;
    let ready: serde_json::Value = serde_json::from_str(&line)?;
    let addr: SocketAddr = ready["listening"].as_str().ok_or_else(|| anyhow!("tenant said {line}"))?.parse()?;
    Ok(BenchTenant { addr, tool, pod })
}

impl BenchTenant {
    /// The packet-layer candidate for the protocol its load generator
    /// speaks.
    fn packet_protocol(&self) -> PacketProtocol {
        match self.tool {
            LoadTool::Wrk => PacketProtocol::Http1,
            LoadTool::H2load => PacketProtocol::Http2,
        }
    }
}

/// The runs of one server profile.
#[derive(Default)]
struct Profile {
    without: Vec<WrkRun>,
    hooks_only: Vec<WrkRun>,
    probed: Vec<WrkRun>,
    /// Runs with the packet-layer candidate instead, and
    /// the requests it delimited, answered and sent over them.
    packet: Vec<WrkRun>,
    packet_counts: (u64, u64, u64),
    /// Requests the probe counted, the load generator saw answered, and
    /// it sent, over the probed runs.
    counted: f64,
    answered: u64,
    sent: u64,
    /// Agent CPU seconds per second, per probed run.
    agent_cpu: Vec<f64>,
    /// Driven by h2load (mean latency instead of p99).
    h2load: bool,
}

/// Median over rounds of `f(run) / f(the run without anything just before)`.
fn median_ratio(runs: &[WrkRun], without: &[WrkRun], f: fn(&WrkRun) -> f64) -> f64 {
    let mut ratios: Vec<f64> = runs.iter().zip(without).map(|(run, base)| f(run) / f(base)).collect();
    ratios.sort_by(f64::total_cmp);
    ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN)
}

fn run_profile(tenant: &BenchTenant, metadata: &Path, options: &Options, label: &str) -> anyhow::Result<Profile> {
    let mut profile = Profile { h2load: tenant.tool == LoadTool::H2load, ..Profile::default() };
    for round in 1..=options.rounds {
        let base = load(tenant, options)?;
        println!(
            "{label} round {round} nothing attached:  {:>9.0} req/s  p99 {:>6.2} ms",
            base.requests_per_s, base.p99_ms
        );
        profile.without.push(base);

        let hooks = HookBaseline::attach().context("attaching the no-op hook programs")?;
        let floor = load(tenant, options)?;
        drop(hooks);
        println!(
            "{label} round {round} no-op hooks only:  {:>9.0} req/s  p99 {:>6.2} ms",
            floor.requests_per_s, floor.p99_ms
        );
        profile.hooks_only.push(floor);

        let mut agent = start_agent(metadata)?;
        let completed_before = scrape(agent.http)?.completed;
        let cpu_before = cpu_seconds(agent.pid())?;
        let probed = load(tenant, options)?;
        profile.agent_cpu.push((cpu_seconds(agent.pid())? - cpu_before) / f64::from(options.seconds));
        std::thread::sleep(Duration::from_millis(500));
        let completed_after = scrape(agent.http)?.completed;
        agent.stop(Duration::from_secs(5));
        println!(
            "{label} round {round} agent (probes):    {:>9.0} req/s  p99 {:>6.2} ms",
            probed.requests_per_s, probed.p99_ms
        );
        profile.counted += completed_after - completed_before;
        profile.answered += probed.requests;
        profile.sent += probed.sent;
        profile.probed.push(probed);

        {
            let candidate = HookBaseline::attach_packet_candidate(&tenant.pod.pod_dir, tenant.packet_protocol())
                .context("attaching the packet-layer candidate")?;
            let before = candidate.packet_requests()?;
            let run = load(tenant, options)?;
            std::thread::sleep(Duration::from_millis(500));
            let counted = candidate.packet_requests()? - before;
            drop(candidate);
            println!(
                "{label} round {round} packet candidate:  {:>9.0} req/s  p99 {:>6.2} ms",
                run.requests_per_s, run.p99_ms
            );
            let (c, a, s) = profile.packet_counts;
            profile.packet_counts = (c + counted, a + run.requests, s + run.sent);
            profile.packet.push(run);
        }
    }
    Ok(profile)
}

fn report(out: &mut String, label: &str, profile: &Profile) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mean = |runs: &[WrkRun]| runs.iter().map(|r| r.requests_per_s).sum::<f64>() / runs.len().max(1) as f64;
    let throughput = |r: &WrkRun| r.requests_per_s;
    let p99 = |r: &WrkRun| r.p99_ms;
    writeln!(out, "\n{label}")?;
    writeln!(
        out,
        "  mean req/s: nothing attached {:.0}, no-op hooks {:.0}, agent {:.0}",
        mean(&profile.without),
        mean(&profile.hooks_only),
        mean(&profile.probed)
    )?;
    writeln!(
        out,
        "  throughput with the agent / without: {:.3} (target >= 0.97); no-op hooks alone: {:.3}",
        median_ratio(&profile.probed, &profile.without, throughput),
        median_ratio(&profile.hooks_only, &profile.without, throughput)
    )?;
    writeln!(
        out,
        "  {} latency with the agent / without: {:.3}; no-op hooks alone: {:.3}",
        if profile.h2load { "mean" } else { "p99" },
        median_ratio(&profile.probed, &profile.without, p99),
        median_ratio(&profile.hooks_only, &profile.without, p99)
    )?;
    if !profile.packet.is_empty() {
        let (counted, answered, sent) = profile.packet_counts;
        writeln!(
            out,
            "  packet-layer candidate (cgroup_skb on the pod, in-kernel delimiting, no events): \
             throughput {:.3} of nothing; counted / answered {counted} / {answered} ({:.4}), sent {sent}",
            median_ratio(&profile.packet, &profile.without, throughput),
            counted as f64 / answered.max(1) as f64
        )?;
    }
    let cpu = profile.agent_cpu.iter().sum::<f64>() / profile.agent_cpu.len().max(1) as f64;
    writeln!(
        out,
        "  agent CPU (user + system): {:.1}% of one core, {:.2} us per request",
        cpu * 100.0,
        cpu / mean(&profile.probed).max(1.0) * 1e6
    )?;
    writeln!(
        out,
        "  requests counted by the probe / answered to the load generator: {:.0} / {} ({:.4}); sent {} \
         (in flight at its stop, answered unread); exact within 0.1 %: {}",
        profile.counted,
        profile.answered,
        profile.counted / profile.answered.max(1) as f64,
        profile.sent,
        if profile.counted >= 0.999 * profile.answered as f64 && profile.counted <= 1.001 * profile.sent as f64 {
            "yes (answered <= counted <= sent)"
        } else {
            "NO"
        }
    )?;
    Ok(())
}

pub fn run(options: Options) -> anyhow::Result<()> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads eBPF programs and creates cgroups: run it as root");
    }
    let wanted = |name: &str| options.profiles.iter().any(|p| p == name);
    let cgroup_root = podgpu_agent::pods::cgroup_tree::host_v2_root()?;
    let (empty_uid, working_uid, http2_uid) = (new_uid(), new_uid(), new_uid());
    let metadata = tempfile_path("podgpu-bench-pods.yaml");
    std::fs::write(
        &metadata,
        format!(
            "pods:\n  - {{uid: {empty_uid}, namespace: bench, name: empty, labels: {{app: tenant}}}}\n  \
             - {{uid: {working_uid}, namespace: bench, name: working, labels: {{app: tenant}}}}\n  \
             - {{uid: {http2_uid}, namespace: bench, name: http2, labels: {{app: tenant}}}}\n"
        ),
    )?;
    println!(
        "wrk -t2 -c{0} -d{1}s (HTTP/1.1) / h2load -c{2} -m16 -D{1} (HTTP/2), {3} rounds of (nothing attached, no-op hooks, agent, \
         and the packet-layer candidate) per server profile",
        options.connections,
        options.seconds,
        (options.connections / 2).max(1),
        options.rounds
    );

    let mut out = String::new();
    let mut cost_tables = String::new();
    if wanted("empty") {
        let empty = start_tenant(&cgroup_root, &empty_uid, Some(0))?;
        let profile = run_profile(&empty, &metadata, &options, "empty")?;
        report(&mut out, "empty answers (worst case)", &profile)?;
        program_costs(&mut cost_tables, &empty, &metadata, &options, "empty answers")?;
    }
    if wanted("work") {
        let working = start_tenant(&cgroup_root, &working_uid, Some(options.work_us))?;
        let label = format!("{} us of CPU per request (an inference front end's share)", options.work_us);
        let profile = run_profile(&working, &metadata, &options, "work")?;
        report(&mut out, &label, &profile)?;
    }
    if wanted("http2") {
        let http2 = start_tenant(&cgroup_root, &http2_uid, None)?;
        let profile = run_profile(&http2, &metadata, &options, "http2")?;
        report(&mut out, "HTTP/2: Node.js http2 (nghttp2), 16 streams per connection", &profile)?;
        program_costs(&mut cost_tables, &http2, &metadata, &options, "HTTP/2")?;
    }
    let _ = std::fs::remove_file(&metadata);
    print!("{out}{cost_tables}");
    Ok(())
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    Path::new(&std::env::temp_dir()).join(format!("{}-{name}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk's duration units convert to milliseconds.
    #[test]
    fn wrk_durations() {
        assert_eq!(parse_wrk_duration("850.00us").unwrap(), 0.85);
        assert_eq!(parse_wrk_duration("1.50ms").unwrap(), 1.5);
        assert_eq!(parse_wrk_duration("2.00s").unwrap(), 2000.0);
        assert!(parse_wrk_duration("12").is_err());
    }
}
