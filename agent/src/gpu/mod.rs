//! GPU accounting sources behind one trait: real NVML and a scenario-driven
//! simulator. Both report what NVML would report (host pids, per-process SM %
//! and memory, per-device health); attribution to pods happens later, in
//! `signals`.
pub mod attribution;
mod nvml;
mod nvml_raw;
pub mod poller;
pub mod samples;
mod sim;

use std::path::PathBuf;
use std::str::FromStr;

pub use nvml::NvmlBackend;
pub use samples::{ProcessUtil, RawSample, SampleCursor};
pub use sim::{Scenario, SimBackend};

/// One poll of every GPU a backend sees.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuPoll {
    /// Devices, in backend order.
    pub devices: Vec<DeviceSample>,
    /// Processes that hold memory or were sampled on any device.
    pub processes: Vec<ProcessSample>,
}

/// How a GPU is shared, which decides what NVML can attribute per process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharing {
    /// Whole GPU, possibly time-sliced between processes: NVML gives
    /// per-process SM % (noisy, see docs/platform.md) and memory.
    #[default]
    TimeSliced,
    /// MIG: per-process memory per instance, no per-process SM %.
    Mig,
    /// MPS: NVML sees only the MPS server process.
    Mps,
}

/// Health and load of one GPU.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct DeviceSample {
    /// NVML UUID (`GPU-...`).
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Device SM utilization, percent (trustworthy where NVML gives it;
    /// `None` on a MIG-enabled GPU, where NVML answers NotSupported).
    pub util_percent: Option<f64>,
    /// Device memory-bandwidth utilization, percent (`None` as above).
    pub mem_bw_util_percent: Option<f64>,
    /// Framebuffer in use, bytes.
    pub memory_used_bytes: u64,
    /// Framebuffer size, bytes.
    pub memory_total_bytes: u64,
    /// Board power draw, watts.
    pub power_watts: Option<f64>,
    /// Core temperature, degrees Celsius.
    pub temperature_c: Option<u32>,
    /// NVML compute mode (`default`, `exclusive_process`, `prohibited`).
    pub compute_mode: Option<String>,
    /// How the device is shared.
    pub sharing: Sharing,
    /// MIG instances when MIG mode is on.
    pub mig_devices: Vec<MigDeviceSample>,
    /// How sure the per-pod split of this GPU is, 0 to 1 (`attribution`);
    /// `None` when it was not estimated (no device utilization).
    pub attribution_confidence: Option<f64>,
    /// GPU time lost to switching between time-sliced processes, percent:
    /// reported here, not spread over pods.
    pub sharing_overhead_percent: Option<f64>,
}

/// One MIG instance of a GPU.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct MigDeviceSample {
    /// MIG UUID (`MIG-...`), as kubelet device ids name it.
    pub uuid: String,
    /// Framebuffer in use, bytes.
    pub memory_used_bytes: u64,
    /// Framebuffer size, bytes.
    pub memory_total_bytes: u64,
}

/// What a backend knows about one host process on one GPU (or MIG instance).
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessSample {
    /// Host pid (the agent runs with hostPID).
    pub pid: u32,
    /// UUID of the device (or MIG instance) the process runs on.
    pub gpu_uuid: String,
    /// Mean utilization over the poll interval; `None` when NVML had no new
    /// sample for the process (idle, or missed: see docs/platform.md).
    pub util: Option<ProcessUtil>,
    /// Framebuffer bytes the process holds.
    pub memory_used_bytes: u64,
    /// Sharing mode of its device: under MIG and MPS the SM % cannot come
    /// from NVML per process.
    pub sharing: Sharing,
}

/// Failures of a GPU backend, split by how the agent reacts to them.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No NVML library on this node: GPU signals are absent, not an error.
    #[error("NVML library not available ({path}): {reason}")]
    LibraryMissing {
        /// Library path that was tried.
        path: String,
        /// Loader's message.
        reason: String,
    },
    /// The library loaded but NVML did not initialise (no driver, no device).
    #[error("NVML init failed: {0}")]
    Init(String),
    /// A device fell off the bus; the backend must be re-initialised.
    #[error("GPU {uuid} lost: {reason}")]
    GpuLost {
        /// Device that was lost (index when the UUID is unknown).
        uuid: String,
        /// Backend's message.
        reason: String,
    },
    /// Any other backend failure during a poll.
    #[error("GPU poll failed: {0}")]
    Poll(String),
    /// A simulator scenario could not be read or parsed.
    #[error("GPU scenario {path}: {reason}")]
    Scenario {
        /// Scenario file.
        path: String,
        /// Why it was rejected.
        reason: String,
    },
}

