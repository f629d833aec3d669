//! What completion spans add to a window's shares (`ProcessSpan`).
//!
//! A process's kernels can only keep the GPU busy while it has work
//! outstanding, so its span time bounds its share from above, whatever
//! the costs: a bound that needs no learning and holds for co-started,
//! steady tenants that the launch counts cannot separate. The bounds of
//! the others bound it from below (the device utilization is theirs or
//! its). Inside the bounds, what the filter cannot separate is split by
//! the fair span time (each instant shared by the processes outstanding
//! then), the split a time-slicing scheduler makes between contexts that
//! all have work: it is even when every process is always outstanding,
//! and follows their duty cycles when they are not.
//!
//! Where the bounds are tighter than the filter's σ they set it: a share
//! inside [lower, upper] is off by at most the larger gap, so σ is half
//! that gap, and a confident share is one the bounds pin.
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::filter::CostFilter;
use super::shares::confidence_of;
use super::{Basis, ProcessShare, ProcessSpan};

/// A span open over at least this part of the window with no wait seen
/// says nothing: the process may never wait (it polls, or it runs a
/// persistent kernel), not be busy.
const OPEN_ALL_WINDOW: f64 = 0.98;

/// What one process's spans say over a window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct SpanEvidence {
    /// Most GPU share it can have had, percent.
    pub upper: f64,
    /// Its fair span time as a fraction of the window (`None`: not all
    /// span events of the window were seen).
    pub fair: Option<f64>,
}

/// Cumulative spans of one read: `[pid, busy_s, fair_s, closed]` per
/// process, and the span events lost so far.
pub type CumulativeSpans<'a> = (&'a [(u32, f64, f64, u64)], u64);

/// Each process's spans between two reads of cumulative spans. A process
/// not in the earlier read has no spans in this window (the later read is
/// its baseline: after a failed read, its whole history is not one
/// window's), nor has one whose sums went back (a new process under the
/// pid). Fair times are unknown when span events were lost in between.
pub fn between(before: CumulativeSpans, after: CumulativeSpans) -> Vec<ProcessSpan> {
    let previous: HashMap<u32, (f64, f64, u64)> =
        before.0.iter().map(|&(pid, busy, fair, closed)| (pid, (busy, fair, closed))).collect();
    let complete = after.1 == before.1;
    after
        .0
        .iter()
        .filter_map(|&(pid, busy, fair, closed)| {
            let &(busy0, fair0, closed0) = previous.get(&pid)?;
            (busy >= busy0 && closed >= closed0).then(|| ProcessSpan {
                pid,
                busy_s: busy - busy0,
                fair_s: complete.then_some((fair - fair0).max(0.0)),
                closed: closed - closed0,
            })
        })
        .collect()
}

/// The evidence of each process whose spans say something, by pid.
pub(super) fn evidence(spans: &[ProcessSpan], duration_s: f64) -> HashMap<u32, SpanEvidence> {
    let plain = |v: f64| v.is_finite() && v >= 0.0;
    spans
        .iter()
        .filter(|span| plain(span.busy_s) && span.fair_s.is_none_or(plain))
        .filter(|span| span.closed > 0 || span.busy_s < OPEN_ALL_WINDOW * duration_s)
        .map(|span| {
            let busy = (span.busy_s / duration_s).min(1.0);
            let fair = span.fair_s.map(|fair| (fair / duration_s).min(busy));
            (span.pid, SpanEvidence { upper: 100.0 * busy, fair })
        })
        .collect()
}

/// Windows of span bounds kept for the readings that reach back: more
/// than a second of 0.5 s windows, with room for shorter ones.
const RECENT_WINDOWS: usize = 8;

