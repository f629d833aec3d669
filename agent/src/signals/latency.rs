//! Rolling latency distributions: HDR histograms (hdrhistogram crate) in
//! 5-second slots. A window is the merge of the slots it covers, and pods
//! and nodes combine by adding histograms, never by averaging percentiles.
//!
//! Closed slots are immutable and shared by `Arc`, so publishing a view
//! every tick copies at most the open slot.
use std::collections::VecDeque;
use std::sync::Arc;

use hdrhistogram::Histogram;

/// Slot length: windows are served at this granularity (rounded up).
pub const SLOT_S: f64 = 5.0;
/// Recorded range, microseconds: 1 µs .. 1 h.
const LOWEST_US: u64 = 1;
const HIGHEST_US: u64 = 3_600_000_000;
/// Two significant digits: 1% value resolution, ~12 KB per slot.
const SIGNIFICANT_DIGITS: u8 = 2;

fn empty() -> Histogram<u32> {
    Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS).expect("static histogram bounds are valid")
}

/// An immutable set of slots: what a published view carries.
#[derive(Clone, Debug, Default)]
pub struct LatencySnapshot {
    /// (slot index, histogram), oldest first.
    slots: Vec<(u64, Arc<Histogram<u32>>)>,
}

impl LatencySnapshot {
    /// Adds the slots covering the last `window_s` before `now_s` into `into`.
    pub fn merge_into(&self, now_s: f64, window_s: f64, into: &mut Histogram<u32>) {
        let first_slot = ((now_s - window_s).max(0.0) / SLOT_S).floor() as u64;
        for (_, histogram) in self.slots.iter().filter(|(slot, _)| *slot >= first_slot) {
            // Same bounds everywhere, so adding cannot fail.
            let _ = into.add(histogram.as_ref());
        }
    }
}

/// The `q` quantile of a histogram in milliseconds; `None` when empty.
pub fn quantile_ms(histogram: &Histogram<u32>, q: f64) -> Option<f64> {
    (!histogram.is_empty()).then(|| histogram.value_at_quantile(q) as f64 / 1000.0)
}

/// An empty histogram with the window's bounds, for merging into.
pub fn new_histogram() -> Histogram<u32> {
    empty()
}

/// A histogram as (value µs, count) pairs, flattened, for the node API.
pub fn encode_buckets(histogram: &Histogram<u32>) -> Vec<u64> {
    histogram
        .iter_recorded()
        .flat_map(|bucket| [bucket.value_iterated_to(), u64::from(bucket.count_at_value())])
        .collect()
}

/// Adds buckets encoded by `encode_buckets` into `into` (odd trailing
/// entries and out-of-range values are ignored).
pub fn decode_buckets_into(buckets: &[u64], into: &mut Histogram<u32>) {
    for pair in buckets.chunks_exact(2) {
        let count = u32::try_from(pair[1]).unwrap_or(u32::MAX);
        let _ = into.record_n(pair[0].clamp(LOWEST_US, HIGHEST_US), count);
    }
}

/// A rolling window of latency slots, owned by the collector.
#[derive(Debug)]
pub struct LatencyWindow {
    closed: VecDeque<(u64, Arc<Histogram<u32>>)>,
    open: Option<(u64, Histogram<u32>)>,
    /// The open slot as last published, reused while nothing new arrived.
    published: Option<(u64, Arc<Histogram<u32>>)>,
    retention_slots: u64,
}

impl LatencyWindow {
    /// A window keeping `retention_s` seconds.
    pub fn new(retention_s: f64) -> Self {
        Self {
            closed: VecDeque::new(),
            open: None,
            published: None,
            retention_slots: (retention_s / SLOT_S).ceil() as u64 + 1,
        }
    }

    /// Records a duration observed at `now_s`.
    pub fn record(&mut self, now_s: f64, nanos: u64) {
        let slot = (now_s.max(0.0) / SLOT_S).floor() as u64;
        if self.open.as_ref().is_some_and(|(open_slot, _)| *open_slot != slot) {
            if let Some((closed_slot, histogram)) = self.open.take() {
                self.closed.push_back((closed_slot, Arc::new(histogram)));
            }
        }
        let (_, histogram) = self.open.get_or_insert_with(|| (slot, empty()));
        histogram.saturating_record((nanos / 1000).max(LOWEST_US));
        self.published = None;
        while self.closed.front().is_some_and(|(old, _)| old + self.retention_slots < slot) {
            self.closed.pop_front();
        }
    }

    /// The slots as they are now (copies the open slot only when it changed).
    pub fn snapshot(&mut self) -> LatencySnapshot {
        let mut slots: Vec<(u64, Arc<Histogram<u32>>)> = self.closed.iter().cloned().collect();
        if let Some((slot, histogram)) = &self.open {
            let published = self.published.get_or_insert_with(|| (*slot, Arc::new(histogram.clone())));
            slots.push(published.clone());
        }
        LatencySnapshot { slots }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quantiles come from the merged slots of the window only.
    #[test]
    fn window_covers_recent_slots() {
        let mut window = LatencyWindow::new(60.0);
        for _ in 0..100 {
            window.record(1.0, 10_000_000); // 10 ms in slot 0
        }
        for _ in 0..100 {
            window.record(12.0, 50_000_000); // 50 ms in slot 2
        }
        let snapshot = window.snapshot();
        let mut recent = new_histogram();
        snapshot.merge_into(12.0, 5.0, &mut recent);
        let p50 = quantile_ms(&recent, 0.5).unwrap();
        assert!((p50 - 50.0).abs() / 50.0 < 0.01, "{p50}");
        let mut all = new_histogram();
        snapshot.merge_into(12.0, 60.0, &mut all);
        assert_eq!(all.len(), 200);
        assert!((quantile_ms(&all, 0.25).unwrap() - 10.0).abs() < 0.1);
        assert_eq!(quantile_ms(&new_histogram(), 0.5), None);
    }

    /// Encoding and decoding keeps every quantile (to the histogram's own
    /// resolution) and the count, so remote merges equal local ones.
    #[test]
    fn buckets_round_trip() {
        let mut original = new_histogram();
        for value in [120u64, 5_000, 5_000, 77_777, 1_000_000] {
            original.record(value).unwrap();
        }
        let mut decoded = new_histogram();
        decode_buckets_into(&encode_buckets(&original), &mut decoded);
        assert_eq!(decoded.len(), original.len());
        for q in [0.1, 0.5, 0.9, 0.99] {
            assert_eq!(decoded.value_at_quantile(q), original.value_at_quantile(q));
        }
        decode_buckets_into(&[1, 2, 3], &mut decoded);
        assert_eq!(decoded.len(), original.len() + 2);
    }

    /// Old slots are dropped after the retention; snapshots share closed slots.
    #[test]
    fn retention_and_sharing() {
        let mut window = LatencyWindow::new(10.0);
        for second in 0..100 {
            window.record(second as f64, 1_000_000);
        }
        assert!(window.closed.len() <= 4, "{}", window.closed.len());
        let a = window.snapshot();
        let b = window.snapshot();
        assert!(Arc::ptr_eq(&a.slots[0].1, &b.slots[0].1));
        assert!(
            Arc::ptr_eq(&a.slots.last().unwrap().1, &b.slots.last().unwrap().1),
            "unchanged open slot copied twice"
        );
    }
}
