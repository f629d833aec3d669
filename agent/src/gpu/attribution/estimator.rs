//! The per-GPU estimator: turns one window of device utilization, launch
//! counts and NVML samples into per-process shares, learning launch costs
//! in a `CostFilter` as windows go by.
//!
//! Per window, in order:
//! 1. Launch counts become rates per cost key (process, function, launch
//!    size class). A key joins the filter once its rate held steady for
//!    two windows; its prior is stated in share points (±`prior_share`),
//!    so that whatever the data cannot separate is split evenly between
//!    processes rather than by launch count. Keys whose kernel identity is
//!    known (`LaunchCount::kernel`) share one state per (kernel, size
//!    class) across processes: a cost learned in one process is where
//!    every other that launches the same kernel starts (held loosely, by
//!    a difference of its own, until its own windows confirm it), and two
//!    replicas started together are split by their launches, not by the
//!    prior.
//! 2. A key whose rate jumps gets process noise in proportion to the
//!    jump: at a fixed duty a new batch size moves launches per second
//!    and cost per launch together, and the device utilization that
//!    follows says which of the two moved.
//! 3. The window's device utilization updates the filter. Its noise grows
//!    with how much the mix changed inside the window (NVML averages over
//!    its own sample period, so a transition window is misaligned with
//!    the counts) and with keys that are not yet learned.
//! 4. Predicted shares are reconciled with the device utilization: the
//!    residual goes to processes in proportion to how uncertain their
//!    prediction is (a new process whose costs are unknown takes what the
//!    known ones do not explain, a process that just stopped takes what
//!    the lagging reading still shows of it), and shares never sum above
//!    it. A share's σ keeps how far its process moved inside the window.
//! 5. What the data cannot separate is split evenly, or by fair span time
//!    where completion spans are seen (`spans`): shares whose split σ is
//!    large move toward their part of the uncertain ones' sum, so an
//!    unobservable split does not depend on the order in which co-started
//!    processes were admitted.
//! 6. Completion spans bound every share (`spans::bound`): no process is
//!    given more than its time with work outstanding, and σ narrows to
//!    the bounds where they are tighter.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::catalog::LearnedCost;
use super::filter::{CostFilter, Slot};
pub use super::rates::CostKey;
use super::rates::{per_pid, rates};
use super::shares::{confidence_of, nvml_only, sane, split_where_unseparable};
use super::spans;
use super::{Attribution, Basis, ProcessShare, Window};
use crate::gpu::Sharing;

pub use super::config::{EstimatorConfig, SETTINGS};

/// Most a rate jump may loosen a cost by, relative to the cost (a rate
/// that fell 10x).
const MAX_COST_JUMP: f64 = 9.0;

/// Windows an unlearned key may launch in without holding a steady rate
/// before it joins the filter anyway.
const UNSTEADY_ADMISSION: u32 = 3;

/// The size of the cost on `slot`, for a difference stated relative to
/// it: its mean, or its σ while that is larger. A slot opened in the
/// window its replicas started holds only the prior's part of what the
/// lagging reading showed, often about nothing; a difference scaled by
/// that mean was pinned near 0, and the replicas were split by their
/// launches as if measured, whatever their batches.
fn cost_scale(filter: &CostFilter, slot: Slot) -> f64 {
    filter.mean(slot).max(filter.variance(slot).max(0.0).sqrt())
}

/// How much looser than learned a catalog cost starts (relative σ).
const CATALOG_LOOSENING: f64 = 0.1;

/// What the estimator remembers about one key.
#[derive(Clone, Debug, Default)]
struct Tracked {
    slot: Option<Slot>,
    /// How much this process's launches of a shared kernel cost more (or
    /// less) than the shared cost. Opened when the process joins a cost
    /// learned elsewhere (σ `shared_cost_spread` of it: the same kernel
    /// and grid do more work on a larger batch or context), or when its
    /// rate jumps while others share the cost (a batch change moves its
    /// cost per launch and nobody else's). Its mean starts at 0, so a rate
    /// that moved alone (a ramp, an on/off load) keeps the key on the
    /// shared cost, and the device utilization says which moved.
    delta: Option<Slot>,
    /// (kernel identity, size class) when the kernel is known across
    /// processes: keys with the same one share a slot.
    identity: Option<(u64, u8)>,
    last_rate: f64,
    /// The key's part of its process's launches in the last window.
    last_weight: f64,
    /// Windows the key launched in before it was admitted.
    unsteady_windows: u32,
    reference_rate: f64,
    jump: f64,
    hold: u8,
    idle_s: f64,
}

