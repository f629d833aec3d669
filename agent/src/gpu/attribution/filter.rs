//! The cost filter: a Kalman filter over what one launch of each key costs
//! (GPU %·s per launch), plus one state for the time-slicing overhead per
//! extra active process.
//!
//! Each window gives one scalar observation, the device utilization
//! `U = Σ cost_k · rate_k + overhead · (active − 1) + noise`. A filter
//! keeps the full covariance between costs, which is what makes it fit
//! this problem: a window where one key runs alone pins that key's cost
//! (its row of the covariance collapses), windows where rates vary
//! separate costs as a regression would, and when nothing varies only
//! the sum is learned while each split stays as uncertain as its prior,
//! which the caller reports as low confidence instead of a guess dressed
//! up as a measurement.
//!
//! States are added and removed as keys come and go; the covariance is a
//! dense row-major matrix (a GPU has tens of keys, not thousands).

/// Index of a state in the filter.
pub type Slot = usize;

/// Mean and covariance of the cost states.
#[derive(Clone, Debug, Default)]
pub struct CostFilter {
    mean: Vec<f64>,
    /// States that may go below zero (a process's difference from a
    /// shared kernel cost), left out of the non-negative projection.
    signed: Vec<bool>,
    /// Row-major, `mean.len()` squared.
    covariance: Vec<f64>,
}

impl CostFilter {
    /// Number of states.
    pub fn len(&self) -> usize {
        self.mean.len()
    }

    /// Whether every mean and covariance entry is a finite number.
    pub fn is_finite(&self) -> bool {
        self.mean.iter().chain(&self.covariance).all(|v| v.is_finite())
    }

    /// Current mean of `slot`.
    pub fn mean(&self, slot: Slot) -> f64 {
        self.mean[slot]
    }

    /// Current variance of `slot`.
    pub fn variance(&self, slot: Slot) -> f64 {
        self.covariance[slot * self.len() + slot]
    }

    /// Adds a state uncorrelated with the others; returns its slot.
    pub fn push(&mut self, mean: f64, variance: f64) -> Slot {
        self.push_state(mean, variance, false)
    }

    /// Adds a state that may go below zero (a correction to another
    /// state), uncorrelated with the others; returns its slot.
    pub fn push_signed(&mut self, mean: f64, variance: f64) -> Slot {
        self.push_state(mean, variance, true)
    }

    fn push_state(&mut self, mean: f64, variance: f64, signed: bool) -> Slot {
        let n = self.len();
        let mut grown = vec![0.0; (n + 1) * (n + 1)];
        for row in 0..n {
            grown[row * (n + 1)..row * (n + 1) + n].copy_from_slice(&self.covariance[row * n..(row + 1) * n]);
        }
        grown[n * (n + 1) + n] = variance;
        self.covariance = grown;
        self.mean.push(mean);
        self.signed.push(signed);
        n
    }

    /// Removes `slot`; the states after it move down by one.
    pub fn remove(&mut self, slot: Slot) {
        let n = self.len();
        let mut shrunk = Vec::with_capacity((n - 1) * (n - 1));
        for row in (0..n).filter(|&row| row != slot) {
            for col in (0..n).filter(|&col| col != slot) {
                shrunk.push(self.covariance[row * n + col]);
            }
        }
        self.covariance = shrunk;
        self.mean.remove(slot);
        self.signed.remove(slot);
    }

    /// Adds process noise to one state's variance (its cost may have moved).
    pub fn diffuse(&mut self, slot: Slot, variance: f64) {
        let n = self.len();
        self.covariance[slot * n + slot] += variance;
    }

    /// `hᵀ P h`: the variance of the linear combination `h · state`.
    pub fn variance_of(&self, h: &[f64]) -> f64 {
        let n = self.len();
        let mut total = 0.0;
        for (row, &hr) in h.iter().enumerate().filter(|(_, &v)| v != 0.0) {
            let line = &self.covariance[row * n..(row + 1) * n];
            total += hr * line.iter().zip(h).map(|(p, hc)| p * hc).sum::<f64>();
        }
        total
    }

    /// `h · mean`.
    pub fn predict(&self, h: &[f64]) -> f64 {
        self.mean.iter().zip(h).map(|(m, hv)| m * hv).sum()
    }

    /// One measurement update with observation `observed = h · state +
    /// noise(noise_variance)`. Costs cannot be negative: the mean is
    /// projected onto the bound afterwards (`project_nonnegative`).
    pub fn update(&mut self, h: &[f64], observed: f64, noise_variance: f64) {
        self.update_unbounded(h, observed, noise_variance);
        self.project_nonnegative();
    }

