//! The generalisation scorecard (`podgpu-agent replay --sweep N`): the
//! estimator replayed over N seeded random scenarios (`generator`) and
//! every recorded trace, scored per tenant against the truth and against
//! the two simple answers peers give (NVML's per-process samples, and the
//! device utilization split by launch share).
//!
//! What it reports, per group (generated, recorded) and in all:
//! - per-tenant mean absolute error, p50 / p90 / max, in points;
//! - the share of tenants within 5 points;
//! - the share worse than NVML and worse than the launch share;
//! - calibration: the share of bins whose error is within 2σ;
//! - confident misses: bins at confidence ≥ 0.5 more than 5 points off.
//!
//! The worst tenants are listed with what their scenario drew, so a bad
//! figure points at the load it comes from.
use super::generator::{self, Pattern};
use super::replay::{replay, Replay, TenantScore};
use super::trace::{LaunchLine, Trace};
use super::EstimatorConfig;
use crate::gpu::Sharing;

/// Where a scored tenant comes from.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ScoredTenant {
    /// Scenario or trace name.
    pub source: String,
    /// Whether it is a recorded trace (not generated).
    pub recorded: bool,
    /// Its load pattern (generated scenarios only).
    pub pattern: Option<&'static str>,
    /// Whether its scenario's tenants all started together.
    pub co_started: Option<bool>,
    /// Whether it runs the same kernels as another tenant of its scenario.
    pub shares_kernels: Option<bool>,
    /// Whether its scenario's launches carry kernel identities.
    pub identified: Option<bool>,
    /// Whether its scenario's GPU is shared by MPS (else time-sliced).
    pub mps: Option<bool>,
    /// Its scores.
    pub score: TenantScore,
}

/// Figures over a set of tenants.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Figures {
    /// Tenants scored.
    pub tenants: usize,
    /// Median of the tenants' MAE, points.
    pub mae_p50: f64,
    /// 90th percentile of the tenants' MAE.
    pub mae_p90: f64,
    /// Largest MAE.
    pub mae_max: f64,
    /// Share of tenants whose MAE is at most 5 points.
    pub within_5: f64,
    /// Share of tenants whose MAE exceeds NVML's.
    pub worse_than_nvml: f64,
    /// Share of tenants whose MAE exceeds the launch share's.
    pub worse_than_launch_share: f64,
    /// Share of bins whose error is within 2σ.
    pub bins_within_2_sigma: f64,
    /// Bins at confidence ≥ 0.5.
    pub confident_bins: usize,
    /// Of those, bins more than 5 points off.
    pub confident_bins_over_5: usize,
}

impl Figures {
    fn of<'a>(tenants: impl Iterator<Item = &'a TenantScore>) -> Self {
        let scores: Vec<&TenantScore> = tenants.filter(|t| t.bins > 0).collect();
        if scores.is_empty() {
            return Self::default();
        }
        let mut maes: Vec<f64> = scores.iter().map(|t| t.podgpu_mae).collect();
        maes.sort_by(f64::total_cmp);
        let rank = |q: f64| maes[((q * maes.len() as f64).ceil() as usize).clamp(1, maes.len()) - 1];
        let share = |test: &dyn Fn(&TenantScore) -> bool| {
            scores.iter().filter(|t| test(t)).count() as f64 / scores.len() as f64
        };
        let bins: usize = scores.iter().map(|t| t.bins).sum();
        Self {
            tenants: scores.len(),
            mae_p50: rank(0.5),
            mae_p90: rank(0.9),
            mae_max: maes[maes.len() - 1],
            within_5: share(&|t| t.podgpu_mae <= 5.0),
            worse_than_nvml: share(&|t| t.podgpu_mae > t.nvml_mae),
            worse_than_launch_share: share(&|t| t.podgpu_mae > t.launch_share_mae),
            bins_within_2_sigma: scores.iter().map(|t| t.bins_within_2_sigma).sum::<usize>() as f64 / bins as f64,
            confident_bins: scores.iter().map(|t| t.confident_bins).sum(),
            confident_bins_over_5: scores.iter().map(|t| t.confident_bins_over_5).sum(),
        }
    }
}

/// The sweep's outcome.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Scorecard {
    /// Seed of the generated scenarios.
    pub seed: u64,
    /// Generated scenarios replayed.
    pub scenarios: usize,
    /// Over the generated scenarios' tenants.
    pub generated: Figures,
    /// Over the recorded traces' tenants.
    pub recorded: Figures,
    /// Over both.
    pub all: Figures,
    /// The time-slicing overhead, drawn and estimated.
    pub overhead: OverheadFigures,
    /// Every tenant scored, worst MAE first.
    pub tenants: Vec<ScoredTenant>,
}

