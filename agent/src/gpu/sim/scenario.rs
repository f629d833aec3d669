//! The simulator's scenario files: devices (time-sliced, MIG or MPS),
//! tenants with scripted loads, NVML's measured distortions, and faults.
//!
//! ```yaml
//! name: example
//! gpus:
//!   - uuid: GPU-0
//!     name: Simulated H100
//!     memory_total_bytes: 85899345920
//!     sharing: time_sliced          # or mig (with `mig:` instances) or mps (with mps_server_pid)
//!     switch_overhead_percent: 2    # time-sliced: utilization each busy tenant beyond the first adds
//! processes:
//!   - name: a                       # optional; distortions refer to tenants by name
//!     cgroup: kubepods.slice/...    # every pid in this cgroup subtree (load and memory split among them), or `pid: 1234`
//!     gpu: 0
//!     memory_bytes: 1073741824
//!     sm_util: [{seconds: 5, percent: 60}, {seconds: 5, percent: 20}]   # loops
//!     # or, instead of sm_util: each launch its processes make through the
//!     # libcuda stand-in occupies the GPU this long (needs launch_counters)
//!     # launch_cost_us: 150
//!     nvml: missing                 # NVML has no samples for it; or {report_as: b}
//! faults:
//!   - {kind: gpu_lost, at_s: 10, for_s: 3}   # gpu_lost, unknown, driver_reload, library_missing
//! launch_counters: /run/podgpu-sim/launches  # where the libcuda stand-in counts launches (PODGPU_SIM_LAUNCHES_DIR)
//! ```
use std::fs;
use std::path::Path;

use serde::Deserialize;

use crate::gpu::{GpuError, Sharing};

const EMBEDDED_DEMO: &str = include_str!("demo-scenario.yaml");

/// A parsed, validated scenario.
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
    /// Scripted failures.
    #[serde(default)]
    pub faults: Vec<SimFault>,
    /// Folder where the libcuda stand-in counts each process's launches
    /// (one 8-byte counter per pid, `PODGPU_SIM_LAUNCHES_DIR`): processes
    /// with `launch_cost_us` load the GPU by what they launch.
    #[serde(default)]
    pub launch_counters: Option<std::path::PathBuf>,
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
    /// Sharing mode.
    #[serde(default)]
    pub sharing: Sharing,
    /// MIG instances (sharing: mig).
    #[serde(default)]
    pub mig: Vec<SimMig>,
    /// The MPS server's pid (sharing: mps): NVML books every sample and all
    /// memory on it.
    #[serde(default)]
    pub mps_server_pid: Option<u32>,
    /// Time-sliced only: device utilization each busy tenant beyond the
    /// first adds, points (context switches; the recorded H100 traces show
    /// 1.3-3.6). 0 by default: the device shows only the tenants' work.
    #[serde(default)]
    pub switch_overhead_percent: f64,
}

/// One simulated MIG instance.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimMig {
    /// Reported `MIG-...` UUID.
    pub uuid: String,
    /// Framebuffer size of the instance.
    pub memory_total_bytes: u64,
}

/// One simulated tenant: a pid or every pid of a cgroup subtree.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimProcess {
    /// Name other entries use to refer to this tenant.
    #[serde(default)]
    pub name: Option<String>,
    /// Fixed host pid.
    #[serde(default)]
    pub pid: Option<u32>,
    /// cgroup directory relative to the v2 root.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Index into `gpus`.
    pub gpu: usize,
    /// Index into that GPU's `mig` instances.
    #[serde(default)]
    pub mig: Option<usize>,
    /// Framebuffer bytes held by each matching pid.
    #[serde(default)]
    pub memory_bytes: u64,
    /// True SM % schedule (loops); empty with `launch_cost_us`.
    #[serde(default)]
    pub sm_util: Vec<UtilStep>,
    /// GPU microseconds each launch of this tenant's processes runs for:
    /// the tenant's load follows its launches (counted by the libcuda
    /// stand-in in `launch_counters`) instead of a schedule.
    #[serde(default)]
    pub launch_cost_us: Option<f64>,
    /// True memory-bandwidth % schedule (loops; default 0).
    #[serde(default)]
    pub mem_bw_util: Vec<UtilStep>,
    /// How NVML reports this tenant.
    #[serde(default)]
    pub nvml: NvmlView,
}

/// NVML's distortions, as measured on a time-sliced H100 (docs/platform.md).
/// Written `nvml: normal`, `nvml: missing` or `nvml: {report_as: NAME}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "NvmlViewText")]
pub enum NvmlView {
    /// Samples carry the tenant's true load.
    #[default]
    Normal,
    /// NVML returns no sample for the tenant at all.
    Missing,
    /// The tenant's load shows up in another tenant's samples.
    ReportAs(String),
}

