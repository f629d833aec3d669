//! An engine's own TTFT over a window: the engine exposes a cumulative
//! histogram, so a window is the difference between the latest scrape and
//! the last scrape at least a window old. The difference is spread over
//! each bucket's width into an HDR histogram, so engine TTFT merges across
//! pods and nodes like the socket's and reads like `histogram_quantile`.
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::engines::exposition::CumulativeHistogram;

/// Scrapes kept at most once per this long, so a 100 ms scrape interval
/// does not keep ten times the history.
const KEEP_EVERY: Duration = Duration::from_secs(1);

/// Points recorded per bucket of a difference: enough for the
/// interpolation inside a bucket to read as a straight line.
const POINTS_PER_BUCKET: u64 = 8;

/// Cumulative TTFT histograms of one engine, oldest first. Entries are
/// shared, so a published copy costs a pointer per kept scrape.
#[derive(Clone, Debug, Default)]
pub struct TtftHistory {
    scrapes: VecDeque<(Instant, Arc<CumulativeHistogram>)>,
}

impl TtftHistory {
    /// Records a scrape taken at `at`, keeping `retention` of history. A
    /// count that went down means the engine restarted: the older
    /// scrapes no longer subtract from the new ones and are dropped.
    pub fn push(&mut self, at: Instant, histogram: CumulativeHistogram, retention: Duration) {
        if let Some((_, last)) = self.scrapes.back() {
            if histogram.count() < last.count() || histogram.bounds_s != last.bounds_s {
                self.scrapes.clear();
            }
        }
        let histogram = Arc::new(histogram);
        // The newest scrape is a moving head: it is replaced until it is
        // KEEP_EVERY after the one before it, then kept.
        let len = self.scrapes.len();
        if len >= 2 && self.scrapes[len - 2].0 + KEEP_EVERY > self.scrapes[len - 1].0 {
            self.scrapes[len - 1] = (at, histogram);
        } else {
            self.scrapes.push_back((at, histogram));
        }
        while self.scrapes.front().is_some_and(|(first, _)| at.duration_since(*first) > retention)
            && self.scrapes.len() > 2
        {
            self.scrapes.pop_front();
        }
    }

    /// Whether no scrape is kept.
    pub fn is_empty(&self) -> bool {
        self.scrapes.is_empty()
    }

    /// Adds the TTFTs of the last `window` before the newest scrape to
    /// `into` (microseconds); `false` when there are not yet two scrapes
    /// to take a difference of.
    pub fn merge_window_into(&self, window: Duration, into: &mut Histogram<u32>) -> bool {
        let Some((latest_at, latest)) = self.scrapes.back() else { return false };
        // The newest scrape at least a window older, else the oldest one
        // (the engine was found less than a window ago).
        let base = self
            .scrapes
            .iter()
            .rev()
            .find(|(at, _)| latest_at.duration_since(*at) >= window)
            .or_else(|| self.scrapes.front())
            .filter(|(at, _)| at < latest_at);
        let Some((_, base)) = base else { return false };
        let mut lower_s = 0.0;
        for (index, bound_s) in latest.bounds_s.iter().enumerate() {
            let below = |h: &CumulativeHistogram| if index == 0 { 0.0 } else { h.cumulative[index - 1] };
            let in_bucket = (latest.cumulative[index] - below(latest)) - (base.cumulative[index] - below(base));
            let count = in_bucket.round().max(0.0) as u64;
            if count > 0 {
                record_spread(into, lower_s, *bound_s, count);
            }
            if bound_s.is_finite() {
                lower_s = *bound_s;
            }
        }
        true
    }
}

