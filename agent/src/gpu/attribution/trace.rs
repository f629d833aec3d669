//! The replayable trace format (`../shared/gpu/traces/README.md`): a
//! `TRACE.json` with device utilization, NVML process samples and, where
//! tenants report it, their true load; beside it `TRACE-launch.jsonl`
//! with cumulative launch counts per (process, entry point, function)
//! every half second. `record` writes it, `replay` reads it.
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::gpu::Sharing;

/// Why a trace could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not in the trace format.
    #[error("{path}: line {line}: {reason}")]
    Format {
        /// File.
        path: PathBuf,
        /// 1-based line (1 for the JSON document).
        line: usize,
        /// What was wrong.
        reason: String,
    },
}

/// One tenant with known load.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    /// Host pid.
    pub pid: u32,
    /// What the tenant was asked to do (free-form, for people).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<serde_json::Value>,
    /// `[unix_time_end, true_gpu_work_s, period_s, ...]` per period; the
    /// true busy share over a window is Σ work / Σ period of its periods.
    pub periods: Vec<Vec<f64>>,
}

/// The JSON half of a trace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Name.
    pub scenario: String,
    /// GPU product.
    #[serde(default)]
    pub gpu: String,
    /// Driver version.
    #[serde(default)]
    pub driver: String,
    /// How the GPU was shared (absent in older traces: inferred).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharing: Option<Sharing>,
    /// Tenants with known load (may be empty: a trace of a real workload).
    #[serde(default)]
    pub tenants: Vec<Tenant>,
    /// `[unix_time, percent]`: nvmlDeviceGetUtilizationRates().gpu.
    pub device_util: Vec<(f64, f64)>,
    /// `[pid, timestamp_us, sm_percent]` from nvmlDeviceGetProcessUtilization.
    #[serde(default)]
    pub nvml_process_samples: Vec<(u32, u64, f64)>,
}

/// One line of the launch file: cumulative counts at `t`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LaunchLine {
    /// Unix time of the read.
    pub t: f64,
    /// `[tgid, kind, function, launches_cumulative, threads_cumulative]`.
    pub rows: Vec<(u32, u32, u64, u64, u64)>,
}

impl Trace {
    /// How the GPU was shared: as recorded, else MPS when NVML named none
    /// of the processes that launched kernels (it then sees only a server).
    pub fn sharing(&self, launches: &[LaunchLine]) -> Sharing {
        if let Some(sharing) = self.sharing {
            return sharing;
        }
        let launching: std::collections::HashSet<u32> =
            launches.iter().flat_map(|line| line.rows.iter().map(|row| row.0)).collect();
        let named_launcher = self.nvml_process_samples.iter().any(|(pid, _, _)| launching.contains(pid));
        if !self.nvml_process_samples.is_empty() && !launching.is_empty() && !named_launcher {
            Sharing::Mps
        } else {
            Sharing::TimeSliced
        }
    }
}

/// The launch file beside `trace`: `X.json` -> `X-launch.jsonl`.
pub fn launch_path(trace: &Path) -> PathBuf {
    let stem = trace.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    trace.with_file_name(format!("{stem}-launch.jsonl"))
}

/// Reads a trace and its launch file.
pub fn read(path: &Path) -> Result<(Trace, Vec<LaunchLine>), TraceError> {
    let io = |source, path: &Path| TraceError::Io { path: path.to_path_buf(), source };
    let text = std::fs::read_to_string(path).map_err(|e| io(e, path))?;
    let trace: Trace = serde_json::from_str(&text).map_err(|e| TraceError::Format {
        path: path.to_path_buf(),
        line: e.line(),
        reason: e.to_string(),
    })?;
    if let Some(tenant) = trace.tenants.iter().find(|t| t.periods.iter().any(|p| p.len() < 3)) {
        return Err(TraceError::Format {
            path: path.to_path_buf(),
            line: 1,
            reason: format!("tenant {}: a period needs [end, work, period]", tenant.pid),
        });
    }
    let launch_file = launch_path(path);
    let file = std::fs::File::open(&launch_file).map_err(|e| io(e, &launch_file))?;
    let mut lines = Vec::new();
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| io(e, &launch_file))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: LaunchLine = serde_json::from_str(&line).map_err(|e| TraceError::Format {
            path: launch_file.clone(),
            line: index + 1,
            reason: e.to_string(),
        })?;
        lines.push(parsed);
    }
    if lines.windows(2).any(|pair| pair[1].t < pair[0].t) {
        return Err(TraceError::Format { path: launch_file, line: 1, reason: "lines are not in time order".into() });
    }
    Ok((trace, lines))
}

/// Writes a trace and its launch file.
pub fn write(path: &Path, trace: &Trace, launches: &[LaunchLine]) -> Result<(), TraceError> {
    let io = |source, path: &Path| TraceError::Io { path: path.to_path_buf(), source };
    let json = serde_json::to_string(trace).map_err(|e| io(std::io::Error::other(e), path))?;
    std::fs::write(path, json).map_err(|e| io(e, path))?;
    let launch_file = launch_path(path);
    let mut text = String::new();
    for line in launches {
        text.push_str(&serde_json::to_string(line).map_err(|e| io(std::io::Error::other(e), &launch_file))?);
        text.push('\n');
    }
    std::fs::write(&launch_file, text).map_err(|e| io(e, &launch_file))
}
