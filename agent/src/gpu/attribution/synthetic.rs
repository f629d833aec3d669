//! Synthetic traces with known costs: tenants whose kernels cost a known
//! GPU time per launch, run through a small model of what the node shows
//! (device utilization averaged over NVML's sample period and noisy,
//! time-slicing overhead, NVML per-process samples that name one process
//! at a time and book the whole device on it). They exercise what the
//! recorded traces do not: tenants that come and go, batch changes with
//! a new launch size, many kernels per process.
use super::trace::{LaunchLine, Tenant, Trace};
use crate::gpu::Sharing;

/// A kernel and what one launch costs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Kernel {
    /// Function handle.
    pub function: u64,
    /// Threads per launch.
    pub threads: u64,
    /// GPU seconds per launch when alone.
    pub cost_s: f64,
    /// Identity across processes (the same kernel in two tenants), when
    /// the trace should carry one.
    pub identity: Option<u64>,
}

/// A tenant launching `kernel` at a steady rate over [from_s, to_s).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Phase {
    /// Start, seconds from the trace start.
    pub from_s: f64,
    /// End.
    pub to_s: f64,
    /// What it launches.
    pub kernel: Kernel,
    /// Launches per second.
    pub launches_per_s: f64,
}

/// A synthetic scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Name.
    pub name: String,
    /// Tenants: pid and phases.
    pub tenants: Vec<(u32, Vec<Phase>)>,
    /// Length, seconds.
    pub duration_s: f64,
    /// Time-slicing overhead, points per active tenant beyond the first.
    pub overhead_points: f64,
    /// NVML's device-utilization averaging period, seconds.
    pub util_period_s: f64,
    /// Amplitude of the reading noise, points.
    pub noise_points: f64,
    /// How the GPU is shared (MPS: NVML names only a server process).
    pub sharing: Sharing,
    /// Error of each read of the launch counts, as a fraction (0: exact;
    /// sampled launch accounting scales counts from part of the interval).
    pub launch_count_noise: f64,
    /// How each tenant's completion spans look (empty: the trace has no
    /// spans, as before spans were probed).
    pub span_models: Vec<SpanModel>,
}

/// How one tenant's work is outstanding on the GPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpanModel {
    /// Host pid.
    pub pid: u32,
    /// The part of its time with work outstanding that keeps the GPU busy
    /// when it runs alone: near 1 for big kernels back to back, lower for
    /// launch-bound loops whose GPU waits on the CPU between kernels.
    pub efficiency: f64,
    /// Whether it waits on its work in a way the probes see (a
    /// synchronize call). One that does not keeps its span open from its
    /// first launch on.
    pub waits: bool,
}

const START: f64 = 1_800_000_000.0;
const STEP: f64 = 0.01;

fn kernel(function: u64, threads: u64, cost_ms: f64) -> Kernel {
    Kernel { function, threads, cost_s: cost_ms / 1e3, identity: None }
}

fn phase(from_s: f64, to_s: f64, kernel: Kernel, busy_percent: f64) -> Phase {
    Phase { from_s, to_s, kernel, launches_per_s: busy_percent / 100.0 / kernel.cost_s }
}

impl Scenario {
    fn base(name: &str, duration_s: f64, tenants: Vec<(u32, Vec<Phase>)>) -> Self {
        Self {
            name: name.to_string(),
            tenants,
            duration_s,
            overhead_points: 1.5,
            util_period_s: 0.5,
            noise_points: 2.0,
            sharing: Sharing::TimeSliced,
            launch_count_noise: 0.0,
            span_models: Vec::new(),
        }
    }

