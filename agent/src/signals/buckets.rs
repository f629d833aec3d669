//! Cumulative Prometheus histograms of request timings (TTFT and latency)
//! per port and pod, for `/metrics`: counts per fixed bucket since the pod
//! was first seen, with their sum and count. Unlike the rolling HDR
//! windows (`latency`), which answer KEDA's percentile over a window,
//! these only grow, so Prometheus can `rate()` them and
//! `histogram_quantile()` a Deployment's p90 over all its pods' buckets
//! (percentiles do not add; bucket counts do).

/// Upper bounds of the buckets, seconds (`+Inf` is implied). From a few
/// milliseconds (a cached short prompt's first token on a fast GPU) to
/// two minutes (a long generation), at most ×2 apart so that a quantile
/// interpolated inside a bucket is off by less than the bucket's width;
/// denser from 50 ms to 1 s, where interactive TTFT targets sit. vLLM's
/// own `vllm:time_to_first_token_seconds` spans 1 ms to 2,560 s with
/// similar steps below 1 s.
pub const BOUNDS_S: [f64; 20] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// One histogram: per-bucket counts (not cumulative; `+Inf` last), sum and
/// count. Small and `Copy`: views copy it every tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ServingBuckets {
    counts: [u64; BOUNDS_S.len() + 1],
    sum_s: f64,
}

impl ServingBuckets {
    /// Records one duration.
    pub fn record(&mut self, nanos: u64) {
        let seconds = nanos as f64 / 1e9;
        let bucket = BOUNDS_S.iter().position(|&bound| seconds <= bound).unwrap_or(BOUNDS_S.len());
        self.counts[bucket] += 1;
        self.sum_s += seconds;
    }

    /// Adds another histogram's counts (a pod's ports into the pod).
    pub fn add(&mut self, other: &ServingBuckets) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.sum_s += other.sum_s;
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum of the observations, seconds.
    pub fn sum_s(&self) -> f64 {
        self.sum_s
    }

    /// (upper bound in seconds, values in that bucket) for every bucket,
    /// `+Inf` last (as `f64::INFINITY`); the exposition sums them into its
    /// cumulative `_bucket` samples.
    pub fn per_bucket(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        BOUNDS_S.iter().copied().chain(std::iter::once(f64::INFINITY)).zip(self.counts.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value lands in the first bucket whose bound it does not exceed
    /// (bounds are inclusive, as Prometheus' `le`); past the last bound it
    /// is counted in `+Inf` only. The buckets add up to the count.
    #[test]
    fn values_land_in_le_buckets() {
        let mut buckets = ServingBuckets::default();
        for ms in [3, 80, 100, 100_000, 500_000] {
            buckets.record(ms * 1_000_000);
        }
        let per_bucket: Vec<(f64, u64)> = buckets.per_bucket().collect();
        assert_eq!(per_bucket.len(), BOUNDS_S.len() + 1);
        let at = |bound: f64| per_bucket.iter().find(|(b, _)| *b == bound).unwrap().1;
        assert_eq!((at(0.005), at(0.075), at(0.1), at(60.0), at(120.0), at(f64::INFINITY)), (1, 0, 2, 0, 1, 1));
        assert_eq!(per_bucket.iter().map(|(_, n)| n).sum::<u64>(), buckets.count());
        assert_eq!(buckets.count(), 5);
        assert!((buckets.sum_s() - 600.183).abs() < 1e-9, "{}", buckets.sum_s());
        let mut twice = buckets;
        twice.add(&buckets);
        assert_eq!((twice.count(), twice.per_bucket().map(|(_, n)| n).take(6).sum::<u64>()), (10, 6));
    }

    /// Bounds rise, and no step is wider than ×2.5: a quantile read inside
    /// a bucket stays within the bucket's width of the truth.
    #[test]
    fn bounds_rise_in_small_steps() {
        assert!(BOUNDS_S.windows(2).all(|pair| pair[1] > pair[0] && pair[1] / pair[0] <= 2.5), "{BOUNDS_S:?}");
    }
}