/// Records `count` values spread evenly over (lower, upper] seconds; an
/// infinite upper bound puts them at `lower` (as `histogram_quantile`
/// answers the highest finite bound).
fn record_spread(into: &mut Histogram<u32>, lower_s: f64, upper_s: f64, count: u64) {
    let highest_us = into.high();
    let to_us = |s: f64| ((s * 1e6).round() as u64).clamp(1, highest_us);
    if !upper_s.is_finite() {
        let _ = into.record_n(to_us(lower_s), u32::try_from(count).unwrap_or(u32::MAX));
        return;
    }
    let points = count.min(POINTS_PER_BUCKET);
    for point in 0..points {
        let share = count / points + u64::from(point < count % points);
        let at_s = lower_s + (upper_s - lower_s) * (point as f64 + 0.5) / points as f64;
        let _ = into.record_n(to_us(at_s), u32::try_from(share).unwrap_or(u32::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::latency::{new_histogram, quantile_ms};

    fn cumulative(counts: &[f64]) -> CumulativeHistogram {
        CumulativeHistogram { bounds_s: vec![0.1, 0.5, 1.0, f64::INFINITY], cumulative: counts.to_vec() }
    }

    /// The window is the difference of two scrapes; quantiles land inside
    /// the right bucket; one scrape alone gives nothing.
    #[test]
    fn windows_are_differences() {
        let start = Instant::now();
        let retention = Duration::from_secs(65);
        let mut history = TtftHistory::default();
        history.push(start, cumulative(&[100.0, 100.0, 100.0, 100.0]), retention);
        let mut merged = new_histogram();
        assert!(!history.merge_window_into(Duration::from_secs(10), &mut merged), "one scrape: no difference");
        // 10 s later: 90 more, all between 0.5 and 1 s.
        history.push(start + Duration::from_secs(10), cumulative(&[100.0, 100.0, 190.0, 190.0]), retention);
        assert!(history.merge_window_into(Duration::from_secs(10), &mut merged));
        assert_eq!(merged.len(), 90);
        let p50 = quantile_ms(&merged, 0.5).unwrap();
        assert!((500.0..=1000.0).contains(&p50), "p50 {p50} ms should be in the 0.5-1 s bucket");
        assert!((p50 - 750.0).abs() < 80.0, "spread evenly, the median is near the middle: {p50}");
    }

    /// A restarted engine (its counts went down) starts a new history.
    #[test]
    fn restarts_start_over() {
        let start = Instant::now();
        let retention = Duration::from_secs(65);
        let mut history = TtftHistory::default();
        history.push(start, cumulative(&[50.0, 50.0, 50.0, 60.0]), retention);
        history.push(start + Duration::from_secs(2), cumulative(&[1.0, 1.0, 1.0, 1.0]), retention);
        let mut merged = new_histogram();
        assert!(!history.merge_window_into(Duration::from_secs(1), &mut merged));
        history.push(start + Duration::from_secs(4), cumulative(&[3.0, 3.0, 3.0, 4.0]), retention);
        assert!(history.merge_window_into(Duration::from_secs(1), &mut merged));
        assert_eq!(merged.len(), 3, "2 under 0.1 s and 1 over 1 s since the restart");
        let highest = quantile_ms(&merged, 1.0).unwrap();
        assert!((highest - 1000.0).abs() <= 10.0, "+Inf reads as the highest bound (1% resolution): {highest}");
    }

    /// Fast scrapes are thinned to one a second and the history is bounded.
    #[test]
    fn history_is_bounded() {
        let start = Instant::now();
        let mut history = TtftHistory::default();
        for tick in 0..1000u64 {
            let at = start + Duration::from_millis(100 * tick);
            history.push(at, cumulative(&[0.0, 0.0, 0.0, tick as f64]), Duration::from_secs(65));
        }
        assert!(history.scrapes.len() <= 68, "kept {}", history.scrapes.len());
        let mut merged = new_histogram();
        assert!(history.merge_window_into(Duration::from_secs(10), &mut merged));
        let expected = 100.0;
        assert!((merged.len() as f64 - expected).abs() <= 10.0, "10 s at 10 per second: {}", merged.len());
    }
}
