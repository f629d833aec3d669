//! What the estimator reports per process, once the filter has spoken:
//! the even split of what the data cannot separate, the confidence scale
//! (σ against the 5-point tolerance), and the NVML-only answer when there
//! are no launch counts.
use super::{Attribution, Basis, ProcessShare};

/// What the data cannot separate is split evenly, or by `weights` where
/// they know better (the fair span time, `spans::split_weights`; `None`:
/// the even split). A process whose split σ is large against `scale`
/// points moves toward its weighted part of the uncertain processes' sum
/// (by `(σ² / scale²)²`, at most all the way); a measured one stays.
/// Weights from spans are evidence about the split, where the even split
/// is only the absence of it: they pull from half the σ. The sum is kept:
/// the device utilization pins it even when the split is unknown. Without
/// this, an unobservable split keeps whatever the costs were when each
/// process was first admitted, which depends on the order in which
/// co-started processes steadied, not on their loads.
pub(super) fn split_where_unseparable(
    processes: &mut [ProcessShare],
    split_variances: &[f64],
    scale: f64,
    weights: impl Fn(&[ProcessShare], &[bool]) -> Option<Vec<f64>>,
) {
    if scale <= 0.0 {
        return;
    }
    let pulled: Vec<bool> = split_variances.iter().map(|&v| v > 0.0).collect();
    let (pull, weights) = match weights(processes, &pulled) {
        Some(weights) => (pull_toward_split(split_variances, scale / 2.0), weights),
        None => (pull_toward_split(split_variances, scale), vec![1.0; processes.len()]),
    };
    let weighted: f64 = pull.iter().zip(&weights).map(|(w, f)| w * f).sum();
    if weighted <= 0.0 {
        return;
    }
    // Each target is its weight's part of the pulled sum: Σ pull·(target −
    // share) is 0, so the sum is kept.
    let per_weight = processes.iter().zip(&pull).map(|(p, w)| p.util_percent * w).sum::<f64>() / weighted;
    for ((process, w), f) in processes.iter_mut().zip(&pull).zip(&weights) {
        process.util_percent += w * (f * per_weight - process.util_percent);
    }
}

/// How far each share moves toward the split: `(σ² / scale²)²`, at most 1.
fn pull_toward_split(split_variances: &[f64], scale: f64) -> Vec<f64> {
    split_variances.iter().map(|v| (v / scale.powi(2)).min(1.0).powi(2)).collect()
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