/// The span bounds of the windows a device reading may still cover.
///
/// NVML averages the utilization over its own sample period (0.2-1 s on
/// the H100, `docs/attribution.md`), so a window's reading holds work
/// done before the window began: a process that stopped just before it
/// owns part of the reading while its spans in the window read 0. Its
/// bound on the reading is its busiest window over the reading's reach.
#[derive(Clone, Debug, Default)]
pub(super) struct RecentBounds {
    /// Oldest first: each window's duration and, per process that ran in
    /// it, its upper bound (`None`: it launched, but its spans said
    /// nothing).
    windows: VecDeque<(f64, HashMap<u32, Option<f64>>)>,
}

impl RecentBounds {
    /// This window's bounds as they hold for its device reading: each
    /// upper bound widened to the busiest of the windows the reading
    /// reaches back into (`reading_period_s` before this one), none for a
    /// process that ran there with spans that said nothing. Then this
    /// window is remembered. `running`: the processes that launched in it.
    pub fn reach(
        &mut self,
        evidence: &HashMap<u32, SpanEvidence>,
        running: impl Iterator<Item = u32>,
        duration_s: f64,
        reading_period_s: f64,
    ) -> HashMap<u32, SpanEvidence> {
        let mut reach = evidence.clone();
        let mut reached = 0.0;
        for (duration, uppers) in self.windows.iter().rev() {
            if reached >= reading_period_s {
                break;
            }
            reached += duration;
            for (pid, bound) in reach.iter_mut() {
                match uppers.get(pid) {
                    Some(Some(upper)) => bound.upper = bound.upper.max(*upper),
                    Some(None) => bound.upper = f64::INFINITY,
                    // Not running then: it added nothing to the reading.
                    None => {}
                }
            }
        }
        let mut now: HashMap<u32, Option<f64>> = running.map(|pid| (pid, None)).collect();
        now.extend(evidence.iter().map(|(&pid, e)| (pid, Some(e.upper))));
        if self.windows.len() == RECENT_WINDOWS {
            self.windows.pop_front();
        }
        self.windows.push_back((duration_s.max(0.0), now));
        reach
    }
}

/// The weight each process's share of an unseparable sum gets: its fair
/// span time where every process pulled toward the split has one
/// (`pulled`: which are), else `None` (the even split).
pub(super) fn split_weights(
    processes: &[ProcessShare],
    pulled: &[bool],
    evidence: &HashMap<u32, SpanEvidence>,
) -> Option<Vec<f64>> {
    let fair: Vec<Option<f64>> = processes.iter().map(|p| evidence.get(&p.pid).and_then(|e| e.fair)).collect();
    let covered = processes.iter().zip(pulled).zip(&fair).all(|((_, &pulled), fair)| !pulled || fair.is_some());
    let any_pulled_busy = pulled.iter().zip(&fair).any(|(&pulled, fair)| pulled && fair.unwrap_or(0.0) > 0.0);
    (covered && any_pulled_busy).then(|| fair.into_iter().map(|fair| fair.unwrap_or(0.0)).collect())
}

/// Each of `pids`' bounds on its share, `(lower, upper)` percent: above,
/// its busy span time (the device's utilization for a process without
/// spans); below, what the device showed less what all the others can
/// have used, with two reading σ of margin.
fn bounds(pids: &[u32], evidence: &HashMap<u32, SpanEvidence>, available: f64, reading_noise: f64) -> Vec<(f64, f64)> {
    // What the overhead leaves may read below 0 on a noisy reading.
    let available = available.max(0.0);
    let upper: Vec<f64> =
        pids.iter().map(|pid| evidence.get(pid).map_or(available, |e| e.upper.min(available))).collect();
    let upper_sum: f64 = upper.iter().sum();
    upper.iter().map(|&high| ((available - 2.0 * reading_noise - (upper_sum - high)).clamp(0.0, high), high)).collect()
}