    /// The built-in scenarios, by name.
    pub fn builtin(name: &str) -> Option<Self> {
        let (big, mid, small) = (kernel(0xb16, 50_688, 1.5), kernel(0x41d, 50_688, 0.65), kernel(0x5a1, 50_688, 0.18));
        Some(match name {
            // Tenants start 6 s apart: each runs alone first, then shares.
            "staggered" => Self::base(
                name,
                36.0,
                vec![
                    (101, vec![phase(0.0, 36.0, big, 30.0)]),
                    (102, vec![phase(6.0, 36.0, small, 20.0)]),
                    (103, vec![phase(12.0, 36.0, mid, 25.0)]),
                ],
            ),
            // Everyone's load changes every few seconds, out of step (the
            // tenants start a second apart).
            "varying" => {
                let steps = |offset: f64, every: f64, kernel: Kernel, loads: &[f64]| -> Vec<Phase> {
                    loads
                        .iter()
                        .enumerate()
                        .map(|(i, &load)| {
                            phase(offset + i as f64 * every, offset + (i + 1) as f64 * every, kernel, load)
                        })
                        .collect()
                };
                Self::base(
                    name,
                    38.0,
                    vec![
                        (201, steps(0.0, 4.0, big, &[20., 10., 30., 15., 5., 25., 10., 30., 20.])),
                        (202, steps(1.0, 3.0, small, &[5., 20., 10., 30., 15., 5., 25., 10., 20., 30., 5., 15.])),
                        (203, steps(2.0, 5.0, mid, &[25., 10., 35., 5., 20., 30., 15.])),
                    ],
                )
            }
            // A tenant changes batch size every 3 s at the same busy share:
            // same function, new launch size and cost per launch.
            "batch-change" => {
                let sizes = [kernel(0xa, 12_288, 0.09), kernel(0xa, 49_152, 0.35), kernel(0xa, 24_576, 0.18)];
                Self::base(
                    name,
                    36.0,
                    vec![
                        (
                            301,
                            (0..12).map(|i| phase(i as f64 * 3.0, i as f64 * 3.0 + 3.0, sizes[i % 3], 35.0)).collect(),
                        ),
                        (302, vec![phase(0.0, 36.0, small, 30.0)]),
                    ],
                )
            }
            // Constant mix from the start: only the sum is observable.
            "steady" => Self::base(
                name,
                30.0,
                vec![
                    (401, vec![phase(0.0, 30.0, big, 30.0)]),
                    (402, vec![phase(0.0, 30.0, small, 20.0)]),
                    (403, vec![phase(0.0, 30.0, mid, 25.0)]),
                ],
            ),
            // Shaped like the held-out H100 trace of issue 23: four tenants
            // started within 1.4 s, three steady at similar duties with very
            // different kernels (one launch-bound), one switching on and off
            // every 3 s; the switching costs more than its own work.
            "co-started" => {
                let tiny = kernel(0x2048, 50_688, 0.03);
                let on_off: Vec<Phase> =
                    (0..7).map(|i| phase(0.9 + i as f64 * 6.0, 0.9 + i as f64 * 6.0 + 3.0, mid, 25.0)).collect();
                Self {
                    overhead_points: 3.0,
                    ..Self::base(
                        name,
                        42.0,
                        vec![
                            (451, vec![phase(0.0, 42.0, big, 15.0)]),
                            (452, vec![phase(0.4, 42.0, tiny, 15.0)]),
                            (453, on_off),
                            (454, vec![phase(1.4, 42.0, kernel(0x6144, 50_688, 0.65), 10.0)]),
                        ],
                    )
                }
            }
            // A tenant arrives, leaves, and another (new kernels) arrives.
            "come-and-go" => Self::base(
                name,
                40.0,
                vec![
                    (501, vec![phase(0.0, 40.0, mid, 30.0)]),
                    (502, vec![phase(5.0, 18.0, big, 40.0)]),
                    (503, vec![phase(24.0, 40.0, small, 25.0)]),
                ],
            ),
            // A model-serving-like tenant with a dozen kernels, beside a
            // one-kernel tenant; it runs alone first.
            "many-kernels" => {
                let mut serving: Vec<Phase> = (0..12u64)
                    .map(|i| phase(0.0, 36.0, kernel(0x1000 + i, 4_096 * (i + 1), 0.02 * (i + 1) as f64), 3.0))
                    .collect();
                serving.push(phase(0.0, 36.0, kernel(0x2000, 65_536, 0.4), 4.0));
                Self::base(name, 36.0, vec![(601, serving), (602, vec![phase(8.0, 36.0, big, 30.0)])])
            }
            // As "staggered", under MPS: NVML names only the server.
            "mps-staggered" => Self { sharing: Sharing::Mps, overhead_points: 0.0, ..Self::builtin("staggered")? },
            _ => return None,
        })
    }

