//! A pod's recent past as cumulative points, from which any window's rate
//! or time-weighted mean is one subtraction.
//!
//! GPU utilization is stored as its integral (percent x seconds), so the
//! mean over a window is a rate like the byte counters: no per-window state,
//! and any window up to the retention can be asked for.
use std::collections::VecDeque;

/// Cumulative values of one pod at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Point {
    /// Seconds since the collector started.
    pub at_s: f64,
    /// Bytes received, cumulative.
    pub recv_bytes: u64,
    /// Bytes sent, cumulative.
    pub send_bytes: u64,
    /// Integral of SM utilization, percent x seconds.
    pub gpu_sm_util_integral: f64,
    /// Integral of NVML's own SM utilization, percent x seconds.
    pub gpu_sm_util_nvml_integral: f64,
    /// Integral of memory-bandwidth utilization, percent x seconds.
    pub gpu_mem_bw_util_integral: f64,
    /// Seconds during which GPU data was valid: GPU means divide by this,
    /// so an outage inside a window is left out instead of read as idle.
    pub gpu_known_s: f64,
    /// Integral of the attribution confidence of the pod's GPU share,
    /// over the seconds it had one.
    pub gpu_confidence_integral: f64,
    /// Seconds the pod's GPU share had an attribution confidence.
    pub gpu_confidence_known_s: f64,
    /// Requests started, cumulative.
    pub requests_started: u64,
    /// Kernel launches, cumulative.
    pub gpu_launches: u64,
    /// NVIDIA driver calls, cumulative.
    pub gpu_driver_calls: u64,
    /// Seconds blocked in driver calls, cumulative.
    pub gpu_driver_blocked_s: f64,
}

/// Points of the last `retention_s` seconds, oldest first.
#[derive(Clone, Debug)]
pub struct History {
    points: VecDeque<Point>,
    retention_s: f64,
}

impl History {
    /// An empty history keeping `retention_s` seconds.
    pub fn new(retention_s: f64) -> Self {
        Self { points: VecDeque::new(), retention_s }
    }

    /// An empty history for points every `interval_s`, with room for the
    /// whole retention allocated once (growth by doubling would reserve up
    /// to twice that for every pod).
    pub fn for_interval(retention_s: f64, interval_s: f64) -> Self {
        let points = (retention_s / interval_s.max(1e-3)).ceil() as usize + 2;
        Self { points: VecDeque::with_capacity(points), retention_s }
    }

    /// Appends a point and forgets those older than the retention (keeping
    /// one just beyond it, so a full-retention window still has a start).
    pub fn push(&mut self, point: Point) {
        self.points.push_back(point);
        while self.points.len() > 2 && point.at_s - self.points[1].at_s >= self.retention_s {
            self.points.pop_front();
        }
    }

    /// The newest point.
    pub fn latest(&self) -> Option<&Point> {
        self.points.back()
    }

    /// Change of `field` per second over the last `window_s` seconds (or
    /// over the whole history when it is shorter, so a new pod has a value
    /// after one tick). `None` until two points exist; the aggregation
    /// makes that an error, not a 0.
    pub fn rate(&self, window_s: f64, field: impl Fn(&Point) -> f64) -> Option<f64> {
        self.ratio(window_s, field, |point| point.at_s)
    }

    /// Change of `numerator` divided by change of `denominator` over the
    /// window (a rate when the denominator is time); `None` when the
    /// denominator did not grow.
    pub fn ratio(
        &self,
        window_s: f64,
        numerator: impl Fn(&Point) -> f64,
        denominator: impl Fn(&Point) -> f64,
    ) -> Option<f64> {
        let latest = self.points.back()?;
        let start_at = latest.at_s - window_s;
        let first_inside = self.points.partition_point(|point| point.at_s < start_at - 1e-9);
        // Prefer the point at or just before the window start: it makes the
        // window at least as long as asked.
        let start = &self.points[first_inside.saturating_sub(1)];
        let span = denominator(latest) - denominator(start);
        (span > 1e-9).then(|| (numerator(latest) - numerator(start)) / span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(at_s: f64, recv_bytes: u64) -> Point {
        Point { at_s, recv_bytes, ..Point::default() }
    }

    /// A rate uses exactly the window asked for when history is long enough.
    #[test]
    fn rate_over_window() {
        let mut history = History::new(60.0);
        for second in 0..=20 {
            // 100 B/s for the first 10 s, 300 B/s after.
            let bytes = if second <= 10 { second * 100 } else { 1000 + (second - 10) * 300 };
            history.push(point(second as f64, bytes));
        }
        assert_eq!(history.rate(5.0, |p| p.recv_bytes as f64), Some(300.0));
        assert_eq!(history.rate(20.0, |p| p.recv_bytes as f64), Some(200.0));
        // Longer than the history: the whole history.
        assert_eq!(history.rate(100.0, |p| p.recv_bytes as f64), Some(200.0));
    }

    /// One point has no rate; retention drops old points but keeps the window start.
    #[test]
    fn retention_and_single_point() {
        let mut history = History::new(10.0);
        history.push(point(0.0, 0));
        assert_eq!(history.rate(10.0, |p| p.recv_bytes as f64), None);
        for second in 1..=30 {
            history.push(point(second as f64, second * 10));
        }
        assert!(history.points.len() <= 12, "{}", history.points.len());
        assert_eq!(history.rate(10.0, |p| p.recv_bytes as f64), Some(10.0));
    }

    /// Time with unknown GPU data is left out of the mean, not counted as 0.
    #[test]
    fn ratio_skips_unknown_time() {
        let mut history = History::new(60.0);
        // 2 s known at 30%, 2 s outage, 1 s known at 60%.
        let points = [(0.0, 0.0, 0.0), (2.0, 60.0, 2.0), (4.0, 60.0, 2.0), (5.0, 120.0, 3.0)];
        for (at_s, integral, known) in points {
            history.push(Point { at_s, gpu_sm_util_integral: integral, gpu_known_s: known, ..Point::default() });
        }
        assert_eq!(history.ratio(5.0, |p| p.gpu_sm_util_integral, |p| p.gpu_known_s), Some(40.0));
        assert_eq!(history.ratio(1.0, |p| p.gpu_sm_util_integral, |p| p.gpu_known_s), Some(60.0));
        assert_eq!(history.ratio(0.5, |p| p.gpu_known_s, |p| p.gpu_known_s), Some(1.0));
        let mut outage = History::new(60.0);
        outage.push(Point { at_s: 0.0, ..Point::default() });
        outage.push(Point { at_s: 1.0, ..Point::default() });
        assert_eq!(outage.ratio(1.0, |p| p.gpu_sm_util_integral, |p| p.gpu_known_s), None);
    }

    /// A time-weighted mean is the rate of the integral.
    #[test]
    fn integral_rate_is_time_weighted_mean() {
        let mut history = History::new(60.0);
        let mut integral = 0.0;
        // 40% for 3 s then 80% for 1 s: mean 50%.
        for (second, util) in [(0.0, 0.0), (1.0, 40.0), (2.0, 40.0), (3.0, 40.0), (4.0, 80.0)] {
            integral += util;
            history.push(Point { at_s: second, gpu_sm_util_integral: integral, ..Point::default() });
        }
        assert_eq!(history.rate(4.0, |p| p.gpu_sm_util_integral), Some(50.0));
    }
}
