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
const MAX_KEYS: usize = 24;
/// Keys KEDA itself uses to reach the scaler. KEDA passes the whole trigger
/// metadata in `scalerMetadata`, so they arrive here and are ignored.
const KEDA_CONNECTION_KEYS: [&str; 7] =
    ["scalerAddress", "caCert", "tlsCertFile", "tlsClientCert", "tlsClientKey", "unsafeSsl", "enableTLS"];
const PODGPU_KEYS: &str = "metric, target, activationTarget, podSelector, aggregation, window, profile, ports, \
                           includeProbeRequests, activationPodSelector, activationMetric, activationPorts, \
                           minConfidence";
/// Most ports one trigger may name.
const MAX_PORTS: usize = 16;
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
    /// Server ports whose requests count (sorted; empty = every port).
    pub ports: Vec<u16>,
    /// Health-check and metrics-scrape requests count too
    /// (`includeProbeRequests`; default: they do not).
    pub include_probe_requests: bool,
    /// An upstream signal that also activates the workload (scale from
    /// zero through a gateway's traffic).
    pub upstream: Option<Upstream>,
    /// `gpu_sm_util` only: below this attribution confidence (0-1, mean
    /// over the window) for any selected pod, KEDA gets an error naming
    /// the pod instead of a number (`minConfidence`).
    pub min_confidence: Option<f64>,
}

/// Pods outside the workload whose signal activates it: at zero replicas
/// the workload's own pods do not exist, so their signal cannot.
#[derive(Clone, Debug, PartialEq)]
pub struct Upstream {
    /// Which pods of the namespace (e.g. the gateway in front of the workload).
    pub pod_selector: LabelSelector,
    /// What to read from them (default: the trigger's metric).
    pub metric: Metric,
    /// Their server ports that count (`activationPorts`; empty = all).
    pub ports: Vec<u16>,
}

/// Defaults a `profile` gives for keys the trigger leaves out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Profile {
    /// Profile name as written in the trigger.
    pub name: &'static str,
    /// Default metric.
    pub metric: Metric,
    /// Default target per replica.
    pub target: f64,
    /// Default window.
    pub window: Duration,
}

/// The documented profiles (docs/scaler.md says why each default).
pub const PROFILES: [Profile; 5] = [
    // vLLM batches continuously: requests in flight per replica is its
    // queue depth, the signal that leads TTFT growth.
    Profile { name: "vllm", metric: Metric::RequestsInFlight, target: 16.0, window: DEFAULT_WINDOW },
    // Triton's dynamic batcher holds fewer, larger batches per model.
    Profile { name: "triton", metric: Metric::RequestsInFlight, target: 8.0, window: DEFAULT_WINDOW },
    Profile { name: "tgi", metric: Metric::RequestsInFlight, target: 16.0, window: DEFAULT_WINDOW },
    // Jobs without requests: GPU time is the only load signal.
    Profile { name: "training", metric: Metric::GpuSmUtil, target: 90.0, window: Duration::from_secs(60) },
    Profile { name: "batch", metric: Metric::GpuSmUtil, target: 80.0, window: Duration::from_secs(30) },
];

