//! Leave-one-out over the recorded traces (`podgpu-agent replay
//! --leave-one-out --traces DIR`): for each trace, the estimator settings
//! are chosen from a grid by how they score on the *other* traces, and the
//! held-out trace is then scored with them. A setting that only looks good
//! because it was tuned on a trace shows here as a held-out score worse
//! than the defaults'.
//!
//! The grid spans the settings the recorded traces can move (how fast a
//! jumped cost is loosened, how much a transition window is trusted, how
//! fast costs drift, how wide the prior is), a factor of two or three
//! either side of the defaults.
use super::replay::replay;
use super::trace::{LaunchLine, Trace};
use super::EstimatorConfig;

/// The settings searched, with the values tried for each.
pub const GRID: [(&str, [f64; 3]); 4] = [
    ("jump_gain", [1.0, 2.0, 4.0]),
    ("misalignment_gain", [2.0, 4.0, 8.0]),
    ("share_drift", [0.1, 0.3, 1.0]),
    ("prior_share", [20.0, 30.0, 45.0]),
];

/// One held-out trace's outcome.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct HeldOut {
    /// The trace left out of the choice.
    pub trace: String,
    /// The settings chosen on the other traces (name, value).
    pub chosen: Vec<(String, f64)>,
    /// Mean per-tenant MAE of the other traces with those settings.
    pub fit_mae: f64,
    /// Per tenant of the held-out trace: (pid, MAE with the chosen
    /// settings, MAE with the defaults, NVML's MAE, the launch share's).
    pub tenants: Vec<(u32, f64, f64, f64, f64)>,
}

/// Every combination of `GRID` as a configuration, with its settings.
fn combinations() -> Vec<(EstimatorConfig, Vec<(String, f64)>)> {
    let mut all = vec![(EstimatorConfig::default(), Vec::new())];
    for (name, values) in GRID {
        let mut next = Vec::with_capacity(all.len() * values.len());
        for (config, chosen) in &all {
            for value in values {
                let mut config = *config;
                config.set(name, value).expect("the grid names known settings");
                let mut chosen = chosen.clone();
                chosen.push((name.to_string(), value));
                next.push((config, chosen));
            }
        }
        all = next;
    }
    all
}

/// Mean per-tenant MAE of `traces` under `config`.
fn mean_mae(traces: &[&(String, Trace, Vec<LaunchLine>)], config: EstimatorConfig) -> f64 {
    let maes: Vec<f64> = traces
        .iter()
        .flat_map(|(_, trace, launches)| replay(trace, launches, config).tenants)
        .map(|t| t.podgpu_mae)
        .collect();
    maes.iter().sum::<f64>() / maes.len().max(1) as f64
}

/// Leave-one-out over `recorded` (at least two traces).
pub fn leave_one_out(recorded: &[(String, Trace, Vec<LaunchLine>)]) -> Vec<HeldOut> {
    let grid = combinations();
    (0..recorded.len())
        .map(|held| {
            let others: Vec<&(String, Trace, Vec<LaunchLine>)> =
                recorded.iter().enumerate().filter(|(i, _)| *i != held).map(|(_, t)| t).collect();
            let (config, chosen, fit_mae) = grid
                .iter()
                .map(|(config, chosen)| (*config, chosen.clone(), mean_mae(&others, *config)))
                .min_by(|a, b| a.2.total_cmp(&b.2))
                .expect("the grid is not empty");
            let (name, trace, launches) = &recorded[held];
            let with_chosen = replay(trace, launches, config).tenants;
            let with_defaults = replay(trace, launches, EstimatorConfig::default()).tenants;
            let tenants = with_chosen
                .iter()
                .zip(&with_defaults)
                .map(|(c, d)| (c.pid, c.podgpu_mae, d.podgpu_mae, c.nvml_mae, c.launch_share_mae))
                .collect();
            HeldOut { trace: name.clone(), chosen, fit_mae, tenants }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::attribution::synthetic::Scenario;

    /// The grid covers every combination once, defaults included.
    #[test]
    fn the_grid_is_complete() {
        let all = combinations();
        assert_eq!(all.len(), 81);
        let defaults = EstimatorConfig::default();
        assert!(all.iter().any(|(c, _)| c.jump_gain == defaults.jump_gain
            && c.misalignment_gain == defaults.misalignment_gain
            && c.share_drift == defaults.share_drift
            && c.prior_share == defaults.prior_share));
    }

    /// Each trace is scored once, with settings chosen on the others, and
    /// every tenant of it is reported.
    #[test]
    fn each_trace_is_held_out_once() {
        let traces: Vec<(String, Trace, Vec<LaunchLine>)> = ["staggered", "steady", "batch-change"]
            .iter()
            .map(|name| {
                let (trace, launches) = Scenario::builtin(name).unwrap().generate();
                (name.to_string(), trace, launches)
            })
            .collect();
        let held = leave_one_out(&traces);
        assert_eq!(held.iter().map(|h| h.trace.as_str()).collect::<Vec<_>>(), ["staggered", "steady", "batch-change"]);
        for (outcome, (_, trace, _)) in held.iter().zip(&traces) {
            assert_eq!(outcome.tenants.len(), trace.tenants.len());
            assert_eq!(outcome.chosen.len(), GRID.len());
            assert!(outcome.fit_mae.is_finite() && outcome.fit_mae >= 0.0);
        }
    }
}
