//! `podgpu-agent record`: writes a replayable trace from a live node by
//! reading the local agent's HTTP API (`/attribution` for device
//! utilization and NVML's per-process samples, `/launches` for launch
//! counts), so it loads no probe and opens no NVML of its own: run it
//! beside the agent (in its pod, `kubectl exec`). Tenants that report
//! their true load (`duty_worker.py`'s output files) become the trace's
//! truth.
use crate::probes::launches::parse_hex;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::trace::{self, LaunchLine, Tenant, Trace};
use crate::agent_http;
use crate::gpu::Sharing;

/// What to record.
#[derive(Clone, Debug)]
pub struct RecordConfig {
    /// The agent's HTTP address.
    pub agent: SocketAddr,
    /// How long to record.
    pub duration: Duration,
    /// Trace file to write (the launch file goes beside it).
    pub out: PathBuf,
    /// Scenario name written into the trace.
    pub scenario: String,
    /// GPU UUID to record (default: the first the agent reports).
    pub gpu: Option<String>,
    /// Truth files (`{"pid", "periods": [[end, work, period], ...]}`).
    pub truth: Vec<PathBuf>,
    /// How long to wait after recording for truth files to appear.
    pub truth_wait: Duration,
}

/// Why recording failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The agent could not be asked.
    #[error("asking the agent at {agent} for {path}: {reason}")]
    Agent {
        /// Address.
        agent: SocketAddr,
        /// Endpoint.
        path: &'static str,
        /// Cause.
        reason: String,
    },
    /// The agent answered but cannot give what a trace needs.
    #[error("{0}")]
    Unusable(String),
    /// A truth file is missing or malformed.
    #[error("truth file {path}: {reason}")]
    Truth {
        /// File.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// The trace could not be written.
    #[error(transparent)]
    Write(#[from] trace::TraceError),
}

/// How often the agent is asked.
const POLL: Duration = Duration::from_millis(250);
/// How long to wait for the agent's first GPU poll.
const DEVICE_WAIT: Duration = Duration::from_secs(15);

/// Records for `config.duration`; returns the trace written.
pub fn record(config: &RecordConfig) -> Result<Trace, RecordError> {
    // A freshly started agent has not polled yet: wait for its GPUs.
    let wait_until = Instant::now() + DEVICE_WAIT;
    let device = loop {
        let pods = get_json(config.agent, "/pods")?;
        let devices = pods["devices"].as_array().cloned().unwrap_or_default();
        let found = match &config.gpu {
            Some(uuid) => devices.iter().find(|d| d["uuid"].as_str() == Some(uuid.as_str())),
            None => devices.first(),
        };
        match found {
            Some(device) => break device.clone(),
            None if Instant::now() < wait_until => std::thread::sleep(POLL),
            None => {
                return Err(RecordError::Unusable(format!(
                    "the agent reports no GPU{} after {} s",
                    gpu_suffix(&config.gpu),
                    DEVICE_WAIT.as_secs()
                )))
            }
        }
    };
    let uuid = device["uuid"].as_str().unwrap_or_default().to_string();
    let sharing: Option<Sharing> = serde_json::from_value(device["sharing"].clone()).ok();
    let mut device_util = Vec::new();
    let mut nvml = Vec::new();
    let mut launches: Vec<LaunchLine> = Vec::new();
    let (mut last_poll, mut last_read) = (0.0, 0.0);
    let deadline = Instant::now() + config.duration;
    while Instant::now() < deadline {
        let started = Instant::now();
        let attribution = get_json(config.agent, "/attribution")?;
        let gpu = attribution["gpus"].as_array().and_then(|gpus| gpus.iter().find(|g| g["uuid"] == uuid.as_str()));
        if let Some(gpu) = gpu {
            let at = gpu["polled_at_unix"].as_f64().unwrap_or(0.0);
            if at > last_poll {
                last_poll = at;
                if let Some(util) = gpu["device_util"].as_f64() {
                    device_util.push((at, util));
                }
                for sample in gpu["nvml"].as_array().into_iter().flatten() {
                    if let (Some(pid), Some(sm)) = (sample[0].as_u64(), sample[1].as_f64()) {
                        nvml.push((pid as u32, (at * 1e6) as u64, sm));
                    }
                }
            }
        }
        let counts = get_json(config.agent, "/launches")?;
        if counts["status"]["state"] == "disabled" {
            return Err(RecordError::Unusable(
                "the agent runs without launch accounting: start it with --launch-accounting on".into(),
            ));
        }
        if let Some(read) = counts["read_at_unix"].as_f64().filter(|&read| read > last_read) {
            last_read = read;
            launches.push(LaunchLine {
                t: read,
                rows: launch_rows(&counts["rows"]),
                kernels: kernel_identities(&counts["rows"]),
                spans: span_rows(&counts["spans"]),
                spans_lost: counts["spans_lost"].as_u64().unwrap_or(0),
            });
        }
        std::thread::sleep(POLL.saturating_sub(started.elapsed()));
    }
    let tenants = config.truth.iter().map(|path| read_truth(path, config.truth_wait)).collect::<Result<_, _>>()?;
    let recorded = Trace {
        scenario: config.scenario.clone(),
        gpu: device["name"].as_str().unwrap_or_default().to_string(),
        driver: String::new(),
        sharing,
        tenants,
        device_util,
        nvml_process_samples: nvml,
    };
    trace::write(&config.out, &recorded, &launches)?;
    Ok(recorded)
}

/// GET `path` from the agent, as JSON.
fn get_json(agent: SocketAddr, path: &'static str) -> Result<serde_json::Value, RecordError> {
    agent_http::get_json(agent, path).map_err(|reason| RecordError::Agent { agent, path, reason })
}

fn gpu_suffix(gpu: &Option<String>) -> String {
    gpu.as_ref().map(|uuid| format!(" {uuid}")).unwrap_or_default()
}

/// The agent's rows (one per process, function and launch shape) as
/// trace rows (one per process, entry point and function: shapes summed).
/// `[pid, function, identity]` of the rows whose kernel is known.
fn kernel_identities(rows: &serde_json::Value) -> Vec<(u32, u64, u64)> {
    let mut known: Vec<(u32, u64, u64)> = rows
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|row| {
            let pid = u32::try_from(row["pid"].as_u64()?).ok()?;
            Some((pid, parse_hex(row["function"].as_str()?)?, parse_hex(row["kernel"].as_str()?)?))
        })
        .collect();
    known.sort_unstable();
    known.dedup();
    known
}

