//! Trigger metadata (`ScaledObject.spec.triggers[].metadata`), validated
//! strictly: an unknown key or a bad value is an error naming the key,
//! which the scaler returns to KEDA as InvalidArgument.
use std::collections::HashMap;
use std::time::Duration;

use crate::pods::selector::LabelSelector;
use crate::signals::aggregate::Aggregation;
use crate::signals::metric::Metric;

/// Default window for rates and means.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// Longest window a trigger may ask for (the collector's retention).
pub const MAX_WINDOW: Duration = Duration::from_secs(60);
const MIN_WINDOW: Duration = Duration::from_secs(1);
const MAX_KEYS: usize = 16;
const MAX_VALUE_BYTES: usize = 1024;

/// A bad trigger: which key and why.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("scalerMetadata.{key}: {reason}")]
pub struct TriggerError {
    /// The offending key.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(key: &str, reason: impl Into<String>) -> TriggerError {
    TriggerError { key: key.to_string(), reason: reason.into() }
}

/// A validated trigger.
#[derive(Clone, Debug, PartialEq)]
pub struct Trigger {
    /// What to measure.
    pub metric: Metric,
    /// Target per replica (AverageValue).
    pub target: f64,
    /// Above this the workload is active (scale from zero).
    pub activation_target: f64,
    /// Which pods of the namespace.
    pub pod_selector: LabelSelector,
    /// How pods combine.
    pub aggregation: Aggregation,
    /// Window for rates and means.
    pub window: Duration,
}

impl Trigger {
    /// Validates KEDA's metadata map.
    pub fn from_metadata(metadata: &HashMap<String, String>) -> Result<Self, TriggerError> {
        if metadata.len() > MAX_KEYS {
            return Err(invalid("*", format!("{} keys given, at most {MAX_KEYS} allowed", metadata.len())));
        }
        for (key, value) in metadata {
            if value.len() > MAX_VALUE_BYTES {
                return Err(invalid(key, format!("value is {} bytes, at most {MAX_VALUE_BYTES} allowed", value.len())));
            }
            match key.as_str() {
                "metric" | "target" | "activationTarget" | "podSelector" | "aggregation" | "window" => {}
                "profile" | "ports" => {
                    return Err(invalid(key, "not supported by this agent version yet"));
                }
                _ => {
                    return Err(invalid(
                        key,
                        "unknown key; expected metric, target, activationTarget, podSelector, aggregation or window",
                    ))
                }
            }
        }
        let metric_name = metadata.get("metric").ok_or_else(|| invalid("metric", "required"))?;
        let metric = Metric::from_name(metric_name.trim()).ok_or_else(|| {
            let known: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
            invalid("metric", format!("unknown metric {metric_name:?}; known: {}", known.join(", ")))
        })?;
        let target = number(metadata, "target")?.ok_or_else(|| invalid("target", "required"))?;
        if target <= 0.0 {
            return Err(invalid("target", "must be greater than 0"));
        }
        let activation_target = number(metadata, "activationTarget")?.unwrap_or(0.0);
        if activation_target < 0.0 {
            return Err(invalid("activationTarget", "must not be negative"));
        }
        let pod_selector = match metadata.get("podSelector") {
            Some(text) => LabelSelector::parse(text).map_err(|reason| invalid("podSelector", reason))?,
            None => LabelSelector::default(),
        };
        let aggregation = match metadata.get("aggregation").map(|a| a.trim()) {
            None | Some("sum") => Aggregation::Sum,
            Some("max") => Aggregation::Max,
            Some("avg") => Aggregation::Avg,
            Some(other) => return Err(invalid("aggregation", format!("{other:?} is not one of sum, max, avg"))),
        };
        let window = match metadata.get("window") {
            Some(text) => parse_duration(text.trim()).map_err(|reason| invalid("window", reason))?,
            None => DEFAULT_WINDOW,
        };
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&window) {
            return Err(invalid("window", format!("must be between {MIN_WINDOW:?} and {MAX_WINDOW:?}")));
        }
        Ok(Self { metric, target, activation_target, pod_selector, aggregation, window })
    }

    /// The metric name podgpu announces in GetMetricSpec.
    pub fn metric_name(&self) -> String {
        format!("podgpu-{}", self.metric.name().replace('_', "-"))
    }
}

