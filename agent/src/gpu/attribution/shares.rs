//! What the estimator reports per process, once the filter has spoken:
//! the even split of what the data cannot separate, the confidence scale
//! (σ against the 5-point tolerance), and the NVML-only answer when there
//! are no launch counts.
use super::{Attribution, Basis, ProcessShare};

/// What the data cannot separate is split evenly. A process whose split σ
/// is large against `scale` points moves toward the mean of the other
/// uncertain processes (by `σ² / (σ² + scale²)`); a measured one stays.
/// The sum is kept: the device utilization pins it even when the split
/// is unknown. Without this, an unobservable split keeps whatever the
/// costs were when each process was first admitted, which depends on the
/// order in which co-started processes steadied, not on their loads.
pub(super) fn split_evenly_where_unseparable(processes: &mut [ProcessShare], split_variances: &[f64], scale: f64) {
    if scale <= 0.0 {
        return;
    }
    let pull: Vec<f64> = split_variances.iter().map(|v| (v / scale.powi(2)).min(1.0).powi(2)).collect();
    let weight: f64 = pull.iter().sum();
    if weight <= 0.0 {
        return;
    }
    let mean = processes.iter().zip(&pull).map(|(p, w)| p.util_percent * w).sum::<f64>() / weight;
    for (process, w) in processes.iter_mut().zip(&pull) {
        process.util_percent += w * (mean - process.util_percent);
    }
}

/// The error a share is meant to stay within, points: the scale of the
/// confidence.
pub const TOLERANCE_POINTS: f64 = 5.0;

/// Confidence of a share whose σ is `uncertainty` points: `1 − σ / 5`,
/// so that 0.5 is where two σ reach the 5-point tolerance (a share at 0.5
/// or more is within 5 points of the truth 95 % of the time if σ is
/// honest), and a σ of 5 points or more reads 0. A probability scale
/// (the chance of being within 5 points) was tried: it reads 0.9 at σ =
/// 3, which is what a tenant confounded with the switching overhead
/// gets while 9 points off (issue 23's held-out trace).
pub fn confidence_of(uncertainty: f64) -> f64 {
    (1.0 - uncertainty / TOLERANCE_POINTS).clamp(0.0, 1.0)
}

/// NVML's per-process values as percentages (anything else left out).
pub(super) fn sane(nvml: &[(u32, f64)]) -> impl Iterator<Item = (u32, f64)> + '_ {
    nvml.iter().filter(|(_, sm)| sm.is_finite()).map(|&(pid, sm)| (pid, sm.clamp(0.0, 100.0)))
}

/// Without launch counts only NVML's per-process samples say anything:
/// scaled to fit under the device utilization, with no confidence.
pub(super) fn nvml_only(util: f64, nvml: &[(u32, f64)]) -> Attribution {
    let total: f64 = sane(nvml).map(|(_, sm)| sm).sum();
    let scale = if total > util && total > 0.0 { util / total } else { 1.0 };
    let processes = sane(nvml)
        .map(|(pid, sm)| ProcessShare {
            pid,
            util_percent: sm * scale,
            uncertainty_points: None,
            confidence: 0.0,
            basis: Basis::Nvml,
        })
        .collect();
    Attribution::new(util, 0.0, processes)
}
