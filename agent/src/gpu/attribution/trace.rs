//! The replayable trace format (`integration/data/gpu/traces/README.md`): a
//! `TRACE.json` with device utilization, NVML process samples and, where
//! tenants report it, their true load; beside it `TRACE-launch.jsonl`
//! with cumulative launch counts per (process, entry point, function)
//! every half second, the kernel identity of the functions whose
//! identity is known, and cumulative completion spans per process.
//! `record` writes it, `replay` reads it.
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
    /// `[tgid, function, kernel identity]` for the rows whose kernel is
    /// known across processes (absent in traces before kernel identities).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<(u32, u64, u64)>,
    /// `[tgid, busy_s, fair_s, spans_closed]`, cumulative, per process
    /// whose completion spans the wait probes saw (absent in traces
    /// before spans): see `ProcessSpan`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spans: Vec<(u32, f64, f64, u64)>,
    /// Span events lost so far (a full ring): a window in which this grew
    /// has no fair span time.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spans_lost: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
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
    let trace_json = std::fs::read_to_string(path).map_err(|e| io(e, path))?;
    let launch_file = launch_path(path);
    let launch_jsonl = std::fs::read_to_string(&launch_file).map_err(|e| io(e, &launch_file))?;
    parse(path, &trace_json, &launch_jsonl)
}

/// Parses a trace (`trace_json`) and its launch file (`launch_jsonl`);
/// `path` names the trace in errors. Refuses what replay cannot use:
/// periods without `[end, work, period]`, non-finite or negative times,
/// utilization outside 0-100 % and launch lines out of time order.
pub fn parse(path: &Path, trace_json: &str, launch_jsonl: &str) -> Result<(Trace, Vec<LaunchLine>), TraceError> {
    let refused = |path: PathBuf, line, reason: String| TraceError::Format { path, line, reason };
    let trace: Trace =
        serde_json::from_str(trace_json).map_err(|e| refused(path.to_path_buf(), e.line(), e.to_string()))?;
    if let Some(tenant) = trace.tenants.iter().find(|t| t.periods.iter().any(|p| p.len() < 3)) {
        let reason = format!("tenant {}: a period needs [end, work, period]", tenant.pid);
        return Err(refused(path.to_path_buf(), 1, reason));
    }
    let times = trace
        .tenants
        .iter()
        .flat_map(|t| t.periods.iter().flat_map(|p| p[..3].iter().copied()))
        .chain(trace.device_util.iter().map(|&(t, _)| t));
    if let Some(bad) = times.into_iter().find(|value| !value.is_finite() || *value < 0.0) {
        return Err(refused(path.to_path_buf(), 1, format!("{bad}: times are finite and not negative")));
    }
    let loads = trace.device_util.iter().map(|&(_, util)| util).chain(trace.nvml_process_samples.iter().map(|s| s.2));
    if let Some(bad) = loads.into_iter().find(|value| !(0.0..=100.0).contains(value)) {
        return Err(refused(path.to_path_buf(), 1, format!("{bad}: utilization is a percentage")));
    }
    let launch_file = launch_path(path);
    let mut lines: Vec<LaunchLine> = Vec::new();
    for (index, line) in launch_jsonl.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: LaunchLine =
            serde_json::from_str(line).map_err(|e| refused(launch_file.clone(), index + 1, e.to_string()))?;
        if !parsed.t.is_finite() || lines.last().is_some_and(|previous| parsed.t < previous.t) {
            return Err(refused(launch_file, index + 1, format!("t = {}: lines are not in time order", parsed.t)));
        }
        lines.push(parsed);
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

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str =
        r#"{"scenario":"t","device_util":[[1.0,50.0]],"tenants":[{"pid":7,"periods":[[2.0,0.5,1.0]]}]}"#;

    /// What replay cannot use is refused with the file and line named;
    /// blank launch lines are skipped.
    #[test]
    fn parse_refuses_what_replay_cannot_use() {
        let path = Path::new("x.json");
        let (trace, lines) =
            parse(path, TRACE, "{\"t\":1.0,\"rows\":[[7,0,1,10,10]]}\n\n{\"t\":1.5,\"rows\":[]}\n").unwrap();
        assert_eq!((trace.tenants.len(), lines.len()), (1, 2));
        let error = |trace: &str, launches: &str| parse(path, trace, launches).unwrap_err().to_string();
        let unordered = error(TRACE, "{\"t\":2.0,\"rows\":[]}\n{\"t\":1.0,\"rows\":[]}");
        assert!(unordered.starts_with("x-launch.jsonl: line 2:") && unordered.contains("time order"), "{unordered}");
        assert!(error(&TRACE.replace("[2.0,0.5,1.0]", "[2.0,0.5]"), "").contains("[end, work, period]"));
        assert!(error(&TRACE.replace("[2.0,0.5,1.0]", "[-2.0,0.5,1.0]"), "").contains("not negative"));
        assert!(error(&TRACE.replace("[1.0,50.0]", "[1.0,150.0]"), "").contains("percentage"));
        assert!(error("{", "").starts_with("x.json: line 1:"));
    }

    /// Kernel identities and spans ride beside the rows; traces from
    /// before them (no `kernels`, no `spans`) still read, and a line
    /// without them is written as before.
    #[test]
    fn identities_and_spans_are_optional() {
        let path = Path::new("x.json");
        let (_, old) = parse(path, TRACE, "{\"t\":1.0,\"rows\":[[7,0,1,10,10]]}\n").unwrap();
        assert!(old[0].kernels.is_empty());
        assert!(old[0].spans.is_empty() && old[0].spans_lost == 0);
        let line = LaunchLine {
            t: 1.0,
            rows: vec![(7, 0, 1, 10, 10)],
            kernels: vec![(7, 1, 0xfeed)],
            spans: vec![(7, 0.25, 0.125, 3)],
            spans_lost: 2,
        };
        let text = serde_json::to_string(&line).unwrap();
        let (_, new) = parse(path, TRACE, &text).unwrap();
        assert_eq!(new, vec![line.clone()]);
        let plain =
            serde_json::to_string(&LaunchLine { kernels: Vec::new(), spans: Vec::new(), spans_lost: 0, ..line })
                .unwrap();
        assert!(!plain.contains("kernels") && !plain.contains("spans"), "{plain}");
    }
}