/// Replays `count` scenarios of `seed` and the `recorded` traces through
/// estimators configured as `config`; `with_spans: false` drops the
/// scenarios' completion spans (the same scenarios otherwise, since spans
/// are drawn apart), to see what they add.
pub fn sweep(
    seed: u64,
    count: usize,
    recorded: &[(String, Trace, Vec<LaunchLine>)],
    config: EstimatorConfig,
    with_spans: bool,
) -> Scorecard {
    let mut tenants = Vec::new();
    let mut overheads = Vec::new();
    for index in 0..count {
        let mut drawn = generator::draw(seed, index);
        if !with_spans {
            drawn.scenario.span_models.clear();
        }
        let (trace, launches) = drawn.scenario.generate();
        let identified =
            drawn.scenario.tenants.iter().any(|(_, phases)| phases.iter().any(|p| p.kernel.identity.is_some()));
        let mps = drawn.scenario.sharing == Sharing::Mps;
        let replayed = replay(&trace, &launches, config);
        if !mps {
            if let Some(estimated) = overhead_per_extra_tenant(&replayed) {
                overheads.push((drawn.scenario.overhead_points, estimated));
            }
        }
        for score in replayed.tenants {
            let pattern = drawn.patterns.iter().find(|(pid, _)| *pid == score.pid).map(|(_, p)| Pattern::name(*p));
            tenants.push(ScoredTenant {
                source: drawn.scenario.name.clone(),
                recorded: false,
                pattern,
                co_started: Some(drawn.co_started),
                shares_kernels: Some(drawn.sharing_kernels.contains(&score.pid)),
                identified: Some(identified),
                mps: Some(mps),
                score,
            });
        }
    }
    for (name, trace, launches) in recorded {
        for score in replay(trace, launches, config).tenants {
            tenants.push(ScoredTenant {
                source: name.clone(),
                recorded: true,
                pattern: None,
                co_started: None,
                shares_kernels: None,
                identified: None,
                mps: None,
                score,
            });
        }
    }
    tenants.sort_by(|a, b| b.score.podgpu_mae.total_cmp(&a.score.podgpu_mae));
    Scorecard {
        seed,
        scenarios: count,
        generated: Figures::of(tenants.iter().filter(|t| !t.recorded).map(|t| &t.score)),
        recorded: Figures::of(tenants.iter().filter(|t| t.recorded).map(|t| &t.score)),
        all: Figures::of(tenants.iter().map(|t| &t.score)),
        overhead: OverheadFigures::of(&overheads),
        tenants,
    }
}

/// The estimator's time-slicing overhead over a replay, points per extra
/// active process, averaged over the windows with two or more processes.
fn overhead_per_extra_tenant(replayed: &Replay) -> Option<f64> {
    let per_window: Vec<f64> = replayed
        .windows
        .iter()
        .filter_map(|w| w.attribution.as_ref())
        .filter(|a| a.processes.len() >= 2)
        .map(|a| a.sharing_overhead_percent / (a.processes.len() - 1) as f64)
        .collect();
    (!per_window.is_empty()).then(|| per_window.iter().sum::<f64>() / per_window.len() as f64)
}

/// How the time-slicing overhead the estimator reports compares with the
/// one the generated (time-sliced) scenarios drew: what it does not learn
/// as overhead, it books on the processes.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct OverheadFigures {
    /// Time-sliced scenarios with two or more processes at once.
    pub scenarios: usize,
    /// Mean of the drawn overheads, points per extra tenant.
    pub drawn_mean: f64,
    /// Mean of the estimated ones.
    pub estimated_mean: f64,
    /// Mean absolute difference, per scenario.
    pub mean_abs_error: f64,
}

impl OverheadFigures {
    fn of(pairs: &[(f64, f64)]) -> Self {
        if pairs.is_empty() {
            return Self::default();
        }
        let n = pairs.len() as f64;
        Self {
            scenarios: pairs.len(),
            drawn_mean: pairs.iter().map(|(drawn, _)| drawn).sum::<f64>() / n,
            estimated_mean: pairs.iter().map(|(_, estimated)| estimated).sum::<f64>() / n,
            mean_abs_error: pairs.iter().map(|(drawn, estimated)| (drawn - estimated).abs()).sum::<f64>() / n,
        }
    }
}

