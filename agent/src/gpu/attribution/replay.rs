//! Replays a trace through the live agent's estimator and scores it per
//! tenant against the tenants' true load, next to the two estimates
//! peers use: NVML's per-process samples and the device utilization
//! split by launch share.
//!
//! Windows are the launch file's intervals (counts are cumulative, so a
//! window's launches are the difference of two lines); a window's device
//! utilization and NVML samples are those timestamped inside it. Scores
//! are mean absolute errors in points per 2 s bin, binned from the
//! earliest tenant start: the bin's truth is the tenant's work rate over
//! its periods, each weighted by the time it spends in the bin; an
//! estimate's value the mean of its windows in the tenant's lifetime
//! (midpoint), weighted the same way (NVML: of the tenant's samples in
//! it, 0 when it has none, as a dashboard would show).
use std::collections::{BTreeMap, HashMap};

use super::trace::{LaunchLine, Trace};
use super::{Attribution, Estimator, EstimatorConfig, LaunchCount, Window};

/// Width of a scoring bin, seconds.
pub const BIN_S: f64 = 2.0;

/// Bins one truth period or window may spread over (five minutes).
const MAX_SPAN_BINS: i64 = 150;

/// One tenant's scores.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TenantScore {
    /// Host pid.
    pub pid: u32,
    /// Mean true load over the scored bins, percent.
    pub truth: f64,
    /// podgpu's mean absolute error, points.
    pub podgpu_mae: f64,
    /// NVML per-process samples' error, points.
    pub nvml_mae: f64,
    /// Device utilization x launch share's error, points.
    pub launch_share_mae: f64,
    /// podgpu's mean estimate, percent.
    pub podgpu: f64,
    /// podgpu's mean confidence for this tenant.
    pub confidence: f64,
    /// Bins scored.
    pub bins: usize,
    /// Bins whose error is within twice the estimate's σ, or within a
    /// point (readings are whole percents; NVML-based shares have no σ):
    /// calibration.
    pub bins_within_2_sigma: usize,
    /// Bins where the estimator said it measured the split (confidence at
    /// least 0.5).
    pub confident_bins: usize,
    /// Of those, bins more than 5 points off: a confident wrong split.
    pub confident_bins_over_5: usize,
}

/// One window's outcome, for people and plots.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ReplayedWindow {
    /// Unix time at the window's end.
    pub t: f64,
    /// The estimator's attribution (`None`: no device utilization).
    pub attribution: Option<Attribution>,
}

/// Everything a replay produced.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Replay {
    /// Per-tenant scores (empty when the trace has no truth).
    pub tenants: Vec<TenantScore>,
    /// Per-window attributions.
    pub windows: Vec<ReplayedWindow>,
}

/// The estimator's input windows of a trace, with their end times.
pub fn windows(trace: &Trace, launches: &[LaunchLine]) -> Vec<(f64, Window)> {
    let mut out = Vec::with_capacity(launches.len());
    for pair in launches.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        let duration_s = after.t - before.t;
        if duration_s <= 0.0 {
            continue;
        }
        let previous: HashMap<(u32, u32, u64), (u64, u64)> = before
            .rows
            .iter()
            .map(|&(pid, kind, function, n, threads)| ((pid, kind, function), (n, threads)))
            .collect();
        let kernels: HashMap<(u32, u64), u64> =
            after.kernels.iter().map(|&(pid, function, kernel)| ((pid, function), kernel)).collect();
        let counts = after
            .rows
            .iter()
            .filter_map(|&(pid, kind, function, n, threads)| {
                let (n0, threads0) = previous.get(&(pid, kind, function)).copied().unwrap_or((0, 0));
                // A process that restarted under the same pid: counts from zero.
                let (launched, started) =
                    if n >= n0 { (n - n0, threads.saturating_sub(threads0)) } else { (n, threads) };
                (launched > 0).then(|| LaunchCount {
                    pid,
                    function,
                    threads_per_launch: started / launched,
                    launches: launched as f64,
                    kernel: kernels.get(&(pid, function)).copied(),
                })
            })
            .collect();
        let inside = |t: f64| t > before.t && t <= after.t;
        let utils: Vec<f64> = trace.device_util.iter().filter(|(t, _)| inside(*t)).map(|(_, u)| *u).collect();
        let device_util = (!utils.is_empty()).then(|| utils.iter().sum::<f64>() / utils.len() as f64);
        let mut nvml: BTreeMap<u32, (f64, u32)> = BTreeMap::new();
        for &(pid, ts_us, sm) in &trace.nvml_process_samples {
            if inside(ts_us as f64 / 1e6) {
                let entry = nvml.entry(pid).or_default();
                entry.0 += sm;
                entry.1 += 1;
            }
        }
        let nvml = nvml.into_iter().map(|(pid, (sum, n))| (pid, sum / f64::from(n))).collect();
        let spans = super::spans::between((&before.spans, before.spans_lost), (&after.spans, after.spans_lost));
        out.push((after.t, Window { duration_s, device_util, launches: Some(counts), nvml, spans }));
    }
    out
}

