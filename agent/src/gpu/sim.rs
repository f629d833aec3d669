//! Simulated GPUs driven by a scenario file: the stand-in for NVML on
//! machines without a GPU (CI, the demo), behind the same `GpuBackend` trait.
//!
//! A scenario lists devices and processes. A process is either a fixed host
//! pid or a cgroup (relative to the cgroup v2 root), in which case every pid
//! currently in that cgroup subtree is reported, the way NVML would report a
//! pod's CUDA processes. SM % follows a looping piecewise-constant schedule.
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;

use super::{DeviceSample, GpuBackend, GpuError, GpuPoll, ProcessSample};

const EMBEDDED_DEMO: &str = include_str!("demo-scenario.yaml");

/// A parsed scenario file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name shown in logs and /healthz.
    pub name: String,
    /// Simulated devices; processes refer to them by index.
    pub gpus: Vec<SimGpu>,
    /// Simulated GPU processes.
    #[serde(default)]
    pub processes: Vec<SimProcess>,
}

/// One simulated device.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimGpu {
    /// Reported UUID.
    pub uuid: String,
    /// Reported product name.
    pub name: String,
    /// Framebuffer size in bytes.
    pub memory_total_bytes: u64,
}

/// One simulated tenant: a pid or every pid of a cgroup subtree.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimProcess {
    /// Fixed host pid.
    #[serde(default)]
    pub pid: Option<u32>,
    /// cgroup directory relative to the v2 root.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Index into `gpus`.
    pub gpu: usize,
    /// Framebuffer bytes held by each matching pid.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Looping SM % schedule.
    pub sm_util: Vec<UtilStep>,
}

/// A constant SM % held for a number of seconds.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UtilStep {
    /// How long the step lasts.
    pub seconds: f64,
    /// SM utilization during the step.
    pub percent: f64,
}

impl Scenario {
    /// The scenario compiled into the binary, used by the demo.
    pub fn embedded_demo() -> Self {
        Self::parse(EMBEDDED_DEMO, "<embedded demo>").expect("embedded demo scenario is valid")
    }

    /// Reads and validates a scenario file.
    pub fn from_file(path: &Path) -> Result<Self, GpuError> {
        let text = fs::read_to_string(path)
            .map_err(|err| GpuError::Scenario { path: path.display().to_string(), reason: err.to_string() })?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, origin: &str) -> Result<Self, GpuError> {
        let invalid = |reason: String| GpuError::Scenario { path: origin.to_string(), reason };
        let scenario: Scenario = serde_yaml::from_str(text).map_err(|err| invalid(err.to_string()))?;
        for (index, process) in scenario.processes.iter().enumerate() {
            if process.pid.is_some() == process.cgroup.is_some() {
                return Err(invalid(format!("processes[{index}]: set exactly one of pid or cgroup")));
            }
            if process.gpu >= scenario.gpus.len() {
                return Err(invalid(format!("processes[{index}].gpu: no GPU with index {}", process.gpu)));
            }
            if process.sm_util.is_empty() || process.sm_util.iter().any(|step| step.seconds <= 0.0) {
                return Err(invalid(format!("processes[{index}].sm_util: needs steps with seconds > 0")));
            }
            if process.sm_util.iter().any(|step| !(0.0..=100.0).contains(&step.percent)) {
                return Err(invalid(format!("processes[{index}].sm_util: percent must be within 0..=100")));
            }
        }
        Ok(scenario)
    }
}

impl SimProcess {
    fn sm_util_at(&self, elapsed_s: f64) -> f64 {
        let period: f64 = self.sm_util.iter().map(|step| step.seconds).sum();
        let mut offset = elapsed_s % period;
        for step in &self.sm_util {
            if offset < step.seconds {
                return step.percent;
            }
            offset -= step.seconds;
        }
        self.sm_util.last().map_or(0.0, |step| step.percent)
    }
}

/// The simulator backend: a scenario plus the clock it started on.
pub struct SimBackend {
    scenario: Scenario,
    cgroup_root: PathBuf,
    started: Instant,
}

impl SimBackend {
    /// Starts the scenario's clock now; cgroup paths resolve under `cgroup_root`.
    pub fn new(scenario: Scenario, cgroup_root: PathBuf) -> Self {
        Self { scenario, cgroup_root, started: Instant::now() }
    }

    fn pids_of(&self, process: &SimProcess) -> Vec<u32> {
        match (&process.pid, &process.cgroup) {
            (Some(pid), _) => vec![*pid],
            (None, Some(cgroup)) => {
                let mut pids = Vec::new();
                collect_cgroup_pids(&self.cgroup_root.join(cgroup.trim_start_matches('/')), &mut pids);
                pids
            }
            (None, None) => Vec::new(),
        }
    }
}

/// Every pid in `dir` and its descendants; a missing directory has none.
fn collect_cgroup_pids(dir: &Path, pids: &mut Vec<u32>) {
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(procs.lines().filter_map(|line| line.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                collect_cgroup_pids(&entry.path(), pids);
            }
        }
    }
}