impl std::fmt::Display for Scorecard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "attribution sweep: seed {}, {} generated scenarios + recorded traces", self.seed, self.scenarios)?;
        writeln!(
            f,
            "{:<10} {:>7} {:>6} {:>6} {:>6} {:>9} {:>10} {:>12} {:>9} {:>16}",
            "set", "tenants", "p50", "p90", "max", "within 5", ">NVML", ">launch sh.", "in 2σ", "confident > 5"
        )?;
        for (name, figures) in [("generated", &self.generated), ("recorded", &self.recorded), ("all", &self.all)] {
            writeln!(
                f,
                "{:<10} {:>7} {:>6.1} {:>6.1} {:>6.1} {:>8.0}% {:>9.0}% {:>11.0}% {:>8.0}% {:>9} of {:<5}",
                name,
                figures.tenants,
                figures.mae_p50,
                figures.mae_p90,
                figures.mae_max,
                100.0 * figures.within_5,
                100.0 * figures.worse_than_nvml,
                100.0 * figures.worse_than_launch_share,
                100.0 * figures.bins_within_2_sigma,
                figures.confident_bins_over_5,
                figures.confident_bins,
            )?;
        }
        let overhead = &self.overhead;
        writeln!(
            f,
            "time-slicing overhead, points per extra tenant over {} scenarios: drawn {:.1}, estimated {:.1} (mean error {:.1})",
            overhead.scenarios, overhead.drawn_mean, overhead.estimated_mean, overhead.mean_abs_error
        )?;
        writeln!(f, "worst tenants (MAE points; podgpu / NVML / launch share; confidence):")?;
        for tenant in self.tenants.iter().take(8) {
            let score = &tenant.score;
            writeln!(
                f,
                "  {:<22} pid {:<6} {:<9} {:<12} truth {:>5.1}%  {:>5.1} / {:>5.1} / {:>5.1}  conf {:.2}",
                tenant.source,
                score.pid,
                tenant.pattern.unwrap_or("recorded"),
                match tenant.co_started {
                    Some(true) => "co-started",
                    Some(false) => "staggered",
                    None => "",
                },
                score.truth,
                score.podgpu_mae,
                score.nvml_mae,
                score.launch_share_mae,
                score.confidence,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scorecard is reproducible, counts every tenant of every
    /// scenario, and its figures are consistent with the tenant scores.
    #[test]
    fn a_sweep_scores_every_tenant_reproducibly() {
        let card = sweep(3, 6, &[], EstimatorConfig::default(), true);
        assert_eq!(card, sweep(3, 6, &[], EstimatorConfig::default(), true));
        let expected: usize = (0..6).map(|index| generator::draw(3, index).scenario.tenants.len()).sum();
        assert_eq!(card.tenants.len(), expected);
        assert_eq!(card.generated.tenants, card.tenants.iter().filter(|t| t.score.bins > 0).count());
        assert_eq!(card.recorded, Figures::default());
        let figures = &card.generated;
        assert!(figures.mae_p50 <= figures.mae_p90 && figures.mae_p90 <= figures.mae_max);
        assert_eq!(figures.mae_max, card.tenants[0].score.podgpu_mae, "worst first");
        assert!((0.0..=1.0).contains(&figures.bins_within_2_sigma));
        assert!(figures.confident_bins_over_5 <= figures.confident_bins);
        let text = card.to_string();
        assert!(text.contains("generated") && text.contains("worst tenants"), "{text}");
        // The overhead figures cover the time-sliced scenarios; the mean
        // error is at least the difference of the means.
        let overhead = &card.overhead;
        assert!(overhead.scenarios >= 1 && overhead.scenarios <= 6, "{overhead:?}");
        assert!(overhead.drawn_mean > 0.0, "{overhead:?}");
        assert!(
            overhead.mean_abs_error + 1e-12 >= (overhead.drawn_mean - overhead.estimated_mean).abs(),
            "{overhead:?}"
        );
    }

    /// The figures over a hand-made set: ranks, shares and bin counts.
    #[test]
    fn figures_follow_their_definitions() {
        let score = |mae: f64, nvml: f64, share: f64| TenantScore {
            pid: 1,
            truth: 10.0,
            podgpu_mae: mae,
            nvml_mae: nvml,
            launch_share_mae: share,
            podgpu: 10.0,
            confidence: 0.5,
            bins: 10,
            bins_within_2_sigma: 9,
            confident_bins: 4,
            confident_bins_over_5: 1,
        };
        let scores = [score(1.0, 5.0, 5.0), score(2.0, 1.0, 5.0), score(8.0, 9.0, 4.0), score(4.0, 5.0, 5.0)];
        let figures = Figures::of(scores.iter());
        assert_eq!(figures.tenants, 4);
        assert_eq!((figures.mae_p50, figures.mae_p90, figures.mae_max), (2.0, 8.0, 8.0));
        assert_eq!(figures.within_5, 0.75);
        assert_eq!(figures.worse_than_nvml, 0.25);
        assert_eq!(figures.worse_than_launch_share, 0.25);
        assert_eq!(figures.bins_within_2_sigma, 0.9);
        assert_eq!((figures.confident_bins, figures.confident_bins_over_5), (16, 4));
    }
}