/// Teaches the filter the bounds that hold for the window's reading
/// (`reach`, `RecentBounds`: a reading that reaches back into windows
/// where a neighbour was still busy gives nobody a floor from that
/// neighbour's span time now): the costs of a settled process (none
/// of them new or just loosened) that predict a share above its upper
/// bound, or below its lower one, by more than the reading noise are
/// moved onto that bound, with their covariance kept
/// (`CostFilter::project`). A bound says where the share is not, never
/// how sure the costs are: taken as a measurement, the same loose bound
/// window after window pinned a share at it with a σ of 2-3 points (a
/// launch-bound tenant whose span time is three times its GPU time read
/// 13 % "measured" for a truth of 3.6). Inside the bounds nothing is
/// learned: pulling toward a bound's middle would bias every share
/// bounded loosely. What is learned here holds in the windows after,
/// when the spans overlap and bound less.
pub(super) fn hold_costs_within(
    filter: &mut CostFilter,
    by_pid: &BTreeMap<u32, Vec<f64>>,
    reach: &HashMap<u32, SpanEvidence>,
    unsettled: &BTreeSet<u32>,
    available: f64,
    reading_noise: f64,
) {
    if reach.is_empty() {
        return;
    }
    // Whoever the reading may hold: those launching now, those still
    // settling, and those whose spans it reaches (a neighbour that just
    // stopped launching is one of them).
    let active: Vec<u32> =
        by_pid.keys().chain(unsettled).chain(reach.keys()).copied().collect::<BTreeSet<u32>>().into_iter().collect();
    let limits: HashMap<u32, (f64, f64)> =
        active.iter().copied().zip(bounds(&active, reach, available, reading_noise)).collect();
    for (pid, h) in by_pid {
        if unsettled.contains(pid) || !reach.contains_key(pid) {
            continue;
        }
        let (low, high) = limits[pid];
        let predicted = filter.predict(h);
        let bound = if predicted > high + reading_noise {
            high
        } else if predicted < low - reading_noise {
            low
        } else {
            continue;
        };
        filter.project(h, bound);
    }
}

