//! Keeps launch accounting within its overhead budget. A probed launch
//! costs the launching thread a uprobe trap (`LaunchProbe::calibrate`
//! measures it on the node: ~1.4 µs on an H200 host), so a tenant making
//! `rate` launches a second loses `rate x cost` of its time while the
//! probes are attached. Below the budget they stay attached and counts are
//! exact; above it they are attached for `duty = budget / (rate x cost)` of
//! each interval and the counts of that part are scaled up to the interval.
//!
//! What a sample measures is the rate while probed. A thread that does
//! nothing but launch is slowed by the traps themselves (`1 / (work +
//! cost)` instead of `1 / work`), so for it the estimate reads low by the
//! probed load `rate x cost` (the node reports the busiest process's).
//! No correction is applied: it needs the trap cost of the tenant's own
//! entry points, which differs from the calibration's by up to 2x
//! (measured), and near saturation that error is amplified, not removed.
use std::collections::HashMap;

use podgpu_common::LaunchKey;

/// The least part of a second the probes are attached (a safety floor:
/// a rate seen while attached is at most 1 / cost, so the duty a budget
/// asks for never falls below the budget itself).
pub const MIN_DUTY: f64 = 0.005;

/// Chooses the attached part of each second.
#[derive(Clone, Copy, Debug)]
pub struct Sampler {
    /// Fraction of a launch-bound tenant's time the probes may take.
    pub budget: f64,
    /// Time one probed launch costs, seconds.
    pub hit_cost_s: f64,
}

impl Sampler {
    /// The part of the next second to attach for, given the busiest
    /// process's launch rate (launches per second, estimated).
    pub fn duty(&self, busiest_rate: f64) -> f64 {
        let load = busiest_rate * self.hit_cost_s;
        if load <= self.budget {
            1.0
        } else {
            (self.budget / load).clamp(MIN_DUTY, 1.0)
        }
    }
}

/// One read's timing.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Seconds the probes counted.
    pub attached_s: f64,
    /// Seconds since the previous read.
    pub period_s: f64,
}

/// Launch counts estimated from sampled reads.
#[derive(Debug, Default)]
pub struct Estimates {
    /// Raw kernel counts at the previous read.
    previous: HashMap<LaunchKey, u64>,
    /// Estimated launches since the key appeared.
    estimated: HashMap<LaunchKey, f64>,
}

impl Estimates {
    /// Books one read of the kernel's cumulative counts; returns the
    /// busiest process's rate of probe hits while probed (what the probes
    /// cost it: rate x cost of its time): its launches, and two hits per
    /// wait in `waits` (entry and return, since the previous read).
    pub fn book(&mut self, counts: &[(LaunchKey, u64)], waits: &HashMap<u32, u64>, window: Window) -> f64 {
        let deltas: Vec<(LaunchKey, u64)> = counts
            .iter()
            .map(|(key, raw)| (*key, raw.saturating_sub(self.previous.insert(*key, *raw).unwrap_or(0))))
            .collect();
        let mut probed: HashMap<u32, f64> = HashMap::new();
        for (key, added) in &deltas {
            *probed.entry(key.tgid).or_default() += *added as f64;
        }
        for (tgid, waited) in waits {
            *probed.entry(*tgid).or_default() += 2.0 * *waited as f64;
        }
        let attached_s = window.attached_s.max(1e-6);
        // Counted the whole period: exact, nothing to scale.
        let scale = if window.attached_s < window.period_s * 0.99 { window.period_s / attached_s } else { 1.0 };
        for (key, added) in deltas {
            *self.estimated.entry(key).or_default() += added as f64 * scale;
        }
        probed.into_values().fold(0.0, f64::max) / attached_s
    }

    /// Whether no launch has been booked yet.
    pub fn is_empty(&self) -> bool {
        self.estimated.is_empty()
    }

    /// Estimated launches of `key` so far.
    pub fn launches(&self, key: &LaunchKey) -> u64 {
        self.estimated.get(key).map_or(0, |launches| launches.round() as u64)
    }

    /// Forgets keys the kernel map no longer holds.
    pub fn forget(&mut self, keys: &[LaunchKey]) {
        for key in keys {
            self.previous.remove(key);
            self.estimated.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tgid: u32, function: u64) -> LaunchKey {
        LaunchKey { tgid, function, ..LaunchKey::default() }
    }

    #[test]
    fn duty_is_full_within_budget_and_shrinks_with_load() {
        let sampler = Sampler { budget: 0.01, hit_cost_s: 1.4e-6 };
        assert_eq!(sampler.duty(0.0), 1.0);
        assert_eq!(sampler.duty(7_000.0), 1.0);
        // 114k launches/s: 16% of the time in traps when attached.
        let duty = sampler.duty(114_000.0);
        assert!((duty - 0.01 / (114_000.0 * 1.4e-6)).abs() < 1e-9, "{duty}");
        assert!(duty * 114_000.0 * 1.4e-6 <= 0.01 + 1e-12, "the loss stays within the budget");
        assert_eq!(sampler.duty(1e12), MIN_DUTY);
    }

    #[test]
    fn sampled_counts_scale_and_exact_counts_do_not() {
        let mut estimates = Estimates::default();
        let full = Window { attached_s: 1.0, period_s: 1.0 };
        let rate = estimates.book(&[(key(1, 7), 100), (key(1, 8), 50), (key(2, 7), 20)], &HashMap::new(), full);
        assert_eq!(rate, 150.0);
        assert_eq!(estimates.launches(&key(1, 7)), 100);
        // The next second attached for a tenth of it: 30 seen, 300
        // estimated.
        let tenth = Window { attached_s: 0.1, ..full };
        let rate = estimates.book(&[(key(1, 7), 130), (key(1, 8), 50), (key(2, 7), 20)], &HashMap::new(), tenth);
        assert_eq!(rate, 300.0);
        assert_eq!(estimates.launches(&key(1, 7)), 400);
        estimates.forget(&[key(1, 7)]);
        assert_eq!(estimates.launches(&key(1, 7)), 0);
    }

    /// A wait costs its thread two probe hits (entry and return): a
    /// process that waits after every launch is the busiest at a third of
    /// the other's launch rate.
    #[test]
    fn waits_count_against_the_budget() {
        let mut estimates = Estimates::default();
        let full = Window { attached_s: 1.0, period_s: 1.0 };
        let waits = HashMap::from([(2, 100)]);
        let rate = estimates.book(&[(key(1, 7), 250), (key(2, 7), 100)], &waits, full);
        assert_eq!(rate, 300.0);
        assert_eq!(estimates.launches(&key(2, 7)), 100, "waits are not launches");
    }
}
