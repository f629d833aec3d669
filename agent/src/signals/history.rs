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
    /// When (collector seconds) the launch reader read `gpu_launches`: it
    /// publishes on its own schedule, so ticks repeat a read.
    pub gpu_launches_read_s: f64,
    /// NVIDIA driver calls, cumulative.
    pub gpu_driver_calls: u64,
    /// Seconds blocked in driver calls, cumulative.
    pub gpu_driver_blocked_s: f64,
    /// When (collector seconds) the driver reader read the two above.
    pub gpu_driver_read_s: f64,
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

    /// Change of `field` per second between the reads of a counter that
    /// is read on its own schedule (`read_s`, the time of the read a
    /// point's value came from). Dividing by tick time instead would
    /// overstate a 2 s window that happens to hold three 1 s reads by half
    /// and read a window between two reads as no change at all. The start
    /// is the read in force at the window's start; a window shorter than
    /// the reads' interval steps back to the read before the newest.
    pub fn rate_between_reads(
        &self,
        window_s: f64,
        field: impl Fn(&Point) -> f64,
        read_s: impl Fn(&Point) -> f64,
    ) -> Option<f64> {
        let (mut start, latest) = self.window_start(window_s)?;
        while start > 0 && read_s(&self.points[start]) >= read_s(latest) - 1e-9 {
            start -= 1;
        }
        let start = &self.points[start];
        let span = read_s(latest) - read_s(start);
        (span > 1e-9).then(|| (field(latest) - field(start)) / span)
    }

    /// The index of the point a window of `window_s` starts from, and the
    /// newest point. The point at or just before the window's start is
    /// preferred: it makes the window at least as long as asked.
    fn window_start(&self, window_s: f64) -> Option<(usize, &Point)> {
        let latest = self.points.back()?;
        let start_at = latest.at_s - window_s;
        let first_inside = self.points.partition_point(|point| point.at_s < start_at - 1e-9);
        Some((first_inside.saturating_sub(1), latest))
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
        let (start, latest) = self.window_start(window_s)?;
        let start = &self.points[start];
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

    /// A counter read every second and sampled every 250 ms: a 2 s window
    /// holds three reads at some ticks and two at others, and the rate
    /// between reads is the true one at every tick; a 0.5 s window, inside
    /// one read interval, still has the rate of the last interval.
    #[test]
    fn rate_between_reads_ignores_where_ticks_fall() {
        let mut history = History::new(60.0);
        let mut tick_rates = Vec::new();
        for tick in 0..=40 {
            let at_s = f64::from(tick) * 0.25 + 0.1;
            let read_s = at_s.floor();
            // 250 per second, as read at each whole second.
            history.push(Point {
                at_s,
                gpu_launches: (read_s * 250.0) as u64,
                gpu_launches_read_s: read_s,
                ..Point::default()
            });
            if tick >= 12 {
                let between = history.rate_between_reads(2.0, |p| p.gpu_launches as f64, |p| p.gpu_launches_read_s);
                assert_eq!(between, Some(250.0), "tick {tick}");
                let short = history.rate_between_reads(0.5, |p| p.gpu_launches as f64, |p| p.gpu_launches_read_s);
                assert_eq!(short, Some(250.0), "tick {tick}");
                tick_rates.push(history.rate(2.0, |p| p.gpu_launches as f64).unwrap());
            }
        }
        // Per tick time, the same counter reads between 1x and 1.5x.
        assert!(tick_rates.iter().any(|&rate| rate > 300.0), "{tick_rates:?}");
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