/// One GPU's estimator.
#[derive(Clone, Debug)]
pub struct Estimator {
    config: EstimatorConfig,
    filter: CostFilter,
    keys: HashMap<CostKey, Tracked>,
    /// The slot of each known kernel (identity, size class), shared by
    /// every process that launches it.
    shared: HashMap<(u64, u8), Slot>,
    /// Costs from the node's catalog (`catalog`), by kernel: a slot opens
    /// with the cost when a process launches the kernel.
    known: HashMap<(u64, u8), (f64, f64)>,
    /// Slot of the time-slicing overhead state (time-sliced GPUs only).
    overhead: Option<Slot>,
    sharing: Sharing,
    /// The span bounds of the windows the device reading still covers.
    recent_bounds: spans::RecentBounds,
}

impl Estimator {
    /// A fresh estimator for a GPU shared as `sharing`.
    pub fn new(config: EstimatorConfig, sharing: Sharing) -> Self {
        let mut filter = CostFilter::default();
        // Under MPS kernels of different clients overlap: there is no
        // switching cost to learn, only concurrency.
        let overhead =
            (sharing == Sharing::TimeSliced).then(|| filter.push(config.overhead_mean, config.overhead_prior.powi(2)));
        Self {
            config,
            filter,
            keys: HashMap::new(),
            shared: HashMap::new(),
            known: HashMap::new(),
            overhead,
            sharing,
            recent_bounds: Default::default(),
        }
    }

    /// Seeds kernel costs learned before (the node's catalog): a process
    /// launching one of these kernels starts from its cost.
    pub fn seed(&mut self, costs: &[LearnedCost]) {
        for cost in costs {
            // What the catalog knew was learned under other mixes: held a
            // little looser than it was learned.
            let variance = cost.variance.max((CATALOG_LOOSENING * cost.cost).powi(2));
            self.known.insert((cost.kernel, cost.size_class), (cost.cost, variance));
        }
    }

    /// Kernel costs this estimator pinned (relative σ under a quarter),
    /// for the node's catalog, stamped `now_unix`.
    pub fn learned_costs(&self, now_unix: f64) -> Vec<LearnedCost> {
        let mut learned: Vec<LearnedCost> = self
            .shared
            .iter()
            .filter_map(|(&(kernel, size_class), &slot)| {
                let (cost, variance) = (self.filter.mean(slot), self.filter.variance(slot));
                (cost > 0.0 && variance.sqrt() < 0.25 * cost).then_some(LearnedCost {
                    kernel,
                    size_class,
                    cost,
                    variance,
                    seen_unix: now_unix,
                })
            })
            .collect();
        learned.sort_by_key(|c| (c.kernel, c.size_class));
        learned
    }

    /// Keys the filter holds now.
    pub fn learned_keys(&self) -> usize {
        self.keys.values().filter(|t| t.slot.is_some()).count()
    }

    /// States the filter holds (costs, differences, the overhead).
    #[cfg(test)]
    pub(super) fn state_count(&self) -> usize {
        self.filter.len()
    }