    /// Names of the built-in scenarios.
    pub const BUILTIN: [&'static str; 8] = [
        "staggered",
        "varying",
        "batch-change",
        "steady",
        "co-started",
        "come-and-go",
        "many-kernels",
        "mps-staggered",
    ];

    /// Busy fraction of `pid` at `t` (seconds from the start) when alone.
    fn busy(&self, phases: &[Phase], t: f64) -> f64 {
        phases.iter().filter(|p| p.from_s <= t && t < p.to_s).map(|p| p.launches_per_s * p.kernel.cost_s).sum()
    }

    /// Generates the trace and its launch file.
    pub fn generate(&self) -> (Trace, Vec<LaunchLine>) {
        let steps = (self.duration_s / STEP).round() as usize;
        let mut device = Vec::with_capacity(steps);
        let mut outstanding = Outstanding::new(self);
        let mut busy_of: Vec<Vec<f64>> = vec![Vec::with_capacity(steps); self.tenants.len()];
        // Fraction of each tenant's demand the GPU served at each step.
        let mut served_of: Vec<Vec<f64>> = vec![Vec::with_capacity(steps); self.tenants.len()];
        for step in 0..steps {
            let t = step as f64 * STEP;
            if step % 50 == 0 {
                outstanding.snapshot();
            }
            let demand: Vec<f64> = self.tenants.iter().map(|(_, phases)| self.busy(phases, t)).collect();
            let active = demand.iter().filter(|&&d| d > 0.0).count();
            // Context switches (time-slicing) or contention (MPS): either
            // way the device is busier than the tenants' own work.
            let overhead = self.overhead_points / 100.0 * active.saturating_sub(1) as f64;
            let served = serve(&demand, (1.0 - overhead).max(0.0));
            outstanding.step(&served);
            let mut total = 0.0;
            for (index, (&wanted, &got)) in demand.iter().zip(&served).enumerate() {
                busy_of[index].push(got);
                served_of[index].push(if wanted > 0.0 { got / wanted } else { 1.0 });
                total += got;
            }
            device.push((total + overhead).min(1.0));
        }
        let mut noise = Lcg(0x5eed ^ self.name.len() as u64);
        let mut count_noise = Lcg(0xc0a7 ^ self.name.len() as u64);
        let per_period = (self.util_period_s / STEP).round().max(1.0) as usize;
        let mut device_util = Vec::new();
        let mut nvml = Vec::new();
        let mut named: Option<usize> = None;
        for step in (25..steps).step_by(25) {
            let from = step.saturating_sub(per_period);
            let mean = device[from..step].iter().sum::<f64>() / (step - from) as f64;
            let t = START + step as f64 * STEP;
            let util = (100.0 * mean + self.noise_points * noise.symmetric()).clamp(0.0, 100.0).round();
            device_util.push((t, util));
            // NVML's per-process view: one process named, sticky, holding
            // the whole device's number.
            let busy_now: Vec<f64> = busy_of.iter().map(|b| b[step - 1]).collect();
            if named.is_none_or(|i| busy_now[i] == 0.0) {
                named = (0..busy_now.len())
                    .filter(|&i| busy_now[i] > 0.0)
                    .max_by(|&a, &b| busy_now[a].total_cmp(&busy_now[b]));
            }
            if let Some(index) = named {
                let pid = if self.sharing == Sharing::Mps { 1 } else { self.tenants[index].0 };
                nvml.push((pid, (t * 1e6) as u64, util));
            }
        }
        let tenants = self
            .tenants
            .iter()
            .zip(&busy_of)
            .map(|((pid, phases), busy)| {
                let first = phases.iter().map(|p| p.from_s).fold(f64::INFINITY, f64::min);
                let last = phases.iter().map(|p| p.to_s).fold(0.0, f64::max);
                let per = (0.1 / STEP).round() as usize;
                let periods = (0..steps / per)
                    .filter(|i| {
                        let t = (i * per) as f64 * STEP;
                        t >= first && t < last
                    })
                    .map(|i| {
                        let work: f64 = busy[i * per..(i + 1) * per].iter().sum::<f64>() * STEP;
                        vec![START + ((i + 1) * per) as f64 * STEP, work, per as f64 * STEP]
                    })
                    .collect();
                Tenant { pid: *pid, segments: Vec::new(), periods }
            })
            .collect();
        let mut launches = Vec::new();
        let mut cumulative: Vec<Vec<f64>> = self.tenants.iter().map(|(_, p)| vec![0.0; p.len()]).collect();
        // What the reads report: each read's increment off by the noise.
        let mut reported = cumulative.clone();
        let mut read_until = cumulative.clone();
        for step in 0..=steps {
            let t = step as f64 * STEP;
            if step % 50 == 0 {
                for ((counts, seen), until) in cumulative.iter().zip(reported.iter_mut()).zip(read_until.iter_mut()) {
                    for ((&count, seen), until) in counts.iter().zip(seen.iter_mut()).zip(until.iter_mut()) {
                        let error = self.launch_count_noise * count_noise.symmetric();
                        *seen += (count - *until) * (1.0 + error);
                        *until = count;
                    }
                }
                let mut rows: Vec<(u32, u32, u64, u64, u64)> = Vec::new();
                for ((pid, phases), counts) in self.tenants.iter().zip(&reported) {
                    for (phase, &count) in phases.iter().zip(counts) {
                        let n = count.floor() as u64;
                        if n == 0 {
                            continue;
                        }
                        // Phases of one kernel accumulate in one row.
                        match rows.iter_mut().find(|r| r.0 == *pid && r.2 == phase.kernel.function) {
                            Some(row) => {
                                row.3 += n;
                                row.4 += n * phase.kernel.threads;
                            }
                            None => rows.push((*pid, 1, phase.kernel.function, n, n * phase.kernel.threads)),
                        }
                    }
                }
                let mut kernels: Vec<(u32, u64, u64)> = self
                    .tenants
                    .iter()
                    .flat_map(|(pid, phases)| {
                        phases.iter().filter_map(|p| Some((*pid, p.kernel.function, p.kernel.identity?)))
                    })
                    .filter(|(pid, function, _)| rows.iter().any(|r| r.0 == *pid && r.2 == *function))
                    .collect();
                kernels.sort_unstable();
                kernels.dedup();
                let spans = outstanding.at(step / 50);
                launches.push(LaunchLine { t: START + t, rows, kernels, spans, spans_lost: 0 });
            }
            for (((_, phases), counts), served) in self.tenants.iter().zip(cumulative.iter_mut()).zip(&served_of) {
                let served = served.get(step).copied().unwrap_or(1.0);
                for (phase, count) in phases.iter().zip(counts.iter_mut()) {
                    if phase.from_s <= t && t < phase.to_s {
                        *count += phase.launches_per_s * served * STEP;
                    }
                }
            }
        }
        let trace = Trace {
            scenario: self.name.clone(),
            gpu: "synthetic".into(),
            driver: String::new(),
            sharing: Some(self.sharing),
            tenants,
            device_util,
            nvml_process_samples: nvml,
        };
        (trace, launches)
    }
}