impl Trigger {
    /// Validates KEDA's metadata map.
    pub fn from_metadata(metadata: &HashMap<String, String>) -> Result<Self, TriggerError> {
        if metadata.len() > MAX_KEYS {
            return Err(invalid("*", format!("{} keys given, at most {MAX_KEYS} allowed", metadata.len())));
        }
        for (key, value) in metadata {
            // Certificates KEDA passes along may be PEM text: only podgpu's
            // own values are size-limited.
            if KEDA_CONNECTION_KEYS.contains(&key.as_str()) {
                continue;
            }
            if value.len() > MAX_VALUE_BYTES {
                return Err(invalid(key, format!("value is {} bytes, at most {MAX_VALUE_BYTES} allowed", value.len())));
            }
            match key.as_str() {
                "metric"
                | "target"
                | "activationTarget"
                | "podSelector"
                | "aggregation"
                | "window"
                | "profile"
                | "ports"
                | "includeProbeRequests"
                | "activationPodSelector"
                | "activationMetric"
                | "activationPorts"
                | "minConfidence" => {}
                _ => return Err(invalid(key, format!("unknown key; expected one of {PODGPU_KEYS}"))),
            }
        }
        let profile = match metadata.get("profile").map(|p| p.trim()) {
            None => None,
            Some(name) => Some(*PROFILES.iter().find(|p| p.name == name).ok_or_else(|| {
                let known: Vec<&str> = PROFILES.iter().map(|p| p.name).collect();
                invalid("profile", format!("unknown profile {name:?}; known: {}", known.join(", ")))
            })?),
        };
        let metric = match (metric_key(metadata, "metric")?, profile) {
            (Some(metric), _) => metric,
            (None, Some(profile)) => profile.metric,
            (None, None) => return Err(invalid("metric", "required (or a profile)")),
        };
        // A profile's target belongs to its metric: overriding the metric
        // without a target would silently reuse a target in other units.
        let profile_target = profile.filter(|p| p.metric == metric).map(|p| p.target);
        let target = number(metadata, "target")?
            .or(profile_target)
            .ok_or_else(|| invalid("target", "required (a profile only supplies it for its own metric)"))?;
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
            None => profile.map_or(DEFAULT_WINDOW, |p| p.window),
        };
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&window) {
            return Err(invalid("window", format!("must be between {MIN_WINDOW:?} and {MAX_WINDOW:?}")));
        }
        let ports = match metadata.get("ports") {
            Some(text) => parse_ports(text).map_err(|reason| invalid("ports", reason))?,
            None => Vec::new(),
        };
        let include_probe_requests = match metadata.get("includeProbeRequests").map(|v| v.trim()) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(invalid("includeProbeRequests", format!("{other:?} is not true or false"))),
        };
        let upstream_selector = match metadata.get("activationPodSelector") {
            Some(text) => Some(LabelSelector::parse(text).map_err(|reason| invalid("activationPodSelector", reason))?),
            None => None,
        };
        let upstream_metric = metric_key(metadata, "activationMetric")?;
        let upstream_ports = match metadata.get("activationPorts") {
            Some(text) => Some(parse_ports(text).map_err(|reason| invalid("activationPorts", reason))?),
            None => None,
        };
        let upstream = match (upstream_selector, upstream_metric, upstream_ports) {
            (Some(pod_selector), metric_override, ports) => Some(Upstream {
                pod_selector,
                metric: metric_override.unwrap_or(metric),
                ports: ports.unwrap_or_default(),
            }),
            (None, Some(_), _) => {
                return Err(invalid("activationMetric", "only meaningful with activationPodSelector"))
            }
            (None, None, Some(_)) => {
                return Err(invalid("activationPorts", "only meaningful with activationPodSelector"))
            }
            (None, None, None) => None,
        };
        let min_confidence = number(metadata, "minConfidence")?;
        if let Some(min) = min_confidence {
            if !(0.0..=1.0).contains(&min) {
                return Err(invalid("minConfidence", format!("{min} is not between 0 and 1")));
            }
            if metric != Metric::GpuSmUtil {
                return Err(invalid(
                    "minConfidence",
                    format!("only applies to gpu_sm_util (the attributed GPU share), not {metric}"),
                ));
            }
        }
        // A confidence is not a load: summed over replicas it means nothing.
        for (key, chosen) in [("metric", Some(metric)), ("activationMetric", upstream.as_ref().map(|u| u.metric))] {
            if chosen == Some(Metric::GpuAttributionConfidence) {
                return Err(invalid(
                    key,
                    "gpu_attribution_confidence is a confidence, not a load; scale on gpu_sm_util with minConfidence",
                ));
            }
        }
        Ok(Self {
            metric,
            target,
            activation_target,
            pod_selector,
            aggregation,
            window,
            ports,
            include_probe_requests,
            upstream,
            min_confidence,
        })
    }

    /// The metric name podgpu announces in GetMetricSpec.
    pub fn metric_name(&self) -> String {
        format!("podgpu-{}", self.metric.name().replace('_', "-"))
    }
}

