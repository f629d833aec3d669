//! Seeded random scenarios, for measuring how the estimator generalises
//! rather than how it fits the few recorded traces. Each scenario draws:
//!
//! - 2-6 tenants, co-started (within 1.5 s, as the hard held-out traces
//!   were) or staggered over the first 15 s; in a third of the scenarios
//!   some tenants are replicas of an earlier one (the same kernels);
//! - kernel identities on 70% of scenarios (the launch probes resolved
//!   them), none on the rest;
//! - 1-5 kernels per tenant, each with a GPU cost per launch drawn
//!   log-uniformly over three orders of magnitude (10 µs to 10 ms) and a
//!   launch geometry (threads) that grows with the cost, so that tiny
//!   kernels are launch-bound (their launch rate is capped at 20,000/s);
//!   Half the tenants use library kernels that keep one grid whatever
//!   their cost (cuBLAS did over every matmul size in the recorded
//!   traces), so the geometry tells nothing about their cost;
//! - a load pattern per tenant: steady, on/off, ramping, request driven
//!   (Poisson arrivals, each request busy for an exponential time), or
//!   batch changes at a fixed duty (cost per launch and launch rate move
//!   together and the key stays the same, as in the recorded
//!   batch-varying trace);
//! - time-slicing overhead per extra active tenant that grows with how
//!   launch-bound the tenants are (0.5-9 points; the recorded H100 traces
//!   and the held-out one showed 1.5-9), smaller under MPS (contention
//!   rather than context switches);
//! - completion spans on most scenarios (`span_models`): how efficiently
//!   each tenant keeps the GPU busy while it has work outstanding, and
//!   whether its waits are seen at all;
//! - sampled launch accounting on some scenarios (counts off by a few
//!   percent per read), device-utilization reading noise, and NVML's
//!   observed distortion (one process named at a time, holding the whole
//!   device; under MPS only the server).
//!
//! The same seed gives the same scenarios on every machine: the sweep's
//! scorecard is a figure anyone can reproduce.
use super::synthetic::{Kernel, Lcg, Phase, Scenario, SpanModel};
use crate::gpu::Sharing;

/// Length of every generated scenario, seconds.
const DURATION_S: f64 = 40.0;
/// Launches per second one process can issue (CPU-bound launch path).
const MAX_LAUNCH_RATE: f64 = 20_000.0;

/// How a tenant's load moves over time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// One level from start to end.
    Steady,
    /// A level for part of every period, nothing for the rest.
    OnOff,
    /// Steps from a low level to a high one (or back).
    Ramp,
    /// Requests arriving at random, each busy for a random time.
    Requests,
    /// One busy level, with the batch size (cost per launch) changing
    /// every few seconds under the same kernel and grid.
    Batch,
}

impl Pattern {
    /// Name as the scorecard prints it.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Steady => "steady",
            Pattern::OnOff => "on-off",
            Pattern::Ramp => "ramp",
            Pattern::Requests => "requests",
            Pattern::Batch => "batch",
        }
    }
}

impl Lcg {
    /// Uniform in [low, high).
    fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (self.symmetric() + 1.0) / 2.0 * (high - low)
    }

    /// Log-uniform in [low, high).
    fn log_uniform(&mut self, low: f64, high: f64) -> f64 {
        self.uniform(low.ln(), high.ln()).exp()
    }

    /// An integer in [low, high].
    fn between(&mut self, low: usize, high: usize) -> usize {
        (low + (self.uniform(0.0, (high - low + 1) as f64)) as usize).min(high)
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        self.uniform(0.0, 1.0) < p
    }

    /// Exponential with the given mean.
    fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.uniform(0.0, 1.0)).max(1e-12).ln()
    }
}

/// What the generator drew for one scenario besides its phases (the
/// scorecard groups errors by it).
#[derive(Clone, Debug, PartialEq)]
pub struct Drawn {
    /// The scenario, ready to generate.
    pub scenario: Scenario,
    /// Each tenant's load pattern, by pid.
    pub patterns: Vec<(u32, Pattern)>,
    /// Whether every tenant started within 1.5 s of the first.
    pub co_started: bool,
    /// Tenants that run the same kernels as another tenant (replicas and
    /// their originals), by pid.
    pub sharing_kernels: Vec<u32>,
}