/// The completion spans the tenants' waits show, integrated step by step.
/// A tenant served `g` of the GPU with efficiency `e` has work outstanding
/// `g / (e · a)` of the time, where `a` is the part of the GPU it gets
/// while outstanding: `E[1 / (1 + K)]` for the `K` other tenants
/// outstanding at the same instant (a time-slicing scheduler takes turns
/// between contexts with work; outstanding times taken as independent).
/// Its fair span time counts `1 / n` of every instant with `n` tenants
/// outstanding as the probes see them: a tenant that never waits counts
/// as always outstanding, which is what its open span says.
struct Outstanding {
    models: Vec<Option<SpanModel>>,
    pids: Vec<u32>,
    started: Vec<bool>,
    /// Cumulative busy seconds, fair seconds and spans closed.
    busy: Vec<f64>,
    fair: Vec<f64>,
    closed: Vec<u64>,
    snapshots: Vec<Vec<(u32, f64, f64, u64)>>,
}

impl Outstanding {
    fn new(scenario: &Scenario) -> Self {
        let models: Vec<Option<SpanModel>> = scenario
            .tenants
            .iter()
            .map(|(pid, _)| scenario.span_models.iter().find(|m| m.pid == *pid).copied())
            .collect();
        let n = models.len();
        Self {
            models,
            pids: scenario.tenants.iter().map(|(pid, _)| *pid).collect(),
            started: vec![false; n],
            busy: vec![0.0; n],
            fair: vec![0.0; n],
            closed: vec![0; n],
            snapshots: Vec::new(),
        }
    }