impl GpuError {
    /// Every `kind`: the self-metric exports each from zero, so a rate
    /// over it exists before the first error.
    pub const KINDS: [&'static str; 5] = ["library_missing", "init", "gpu_lost", "poll", "scenario"];

    /// Short label for self-metrics (`podgpu_agent_gpu_errors_total{kind}`),
    /// one of `KINDS`.
    pub fn kind(&self) -> &'static str {
        match self {
            GpuError::LibraryMissing { .. } => "library_missing",
            GpuError::Init(_) => "init",
            GpuError::GpuLost { .. } => "gpu_lost",
            GpuError::Poll(_) => "poll",
            GpuError::Scenario { .. } => "scenario",
        }
    }
}

/// A source of GPU samples. `poll` is called on the collector's schedule
/// (default once a second), never per KEDA request: a real NVML process
/// utilization call costs ~1.5 ms per device.
pub trait GpuBackend: Send {
    /// Short description for logs and /healthz (`nvml 580.x`, `sim:demo`).
    fn describe(&self) -> String;
    /// Samples every device and process once.
    fn poll(&mut self) -> Result<GpuPoll, GpuError>;
}

/// Which backend the agent uses (`--gpu`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuSource {
    /// Real NVML from the given library path.
    Nvml(PathBuf),
    /// Simulator with a scenario file, or the embedded demo scenario.
    Sim(Option<PathBuf>),
    /// No GPU signals at all.
    None,
}

impl FromStr for GpuSource {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        match spec.split_once(':') {
            None if spec == "nvml" => Ok(Self::Nvml(PathBuf::from(nvml::DEFAULT_LIBRARY))),
            None if spec == "sim" => Ok(Self::Sim(None)),
            None if spec == "none" => Ok(Self::None),
            Some(("nvml", path)) if !path.is_empty() => Ok(Self::Nvml(PathBuf::from(path))),
            Some(("sim", path)) if !path.is_empty() => Ok(Self::Sim(Some(PathBuf::from(path)))),
            _ => Err(format!("invalid GPU source {spec:?}: expected nvml, nvml:LIBRARY, sim, sim:SCENARIO or none")),
        }
    }
}

/// Opens the backend named by `source`. `Ok(None)` means "no GPU signals by
/// choice"; an error means the backend is wanted but not usable now.
/// `epoch` anchors a simulator's timeline, so re-opening after a fault
/// continues the scenario instead of restarting it.
pub fn open(
    source: &GpuSource,
    cgroup_root: &std::path::Path,
    epoch: std::time::Instant,
) -> Result<Option<Box<dyn GpuBackend>>, GpuError> {
    match source {
        GpuSource::None => Ok(None),
        GpuSource::Nvml(path) => Ok(Some(Box::new(NvmlBackend::open(path)?))),
        GpuSource::Sim(path) => {
            let scenario = match path {
                Some(path) => Scenario::from_file(path)?,
                None => Scenario::embedded_demo(),
            };
            Ok(Some(Box::new(SimBackend::open(scenario, cgroup_root.to_path_buf(), epoch)?)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every documented `--gpu` spelling parses, and a typo is rejected with
    /// a message listing the valid forms.
    #[test]
    fn gpu_source_parses_documented_forms() {
        assert_eq!("none".parse::<GpuSource>(), Ok(GpuSource::None));
        assert_eq!("sim".parse::<GpuSource>(), Ok(GpuSource::Sim(None)));
        assert_eq!("sim:/x.yaml".parse::<GpuSource>(), Ok(GpuSource::Sim(Some(PathBuf::from("/x.yaml")))));
        assert_eq!(
            "nvml:/opt/libnvidia-ml.so.1".parse::<GpuSource>(),
            Ok(GpuSource::Nvml(PathBuf::from("/opt/libnvidia-ml.so.1")))
        );
        let err = "nvlm".parse::<GpuSource>().unwrap_err();
        assert!(err.contains("nvml:LIBRARY"), "{err}");
        assert!("sim:".parse::<GpuSource>().is_err());
    }
}