/// Holds every share inside what this window's spans allow and narrows σ
/// to the bounds that hold for its reading (`reach`, `RecentBounds`): a
/// share pinned by this window's bounds alone may still be off by what
/// the reading holds of the windows before, so its σ does not shrink
/// below that. `available` is the device utilization the shares split,
/// `reading_noise` the σ of that reading (the lower bounds, which lean on
/// it, keep two of them as margin). What a share sheds above its upper
/// bound goes to the others with room, in proportion to their variance;
/// a sum the bounds cannot hold (overhead the model missed) is left
/// unassigned rather than booked on a process that cannot have done it.
pub(super) fn bound(
    processes: &mut [ProcessShare],
    evidence: &HashMap<u32, SpanEvidence>,
    reach: &HashMap<u32, SpanEvidence>,
    available: f64,
    reading_noise: f64,
) {
    if evidence.is_empty() || processes.is_empty() {
        return;
    }
    let pids: Vec<u32> = processes.iter().map(|p| p.pid).collect();
    let (lower, upper): (Vec<f64>, Vec<f64>) = bounds(&pids, evidence, available, reading_noise).into_iter().unzip();
    let variance = |p: &ProcessShare| p.uncertainty_points.unwrap_or(0.0).powi(2).max(1e-6);
    for _ in 0..=processes.len() {
        let mut surplus = 0.0;
        for ((process, &low), &high) in processes.iter_mut().zip(&lower).zip(&upper) {
            let held = process.util_percent.clamp(low, high);
            surplus += process.util_percent - held;
            process.util_percent = held;
        }
        if surplus.abs() < 1e-9 {
            break;
        }
        let room = |p: &ProcessShare, low: f64, high: f64| {
            if surplus > 0.0 {
                high - p.util_percent
            } else {
                p.util_percent - low
            }
        };
        let weights: Vec<f64> = processes
            .iter()
            .zip(&lower)
            .zip(&upper)
            .map(|((p, &low), &high)| if room(p, low, high) > 1e-9 { variance(p) } else { 0.0 })
            .collect();
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            break;
        }
        for (process, weight) in processes.iter_mut().zip(&weights) {
            process.util_percent += surplus * weight / total;
        }
    }
    let (lower, upper): (Vec<f64>, Vec<f64>) = bounds(&pids, reach, available, reading_noise).into_iter().unzip();
    for ((process, &low), &high) in processes.iter_mut().zip(&lower).zip(&upper) {
        let Some(sigma) = process.uncertainty_points else { continue };
        let widest = (process.util_percent - low).max(high - process.util_percent).max(0.0);
        if widest / 2.0 < sigma {
            process.uncertainty_points = Some(widest / 2.0);
            process.confidence = confidence_of(widest / 2.0);
            if matches!(process.basis, Basis::Prior | Basis::Partial | Basis::Residual) {
                process.basis = Basis::Bounded;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(pid: u32, util_percent: f64, sigma: f64) -> ProcessShare {
        ProcessShare {
            pid,
            util_percent,
            uncertainty_points: Some(sigma),
            confidence: confidence_of(sigma),
            basis: Basis::Prior,
        }
    }

    fn span(pid: u32, busy_s: f64, fair_s: f64, closed: u64) -> ProcessSpan {
        ProcessSpan { pid, busy_s, fair_s: Some(fair_s), closed }
    }

    /// A span open all window with no wait says nothing; one that closed,
    /// or was open for part of the window, bounds its process.
    #[test]
    fn only_spans_that_end_or_pause_are_evidence() {
        let seen = evidence(&[span(1, 1.0, 0.5, 0), span(2, 1.0, 0.5, 3), span(3, 0.3, 0.2, 0)], 1.0);
        assert!(!seen.contains_key(&1));
        assert_eq!(seen[&2].upper, 100.0);
        assert!((seen[&3].upper - 30.0).abs() < 1e-9 && seen[&3].fair == Some(0.2));
        let lost = ProcessSpan { fair_s: None, ..span(4, 0.2, 0.0, 1) };
        assert_eq!(evidence(&[lost], 1.0)[&4].fair, None);
    }

    /// The unseparable split follows fair span time only when every
    /// process pulled toward it has one.
    #[test]
    fn fair_weights_need_every_pulled_process() {
        let shares = [share(1, 20.0, 30.0), share(2, 20.0, 30.0), share(3, 10.0, 1.0)];
        let mut seen = evidence(&[span(1, 0.9, 0.6, 2), span(2, 0.3, 0.15, 2)], 1.0);
        assert_eq!(split_weights(&shares, &[true, true, false], &seen), Some(vec![0.6, 0.15, 0.0]));
        seen.remove(&2);
        assert_eq!(split_weights(&shares, &[true, true, false], &seen), None);
    }

    /// A share above what its spans allow sheds the excess to the others,
    /// the sum is kept, and σ narrows to the bounds: a process outstanding
    /// 12 % of the window cannot have used 23 %.
    #[test]
    fn shares_stay_inside_their_spans() {
        let mut shares = [share(1, 13.0, 20.0), share(2, 4.0, 20.0), share(3, 23.0, 20.0)];
        let seen = evidence(&[span(1, 0.2, 0.1, 5), span(2, 0.2, 0.1, 5), span(3, 0.12, 0.06, 5)], 1.0);
        bound(&mut shares, &seen, &seen, 40.0, 3.0);
        let values: Vec<f64> = shares.iter().map(|s| s.util_percent).collect();
        assert!((values.iter().sum::<f64>() - 40.0).abs() < 1e-6, "{values:?}");
        assert!(values[2] <= 12.0 + 1e-9 && values.iter().all(|&v| v <= 20.0 + 1e-9), "{values:?}");
        for s in &shares {
            assert!(s.uncertainty_points.unwrap() <= 10.0, "{s:?}");
            assert_eq!(s.basis, Basis::Bounded);
        }
        // Bounds that cannot hold the sum leave the rest unassigned.
        let mut tight = [share(1, 30.0, 20.0), share(2, 30.0, 20.0)];
        let seen = evidence(&[span(1, 0.2, 0.1, 5), span(2, 0.2, 0.1, 5)], 1.0);
        bound(&mut tight, &seen, &seen, 60.0, 3.0);
        assert!(tight.iter().all(|s| (s.util_percent - 20.0).abs() < 1e-9), "{tight:?}");
    }

    /// Two 0.5 s windows: process 1 busy 60 % in the first and stopped in
    /// the second, process 2 busy `steady_s` seconds in each. This
    /// window's evidence and its reach over a 1 s reading.
    fn a_neighbour_stops(steady_s: f64) -> (HashMap<u32, SpanEvidence>, HashMap<u32, SpanEvidence>) {
        let before = evidence(&[span(1, 0.3, 0.2, 4), span(2, steady_s, 0.05, 4)], 0.5);
        let now = evidence(&[span(1, 0.0, 0.0, 0), span(2, steady_s, 0.05, 4)], 0.5);
        let mut recent = RecentBounds::default();
        recent.reach(&before, [1, 2].into_iter(), 0.5, 1.0);
        let reach = recent.reach(&now, [2].into_iter(), 0.5, 1.0);
        (now, reach)
    }

    /// A process that stopped just before the window has no span time in
    /// it, yet the reading, which averages over the second before, still
    /// holds its work: its share is held to this window's bound, but its
    /// σ stays what the reading's reach allows, not 0. A reading that
    /// reaches no earlier window pins it (fails if σ narrows to this
    /// window's bounds alone).
    #[test]
    fn a_reading_that_reaches_back_keeps_sigma_open() {
        let (now, reach) = a_neighbour_stops(0.1);
        assert_eq!((reach[&1].upper, now[&1].upper), (60.0, 0.0), "{reach:?}");

        let mut shares = [share(1, 10.0, 8.0), share(2, 20.0, 8.0)];
        bound(&mut shares, &now, &reach, 30.0, 3.0);
        assert_eq!(shares[0].util_percent, 0.0, "held to this window's bound");
        assert_eq!(shares[0].uncertainty_points, Some(8.0), "{:?}", shares[0]);

        let mut pinned = [share(1, 10.0, 8.0), share(2, 20.0, 8.0)];
        bound(&mut pinned, &now, &now, 30.0, 3.0);
        assert_eq!((pinned[0].util_percent, pinned[0].uncertainty_points), (0.0, Some(0.0)));
    }

    /// The costs learn only the bounds that hold for the reading: a
    /// neighbour that stopped just before the window (spans 0 now, 60 %
    /// a window ago) still owns part of the reading, so the steady
    /// process beside it has no floor from it. Taken from this window's
    /// spans alone, the stopped one's 0 made the reading's tail the steady
    /// one's floor, and its costs were moved onto it (`sweep-3-108`: a
    /// steady 35 % tenant read 51-57 % at σ 2-3 each time a bursty
    /// neighbour stopped).
    #[test]
    fn costs_learn_only_bounds_that_hold_for_the_reading() {
        let (now, reach) = a_neighbour_stops(0.25);
        let mut filter = CostFilter::default();
        let steady = filter.push(0.35, 0.0009);
        let h = |slot: usize| {
            let mut h = vec![0.0; 1];
            h[slot] = 100.0;
            h
        };
        let by_pid = BTreeMap::from([(2, h(steady))]);
        // The reading still shows 22 points of the stopped neighbour.
        let mut held = filter.clone();
        hold_costs_within(&mut held, &by_pid, &reach, &BTreeSet::new(), 57.0, 3.0);
        assert!((held.predict(&h(steady)) - 35.0).abs() < 1e-9, "{}", held.predict(&h(steady)));
        hold_costs_within(&mut filter, &by_pid, &now, &BTreeSet::new(), 57.0, 3.0);
        assert!(filter.predict(&h(steady)) > 45.0, "this window's bounds alone lift it");
    }

    /// Only the windows inside the reading's period widen a bound, and a
    /// process that launched there while its spans said nothing has no
    /// bound at all; the memory of windows stays bounded.
    #[test]
    fn the_reach_is_the_reading_period() {
        let busy = |pid: u32, share: f64| evidence(&[span(pid, share * 0.5, 0.0, 1)], 0.5);
        let mut recent = RecentBounds::default();
        recent.reach(&busy(1, 0.9), [1].into_iter(), 0.5, 1.0);
        recent.reach(&busy(1, 0.5), [1].into_iter(), 0.5, 1.0);
        recent.reach(&busy(1, 0.2), [1].into_iter(), 0.5, 1.0);
        let reach = recent.reach(&busy(1, 0.1), [1].into_iter(), 0.5, 1.0);
        assert!((reach[&1].upper - 50.0).abs() < 1e-9, "two windows back, not three: {reach:?}");
        let mut recent = RecentBounds::default();
        recent.reach(&HashMap::new(), [1].into_iter(), 0.5, 1.0);
        let reach = recent.reach(&busy(1, 0.1), [1].into_iter(), 0.5, 1.0);
        assert_eq!(reach[&1].upper, f64::INFINITY);
        for _ in 0..3 * RECENT_WINDOWS {
            recent.reach(&busy(1, 0.1), [1].into_iter(), 0.5, 1.0);
        }
        assert_eq!(recent.windows.len(), RECENT_WINDOWS);
    }

    /// Windows difference cumulative reads; a process's first read is its
    /// baseline, a lost event hides the fair times, a pid whose sums went
    /// back is a new process.
    #[test]
    fn windows_difference_cumulative_reads() {
        let before = [(1, 1.0, 0.5, 10), (2, 5.0, 2.0, 40)];
        let after = [(1, 1.4, 0.7, 14), (2, 0.2, 0.1, 1), (3, 9.0, 9.0, 9)];
        let spans = between((&before, 0), (&after, 0));
        assert_eq!(spans.len(), 1, "{spans:?}");
        assert!((spans[0].busy_s - 0.4).abs() < 1e-9 && spans[0].closed == 4);
        assert!((spans[0].fair_s.unwrap() - 0.2).abs() < 1e-9);
        assert_eq!(between((&before, 0), (&after, 3))[0].fair_s, None);
    }

    /// Costs that break a bound are moved onto it without growing surer;
    /// costs inside their bounds, and processes still settling, are left
    /// alone.
    #[test]
    fn costs_learn_the_bounds_they_break() {
        let mut filter = CostFilter::default();
        let (over, inside, settling) = (filter.push(0.3, 0.01), filter.push(0.1, 0.01), filter.push(0.3, 0.01));
        let h = |slot: usize| {
            let mut h = vec![0.0; 3];
            h[slot] = 100.0;
            h
        };
        let by_pid = BTreeMap::from([(1, h(over)), (2, h(inside)), (3, h(settling))]);
        let seen = evidence(&[span(1, 0.12, 0.1, 5), span(2, 0.5, 0.3, 5), span(3, 0.12, 0.1, 5)], 1.0);
        hold_costs_within(&mut filter, &by_pid, &seen, &BTreeSet::from([3]), 30.0, 3.0);
        assert!((filter.predict(&h(over)) - 12.0).abs() < 1e-9, "onto the bound: {}", filter.predict(&h(over)));
        assert!((filter.predict(&h(inside)) - 10.0).abs() < 1e-9);
        assert!((filter.predict(&h(settling)) - 30.0).abs() < 1e-9);
        // A bound is no measurement: the share held at it is as unsure as
        // before (σ 10 points), however many windows repeat it.
        assert!((filter.variance_of(&h(over)) - 100.0).abs() < 1e-9, "{}", filter.variance_of(&h(over)));
    }

    /// Without spans nothing moves.
    #[test]
    fn no_spans_no_change() {
        let mut shares = [share(1, 30.0, 20.0)];
        bound(&mut shares, &HashMap::new(), &HashMap::new(), 30.0, 3.0);
        assert_eq!(shares[0], share(1, 30.0, 20.0));
    }
}