    /// Folds one window in and returns its attribution; `None` when the
    /// device utilization is unknown (no share can be bounded).
    pub fn observe(&mut self, window: &Window) -> Option<Attribution> {
        // Inputs come from other threads and from trace files: anything
        // not a plain number is left out rather than poisoning the state.
        let util = window.device_util.filter(|u| u.is_finite())?.clamp(0.0, 100.0);
        let Some(launches) = &window.launches else {
            return Some(nvml_only(util, &window.nvml));
        };
        let duration = if window.duration_s.is_finite() { window.duration_s.clamp(1e-3, 3600.0) } else { 1.0 };
        let (rates, identities) = rates(launches, duration, self.config.max_keys_per_process, |key| {
            self.keys.get(key).is_some_and(|t| t.slot.is_some())
        });
        let pid_rates = per_pid(&rates);
        let cfg = self.config;

        // Steps 1 and 2: admit steady keys, loosen the costs of jumps.
        let mut pending: BTreeSet<u32> = BTreeSet::new();
        let mut entering: Vec<(CostKey, f64, f64)> = Vec::new();
        let mut moved = 0.0;
        // Points of share each process moved by inside the window.
        let mut moved_by: BTreeMap<u32, f64> = BTreeMap::new();
        let mut explained = 0.0;
        // Processes whose costs a rate jump loosened this window: their σ
        // is a transient, not an unobservable split.
        let mut loosened: BTreeSet<u32> = BTreeSet::new();
        let mut all: Vec<CostKey> = self.keys.keys().chain(rates.keys()).copied().collect();
        all.sort_unstable();
        all.dedup();
        // Shared slots get their drift once per window, not once per process.
        let mut diffused: BTreeSet<Slot> = BTreeSet::new();
        // The processes on each slot, for the slots kernels share.
        let mut slot_pids: HashMap<Slot, BTreeSet<u32>> = HashMap::new();
        for (key, tracked) in &self.keys {
            if let Some(slot) = tracked.slot {
                slot_pids.entry(slot).or_default().insert(key.pid);
            }
        }
        for key in all {
            let rate = rates.get(&key).copied().unwrap_or(0.0);
            let tracked = self.keys.entry(key).or_default();
            if let Some(identity) = identities.get(&key) {
                tracked.identity = Some((*identity, key.size_class));
            }
            // A kernel another process runs (or ran) is already learned: a
            // new process launching it starts from that cost.
            if tracked.slot.is_none() && rate > 0.0 {
                if let Some(identity) = tracked.identity {
                    let slot = match (self.shared.get(&identity), self.known.get(&identity)) {
                        (Some(&slot), _) => Some(slot),
                        // Known from the catalog: its slot opens now.
                        (None, Some(&(cost, variance))) => {
                            let slot = self.filter.push(cost, variance);
                            self.shared.insert(identity, slot);
                            Some(slot)
                        }
                        (None, None) => None,
                    };
                    if let Some(slot) = slot {
                        tracked.slot = Some(slot);
                        tracked.reference_rate = rate;
                        tracked.last_rate = rate;
                        // Learned in another process (or before): this
                        // process's launches may do more or less work, by
                        // an amount only its own data can tell.
                        let spread = cfg.shared_cost_spread * cost_scale(&self.filter, slot);
                        tracked.delta = Some(self.filter.push_signed(0.0, spread.powi(2)));
                    }
                }
            }
            match tracked.slot {
                None => {
                    let steady = rate > 0.0 && (rate - tracked.last_rate).abs() <= cfg.jump_tolerance * rate;
                    if rate > 0.0 {
                        tracked.unsteady_windows += 1;
                    }
                    // A load that toggles faster than two windows is never
                    // steady, yet its toggles are the best evidence of its
                    // cost there is: after a few windows it joins anyway,
                    // at the prior's full width.
                    let steady = steady || (rate > 0.0 && tracked.unsteady_windows > UNSTEADY_ADMISSION);
                    let weight = rate / pid_rates.get(&key.pid).copied().unwrap_or(rate).max(f64::MIN_POSITIVE);
                    if steady {
                        entering.push((key, rate, weight));
                    } else if rate > 0.0 {
                        pending.insert(key.pid);
                        moved += cfg.prior_share * weight;
                    } else if tracked.last_rate > 0.0 {
                        // An unlearned key that just stopped: the reading
                        // lags the counts and may still hold some of it,
                        // by an amount nobody knows. Its process takes the
                        // residual first, and the window teaches little, so
                        // a neighbour's cost is not pulled up by its tail.
                        let tail = cfg.prior_share * tracked.last_weight;
                        moved += tail;
                        *moved_by.entry(key.pid).or_default() += tail;
                    }
                    tracked.last_weight = weight;
                }
                Some(slot) => {
                    let cost = self.filter.mean(slot) + tracked.delta.map_or(0.0, |delta| self.filter.mean(delta));
                    explained += cost * rate;
                    let jump = (rate - tracked.last_rate).abs() / rate.max(tracked.last_rate).max(f64::MIN_POSITIVE);
                    if jump > cfg.jump_tolerance {
                        tracked.hold = cfg.jump_hold;
                        // How far the cost moves if the share held (a batch
                        // change at a fixed duty): a rate that fell 4x may
                        // mean a cost 4x higher (+300 %), one that rose 4x
                        // a cost 4x lower (-75 %). Scaled by the jump
                        // itself (|Δrate| / max), a fall loosened the cost a
                        // quarter of what it may need, and shares of loads
                        // whose batches grow stayed low.
                        tracked.jump =
                            if rate > 0.0 { (tracked.last_rate / rate - 1.0).abs().min(MAX_COST_JUMP) } else { jump };
                        // The same kernel need not cost the same in every
                        // process: a larger batch or a longer context at
                        // the same launch geometry costs more per launch.
                        // A process whose rate jumps may be the one whose
                        // cost moved, so its difference from the shared
                        // cost gets the jump's looseness, instead of the
                        // shared cost dragging its neighbours' shares
                        // along.
                        let shared_with_others =
                            slot_pids.get(&slot).is_some_and(|pids| pids.iter().any(|&pid| pid != key.pid));
                        if rate > 0.0 && shared_with_others && tracked.delta.is_none() {
                            tracked.delta = Some(self.filter.push_signed(0.0, 0.0));
                        }
                    }
                    let noise = (cfg.cost_drift * cost).powi(2) + (cfg.share_drift / tracked.reference_rate).powi(2);
                    let mut jump_noise = 0.0;
                    if tracked.hold > 0 {
                        loosened.insert(key.pid);
                        jump_noise = (cfg.jump_gain * tracked.jump * cost).powi(2);
                        // A cost learned small loosens little by itself: the
                        // share gets at least the floor's looseness.
                        if rate > 0.0 {
                            jump_noise = jump_noise.max((cfg.jump_share_floor * util / rate).powi(2));
                        }
                        tracked.hold -= 1;
                    }
                    match tracked.delta {
                        Some(delta) => {
                            self.filter.diffuse(delta, jump_noise);
                            if diffused.insert(slot) {
                                self.filter.diffuse(slot, noise);
                            }
                        }
                        None => {
                            if diffused.insert(slot) {
                                self.filter.diffuse(slot, noise + jump_noise);
                            }
                        }
                    }
                    moved += (rate - tracked.last_rate).abs() * cost;
                    *moved_by.entry(key.pid).or_default() += (rate - tracked.last_rate).abs() * cost;
                }
            }
            tracked.last_rate = rate;
            tracked.idle_s = if rate > 0.0 { 0.0 } else { tracked.idle_s + duration };
        }
        // A process NVML saw busy whose launches the probes did not see
        // (its libcuda not found yet, or launches made some other way)
        // holds the unexplained part too: without it that part would be
        // nobody's, and its pod would read a made-up 0. Not under MPS,
        // where NVML's only busy process is the server, doing everyone's
        // work.
        // Its NVML value is the best guess there is for it (a prior the
        // reconciliation corrects).
        let mut unseen: BTreeMap<u32, f64> = BTreeMap::new();
        if self.sharing != Sharing::Mps {
            for (pid, sm) in sane(&window.nvml) {
                if sm > 0.0 && !pid_rates.contains_key(&pid) {
                    pending.insert(pid);
                    unseen.insert(pid, sm);
                }
            }
        }
        let active = pid_rates.values().filter(|&&rate| rate > 0.0).count();
        // A key's prior mean is its process's part of what the learned keys
        // leave unexplained (split evenly between the processes still
        // unexplained): a zero prior would pull the learned costs up to
        // cover it as soon as the new key joins.
        let overhead_now = self.overhead.map_or(0.0, |slot| self.filter.mean(slot) * active.saturating_sub(1) as f64);
        let unexplained = (util - explained - overhead_now).max(0.0);
        let newcomers: BTreeSet<u32> =
            entering.iter().map(|(key, _, _)| key.pid).chain(pending.iter().copied()).collect();
        let per_newcomer = unexplained / newcomers.len().max(1) as f64;
        for (key, rate, weight) in entering {
            let identity = self.keys.get(&key).and_then(|t| t.identity);
            // Two processes starting the same kernel in one window share
            // the slot the first one opened, and the second keeps a
            // difference of its own, as one joining later does: replicas
            // started together are split by their launches, but a larger
            // batch in one of them costs more per launch at the same
            // geometry (held exactly, a replica at 3x the batch read a
            // third of its share at σ 0.4, `sweep-3-36`).
            let mut delta = None;
            let slot = match identity.and_then(|identity| self.shared.get(&identity)) {
                Some(&slot) => {
                    let spread = cfg.shared_cost_spread * cost_scale(&self.filter, slot);
                    delta = Some(self.filter.push_signed(0.0, spread.powi(2)));
                    slot
                }
                None => {
                    let slot =
                        self.filter.push(per_newcomer * weight / rate, (cfg.prior_share * weight / rate).powi(2));
                    if let Some(identity) = identity {
                        self.shared.insert(identity, slot);
                    }
                    slot
                }
            };
            let tracked = self.keys.get_mut(&key).expect("entering keys are tracked");
            tracked.slot = Some(slot);
            tracked.delta = tracked.delta.or(delta);
            tracked.reference_rate = rate;
        }

        // Step 3: learn from the device utilization.
        let mut h = vec![0.0; self.filter.len()];
        for (key, tracked) in &self.keys {
            if let Some(slot) = tracked.slot {
                let rate = rates.get(key).copied().unwrap_or(0.0);
                h[slot] += rate;
                if let Some(delta) = tracked.delta {
                    h[delta] += rate;
                }
            }
        }
        let measured_active = h.iter().any(|&v| v > 0.0);
        if let Some(slot) = self.overhead {
            h[slot] = active.saturating_sub(1) as f64;
            self.filter.diffuse(slot, 0.01);
        }
        if measured_active {
            let noise = cfg.util_noise.powi(2) + (cfg.misalignment_gain * moved).powi(2);
            self.filter.update(&h, util, noise);
            if !self.filter.is_finite() {
                // Unreachable with sane inputs; if it happens, start over
                // rather than serve numbers from a broken state.
                tracing::warn!("attribution state diverged; relearning this GPU's launch costs");
                *self = Self::new(cfg, self.sharing);
                return Some(nvml_only(util, &window.nvml));
            }
        }

        let mut by_pid: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        for (key, tracked) in &self.keys {
            let (Some(slot), Some(&rate)) = (tracked.slot, rates.get(key)) else { continue };
            if rate <= 0.0 {
                continue;
            }
            let hp = by_pid.entry(key.pid).or_insert_with(|| vec![0.0; self.filter.len()]);
            hp[slot] += rate;
            if let Some(delta) = tracked.delta {
                hp[delta] += rate;
            }
        }
        // Step 3b: costs that put a process outside its span bounds, as
        // they hold for the reading (which reaches back), are moved onto
        // the bound it breaks.
        let evidence = spans::evidence(&window.spans, duration);
        let reach = self.recent_bounds.reach(&evidence, pid_rates.keys().copied(), duration, cfg.reading_period_s);
        let unsettled: BTreeSet<u32> = pending.union(&loosened).copied().collect();
        spans::hold_costs_within(&mut self.filter, &by_pid, &reach, &unsettled, util - overhead_now, cfg.util_noise);

        // Step 4: shares, reconciled with the device utilization.
        let mut predicted: BTreeMap<u32, (f64, f64)> = BTreeMap::new();
        for (pid, hp) in &by_pid {
            predicted.insert(*pid, (self.filter.predict(hp), self.filter.variance_of(hp)));
        }
        for pid in &pending {
            let entry = predicted.entry(*pid).or_insert((0.0, 0.0));
            entry.0 += unseen.get(pid).copied().unwrap_or(0.0);
            entry.1 += cfg.prior_share.powi(2);
        }
        // The reading averages over its own period, so it lags the counts:
        // a process that just stopped still shows in it, one that just
        // started does not yet. Whoever moved inside the window takes the
        // residual first (by how far it moved), so the lagging work lands
        // on the process that did it, not on its neighbours.
        for (&pid, &own_move) in &moved_by {
            if own_move > 0.0 {
                predicted.entry(pid).or_insert((0.0, 0.0)).1 += own_move.powi(2);
            }
        }
        let overhead = self.overhead.map_or(0.0, |slot| self.filter.mean(slot) * h[slot]).clamp(0.0, util);
        let available = util - overhead;
        let explained: f64 = predicted.values().map(|(share, _)| share).sum();
        let total_variance: f64 = predicted.values().map(|(_, variance)| variance).sum();
        let residual = available - explained;
        let mut split_variances = Vec::with_capacity(predicted.len());
        let mut processes: Vec<ProcessShare> = predicted
            .iter()
            .map(|(&pid, &(share, variance))| {
                let part = if total_variance > 0.0 { variance / total_variance } else { 0.0 };
                let posterior = variance * (1.0 - variance / (total_variance + cfg.util_noise.powi(2)));
                let settled = !loosened.contains(&pid) && !pending.contains(&pid);
                split_variances.push(if settled { posterior.max(0.0) } else { 0.0 });
                // A process whose load moved inside the window is compared
                // with a reading that averaged part of the window before
                // the move: its share is off by up to what moved.
                let own_move = moved_by.get(&pid).copied().unwrap_or(0.0);
                // The reconciliation cannot undo the reading's lag: what the
                // process moved by stays in its σ whoever took the residual.
                let uncertainty = (posterior.max(0.0) + own_move.powi(2)).sqrt();
                let basis = if pending.contains(&pid) && !by_pid.contains_key(&pid) {
                    Basis::Residual
                } else {
                    Basis::from_uncertainty(uncertainty, cfg.prior_share)
                };
                ProcessShare {
                    pid,
                    util_percent: (share + residual * part).max(0.0),
                    uncertainty_points: Some(uncertainty),
                    confidence: confidence_of(uncertainty),
                    basis,
                }
            })
            .collect();
        split_where_unseparable(&mut processes, &split_variances, cfg.fallback_scale, |shares, pulled| {
            spans::split_weights(shares, pulled, &evidence)
        });
        let total: f64 = processes.iter().map(|p| p.util_percent).sum();
        if total > available && total > 0.0 {
            let scale = available.max(0.0) / total;
            processes.iter_mut().for_each(|p| p.util_percent *= scale);
        }
        spans::bound(&mut processes, &evidence, &reach, available.max(0.0), cfg.util_noise);
        self.forget_idle();
        Some(Attribution::new(util, overhead, processes))
    }