    fn step(&mut self, served: &[f64]) {
        if self.models.iter().all(Option::is_none) {
            return;
        }
        let efficiency: Vec<f64> =
            self.models.iter().map(|m| m.map_or(1.0, |m| m.efficiency.clamp(0.05, 1.0))).collect();
        let mut outstanding: Vec<f64> = served.iter().zip(&efficiency).map(|(g, e)| (g / e).min(1.0)).collect();
        for _ in 0..3 {
            let turn = turn_while_outstanding(&outstanding);
            for (i, o) in outstanding.iter_mut().enumerate() {
                *o = (served[i] / (efficiency[i] * turn[i])).min(1.0);
            }
        }
        let seen: Vec<f64> = (0..served.len())
            .map(|i| {
                self.started[i] |= served[i] > 0.0;
                match self.models[i] {
                    Some(model) if model.waits => outstanding[i],
                    _ if self.started[i] => 1.0,
                    _ => 0.0,
                }
            })
            .collect();
        let turn = turn_while_outstanding(&seen);
        for i in 0..served.len() {
            self.busy[i] += seen[i] * STEP;
            self.fair[i] += seen[i] * turn[i] * STEP;
            if self.models[i].is_some_and(|m| m.waits) && outstanding[i] > 0.0 {
                self.closed[i] += 1;
            }
        }
    }

    fn snapshot(&mut self) {
        let line = (0..self.pids.len())
            .filter(|&i| self.models[i].is_some() && self.started[i])
            .map(|i| (self.pids[i], self.busy[i], self.fair[i], self.closed[i]))
            .collect();
        self.snapshots.push(line);
    }

    /// The cumulative spans at snapshot `index` (the last one past the end).
    fn at(&mut self, index: usize) -> Vec<(u32, f64, f64, u64)> {
        if index >= self.snapshots.len() {
            self.snapshot();
        }
        self.snapshots[index.min(self.snapshots.len() - 1)].clone()
    }
}

/// `E[1 / (1 + K_i)]` for each tenant, where `K_i` counts the others
/// outstanding, each independently with its probability in `outstanding`.
fn turn_while_outstanding(outstanding: &[f64]) -> Vec<f64> {
    (0..outstanding.len())
        .map(|i| {
            // Distribution of K_i, built one tenant at a time.
            let mut others = vec![1.0];
            for (j, &o) in outstanding.iter().enumerate() {
                if j == i {
                    continue;
                }
                let mut next = vec![0.0; others.len() + 1];
                for (k, p) in others.iter().enumerate() {
                    next[k] += p * (1.0 - o);
                    next[k + 1] += p * o;
                }
                others = next;
            }
            others.iter().enumerate().map(|(k, p)| p / (1 + k) as f64).sum()
        })
        .collect()
}