fn number(metadata: &HashMap<String, String>, key: &str) -> Result<Option<f64>, TriggerError> {
    let Some(text) = metadata.get(key) else {
        return Ok(None);
    };
    let value: f64 = text.trim().parse().map_err(|_| invalid(key, format!("{text:?} is not a number")))?;
    if !value.is_finite() {
        return Err(invalid(key, "must be a finite number"));
    }
    Ok(Some(value))
}

/// `500ms`, `10s`, `1m`, or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 10s"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}; use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// A full trigger parses into typed values; defaults fill the rest.
    #[test]
    fn parses_full_and_minimal_triggers() {
        let full = Trigger::from_metadata(&metadata(&[
            ("metric", "gpu_sm_util"),
            ("target", "60"),
            ("activationTarget", "5.5"),
            ("podSelector", "app=llm"),
            ("aggregation", "max"),
            ("window", "30s"),
        ]))
        .unwrap();
        assert_eq!(full.metric, Metric::GpuSmUtil);
        assert_eq!((full.target, full.activation_target), (60.0, 5.5));
        assert_eq!(full.aggregation, Aggregation::Max);
        assert_eq!(full.window, Duration::from_secs(30));
        assert_eq!(full.metric_name(), "podgpu-gpu-sm-util");

        let minimal =
            Trigger::from_metadata(&metadata(&[("metric", "socket_recv_bytes_rate"), ("target", "1000")])).unwrap();
        assert_eq!(minimal.aggregation, Aggregation::Sum);
        assert_eq!(minimal.window, DEFAULT_WINDOW);
        assert_eq!(minimal.pod_selector, LabelSelector::default());
    }

    /// Every kind of bad metadata is rejected with the key it concerns.
    #[test]
    fn rejects_bad_metadata_naming_the_key() {
        let ok = [("metric", "gpu_sm_util"), ("target", "50")];
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (vec![("target", "50")], "metric"),
            (vec![("metric", "gpu_util"), ("target", "50")], "metric"),
            (vec![("metric", "gpu_sm_util")], "target"),
            (vec![("metric", "gpu_sm_util"), ("target", "fifty")], "target"),
            (vec![("metric", "gpu_sm_util"), ("target", "0")], "target"),
            (vec![("metric", "gpu_sm_util"), ("target", "NaN")], "target"),
            (vec![("metric", "gpu_sm_util"), ("target", "inf")], "target"),
            ([&ok[..], &[("activationTarget", "-1")]].concat(), "activationTarget"),
            ([&ok[..], &[("podSelector", "app in (x")]].concat(), "podSelector"),
            ([&ok[..], &[("aggregation", "median")]].concat(), "aggregation"),
            ([&ok[..], &[("window", "10h")]].concat(), "window"),
            ([&ok[..], &[("window", "0.5s")]].concat(), "window"),
            ([&ok[..], &[("window", "2m")]].concat(), "window"),
            ([&ok[..], &[("window", "-3s")]].concat(), "window"),
            ([&ok[..], &[("targetValue", "5")]].concat(), "targetValue"),
            ([&ok[..], &[("profile", "vllm")]].concat(), "profile"),
        ];
        for (pairs, key) in cases {
            let err = Trigger::from_metadata(&metadata(&pairs)).unwrap_err();
            assert_eq!(err.key, key, "{pairs:?}: {err}");
            assert!(err.to_string().starts_with(&format!("scalerMetadata.{key}: ")), "{err}");
        }
        let huge = "a".repeat(MAX_VALUE_BYTES + 1);
        assert_eq!(Trigger::from_metadata(&metadata(&[("metric", &huge)])).unwrap_err().key, "metric");
    }

    /// Durations accept the documented units.
    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10 s").is_err());
    }
}