    /// Drops keys idle longer than the TTL (their processes have gone or
    /// stopped using them), with their filter states.
    fn forget_idle(&mut self) {
        let ttl = self.config.key_ttl_s;
        let expired: Vec<CostKey> = self.keys.iter().filter(|(_, t)| t.idle_s > ttl).map(|(k, _)| *k).collect();
        for key in expired {
            let Some(tracked) = self.keys.remove(&key) else { continue };
            let mut slot = tracked.slot;
            if let Some(delta) = tracked.delta {
                self.drop_slot(delta);
                // The removed key's own slot is not shifted with the rest.
                slot = slot.map(|slot| if slot > delta { slot - 1 } else { slot });
            }
            let Some(slot) = slot else { continue };
            // A kernel other processes still launch keeps its cost.
            if self.keys.values().any(|other| other.slot == Some(slot)) {
                continue;
            }
            // A pinned kernel cost outlives its processes: the next process
            // launching the kernel starts from it.
            let (cost, variance) = (self.filter.mean(slot), self.filter.variance(slot));
            for (&identity, _) in self.shared.iter().filter(|(_, shared)| **shared == slot) {
                if cost > 0.0 && variance.sqrt() < 0.25 * cost {
                    self.known.insert(identity, (cost, variance));
                }
            }
            self.shared.retain(|_, shared| *shared != slot);
            self.drop_slot(slot);
        }
    }

    /// Removes a state from the filter; the slots after it move down.
    fn drop_slot(&mut self, slot: Slot) {
        self.filter.remove(slot);
        let shift = |s: &mut Slot| {
            if *s > slot {
                *s -= 1;
            }
        };
        for other in self.keys.values_mut() {
            other.slot.iter_mut().chain(other.delta.iter_mut()).for_each(shift);
        }
        self.shared.values_mut().for_each(shift);
        self.overhead.iter_mut().for_each(shift);
    }
}
