//! The scaler measured on its own: node agents stood in for by one child
//! process (`node-standins`), the scaler binary in another, and KEDA's
//! load from this one, so `/proc` of the scaler shows its cost alone.
//! Shared by the load test (`tests/scaler_load.rs`) and the benchmark
//! (`cargo xtask bench-scale`).
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use podgpu_proto::externalscaler::ScaledObjectRef;

use crate::keda::{scaled_object, KedaClient};

/// Node agents in a child process.
pub struct NodeStandIns {
    child: Child,
    stats: tempfile::TempDir,
    /// Their node-API addresses.
    pub addresses: Vec<String>,
}

impl NodeStandIns {
    /// Starts `count` stand-ins of `pods` pods each, labelled over
    /// `deployments` deployments (`app=llm-K`).
    pub fn start(count: usize, pods: usize, deployments: usize) -> anyhow::Result<Self> {
        let binary = crate::workspace_binary("node-standins");
        let stats = tempfile::tempdir()?;
        let mut command = Command::new(&binary);
        crate::detach_from_terminal(&mut command);
        let mut child = command
            .args(["--count", &count.to_string(), "--pods", &pods.to_string()])
            .args(["--deployments", &deployments.to_string()])
            .arg("--stats")
            .arg(stats.path().join("traffic"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("stand-in stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).context("reading the stand-ins' addresses")?;
        let addresses: Vec<String> = line.trim().split(',').filter(|a| !a.is_empty()).map(String::from).collect();
        if addresses.len() != count {
            let _ = child.kill();
            bail!("node stand-ins printed {} addresses, expected {count}", addresses.len());
        }
        Ok(Self { child, stats, addresses })
    }

    /// Protobuf bytes the stand-ins have sent (snapshots) and received
    /// (requests) so far, as of their last count (every 100 ms).
    pub fn traffic(&self) -> anyhow::Result<(u64, u64)> {
        let text = std::fs::read_to_string(self.stats.path().join("traffic")).context("stand-in traffic")?;
        let mut numbers = text.split_whitespace().map(str::parse::<u64>);
        match (numbers.next(), numbers.next()) {
            (Some(Ok(sent)), Some(Ok(received))) => Ok((sent, received)),
            _ => bail!("stand-in traffic file holds {text:?}"),
        }
    }

    /// The stand-ins' process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NodeStandIns {
    fn drop(&mut self) {
        // Closing stdin ends it; kill makes sure.
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's counters at one moment (`/proc/PID`).
#[derive(Clone, Copy, Debug)]
pub struct ProcessSample {
    /// When sampled.
    pub at: Instant,
    /// User + system CPU seconds so far.
    pub cpu_s: f64,
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: usize,
}

impl ProcessSample {
    /// Reads `pid`'s counters.
    pub fn of(pid: u32) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc/PID/stat")?;
        // Fields after the command name (which may hold spaces).
        let fields: Vec<&str> = stat.rsplit_once(')').context("stat format")?.1.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = field(&status, "VmRSS:").unwrap_or(0);
        Ok(Self {
            at: Instant::now(),
            cpu_s: ticks as f64 / per_second,
            rss_kib,
            fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
        })
    }

    /// Cores used between `earlier` and this sample.
    pub fn cores_since(&self, earlier: &Self) -> f64 {
        (self.cpu_s - earlier.cpu_s) / self.seconds_since(earlier)
    }

    /// Seconds between the samples.
    pub fn seconds_since(&self, earlier: &Self) -> f64 {
        self.at.duration_since(earlier.at).as_secs_f64().max(1e-3)
    }
}

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.split_whitespace().next()?.parse().ok())
}

/// The metric the `index`th ScaledObject scales on: one of each kind the
/// scaler computes differently (a GPU sum, a request count, merged
/// percentiles of two histograms).
const METRICS: [&str; 4] = ["gpu_sm_util", "requests_in_flight", "ttft_ms_p99", "latency_ms_p90"];

/// `count` ScaledObjects, the `k`th selecting deployment `llm-k` of the
/// stand-ins.
pub fn scaled_objects(count: usize) -> Vec<ScaledObjectRef> {
    (0..count)
        .map(|k| {
            let selector = format!("app=llm-{k}");
            scaled_object(
                "bench",
                &format!("llm-{k}"),
                &[("metric", METRICS[k % METRICS.len()]), ("target", "10"), ("podSelector", selector.as_str())],
            )
        })
        .collect()
}

/// KEDA-shaped load on a scaler.
#[derive(Clone, Debug)]
pub struct KedaLoad {
    /// Connections, each polling one ScaledObject (round robin).
    pub clients: usize,
    /// Distinct ScaledObjects.
    pub scaled_objects: usize,
    /// Time between one client's polls (GetMetrics then IsActive).
    pub interval: Duration,
    /// StreamIsActive streams held open besides the polls.
    pub streams: usize,
    /// How long to poll.
    pub duration: Duration,
}

/// What the load saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// RPCs answered (GetMetrics and IsActive each count).
    pub answered: u64,
    /// RPCs that failed.
    pub errors: u64,
    /// The first failure, for the message.
    pub first_error: Option<String>,
    /// Each answered RPC's round trip, ms.
    pub latencies_ms: Vec<f64>,
    /// Messages received on StreamIsActive streams.
    pub stream_messages: u64,
    /// Streams that ended or failed before the load did.
    pub streams_broken: u64,
}

impl LoadReport {
    /// The `q` quantile of round trips (NaN when none).
    pub fn latency_ms(&self, q: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return f64::NAN;
        }
        crate::percentile(self.latencies_ms.clone(), q)
    }