    /// Moves the mean so that `h · x` reads `value`, along the covariance
    /// (the states that explain `h · x` take up the change in proportion
    /// to how uncertain they are), and keeps the covariance: an
    /// inequality the state broke (a completion span's bound) says where
    /// the state is not, not that it is known. Feeding the bound as a
    /// measurement instead, window after window, shrinks the variance as
    /// if every window had measured the share at the bound.
    pub fn project(&mut self, h: &[f64], value: f64) {
        let n = self.len();
        debug_assert_eq!(h.len(), n);
        let ph: Vec<f64> = (0..n)
            .map(|row| self.covariance[row * n..(row + 1) * n].iter().zip(h).map(|(p, hv)| p * hv).sum())
            .collect();
        let spread = h.iter().zip(&ph).map(|(hv, p)| hv * p).sum::<f64>();
        if !(spread.is_finite() && spread > 0.0) {
            return;
        }
        let miss = value - self.predict(h);
        for (mean, p) in self.mean.iter_mut().zip(&ph) {
            *mean += p / spread * miss;
        }
        self.project_nonnegative();
    }

    fn update_unbounded(&mut self, h: &[f64], observed: f64, noise_variance: f64) {
        let n = self.len();
        debug_assert_eq!(h.len(), n);
        // P h
        let ph: Vec<f64> = (0..n)
            .map(|row| self.covariance[row * n..(row + 1) * n].iter().zip(h).map(|(p, hv)| p * hv).sum())
            .collect();
        let innovation_variance = h.iter().zip(&ph).map(|(hv, p)| hv * p).sum::<f64>() + noise_variance;
        if !(innovation_variance.is_finite() && innovation_variance > 0.0) {
            return;
        }
        let innovation = observed - self.predict(h);
        for (row, &p_row) in ph.iter().enumerate() {
            let gain = p_row / innovation_variance;
            self.mean[row] += gain * innovation;
            for (cell, p_col) in self.covariance[row * n..(row + 1) * n].iter_mut().zip(&ph) {
                *cell -= gain * p_col;
            }
        }
        // Keep it symmetric and its diagonal non-negative against rounding.
        for row in 0..n {
            self.covariance[row * n + row] = self.covariance[row * n + row].max(0.0);
            for col in row + 1..n {
                let mean = 0.5 * (self.covariance[row * n + col] + self.covariance[col * n + row]);
                self.covariance[row * n + col] = mean;
                self.covariance[col * n + row] = mean;
            }
        }
    }