/// What a saturated GPU gives each tenant of `demand` (busy fractions)
/// within `capacity`: a time-slicing scheduler serves every context in
/// turn, so tenants wanting less than an equal slice get what they want
/// and the rest share what is left equally (max-min fairness). Their
/// launches slow down with them: a tenant served half its demand
/// completes, and so issues, half its launches.
fn serve(demand: &[f64], capacity: f64) -> Vec<f64> {
    let total: f64 = demand.iter().sum();
    if total <= capacity {
        return demand.to_vec();
    }
    let mut order: Vec<usize> = (0..demand.len()).filter(|&i| demand[i] > 0.0).collect();
    order.sort_by(|&a, &b| demand[a].total_cmp(&demand[b]));
    let mut served = vec![0.0; demand.len()];
    let mut left = capacity;
    for (position, &index) in order.iter().enumerate() {
        let slice = left / (order.len() - position) as f64;
        served[index] = demand[index].min(slice);
        left -= served[index];
    }
    served
}

/// A small deterministic generator for reading noise and for the sweep's
/// scenarios (`generator`).
pub(crate) struct Lcg(u64);

impl Lcg {
    /// A generator started from `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next raw 64-bit state.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0
    }

    /// Uniform in [-1, 1).
    pub(crate) fn symmetric(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under capacity everyone gets what they ask; over it, tenants asking
    /// less than an equal slice keep their demand and the rest share what
    /// is left equally.
    #[test]
    fn a_saturated_gpu_serves_max_min_fair_shares() {
        assert_eq!(serve(&[0.2, 0.3], 1.0), vec![0.2, 0.3]);
        let served = serve(&[0.2, 0.5, 0.6, 0.0], 0.9);
        assert!((served[0] - 0.2).abs() < 1e-12 && served[3] == 0.0, "{served:?}");
        assert!((served[1] - 0.35).abs() < 1e-12 && (served[2] - 0.35).abs() < 1e-12, "{served:?}");
    }

    /// A generated trace never shows more work than the device had: the
    /// tenants' true work plus the overhead fits under 100 %, and their
    /// launches slow down with them.
    #[test]
    fn oversubscribed_tenants_are_slowed_not_clipped() {
        let big = kernel(0xb16, 50_688, 1.0);
        let scenario = Scenario::base(
            "oversubscribed",
            10.0,
            vec![(1, vec![phase(0.0, 10.0, big, 70.0)]), (2, vec![phase(5.0, 10.0, big, 70.0)])],
        );
        let (trace, launches) = scenario.generate();
        let work_in = |pid: u32, from: f64, to: f64| -> f64 {
            let tenant = trace.tenants.iter().find(|t| t.pid == pid).unwrap();
            let periods: Vec<&Vec<f64>> =
                tenant.periods.iter().filter(|p| p[0] - START > from && p[0] - START <= to).collect();
            periods.iter().map(|p| p[1]).sum::<f64>() / periods.iter().map(|p| p[2]).sum::<f64>()
        };
        assert!((work_in(1, 1.0, 5.0) - 0.70).abs() < 0.01, "alone it gets its demand");
        let together = work_in(1, 6.0, 10.0) + work_in(2, 6.0, 10.0);
        assert!(together <= 1.0 - 0.015 + 1e-9, "work plus overhead fits the device: {together}");
        assert!((work_in(1, 6.0, 10.0) - work_in(2, 6.0, 10.0)).abs() < 0.01, "equal demands, equal shares");
        // Launches follow the work served: tenant 1's rate falls when 2 joins.
        let count_at = |t: f64| -> u64 {
            let line =
                launches.iter().min_by(|a, b| (a.t - START - t).abs().total_cmp(&(b.t - START - t).abs())).unwrap();
            line.rows.iter().filter(|r| r.0 == 1).map(|r| r.3).sum()
        };
        let alone = (count_at(5.0) - count_at(3.0)) as f64;
        let shared = (count_at(9.0) - count_at(7.0)) as f64;
        assert!((shared / alone - 0.4925 / 0.70).abs() < 0.03, "alone {alone} shared {shared}");
    }
}