/// Replays `trace` through a fresh estimator and scores it.
pub fn replay(trace: &Trace, launches: &[LaunchLine], config: EstimatorConfig) -> Replay {
    let mut estimator = Estimator::new(config, trace.sharing(launches));
    let windows = windows(trace, launches);
    let replayed: Vec<ReplayedWindow> =
        windows.iter().map(|(t, window)| ReplayedWindow { t: *t, attribution: estimator.observe(window) }).collect();
    let tenants = score(trace, &windows, &replayed);
    Replay { tenants, windows: replayed }
}

/// One tenant's values in one bin.
struct BinScore {
    truth: f64,
    podgpu: f64,
    nvml: f64,
    launch_share: f64,
    confidence: f64,
    sigma: f64,
}

/// Per-bin means, keyed by (pid, bin).
#[derive(Default)]
struct Bins(HashMap<(u32, i64), (f64, f64)>);

impl Bins {
    fn add(&mut self, pid: u32, bin: i64, value: f64, weight: f64) {
        let entry = self.0.entry((pid, bin)).or_default();
        entry.0 += value * weight;
        entry.1 += weight;
    }

    fn mean(&self, pid: u32, bin: i64) -> Option<f64> {
        self.0.get(&(pid, bin)).filter(|(_, w)| *w > 0.0).map(|(v, w)| v / w)
    }
}