/// The YAML spellings of `NvmlView` (serde_yaml would otherwise want tags).
#[derive(Deserialize)]
#[serde(untagged)]
enum NvmlViewText {
    Word(NvmlWord),
    ReportAs {
        #[allow(dead_code)] // read through the From impl
        report_as: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum NvmlWord {
    Normal,
    Missing,
}

impl From<NvmlViewText> for NvmlView {
    fn from(text: NvmlViewText) -> Self {
        match text {
            NvmlViewText::Word(NvmlWord::Normal) => NvmlView::Normal,
            NvmlViewText::Word(NvmlWord::Missing) => NvmlView::Missing,
            NvmlViewText::ReportAs { report_as } => NvmlView::ReportAs(report_as),
        }
    }
}

/// A constant value held for a number of seconds.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UtilStep {
    /// How long the step lasts.
    pub seconds: f64,
    /// Value during the step, percent.
    pub percent: f64,
}

/// A failure injected for a time window.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimFault {
    /// What fails.
    pub kind: FaultKind,
    /// Start, seconds after the agent started polling.
    pub at_s: f64,
    /// Duration in seconds.
    pub for_s: f64,
}

/// The NVML failures the agent must survive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// NVML_ERROR_GPU_IS_LOST on every call.
    GpuLost,
    /// NVML_ERROR_UNKNOWN on polls.
    Unknown,
    /// The driver is being reloaded: polls and re-init fail.
    DriverReload,
    /// libnvidia-ml cannot be loaded (e.g. the GPU operator is reinstalling it).
    LibraryMissing,
}

impl SimFault {
    /// Whether the fault is active `t_s` seconds into the scenario.
    pub fn active_at(&self, t_s: f64) -> bool {
        (self.at_s..self.at_s + self.for_s).contains(&t_s)
    }

    /// The error the backend reports while the fault is active.
    pub fn error(&self, gpu: &str) -> GpuError {
        match self.kind {
            FaultKind::GpuLost => GpuError::GpuLost { uuid: gpu.to_string(), reason: "GPU is lost (simulated)".into() },
            FaultKind::Unknown => GpuError::Poll(format!("{gpu}: an unknown error occurred (simulated)")),
            FaultKind::DriverReload => GpuError::Init("driver not loaded (simulated reload)".into()),
            FaultKind::LibraryMissing => GpuError::LibraryMissing {
                path: "libnvidia-ml.so.1".into(),
                reason: "cannot open shared object file (simulated)".into(),
            },
        }
    }
}