/// `8000`, `8000,8001`: server ports, 1-65535, at most `MAX_PORTS`.
fn parse_ports(text: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for item in text.split(',').map(str::trim) {
        let port: u16 = item.parse().map_err(|_| format!("{item:?} is not a port number"))?;
        if port == 0 {
            return Err("port 0 is not a server port".to_string());
        }
        ports.push(port);
    }
    ports.sort_unstable();
    ports.dedup();
    if ports.len() > MAX_PORTS {
        return Err(format!("{} ports given, at most {MAX_PORTS}", ports.len()));
    }
    Ok(ports)
}

fn metric_key(metadata: &HashMap<String, String>, key: &str) -> Result<Option<Metric>, TriggerError> {
    let Some(name) = metadata.get(key) else {
        return Ok(None);
    };
    Metric::from_name(name.trim()).map(Some).ok_or_else(|| {
        let known: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
        invalid(key, format!("unknown metric {name:?}; known: {}", known.join(", ")))
    })
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

    /// `minConfidence` is a number in [0, 1], only with `gpu_sm_util`; a
    /// confidence is never a trigger's load metric.
    #[test]
    fn min_confidence_is_validated() {
        let parse = |pairs: &[(&str, &str)]| Trigger::from_metadata(&metadata(pairs));
        let base = [("metric", "gpu_sm_util"), ("target", "50")];
        assert_eq!(parse(&base).unwrap().min_confidence, None);
        let with = |min: &'static str| {
            let mut pairs = base.to_vec();
            pairs.push(("minConfidence", min));
            parse(&pairs)
        };
        assert_eq!(with("0.5").unwrap().min_confidence, Some(0.5));
        assert_eq!(with(" 1 ").unwrap().min_confidence, Some(1.0));
        for bad in ["1.5", "-0.1", "high", "NaN"] {
            assert_eq!(with(bad).unwrap_err().key, "minConfidence", "{bad}");
        }
        let other = parse(&[("metric", "requests_in_flight"), ("target", "4"), ("minConfidence", "0.5")]);
        let err = other.unwrap_err();
        assert_eq!(err.key, "minConfidence");
        assert!(err.reason.contains("requests_in_flight"), "{err}");
        let err = parse(&[("metric", "gpu_attribution_confidence"), ("target", "1")]).unwrap_err();
        assert_eq!(err.key, "metric");
        assert!(err.reason.contains("minConfidence"), "{err}");
        let err = parse(&[
            ("metric", "gpu_sm_util"),
            ("target", "50"),
            ("activationPodSelector", "app=gateway"),
            ("activationMetric", "gpu_attribution_confidence"),
        ])
        .unwrap_err();
        assert_eq!(err.key, "activationMetric");
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
        let ported = Trigger::from_metadata(&metadata(&[
            ("metric", "request_rate"),
            ("target", "5"),
            ("ports", "8001, 8000,8001"),
        ]))
        .unwrap();
        assert_eq!(ported.ports, vec![8000, 8001]);
        assert!(full.ports.is_empty());

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
            ([&ok[..], &[("profile", "llama")]].concat(), "profile"),
            ([&ok[..], &[("ports", "80,http")]].concat(), "ports"),
            ([&ok[..], &[("ports", "0")]].concat(), "ports"),
            ([&ok[..], &[("ports", "70000")]].concat(), "ports"),
            ([&ok[..], &[("ports", "")]].concat(), "ports"),
            ([&ok[..], &[("activationMetric", "request_rate")]].concat(), "activationMetric"),
            (
                [&ok[..], &[("activationPodSelector", "app=gw"), ("activationMetric", "qps")]].concat(),
                "activationMetric",
            ),
            ([&ok[..], &[("activationPodSelector", "app in (")]].concat(), "activationPodSelector"),
            ([&ok[..], &[("activationPorts", "8080")]].concat(), "activationPorts"),
            ([&ok[..], &[("activationPodSelector", "app=gw"), ("activationPorts", "x")]].concat(), "activationPorts"),
            (vec![("profile", "vllm"), ("metric", "gpu_sm_util")], "target"),
        ];
        for (pairs, key) in cases {
            let err = Trigger::from_metadata(&metadata(&pairs)).unwrap_err();
            assert_eq!(err.key, key, "{pairs:?}: {err}");
            assert!(err.to_string().starts_with(&format!("scalerMetadata.{key}: ")), "{err}");
        }
        let huge = "a".repeat(MAX_VALUE_BYTES + 1);
        assert_eq!(Trigger::from_metadata(&metadata(&[("metric", &huge)])).unwrap_err().key, "metric");
    }

    /// A profile fills metric, target and window; explicit keys win.
    #[test]
    fn profiles_fill_defaults() {
        let vllm = Trigger::from_metadata(&metadata(&[("profile", "vllm")])).unwrap();
        assert_eq!((vllm.metric, vllm.target, vllm.window), (Metric::RequestsInFlight, 16.0, DEFAULT_WINDOW));
        let batch = Trigger::from_metadata(&metadata(&[("profile", "batch"), ("target", "50")])).unwrap();
        assert_eq!((batch.metric, batch.target, batch.window), (Metric::GpuSmUtil, 50.0, Duration::from_secs(30)));
        let overridden =
            Trigger::from_metadata(&metadata(&[("profile", "tgi"), ("metric", "ttft_ms_p90"), ("target", "500")]))
                .unwrap();
        assert_eq!(overridden.metric, Metric::TtftMs(crate::signals::metric::Quantile::P90));
        for profile in PROFILES {
            assert!(Trigger::from_metadata(&metadata(&[("profile", profile.name)])).is_ok(), "{}", profile.name);
        }
    }

    /// KEDA's own connection keys arrive in scalerMetadata and are accepted.
    #[test]
    fn keda_connection_keys_are_ignored() {
        let mut pairs = vec![("metric", "requests_in_flight"), ("target", "4")];
        pairs.extend(KEDA_CONNECTION_KEYS.iter().map(|key| (*key, "x")));
        assert!(Trigger::from_metadata(&metadata(&pairs)).is_ok());
    }

    /// An upstream selector activates; its metric defaults to the trigger's.
    #[test]
    fn upstream_activation() {
        let trigger = Trigger::from_metadata(&metadata(&[
            ("metric", "requests_in_flight"),
            ("target", "4"),
            ("activationPodSelector", "app=gateway"),
        ]))
        .unwrap();
        let upstream = trigger.upstream.unwrap();
        assert_eq!(upstream.metric, Metric::RequestsInFlight);
        assert!(upstream.ports.is_empty());
        assert_eq!(upstream.pod_selector, LabelSelector::parse("app=gateway").unwrap());
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

    /// `includeProbeRequests` takes true or false and nothing else.
    #[test]
    fn include_probe_requests() {
        let parse = |value: &str| {
            let metadata: HashMap<String, String> =
                [("metric", "requests_in_flight"), ("target", "4"), ("includeProbeRequests", value)]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
            Trigger::from_metadata(&metadata)
        };
        assert!(parse("true").unwrap().include_probe_requests);
        assert!(!parse("false").unwrap().include_probe_requests);
        let err = parse("yes").unwrap_err().to_string();
        assert!(err.contains("includeProbeRequests"), "{err}");
    }
}