fn score(trace: &Trace, windows: &[(f64, Window)], replayed: &[ReplayedWindow]) -> Vec<TenantScore> {
    let Some(start) =
        trace.tenants.iter().filter_map(|t| t.periods.first().map(|p| p[0] - p[2])).min_by(f64::total_cmp)
    else {
        return Vec::new();
    };
    let bin_of = |t: f64| ((t - start) / BIN_S).floor() as i64;
    // The bins an interval overlaps, with the seconds it spends in each:
    // truth and estimates are both weighted by their time inside a bin, so
    // they average the same stretch of time. (Binned by end or midpoint, a
    // 1 s truth period and a 0.5 s window that straddle a load change
    // compared different stretches: an error of the scoring, not of the
    // estimate, that fell on the tenants whose load toggles.)
    let overlaps = |from: f64, to: f64| {
        // A trace's periods and windows last seconds. One longer than
        // `MAX_SPAN_BINS` bins (or not finite: a damaged trace) counts in
        // its end bin whole, so no input makes the scorer walk without end.
        let spread = to - from <= MAX_SPAN_BINS as f64 * BIN_S;
        let (first, last) = if spread { (bin_of(from), bin_of(to)) } else { (bin_of(to), bin_of(to)) };
        (first..=last).filter_map(move |bin| {
            if !spread {
                return Some((bin, (to - from).clamp(1e-9, f64::MAX)));
            }
            let (lo, hi) = (start + bin as f64 * BIN_S, start + bin.saturating_add(1) as f64 * BIN_S);
            let seconds = to.min(hi) - from.max(lo);
            (seconds > 1e-9).then_some((bin, seconds))
        })
    };
    let mut truth = Bins::default();
    for tenant in &trace.tenants {
        for period in &tenant.periods {
            // Work over period time, spread evenly over the period.
            let rate = 100.0 * period[1] / period[2].max(1e-9);
            for (bin, seconds) in overlaps(period[0] - period[2], period[0]) {
                truth.add(tenant.pid, bin, rate, seconds);
            }
        }
    }
    let (mut podgpu, mut confidence, mut shares) = (Bins::default(), Bins::default(), Bins::default());
    let mut sigma = Bins::default();
    for ((t, window), outcome) in windows.iter().zip(replayed) {
        let Some(attribution) = &outcome.attribution else { continue };
        let middle = t - window.duration_s / 2.0;
        let launches = window.launches.as_deref().unwrap_or_default();
        let total: f64 = launches.iter().map(|c| c.launches).sum();
        // A tenant is scored over its own lifetime: a bin it enters or
        // leaves compares its periods with the windows it was alive in.
        let alive = |tenant: &&super::trace::Tenant| {
            let first = tenant.periods.first().map_or(f64::INFINITY, |p| p[0] - p[2]);
            let last = tenant.periods.last().map_or(f64::NEG_INFINITY, |p| p[0]);
            middle >= first && middle <= last
        };
        for tenant in trace.tenants.iter().filter(alive) {
            let process = attribution.processes.iter().find(|p| p.pid == tenant.pid);
            let own: f64 = launches.iter().filter(|c| c.pid == tenant.pid).map(|c| c.launches).sum();
            let share = if total > 0.0 { attribution.device_util * own / total } else { 0.0 };
            for (bin, seconds) in overlaps(t - window.duration_s, *t) {
                podgpu.add(tenant.pid, bin, process.map_or(0.0, |p| p.util_percent), seconds);
                // As the agent averages a pod's confidence over a query's
                // window: over the time it had one (a process the split
                // does not list, launching nothing, has none).
                if let Some(process) = process {
                    confidence.add(tenant.pid, bin, process.confidence, seconds);
                }
                sigma.add(tenant.pid, bin, process.and_then(|p| p.uncertainty_points).unwrap_or(0.0), seconds);
                shares.add(tenant.pid, bin, share, seconds);
            }
        }
    }
    let mut nvml = Bins::default();
    for &(pid, ts_us, sm) in &trace.nvml_process_samples {
        let bin = bin_of(ts_us as f64 / 1e6);
        nvml.add(pid, bin, sm, 1.0);
    }
    trace
        .tenants
        .iter()
        .map(|tenant| {
            let mut bins: Vec<i64> = truth.0.keys().filter(|(pid, _)| *pid == tenant.pid).map(|(_, b)| *b).collect();
            bins.sort_unstable();
            let scored: Vec<BinScore> = bins
                .into_iter()
                .filter(|&bin| bin >= 0)
                .filter_map(|bin| {
                    Some(BinScore {
                        truth: truth.mean(tenant.pid, bin)?,
                        podgpu: podgpu.mean(tenant.pid, bin)?,
                        nvml: nvml.mean(tenant.pid, bin).unwrap_or(0.0),
                        launch_share: shares.mean(tenant.pid, bin).unwrap_or(0.0),
                        // A bin in which it was never listed reads 0 for
                        // certain: it launched nothing.
                        confidence: confidence.mean(tenant.pid, bin).unwrap_or(1.0),
                        sigma: sigma.mean(tenant.pid, bin).unwrap_or(0.0),
                    })
                })
                .collect();
            let n = scored.len().max(1) as f64;
            let mean = |f: fn(&BinScore) -> f64| scored.iter().map(f).sum::<f64>() / n;
            TenantScore {
                pid: tenant.pid,
                truth: mean(|s| s.truth),
                podgpu_mae: mean(|s| (s.podgpu - s.truth).abs()),
                nvml_mae: mean(|s| (s.nvml - s.truth).abs()),
                launch_share_mae: mean(|s| (s.launch_share - s.truth).abs()),
                podgpu: mean(|s| s.podgpu),
                confidence: mean(|s| s.confidence),
                bins: scored.len(),
                bins_within_2_sigma: scored
                    .iter()
                    .filter(|s| (s.podgpu - s.truth).abs() <= (2.0 * s.sigma).max(1.0))
                    .count(),
                confident_bins: scored.iter().filter(|s| s.confidence >= 0.5).count(),
                confident_bins_over_5: scored
                    .iter()
                    .filter(|s| s.confidence >= 0.5 && (s.podgpu - s.truth).abs() > 5.0)
                    .count(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::attribution::{Basis, ProcessShare};

    /// Scores one tenant (pid 1) with these `periods` against 16 windows
    /// of 0.5 s, each `at(t)` = (device utilization, the split's shares).
    fn score_one_tenant(periods: Vec<Vec<f64>>, at: impl Fn(f64) -> (f64, Vec<ProcessShare>)) -> Vec<TenantScore> {
        let trace = Trace {
            tenants: vec![super::super::trace::Tenant { pid: 1, segments: Vec::new(), periods }],
            ..Trace::default()
        };
        let mut windows = Vec::new();
        let mut replayed = Vec::new();
        for step in 1..=16 {
            let t = step as f64 * 0.5;
            let (util, shares) = at(t);
            windows.push((t, Window { duration_s: 0.5, device_util: Some(util), ..Window::default() }));
            replayed.push(ReplayedWindow { t, attribution: Some(Attribution::new(util, 0.0, shares)) });
        }
        score(&trace, &windows, &replayed)
    }

    /// A tenant busy at 60 % until t = 3 s and idle after, scored against
    /// an estimate that is exact in every 0.5 s window: 0 error, although
    /// the load changes inside the bin [2, 4) and the truth's 1 s periods
    /// and the windows end at different times in it.
    #[test]
    fn an_exact_estimate_scores_zero_across_a_load_change_inside_a_bin() {
        let busy_until = 3.0;
        let periods = (1..=8).map(|end| vec![end as f64, if (end as f64) <= busy_until { 0.6 } else { 0.0 }, 1.0]);
        let scores = score_one_tenant(periods.collect(), |t| {
            let util = if t <= busy_until { 60.0 } else { 0.0 };
            let share = ProcessShare {
                pid: 1,
                util_percent: util,
                uncertainty_points: Some(1.0),
                confidence: 0.8,
                basis: Basis::Measured,
            };
            (util, vec![share])
        });
        assert_eq!(scores.len(), 1);
        assert_eq!(scores[0].bins, 4);
        assert!(scores[0].podgpu_mae < 1e-9, "an exact estimate scored {} points off", scores[0].podgpu_mae);
        assert_eq!(scores[0].confident_bins_over_5, 0);
        assert!((scores[0].truth - 22.5).abs() < 1e-9, "the mean of 60, 30, 0, 0 over the bins");
    }

    /// A bin's confidence is its windows' while the split listed the
    /// tenant, as the agent averages a pod's: an on/off tenant off for
    /// three windows (not listed, certain 0) and back in the fourth at
    /// confidence 0 scores a bin at confidence 0, not 0.75, and its miss
    /// is not a confident one. A bin it is never listed in stays certain.
    #[test]
    fn a_bin_is_as_confident_as_the_windows_that_listed_the_tenant() {
        // Busy at 50 % in [0, 2) and in the last 0.5 s of [2, 4), off
        // between; off in [4, 6) and busy again in [6, 8).
        let busy = |end: f64| (end <= 2.0) || (end > 3.5 && end <= 4.0) || end > 6.0;
        let periods = (1..=16).map(|step| {
            let end = step as f64 * 0.5;
            vec![end, if busy(end) { 0.25 } else { 0.0 }, 0.5]
        });
        let scores = score_one_tenant(periods.collect(), |t| {
            // Exact where it has settled; the first window after the
            // restart reads 10 % at confidence 0.
            let listed = busy(t).then_some(ProcessShare {
                pid: 1,
                util_percent: if t == 4.0 { 10.0 } else { 50.0 },
                uncertainty_points: Some(if t == 4.0 { 20.0 } else { 1.0 }),
                confidence: if t == 4.0 { 0.0 } else { 0.8 },
                basis: Basis::Measured,
            });
            (50.0, listed.into_iter().collect())
        });
        assert_eq!(scores[0].bins, 4);
        // [2, 4): truth 12.5, the estimate 2.5: 10 off, at confidence 0.
        assert_eq!(scores[0].confident_bins_over_5, 0, "{:?}", scores[0]);
        // [0, 2) and [6, 8) at 0.8, [4, 6) never listed and certain.
        assert_eq!(scores[0].confident_bins, 3, "{:?}", scores[0]);
    }

    /// A damaged trace whose periods and windows span ages (or no time
    /// that is a number) is scored at once, not walked bin by bin.
    #[test]
    fn periods_and_windows_of_absurd_length_are_scored_at_once() {
        let periods = vec![vec![1e18, 5.0, 1e18], vec![f64::INFINITY, 1.0, 1.0], vec![2.0, 1.0, f64::NAN]];
        let trace = Trace {
            tenants: vec![super::super::trace::Tenant { pid: 1, segments: Vec::new(), periods }],
            ..Trace::default()
        };
        let window = Window { duration_s: 1e17, device_util: Some(50.0), ..Window::default() };
        let share = ProcessShare {
            pid: 1,
            util_percent: 50.0,
            uncertainty_points: None,
            confidence: 0.0,
            basis: Basis::Measured,
        };
        let replayed = vec![ReplayedWindow { t: 1e17, attribution: Some(Attribution::new(50.0, 0.0, vec![share])) }];
        // Before the bound this walked 10^17 bins: the test would not end.
        let scores = score(&trace, &[(1e17, window)], &replayed);
        assert_eq!(scores.len(), 1);
        assert_eq!(scores[0].pid, 1);
    }
}