fn launch_rows(rows: &serde_json::Value) -> Vec<(u32, u32, u64, u64, u64)> {
    let mut merged: BTreeMap<(u32, u32, u64), (u64, u64)> = BTreeMap::new();
    for row in rows.as_array().into_iter().flatten() {
        let (Some(pid), Some(n), Some(threads)) =
            (row["pid"].as_u64(), row["launches"].as_u64(), row["threads"].as_u64())
        else {
            continue;
        };
        let kind = match row["entry"].as_str() {
            Some("kernel") => podgpu_common::launch_kind::KERNEL,
            Some("kernel_ex") => podgpu_common::launch_kind::KERNEL_EX,
            Some("cooperative") => podgpu_common::launch_kind::COOPERATIVE,
            Some("graph") => podgpu_common::launch_kind::GRAPH,
            _ => continue,
        };
        let function = row["function"].as_str().and_then(parse_hex).unwrap_or(0);
        let entry = merged.entry((pid as u32, kind, function)).or_default();
        entry.0 += n;
        entry.1 += threads;
    }
    merged.into_iter().map(|((pid, kind, function), (n, threads))| (pid, kind, function, n, threads)).collect()
}

/// `/launches`' span rows as the trace keeps them.
fn span_rows(rows: &serde_json::Value) -> Vec<(u32, f64, f64, u64)> {
    rows.as_array()
        .into_iter()
        .flatten()
        .filter_map(|row| {
            Some((
                row["pid"].as_u64()? as u32,
                row["busy_s"].as_f64()?,
                row["fair_s"].as_f64()?,
                row["closed"].as_u64()?,
            ))
        })
        .collect()
}

/// A tenant's truth file, waited for (tenants write it when they exit).
fn read_truth(path: &std::path::Path, wait: Duration) -> Result<Tenant, RecordError> {
    let deadline = Instant::now() + wait;
    let text = loop {
        match std::fs::read_to_string(path) {
            Ok(text) => break text,
            Err(_) if Instant::now() < deadline => std::thread::sleep(POLL),
            Err(err) => return Err(RecordError::Truth { path: path.to_path_buf(), reason: err.to_string() }),
        }
    };
    let truth = |reason: String| RecordError::Truth { path: path.to_path_buf(), reason };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| truth(e.to_string()))?;
    let pid = value["pid"].as_u64().ok_or_else(|| truth("no pid".into()))? as u32;
    let periods: Vec<Vec<f64>> =
        serde_json::from_value(value["periods"].clone()).map_err(|e| truth(format!("periods: {e}")))?;
    if periods.iter().any(|p| p.len() < 3) {
        return Err(truth("a period needs [end, work, period]".into()));
    }
    let segments = value.get("duty_target").map(|duty| vec![serde_json::json!({ "duty": duty, "n": value["n"] })]);
    Ok(Tenant { pid, segments: segments.unwrap_or_default(), periods })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's per-shape rows merge into the trace's per-function rows.
    #[test]
    fn rows_merge_launch_shapes() {
        let rows = serde_json::json!([
            {"pid": 5, "entry": "kernel_ex", "function": "0x1f", "grid": [1,1,1], "block": [32,1,1], "launches": 10, "threads": 320},
            {"pid": 5, "entry": "kernel_ex", "function": "0x1f", "grid": [2,1,1], "block": [32,1,1], "launches": 5, "threads": 320},
            {"pid": 6, "entry": "graph", "function": "0xa", "grid": [0,0,0], "block": [0,0,0], "launches": 3, "threads": 0},
        ]);
        assert_eq!(
            launch_rows(&rows),
            vec![
                (5, podgpu_common::launch_kind::KERNEL_EX, 0x1f, 15, 640),
                (6, podgpu_common::launch_kind::GRAPH, 0xa, 3, 0)
            ]
        );
    }
}
