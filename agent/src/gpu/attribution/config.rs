//! The estimator's settings (`EstimatorConfig`): physical scales with
//! defaults, and the names `replay --set` changes them by.

/// Tuning of the model. The defaults are physical scales (points of GPU
/// %, fractions), not fitted to any trace.
#[derive(Clone, Copy, Debug)]
pub struct EstimatorConfig {
    /// Prior standard deviation of one process's share, points.
    pub prior_share: f64,
    /// Standard deviation of one device-utilization reading, points.
    pub util_noise: f64,
    /// Relative drift of a cost per window.
    pub cost_drift: f64,
    /// Absolute drift of a key's share per window, points.
    pub share_drift: f64,
    /// Process noise per unit of relative rate jump (times the cost).
    pub jump_gain: f64,
    /// Windows a jump keeps a cost loose.
    pub jump_hold: u8,
    /// Relative rate change that counts as a jump. A duty loop of 100 ms
    /// periods moves by one period in five (±20%) between 0.5 s windows
    /// without any change of load: that is noise, not a jump.
    pub jump_tolerance: f64,
    /// Observation noise per point of share that moved inside the window.
    pub misalignment_gain: f64,
    /// Prior standard deviation of the time-slicing overhead, points per
    /// active process beyond the first. The H100 traces showed 1.5 to 9
    /// points per extra tenant (the three small tenants of
    /// `docs/platform.md`: 4.9), so the prior reaches past 9 at 1.5σ.
    pub overhead_prior: f64,
    /// Prior mean of the time-slicing overhead, points per active process
    /// beyond the first: what the four recorded H100 traces show (1.3 to
    /// 3.6 over the tenants' own work). At 0 the overhead was never
    /// learned (tenants arriving bring it with their own costs, and
    /// nothing tells the two apart) and was booked on the processes.
    pub overhead_mean: f64,
    /// Seconds without launches after which a key is forgotten.
    pub key_ttl_s: f64,
    /// Most keys one process keeps apart; its rarer keys share one.
    pub max_keys_per_process: usize,
    /// Split σ (points) beyond which a share leans on the even split.
    pub fallback_scale: f64,
    /// How far (relative σ) one process's cost per launch of a kernel may
    /// be from the cost another process learned for it: the same kernel
    /// at the same grid does more work on a larger batch or context.
    pub shared_cost_spread: f64,
    /// Longest period the device reading averages over, seconds: how far
    /// back the completion spans' bounds must reach (NVML's sample period
    /// on the H100 read 0.2-1 s).
    pub reading_period_s: f64,
    /// Least looseness a rate jump gives a process's share, as a fraction
    /// of the device reading (σ). The jump's own looseness scales with the
    /// cost learned before it, and a share misattributed small stays
    /// pinned small by it: a rate that fell 6x at a fixed share then
    /// "proves" the cost near 0. A tenth of the device is a share that a
    /// batch change can move, whatever was learned.
    pub jump_share_floor: f64,
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        Self {
            prior_share: 30.0,
            util_noise: 3.0,
            cost_drift: 0.02,
            share_drift: 0.3,
            jump_gain: 2.0,
            jump_hold: 2,
            jump_tolerance: 0.2,
            misalignment_gain: 4.0,
            overhead_prior: 6.0,
            overhead_mean: 2.0,
            key_ttl_s: 60.0,
            max_keys_per_process: 8,
            fallback_scale: 15.0,
            shared_cost_spread: 0.5,
            reading_period_s: 1.0,
            jump_share_floor: 0.1,
        }
    }
}

/// The settings `EstimatorConfig::set` knows, for `replay --set`.
pub const SETTINGS: [&str; 16] = [
    "prior_share",
    "util_noise",
    "cost_drift",
    "share_drift",
    "jump_gain",
    "jump_hold",
    "jump_tolerance",
    "misalignment_gain",
    "overhead_prior",
    "overhead_mean",
    "key_ttl_s",
    "max_keys_per_process",
    "fallback_scale",
    "shared_cost_spread",
    "reading_period_s",
    "jump_share_floor",
];

impl EstimatorConfig {
    /// Sets one setting by name (`SETTINGS`), as `replay --set NAME=VALUE`
    /// does to try settings on traces without a rebuild.
    pub fn set(&mut self, name: &str, value: f64) -> Result<(), String> {
        if !value.is_finite() || value < 0.0 {
            return Err(format!("{name}: expected a finite number at least 0, got {value}"));
        }
        let whole = |value: f64| value.round().min(255.0) as u8;
        match name {
            "prior_share" => self.prior_share = value,
            "util_noise" => self.util_noise = value,
            "cost_drift" => self.cost_drift = value,
            "share_drift" => self.share_drift = value,
            "jump_gain" => self.jump_gain = value,
            "jump_hold" => self.jump_hold = whole(value),
            "jump_tolerance" => self.jump_tolerance = value,
            "misalignment_gain" => self.misalignment_gain = value,
            "overhead_prior" => self.overhead_prior = value,
            "overhead_mean" => self.overhead_mean = value,
            "key_ttl_s" => self.key_ttl_s = value,
            "max_keys_per_process" => self.max_keys_per_process = (value.round() as usize).max(1),
            "fallback_scale" => self.fallback_scale = value,
            "jump_share_floor" => self.jump_share_floor = value,
            "shared_cost_spread" => self.shared_cost_spread = value,
            "reading_period_s" => self.reading_period_s = value,
            _ => return Err(format!("unknown setting {name:?}; known: {}", SETTINGS.join(", "))),
        }
        Ok(())
    }
}