    /// Costs cannot be negative. Clamping a state at zero on its own
    /// would break what the filter knows about sums: keys that always move
    /// together (one process's kernels) are learned as a sum with strongly
    /// anti-correlated parts, and zeroing one part drops the sum, which
    /// the next update then books on another process. Instead the mean is
    /// projected onto the bound along the covariance (the correlated states
    /// take up what the clamped one gave back), one violated state at a
    /// time; the covariance is kept.
    fn project_nonnegative(&mut self) {
        let n = self.len();
        let mut pinned = vec![false; n];
        for _ in 0..n {
            let Some(slot) = (0..n)
                .filter(|&slot| self.mean[slot] < 0.0 && !pinned[slot] && !self.signed[slot])
                .min_by(|&a, &b| self.mean[a].total_cmp(&self.mean[b]))
            else {
                break;
            };
            pinned[slot] = true;
            let variance = self.covariance[slot * n + slot];
            let below = self.mean[slot];
            if variance > 0.0 {
                for (row, mean) in self.mean.iter_mut().enumerate() {
                    // States already pinned at zero stay there.
                    if !pinned[row] || row == slot {
                        *mean -= self.covariance[row * n + slot] / variance * below;
                    }
                }
            }
            self.mean[slot] = 0.0;
        }
        // Whatever is still below (pinned states nudged by later
        // projections) is clamped.
        for (mean, _) in self.mean.iter_mut().zip(&self.signed).filter(|(_, &signed)| !signed) {
            *mean = mean.max(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state observed alone converges to the observed value and its
    /// variance shrinks; a second state never observed keeps its prior.
    #[test]
    fn solo_observations_pin_a_state() {
        let mut filter = CostFilter::default();
        let a = filter.push(0.0, 100.0);
        let b = filter.push(0.0, 100.0);
        for _ in 0..20 {
            filter.update(&[1.0, 0.0], 7.0, 1.0);
        }
        assert!((filter.mean(a) - 7.0).abs() < 0.1, "{}", filter.mean(a));
        assert!(filter.variance_of(&[1.0, 0.0]) < 0.1);
        assert_eq!(filter.mean(b), 0.0);
        assert_eq!(filter.variance_of(&[0.0, 1.0]), 100.0);
    }

    /// Two states only ever observed as a sum: the sum is learned, the
    /// split stays uncertain (each variance near its prior), and the
    /// prior's symmetry decides the means.
    #[test]
    fn a_constant_mix_learns_only_the_sum() {
        let mut filter = CostFilter::default();
        filter.push(0.0, 100.0);
        filter.push(0.0, 100.0);
        for _ in 0..50 {
            filter.update(&[1.0, 1.0], 10.0, 1.0);
        }
        assert!((filter.predict(&[1.0, 1.0]) - 10.0).abs() < 0.1);
        assert!(filter.variance_of(&[1.0, 1.0]) < 0.1);
        assert!(filter.variance_of(&[1.0, 0.0]) > 40.0, "the split was learned from nothing");
        assert!((filter.mean(0) - filter.mean(1)).abs() < 1e-9);
    }

    /// Varying mixes separate the states (a regression's job).
    #[test]
    fn varying_mixes_separate_costs() {
        let mut filter = CostFilter::default();
        filter.push(0.0, 100.0);
        filter.push(0.0, 100.0);
        let truth = [2.0, 5.0];
        for step in 0..60 {
            let h = [1.0 + (step % 3) as f64, 1.0 + (step % 5) as f64];
            filter.update(&h, truth[0] * h[0] + truth[1] * h[1], 0.01);
        }
        assert!((filter.mean(0) - 2.0).abs() < 0.05 && (filter.mean(1) - 5.0).abs() < 0.05);
    }

    /// Two keys of one process always launched together are learned as a
    /// sum with anti-correlated parts. When an update drives one part
    /// below zero, the sum must survive the bound: clamping the part alone
    /// would lose what it held, and the next reading would book it on the
    /// other process.
    #[test]
    fn the_bound_keeps_what_correlated_states_sum_to() {
        let mut filter = CostFilter::default();
        filter.push(10.0, 100.0);
        filter.push(10.0, 100.0);
        filter.push(0.0, 100.0);
        // Keys 0 and 1 (process A) always at the same rate, so only their
        // sum (20) is learned; key 2 (process B, 20) varies and is learned.
        for step in 0..30 {
            let rate = 1.0 + (step % 3) as f64;
            filter.update(&[1.0, 1.0, rate], 20.0 + 20.0 * rate, 0.01);
        }
        // A reading only key 0 tripled for: 3a + b + c = 100 with a + b =
        // 20 puts b below zero.
        let reading = [3.0, 1.0, 1.0];
        let mut clamped = filter.clone();
        clamped.update_unbounded(&reading, 100.0, 0.01);
        assert!(clamped.mean(1) < 0.0, "the reading drives key 1 below zero");
        clamped.mean.iter_mut().for_each(|m| *m = m.max(0.0));
        filter.update(&reading, 100.0, 0.01);
        assert!(filter.mean.iter().all(|&m| m >= 0.0), "{:?}", filter.mean);
        let miss = |f: &CostFilter| (f.predict(&reading) - 100.0).abs();
        assert!(miss(&filter) < miss(&clamped), "projected {} clamped {}", miss(&filter), miss(&clamped));
    }

    /// A projection puts the mean on the bound along the covariance (a
    /// state correlated with the bounded one follows it) and leaves the
    /// covariance as it was.
    #[test]
    fn a_projection_moves_the_mean_and_keeps_the_covariance() {
        let mut filter = CostFilter::default();
        filter.push(10.0, 100.0);
        filter.push(10.0, 100.0);
        filter.push(5.0, 4.0);
        // Only the sum of the first two is learned: anti-correlated parts.
        filter.update(&[1.0, 1.0, 0.0], 20.0, 0.01);
        let covariance = filter.covariance.clone();
        filter.project(&[1.0, 0.0, 0.0], 4.0);
        assert!((filter.mean(0) - 4.0).abs() < 1e-9, "{:?}", filter.mean);
        assert!((filter.mean(0) + filter.mean(1) - 20.0).abs() < 0.01, "the sum holds: {:?}", filter.mean);
        assert!((filter.mean(2) - 5.0).abs() < 1e-9, "an unrelated state stays: {:?}", filter.mean);
        assert_eq!(filter.covariance, covariance);
    }

    /// Removing a state keeps the others' means and covariance.
    #[test]
    fn remove_keeps_the_rest() {
        let mut filter = CostFilter::default();
        filter.push(1.0, 1.0);
        filter.push(2.0, 2.0);
        filter.push(3.0, 3.0);
        filter.update(&[1.0, 0.0, 1.0], 5.0, 1.0);
        let before = filter.variance_of(&[1.0, 0.0, 1.0]);
        filter.remove(1);
        assert_eq!(filter.len(), 2);
        assert!((filter.variance_of(&[1.0, 1.0]) - before).abs() < 1e-12);
        assert!(filter.mean(1) > 2.9 - 1.0);
    }

    /// A signed state (a process's difference from a shared cost) may go
    /// below zero: a process running a kernel on smaller batches costs less
    /// per launch than the cost it shares. The cost it adds to stays at or
    /// above zero.
    #[test]
    fn signed_states_go_below_zero() {
        let mut filter = CostFilter::default();
        let shared = filter.push(0.1, 1e-6);
        let difference = filter.push_signed(0.0, 0.01);
        // 100 launches a second of the shared kernel read 5 %, not 10.
        for _ in 0..10 {
            filter.update(&[100.0, 100.0], 5.0, 0.01);
        }
        assert!((filter.mean(difference) + 0.05).abs() < 0.005, "{:?}", filter.mean);
        assert!(filter.mean(shared) > 0.09, "{:?}", filter.mean);
        assert!((filter.predict(&[100.0, 100.0]) - 5.0).abs() < 0.2);
    }
}
