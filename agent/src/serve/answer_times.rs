//! How long the KEDA service takes to answer, per call, as a Prometheus
//! histogram (`podgpu_scaler_answer_seconds`). Timed inside the service,
//! from the decoded request to the built answer, so the network and the
//! client's own scheduling are not in it: what KEDA waits on the scaler.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, seconds (a last one, +Inf, follows).
const BOUNDS_S: [f64; 10] = [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 1.0];

/// The KEDA calls timed.
#[derive(Clone, Copy, Debug)]
pub enum Call {
    /// GetMetrics.
    GetMetrics,
    /// IsActive.
    IsActive,
}

#[derive(Default)]
struct Histogram {
    /// Answers per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; BOUNDS_S.len() + 1],
    sum_ns: AtomicU64,
}

/// Answer times of every call kind; shared by the service and `/metrics`.
#[derive(Default)]
pub struct AnswerTimes {
    get_metrics: Histogram,
    is_active: Histogram,
}

impl AnswerTimes {
    /// Counts one answer of `call` that took `took`.
    pub fn record(&self, call: Call, took: Duration) {
        let histogram = self.histogram(call);
        let seconds = took.as_secs_f64();
        let bucket = BOUNDS_S.iter().position(|&bound| seconds <= bound).unwrap_or(BOUNDS_S.len());
        histogram.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        histogram.sum_ns.fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn histogram(&self, call: Call) -> &Histogram {
        match call {
            Call::GetMetrics => &self.get_metrics,
            Call::IsActive => &self.is_active,
        }
    }

    /// Appends the histogram family in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let name = "podgpu_scaler_answer_seconds";
        let _ = writeln!(out, "# HELP {name} Time the KEDA service took to answer, by call, measured inside it.");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (call, label) in [(Call::GetMetrics, "GetMetrics"), (Call::IsActive, "IsActive")] {
            let histogram = self.histogram(call);
            let mut cumulative = 0;
            for (index, count) in histogram.buckets.iter().enumerate() {
                cumulative += count.load(Ordering::Relaxed);
                let le = BOUNDS_S.get(index).map_or("+Inf".to_string(), |bound| bound.to_string());
                let _ = writeln!(out, "{name}_bucket{{call=\"{label}\",le=\"{le}\"}} {cumulative}");
            }
            let sum_s = histogram.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "{name}_sum{{call=\"{label}\"}} {sum_s}");
            let _ = writeln!(out, "{name}_count{{call=\"{label}\"}} {cumulative}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets are cumulative in the output, an answer on a bound counts
    /// in that bucket, and one past the last bound only in +Inf.
    #[test]
    fn answers_land_in_cumulative_buckets() {
        let times = AnswerTimes::default();
        times.record(Call::GetMetrics, Duration::from_micros(100));
        times.record(Call::GetMetrics, Duration::from_micros(1500));
        times.record(Call::GetMetrics, Duration::from_secs(3));
        times.record(Call::IsActive, Duration::from_micros(300));
        let mut out = String::new();
        times.render(&mut out);
        let value = |series: &str| -> f64 {
            out.lines().find_map(|line| line.strip_prefix(series)).and_then(|v| v.trim().parse().ok()).unwrap()
        };
        let bucket = |call: &str, le: &str| {
            value(&format!("podgpu_scaler_answer_seconds_bucket{{call=\"{call}\",le=\"{le}\"}} "))
        };
        assert_eq!(bucket("GetMetrics", "0.0001"), 1.0);
        assert_eq!(bucket("GetMetrics", "0.001"), 1.0);
        assert_eq!(bucket("GetMetrics", "0.002"), 2.0);
        assert_eq!(bucket("GetMetrics", "1"), 2.0);
        assert_eq!(bucket("GetMetrics", "+Inf"), 3.0);
        assert_eq!(bucket("IsActive", "0.0005"), 1.0);
        assert_eq!(value("podgpu_scaler_answer_seconds_count{call=\"GetMetrics\"} "), 3.0);
        assert!((value("podgpu_scaler_answer_seconds_sum{call=\"GetMetrics\"} ") - 3.0016).abs() < 1e-9);
    }
}
