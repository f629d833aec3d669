//! Per-process (and so per-pod) GPU shares on shared GPUs, from fusing the
//! device utilization NVML gets right with the kernel launches eBPF sees.
//!
//! # Why not NVML's per-process numbers
//! On a time-sliced GPU NVML's per-process samples name one process at a
//! time and book the whole device on it (errors of 7-32 points per 2 s on
//! an H100, `docs/platform.md`); under MPS they name only the MPS
//! server. The device utilization itself is right, and the launch probes
//! count every launch of every process.
//!
//! # The model
//! Each launch of a key (process, function, launch size class) costs the
//! GPU `cost_k` %·s, so a window's device utilization is
//! `U = Σ cost_k · rate_k + overhead · (active processes − 1)`. Costs are
//! unknown and drift; `filter::CostFilter` learns them from every window
//! (a Kalman filter: solo windows pin a key exactly, varying mixes act as
//! a regression, launch size is part of the key because cost changes with
//! it). `estimator::Estimator` turns a window into shares and reconciles
//! them with `U`. The time-slicing overhead (three small tenants used
//! 2.5 + 2.9 + 3.0 % alone and 18.1 % together) is its own state and is
//! reported per GPU as `sharing_overhead_percent`, never spread over pods.
//!
//! # Confidence
//! Every share carries the standard deviation of its estimate in points
//! (`uncertainty_points`) and `confidence = 1 − σ / 5` (0.5: 2σ at the
//! 5-point tolerance). A process running alone, or whose launch mix
//! varied against the others', is measured. When loads are steady and
//! nothing else varies, only the sum of the costs is observable: the
//! split is even between the processes concerned, σ stays near the prior
//! and the confidence at 0. That is the honest answer; the basis says
//! which case a share is in.
//!
//! Layout: `filter` (the Kalman state), `estimator` (windows to shares),
//! `rates` (launch counts to rates per cost key),
//! `config` (its settings),
//! `live` (windows from the poller and the launch reader on a node),
//! `trace` (the replayable trace format), `replay` (traces through the
//! estimator, scored against their truth), `synthetic` (generated traces
//! with known costs), `generator` (seeded random scenarios), `sweep` (the
//! generalisation scorecard over them and the recorded traces), `holdout`
//! (leave-one-out over the recorded traces), `shares` (the even split,
//! the confidence scale, the NVML-only answer), `spans` (what completion
//! spans bound and how they split the unseparable), `record` (a trace from
//! a live node), `catalog` (kernel costs kept across agent restarts).
pub mod catalog;
mod config;
mod estimator;
mod filter;
pub mod generator;
pub mod holdout;
pub mod live;
mod rates;
pub mod record;
pub mod replay;
mod shares;
mod spans;
pub mod sweep;
pub mod synthetic;
pub mod trace;

pub use estimator::{CostKey, Estimator, EstimatorConfig, SETTINGS};

/// Launches of one key in one window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LaunchCount {
    /// Host pid.
    pub pid: u32,
    /// Function or graph handle.
    pub function: u64,
    /// Threads per launch (grid x block; 0 for graphs or when unknown).
    pub threads_per_launch: u64,
    /// Launches in the window (scaled when launch accounting samples).
    pub launches: f64,
    /// The kernel's identity across processes (a hash of its name and
    /// module image), when known: the same kernel in two processes then
    /// shares one learned cost.
    pub kernel: Option<u64>,
}

/// What one GPU showed over one window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    /// Length of the window, seconds.
    pub duration_s: f64,
    /// Mean device utilization over the window, percent (`None`: unknown,
    /// e.g. a MIG-enabled GPU).
    pub device_util: Option<f64>,
    /// Launch counts per key (`None`: launch accounting off or not
    /// serving: the estimate falls back to NVML).
    pub launches: Option<Vec<LaunchCount>>,
    /// NVML's per-process SM % over the window.
    pub nvml: Vec<(u32, f64)>,
    /// Completion spans of the processes the wait probes saw (empty:
    /// none, e.g. a trace from before spans).
    pub spans: Vec<ProcessSpan>,
}

/// One process's completion spans over a window (`spans`): how long it had
/// GPU work outstanding, from its first launch after idle to the return of
/// the wait that saw that work finish.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessSpan {
    /// Host pid.
    pub pid: u32,
    /// Seconds of the window with work outstanding: its kernels cannot
    /// have kept the GPU busy for longer.
    pub busy_s: f64,
    /// Seconds of the window shared fairly: each instant with work
    /// outstanding counts `1 / n` for the `n` processes outstanding then
    /// (`None` when the span events of the window were not all seen).
    pub fair_s: Option<f64>,
    /// Spans that ended (a wait returned) in the window: a process that
    /// never waits keeps its span open and bounds nothing.
    pub closed: u64,
}

/// Where a share's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// Learned costs pin it (σ under a quarter of the prior).
    Measured,
    /// Partly separated from the others.
    Partial,
    /// Not separable from the other processes' shares (steady loads):
    /// the prior splits their sum.
    Prior,
    /// A process whose launch costs are not learned yet: it holds what the
    /// learned ones do not explain.
    Residual,
    /// Completion spans bound it closer than the launch counts do (its
    /// time with work outstanding, and the others').
    Bounded,
    /// No launch counts: NVML's per-process samples, scaled under the
    /// device utilization.
    Nvml,
}

impl Basis {
    fn from_uncertainty(uncertainty: f64, prior: f64) -> Self {
        if uncertainty < 0.25 * prior {
            Basis::Measured
        } else if uncertainty < 0.6 * prior {
            Basis::Partial
        } else {
            Basis::Prior
        }
    }
}

/// One process's share of a GPU over a window.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ProcessShare {
    /// Host pid.
    pub pid: u32,
    /// Share of the GPU, percent.
    pub util_percent: f64,
    /// Standard deviation of the estimate, points (`None` for NVML).
    pub uncertainty_points: Option<f64>,
    /// `1 − σ / 5` in [0, 1]: 0.5 is 2σ at 5 points.
    pub confidence: f64,
    /// Why the estimate is what it is.
    pub basis: Basis,
}

/// One GPU's attribution over a window.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Attribution {
    /// Device utilization the shares split, percent.
    pub device_util: f64,
    /// Time lost to switching between time-sliced processes, percent.
    pub sharing_overhead_percent: f64,
    /// Share-weighted confidence of the processes (1 when nothing is
    /// shared).
    pub confidence: f64,
    /// Shares, by pid.
    pub processes: Vec<ProcessShare>,
}

impl Attribution {
    fn new(device_util: f64, sharing_overhead_percent: f64, processes: Vec<ProcessShare>) -> Self {
        let weight: f64 = processes.iter().map(|p| p.util_percent).sum();
        let confidence = if weight > 0.0 {
            processes.iter().map(|p| p.util_percent * p.confidence).sum::<f64>() / weight
        } else {
            1.0
        };
        Self { device_util, sharing_overhead_percent, confidence, processes }
    }

    /// The share of `pid`, percent (0 when it had none).
    pub fn share_of(&self, pid: u32) -> f64 {
        self.processes.iter().find(|p| p.pid == pid).map_or(0.0, |p| p.util_percent)
    }
}

#[cfg(test)]
mod tests;