/// Scenario `index` of the sweep seeded with `seed`.
pub fn draw(seed: u64, index: usize) -> Drawn {
    let mut rng = Lcg::new(seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mps = rng.chance(0.2);
    let tenant_count = rng.between(2, 6);
    let co_started = rng.chance(0.5);
    // Mean busy levels, scaled so the GPU is not oversubscribed.
    let mut levels: Vec<f64> = (0..tenant_count).map(|_| rng.uniform(3.0, 40.0)).collect();
    let sum: f64 = levels.iter().sum();
    if sum > 85.0 {
        levels.iter_mut().for_each(|level| *level *= 85.0 / sum);
    }
    let mut tenants = Vec::with_capacity(tenant_count);
    let mut patterns = Vec::with_capacity(tenant_count);
    let mut launch_bound = 0.0;
    // Whether the launch probes resolved kernel identities (they cannot
    // for handles created before the agent attached, when the launch site
    // cannot be symbolized either), and whether some tenants are replicas.
    let identified = rng.chance(0.7);
    let replicas = rng.chance(0.35);
    let mut kernel_sets: Vec<Vec<(Kernel, f64)>> = Vec::with_capacity(tenant_count);
    let mut sharing_kernels: Vec<u32> = Vec::new();
    // How big each tenant's kernels are (0: 10 µs, 1: 10 ms), for its spans.
    let mut sizes: Vec<(u32, f64)> = Vec::with_capacity(tenant_count);
    for (t, &level) in levels.iter().enumerate() {
        let pid = 1000 + t as u32;
        let start = if co_started { rng.uniform(0.0, 1.5) } else { rng.uniform(0.0, 15.0) };
        let library = rng.chance(0.5);
        // A replica runs the kernels of an earlier tenant (the same model
        // served twice), under its own function handles.
        let replica_of = (replicas && t > 0 && rng.chance(0.5)).then(|| rng.between(0, t - 1));
        let drawn_kernels: Vec<(Kernel, f64)> = (0..rng.between(1, 5))
            .map(|k| {
                let cost_s = rng.log_uniform(1e-5, 1e-2);
                // Hand-written kernels launch more threads the more work
                // they do; library kernels keep a grid sized to the GPU.
                let threads = if library {
                    [50_688, 65_536, 135_168][rng.between(0, 2)]
                } else {
                    ((cost_s * 3e7 * rng.uniform(0.5, 2.0)).round() as u64).max(128)
                };
                let function = u64::from(pid) << 8 | k as u64;
                let identity = identified.then(|| kernel_identity(seed, index, t, k));
                (Kernel { function, threads, cost_s, identity }, rng.uniform(0.2, 1.0))
            })
            .collect();
        if let Some(origin) = replica_of {
            sharing_kernels.extend([pid, 1000 + origin as u32]);
        }
        let kernels = match replica_of.and_then(|origin| kernel_sets.get(origin)) {
            Some(origin) => {
                let origin: &Vec<(Kernel, f64)> = origin;
                origin
                    .iter()
                    .enumerate()
                    .map(|(k, (kernel, weight))| {
                        (Kernel { function: u64::from(pid) << 8 | k as u64, ..*kernel }, *weight)
                    })
                    .collect()
            }
            None => drawn_kernels,
        };
        kernel_sets.push(kernels.clone());
        let weight_sum: f64 = kernels.iter().map(|(_, w)| w).sum();
        let mean_cost: f64 = kernels.iter().map(|(k, w)| k.cost_s * w).sum::<f64>() / weight_sum;
        // 0 for 10 ms kernels, 1 for 10 µs ones: how launch-bound the
        // tenant is, which drives the switching overhead.
        let size = ((mean_cost / 1e-3).log10().clamp(-2.0, 1.0) + 2.0) / 3.0;
        launch_bound += (1.0 - size) / tenant_count as f64;
        sizes.push((pid, size));
        let pattern = match rng.between(0, 4) {
            0 => Pattern::Steady,
            1 => Pattern::OnOff,
            2 => Pattern::Ramp,
            3 => Pattern::Requests,
            _ => Pattern::Batch,
        };
        // (from, to, busy percent) intervals of the tenant's load.
        let spans = spans(&mut rng, pattern, start, level);
        let mut phases = Vec::new();
        for (from_s, to_s, busy, batch) in spans {
            for (kernel, weight) in &kernels {
                let kernel = &Kernel { cost_s: kernel.cost_s * batch, ..*kernel };
                let kernel_busy = busy * weight / weight_sum / 100.0;
                let launches_per_s = (kernel_busy / kernel.cost_s).min(MAX_LAUNCH_RATE);
                if launches_per_s > 0.0 {
                    phases.push(Phase { from_s, to_s, kernel: *kernel, launches_per_s });
                }
            }
        }
        if !phases.is_empty() {
            tenants.push((pid, phases));
            patterns.push((pid, pattern));
        }
    }
    let overhead_points =
        if mps { rng.uniform(0.0, 1.5) } else { rng.uniform(0.5, 3.0) + 6.0 * launch_bound.clamp(0.0, 1.0) };
    let scenario = Scenario {
        name: format!("sweep-{seed}-{index}"),
        tenants,
        duration_s: DURATION_S,
        overhead_points,
        util_period_s: rng.uniform(0.2, 1.0),
        noise_points: rng.uniform(0.5, 3.0),
        sharing: if mps { Sharing::Mps } else { Sharing::TimeSliced },
        launch_count_noise: if rng.chance(0.4) { rng.uniform(0.02, 0.15) } else { 0.0 },
        span_models: span_models(seed, index, &sizes),
    };
    sharing_kernels.sort_unstable();
    sharing_kernels.dedup();
    Drawn { scenario, patterns, co_started, sharing_kernels }
}

/// Completion spans, drawn from a stream of their own so that the rest of
/// the scenario is the same with or without them: none on 15% of
/// scenarios (wait probes not attached), and on the rest 15% of tenants
/// that never wait where the probes see it (they poll, or wait through a
/// call not probed). Efficiency (the GPU busy part of a tenant's
/// outstanding time when alone) runs from 0.3-0.8 for launch-bound
/// tenants to 0.85-1 for 10 ms kernels.
fn span_models(seed: u64, index: usize, sizes: &[(u32, f64)]) -> Vec<SpanModel> {
    let mut rng = Lcg::new(seed.rotate_left(17) ^ (index as u64 + 1).wrapping_mul(0xc2b2_ae3d_27d4_eb4f) ^ 0x5ba5);
    if !rng.chance(0.85) {
        return Vec::new();
    }
    sizes
        .iter()
        .map(|&(pid, size)| {
            let (small, big) = (rng.uniform(0.3, 0.8), rng.uniform(0.85, 1.0));
            SpanModel { pid, efficiency: small + (big - small) * size, waits: rng.chance(0.85) }
        })
        .collect()
}

/// A kernel identity unique to (seed, scenario, tenant, kernel), as the
/// hash of a name and module image would be.
fn kernel_identity(seed: u64, index: usize, tenant: usize, kernel: usize) -> u64 {
    let mut rng = Lcg::new(seed ^ (index as u64) << 20 ^ (tenant as u64) << 8 ^ kernel as u64 ^ 0x1de7);
    rng.symmetric();
    rng.next_u64()
}

/// The busy intervals of one tenant: `(from_s, to_s, busy_percent,
/// cost factor)`; the factor scales every kernel's cost per launch (a
/// batch size), 1 but for batch changes.
fn spans(rng: &mut Lcg, pattern: Pattern, start: f64, level: f64) -> Vec<(f64, f64, f64, f64)> {
    if pattern == Pattern::Batch {
        let mut spans = Vec::new();
        let mut t = start;
        while t < DURATION_S {
            let until = (t + rng.uniform(2.0, 4.0)).min(DURATION_S);
            spans.push((t, until, level, rng.log_uniform(0.25, 4.0)));
            t = until;
        }
        return spans;
    }
    let spans = match pattern {
        Pattern::Steady | Pattern::Batch => vec![(start, DURATION_S, level)],
        Pattern::OnOff => {
            let period = rng.uniform(2.0, 8.0);
            let duty = rng.uniform(0.3, 0.7);
            let on = (level / duty).min(90.0);
            let mut spans = Vec::new();
            let mut t = start;
            while t < DURATION_S {
                spans.push((t, (t + period * duty).min(DURATION_S), on));
                t += period;
            }
            spans
        }
        Pattern::Ramp => {
            let step = rng.uniform(2.0, 4.0);
            let steps = ((DURATION_S - start) / step).ceil().max(1.0) as usize;
            let rising = rng.chance(0.5);
            (0..steps)
                .map(|i| {
                    let fraction = (i as f64 + 0.5) / steps as f64;
                    let fraction = if rising { fraction } else { 1.0 - fraction };
                    let from = start + i as f64 * step;
                    (from, (from + step).min(DURATION_S), 2.0 * level * fraction)
                })
                .collect()
        }
        Pattern::Requests => {
            let arrivals_per_s = rng.uniform(0.5, 3.0);
            let mean_busy_s = rng.uniform(0.3, 1.5);
            // Each request runs at the level that makes the mean come out
            // at `level` (requests may overlap and add up).
            let per_request = (level / (arrivals_per_s * mean_busy_s)).min(60.0);
            let mut spans = Vec::new();
            let mut t = start + rng.exponential(1.0 / arrivals_per_s);
            while t < DURATION_S {
                let end = (t + rng.exponential(mean_busy_s)).min(DURATION_S);
                spans.push((t, end, per_request));
                t += rng.exponential(1.0 / arrivals_per_s);
            }
            spans
        }
    };
    spans.into_iter().map(|(from, to, busy)| (from, to, busy, 1.0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same seed draws the same scenarios; another seed, others.
    #[test]
    fn scenarios_are_reproducible() {
        assert_eq!(draw(7, 3), draw(7, 3));
        assert_ne!(draw(7, 3).scenario, draw(8, 3).scenario);
        assert_ne!(draw(7, 3).scenario, draw(7, 4).scenario);
    }

    /// Over a sweep the draws cover what the generator promises: every
    /// tenant count, pattern, co-started and staggered mixes, MPS, sampled
    /// counts, and kernel costs over three orders of magnitude.
    #[test]
    fn a_sweep_covers_the_space() {
        let drawn: Vec<Drawn> = (0..200).map(|index| draw(1, index)).collect();
        let counts: std::collections::BTreeSet<usize> = drawn.iter().map(|d| d.scenario.tenants.len()).collect();
        assert!(counts.contains(&2) && counts.contains(&6), "{counts:?}");
        for pattern in [Pattern::Steady, Pattern::OnOff, Pattern::Ramp, Pattern::Requests, Pattern::Batch] {
            assert!(drawn.iter().any(|d| d.patterns.iter().any(|(_, p)| *p == pattern)), "{pattern:?}");
        }
        assert!(drawn.iter().any(|d| d.co_started) && drawn.iter().any(|d| !d.co_started));
        assert!(drawn.iter().any(|d| d.scenario.sharing == Sharing::Mps));
        assert!(drawn.iter().any(|d| d.scenario.launch_count_noise > 0.0));
        // Replicas (tenants sharing an earlier tenant's kernels), and
        // scenarios with and without resolved kernel identities.
        assert!(drawn.iter().any(|d| !d.sharing_kernels.is_empty()));
        let identified =
            |d: &Drawn| d.scenario.tenants.iter().any(|(_, phases)| phases.iter().any(|p| p.kernel.identity.is_some()));
        assert!(drawn.iter().any(identified) && !drawn.iter().all(identified));
        for d in drawn.iter().filter(|d| !d.sharing_kernels.is_empty() && identified(d)) {
            let identities = |pid: u32| -> Vec<Option<u64>> {
                let phases = &d.scenario.tenants.iter().find(|(p, _)| *p == pid).unwrap().1;
                let mut ids: Vec<Option<u64>> = phases.iter().map(|p| p.kernel.identity).collect();
                ids.sort_unstable();
                ids.dedup();
                ids
            };
            // Every replica shares its kernels with some other tenant.
            for &pid in &d.sharing_kernels {
                let own = identities(pid);
                let shared = d.sharing_kernels.iter().any(|&other| other != pid && identities(other) == own);
                assert!(shared, "{}: {pid}", d.scenario.name);
            }
        }
        let costs: Vec<f64> = drawn
            .iter()
            .flat_map(|d| d.scenario.tenants.iter().flat_map(|(_, phases)| phases.iter().map(|p| p.kernel.cost_s)))
            .collect();
        let (low, high) = costs.iter().fold((f64::MAX, 0.0_f64), |(lo, hi), &c| (lo.min(c), hi.max(c)));
        assert!(low < 2e-5 && high > 5e-3, "costs {low}..{high}");
        // Launch-bound kernels are capped at what a process can launch.
        assert!(drawn.iter().all(|d| d
            .scenario
            .tenants
            .iter()
            .all(|(_, phases)| phases.iter().all(|p| p.launches_per_s <= MAX_LAUNCH_RATE))));
    }
}