impl GpuBackend for SimBackend {
    fn describe(&self) -> String {
        format!("sim:{}", self.scenario.name)
    }

    fn poll(&mut self) -> Result<GpuPoll, GpuError> {
        let elapsed_s = self.started.elapsed().as_secs_f64();
        let mut devices: Vec<DeviceSample> = self
            .scenario
            .gpus
            .iter()
            .map(|gpu| DeviceSample {
                uuid: gpu.uuid.clone(),
                name: gpu.name.clone(),
                util_percent: 0.0,
                memory_used_bytes: 0,
                memory_total_bytes: gpu.memory_total_bytes,
            })
            .collect();
        let mut processes = Vec::new();
        for process in &self.scenario.processes {
            let pids = self.pids_of(process);
            if pids.is_empty() {
                continue;
            }
            // A tenant's load is split evenly over its pids, so a pod's sum
            // is the scripted value however many processes it runs.
            let share = process.sm_util_at(elapsed_s) / pids.len() as f64;
            let device = &mut devices[process.gpu];
            device.util_percent = (device.util_percent + share * pids.len() as f64).min(100.0);
            for pid in pids {
                device.memory_used_bytes += process.memory_bytes;
                processes.push(ProcessSample {
                    pid,
                    gpu_uuid: device.uuid.clone(),
                    sm_util_percent: Some(share),
                    memory_used_bytes: process.memory_bytes,
                });
            }
        }
        Ok(GpuPoll { devices, processes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(yaml: &str) -> Result<Scenario, GpuError> {
        Scenario::parse(yaml, "test")
    }

    /// The embedded demo scenario parses and names two tenants on one GPU.
    #[test]
    fn embedded_demo_is_valid() {
        let demo = Scenario::embedded_demo();
        assert_eq!(demo.gpus.len(), 1);
        assert_eq!(demo.processes.len(), 2);
    }

    /// The schedule loops: step boundaries and wrap-around pick the right step.
    #[test]
    fn schedule_is_piecewise_and_loops() {
        let s = scenario(
            "name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1}]\nprocesses:\n  - {pid: 7, gpu: 0, sm_util: [{seconds: 2, percent: 10}, {seconds: 3, percent: 50}]}\n",
        )
        .unwrap();
        let p = &s.processes[0];
        assert_eq!(p.sm_util_at(0.0), 10.0);
        assert_eq!(p.sm_util_at(1.99), 10.0);
        assert_eq!(p.sm_util_at(2.0), 50.0);
        assert_eq!(p.sm_util_at(5.5), 10.0);
    }

    /// A cgroup tenant reports every pid of its subtree and splits its load
    /// across them; a pid tenant reports its pid.
    #[test]
    fn cgroup_tenants_cover_their_subtree() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("kubepods.slice/pod-a");
        fs::create_dir_all(pod.join("ctr")).unwrap();
        fs::write(pod.join("cgroup.procs"), "").unwrap();
        fs::write(pod.join("ctr/cgroup.procs"), "11\n12\n").unwrap();
        let s = scenario(
            "name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 100}]\nprocesses:\n  - {cgroup: /kubepods.slice/pod-a, gpu: 0, memory_bytes: 5, sm_util: [{seconds: 1, percent: 40}]}\n  - {pid: 99, gpu: 0, sm_util: [{seconds: 1, percent: 10}]}\n",
        )
        .unwrap();
        let mut backend = SimBackend::new(s, root.path().to_path_buf());
        let poll = backend.poll().unwrap();
        let pids: Vec<u32> = poll.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, vec![11, 12, 99]);
        assert_eq!(poll.processes[0].sm_util_percent, Some(20.0));
        assert_eq!(poll.devices[0].util_percent, 50.0);
        assert_eq!(poll.devices[0].memory_used_bytes, 10);
    }

    /// Invalid scenarios are rejected with the offending field named.
    #[test]
    fn invalid_scenarios_name_the_field() {
        let base = "name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1}]\nprocesses:\n";
        let cases = [
            ("  - {gpu: 0, sm_util: [{seconds: 1, percent: 1}]}\n", "pid or cgroup"),
            ("  - {pid: 1, gpu: 3, sm_util: [{seconds: 1, percent: 1}]}\n", "processes[0].gpu"),
            ("  - {pid: 1, gpu: 0, sm_util: []}\n", "sm_util"),
            ("  - {pid: 1, gpu: 0, sm_util: [{seconds: 1, percent: 101}]}\n", "percent"),
            ("  - {pid: 1, gpu: 0, smutil: []}\n", "unknown field"),
        ];
        for (tail, expected) in cases {
            let err = scenario(&format!("{base}{tail}")).unwrap_err().to_string();
            assert!(err.contains(expected), "{tail}: {err}");
        }
    }
}