/// Value of a looping schedule at `t_s`; an empty schedule is 0.
pub fn schedule_at(steps: &[UtilStep], t_s: f64) -> f64 {
    let period: f64 = steps.iter().map(|step| step.seconds).sum();
    if steps.is_empty() || period <= 0.0 {
        return 0.0;
    }
    let mut offset = t_s.max(0.0) % period;
    for step in steps {
        if offset < step.seconds {
            return step.percent;
        }
        offset -= step.seconds;
    }
    steps.last().map_or(0.0, |step| step.percent)
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

    /// Parses and validates scenario text; errors name the field.
    pub fn parse(text: &str, origin: &str) -> Result<Self, GpuError> {
        let invalid = |reason: String| GpuError::Scenario { path: origin.to_string(), reason };
        let scenario: Scenario = serde_yaml::from_str(text).map_err(|err| invalid(err.to_string()))?;
        scenario.validate().map_err(invalid)?;
        Ok(scenario)
    }

    fn validate(&self) -> Result<(), String> {
        for (index, gpu) in self.gpus.iter().enumerate() {
            match gpu.sharing {
                Sharing::Mig if gpu.mig.is_empty() => {
                    return Err(format!("gpus[{index}].mig: sharing mig needs instances"))
                }
                Sharing::Mps if gpu.mps_server_pid.is_none() => {
                    return Err(format!("gpus[{index}].mps_server_pid: sharing mps needs the server pid"))
                }
                _ => {}
            }
            if !(0.0..=100.0).contains(&gpu.switch_overhead_percent) {
                return Err(format!("gpus[{index}].switch_overhead_percent: expected 0 to 100 points"));
            }
        }
        let names: Vec<&str> = self.processes.iter().filter_map(|p| p.name.as_deref()).collect();
        for (index, process) in self.processes.iter().enumerate() {
            let at = |field: &str| format!("processes[{index}].{field}");
            if process.pid.is_some() == process.cgroup.is_some() {
                return Err(format!("processes[{index}]: set exactly one of pid or cgroup"));
            }
            let Some(gpu) = self.gpus.get(process.gpu) else {
                return Err(format!("{}: no GPU with index {}", at("gpu"), process.gpu));
            };
            match (gpu.sharing, process.mig) {
                (Sharing::Mig, None) => return Err(format!("{}: GPU {} is in MIG mode", at("mig"), process.gpu)),
                (Sharing::Mig, Some(mig)) if mig >= gpu.mig.len() => {
                    return Err(format!("{}: GPU {} has no MIG instance {mig}", at("mig"), process.gpu))
                }
                (Sharing::TimeSliced | Sharing::Mps, Some(_)) => {
                    return Err(format!("{}: GPU {} is not in MIG mode", at("mig"), process.gpu))
                }
                _ => {}
            }
            match process.launch_cost_us {
                Some(cost) if !(cost > 0.0 && cost.is_finite()) => {
                    return Err(format!("{}: must be a number of microseconds above 0", at("launch_cost_us")))
                }
                Some(_) if !process.sm_util.is_empty() => {
                    return Err(format!("{}: set sm_util or launch_cost_us, not both", at("launch_cost_us")))
                }
                Some(_) if self.launch_counters.is_none() => {
                    return Err(format!("{}: needs the scenario's launch_counters folder", at("launch_cost_us")))
                }
                _ => {}
            }
            let scheduled = process.launch_cost_us.is_none();
            for (field, steps, required) in
                [("sm_util", &process.sm_util, scheduled), ("mem_bw_util", &process.mem_bw_util, false)]
            {
                if required && steps.is_empty() {
                    return Err(format!("{}: needs at least one step", at(field)));
                }
                if steps.iter().any(|step| step.seconds <= 0.0 || !step.seconds.is_finite()) {
                    return Err(format!("{}: seconds must be > 0", at(field)));
                }
                if steps.iter().any(|step| !(0.0..=100.0).contains(&step.percent)) {
                    return Err(format!("{}: percent must be within 0..=100", at(field)));
                }
            }
            if let NvmlView::ReportAs(target) = &process.nvml {
                if !names.contains(&target.as_str()) || process.name.as_deref() == Some(target) {
                    return Err(format!("{}: report_as names no other tenant ({target:?})", at("nvml")));
                }
            }
        }
        for (index, fault) in self.faults.iter().enumerate() {
            if !(fault.at_s >= 0.0 && fault.for_s > 0.0 && fault.at_s.is_finite() && fault.for_s.is_finite()) {
                return Err(format!("faults[{index}]: at_s must be >= 0 and for_s > 0"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: &str = "name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1}]\n";

    /// The embedded demo scenario parses and names two tenants on one GPU.
    #[test]
    fn embedded_demo_is_valid() {
        let demo = Scenario::embedded_demo();
        assert_eq!(demo.gpus.len(), 1);
        assert_eq!(demo.processes.len(), 2);
    }

    /// Schedules are piecewise constant and loop.
    #[test]
    fn schedule_is_piecewise_and_loops() {
        let steps = [UtilStep { seconds: 2.0, percent: 10.0 }, UtilStep { seconds: 3.0, percent: 50.0 }];
        assert_eq!(schedule_at(&steps, 0.0), 10.0);
        assert_eq!(schedule_at(&steps, 1.99), 10.0);
        assert_eq!(schedule_at(&steps, 2.0), 50.0);
        assert_eq!(schedule_at(&steps, 5.5), 10.0);
        assert_eq!(schedule_at(&[], 3.0), 0.0);
    }

    /// Faults are active in [at, at + for).
    #[test]
    fn fault_window() {
        let fault = SimFault { kind: FaultKind::GpuLost, at_s: 2.0, for_s: 1.0 };
        assert!(!fault.active_at(1.99) && fault.active_at(2.0) && fault.active_at(2.99) && !fault.active_at(3.0));
        assert!(matches!(fault.error("G"), GpuError::GpuLost { .. }));
    }

    /// Invalid scenarios are rejected with the offending field named.
    #[test]
    fn invalid_scenarios_name_the_field() {
        let cases = [
            (format!("{GPU}processes:\n  - {{gpu: 0, sm_util: [{{seconds: 1, percent: 1}}]}}\n"), "pid or cgroup"),
            (format!("{GPU}processes:\n  - {{pid: 1, gpu: 3, sm_util: [{{seconds: 1, percent: 1}}]}}\n"), "processes[0].gpu"),
            (format!("{GPU}processes:\n  - {{pid: 1, gpu: 0, sm_util: []}}\n"), "processes[0].sm_util"),
            (format!("{GPU}processes:\n  - {{pid: 1, gpu: 0, sm_util: [{{seconds: 1, percent: 101}}]}}\n"), "percent"),
            (format!("{GPU}processes:\n  - {{pid: 1, gpu: 0, smutil: []}}\n"), "unknown field"),
            (format!("{GPU}processes:\n  - {{pid: 1, gpu: 0, mig: 0, sm_util: [{{seconds: 1, percent: 1}}]}}\n"), "not in MIG mode"),
            (
                format!("{GPU}processes:\n  - {{pid: 1, gpu: 0, nvml: {{report_as: nobody}}, sm_util: [{{seconds: 1, percent: 1}}]}}\n"),
                "report_as",
            ),
            (format!("{GPU}faults: [{{kind: gpu_lost, at_s: 1, for_s: 0}}]\n"), "faults[0]"),
            (format!("{GPU}faults: [{{kind: meltdown, at_s: 1, for_s: 1}}]\n"), "unknown variant"),
            ("name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1, sharing: mps}]\n".to_string(), "mps_server_pid"),
            ("name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1, sharing: mig}]\n".to_string(), "gpus[0].mig"),
            (
                "name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1, switch_overhead_percent: -1}]\n".to_string(),
                "gpus[0].switch_overhead_percent",
            ),
        ];
        for (yaml, expected) in cases {
            let err = Scenario::parse(&yaml, "test").unwrap_err().to_string();
            assert!(err.contains(expected), "{yaml}: {err}");
        }
    }
}