    fn failed(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }
}

/// Runs `load` against the scaler at `scaler`.
pub async fn run_load(scaler: SocketAddr, load: &KedaLoad) -> anyhow::Result<LoadReport> {
    let objects = Arc::new(scaled_objects(load.scaled_objects.max(1)));
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let until = Instant::now() + load.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client_index in 0..load.clients {
        let (objects, report, interval, clients) = (objects.clone(), report.clone(), load.interval, load.clients);
        tasks.spawn(async move {
            // Spread the clients over the interval, as independent pollers are.
            let offset = interval.mul_f64(client_index as f64 / clients as f64);
            tokio::time::sleep(offset).await;
            let mut keda = match KedaClient::connect(scaler).await {
                Ok(keda) => keda,
                Err(err) => return report.lock().unwrap().failed(format!("connect: {err}")),
            };
            let object = &objects[client_index % objects.len()];
            let mut ticker = tokio::time::interval(interval);
            while Instant::now() < until {
                ticker.tick().await;
                let started = Instant::now();
                let metrics = keda.get_metrics(object, "m").await.map(|_| started.elapsed());
                let started = Instant::now();
                let active = keda.is_active(object).await.map(|_| started.elapsed());
                let mut report = report.lock().unwrap();
                for result in [metrics, active] {
                    match result {
                        Ok(took) => {
                            report.answered += 1;
                            report.latencies_ms.push(took.as_secs_f64() * 1e3);
                        }
                        Err(status) => report.failed(format!("{}: {}", object.name, status.message())),
                    }
                }
            }
        });
    }
    for stream_index in 0..load.streams {
        let (objects, report) = (objects.clone(), report.clone());
        tasks.spawn(async move {
            let object = objects[stream_index % objects.len()].clone();
            let stream = match KedaClient::connect(scaler).await {
                Ok(mut keda) => keda.stream_is_active(&object).await.map_err(|s| s.message().to_string()),
                Err(err) => Err(err.to_string()),
            };
            let mut stream = match stream {
                Ok(stream) => stream,
                Err(err) => return report.lock().unwrap().failed(format!("StreamIsActive: {err}")),
            };
            loop {
                let left = until.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, stream.message()).await {
                    Err(_) => return,
                    Ok(Ok(Some(_))) => report.lock().unwrap().stream_messages += 1,
                    Ok(_) => {
                        report.lock().unwrap().streams_broken += 1;
                        return;
                    }
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("a load task panicked")?;
    }
    let mut report = report.lock().unwrap();
    Ok(std::mem::take(&mut *report))
}
