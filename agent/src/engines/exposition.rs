//! Reading an engine's `/metrics` body: the Prometheus text or OpenMetrics
//! format (parsed by `openmetrics-parser`), recognised by family prefix,
//! and reduced to the four signals podgpu serves.
//!
//! Series that engines split by data-parallel rank (`engine`), model or
//! pool are combined here: queue and batch sizes add up, KV-cache use is
//! the fullest pool (the one that preempts first), TTFT histograms add up
//! bucket by bucket where their bounds agree.
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use openmetrics_parser::{MetricNumber, OpenMetricsValue, PrometheusValue};

use super::catalog::{EngineKind, EngineSpec, HistogramSeries, Series, ENGINES};

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExpositionError {
    /// Not valid Prometheus text or OpenMetrics.
    #[error("the body is not Prometheus text or OpenMetrics: {0}")]
    Malformed(String),
    /// Valid, but no family of any engine podgpu knows.
    #[error("no family of a known engine (looked for {0})")]
    NoEngine(String),
    /// The expected engine's families are not there.
    #[error("no {engine} families ({families} families in the body)")]
    NotThisEngine {
        /// The engine expected.
        engine: EngineKind,
        /// How many families the body had.
        families: usize,
    },
}

/// A cumulative histogram as an engine exposes it, bounds in seconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CumulativeHistogram {
    /// Upper bounds in seconds, ascending, the last one `+Inf`.
    pub bounds_s: Vec<f64>,
    /// Observations at or below each bound since the engine started.
    pub cumulative: Vec<f64>,
}

impl CumulativeHistogram {
    /// Observations in total.
    pub fn count(&self) -> f64 {
        self.cumulative.last().copied().unwrap_or(0.0)
    }

    /// The same bounds with no observation.
    pub fn zeroed(&self) -> Self {
        Self { bounds_s: self.bounds_s.clone(), cumulative: vec![0.0; self.cumulative.len()] }
    }

    /// Adds `other` bucket by bucket; `false` (and nothing added) when
    /// the bounds differ.
    fn add(&mut self, other: &CumulativeHistogram) -> bool {
        if self.bounds_s.is_empty() {
            *self = other.clone();
            return true;
        }
        if self.bounds_s != other.bounds_s {
            return false;
        }
        for (mine, theirs) in self.cumulative.iter_mut().zip(&other.cumulative) {
            *mine += theirs;
        }
        true
    }
}

/// What one scrape of an engine said.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineReading {
    /// The engine that wrote it.
    pub engine: EngineKind,
    /// Requests queued, summed over the engine's series (`None`: the
    /// engine does not export it, or this version did not).
    pub requests_waiting: Option<f64>,
    /// Requests in the running batch, summed.
    pub requests_running: Option<f64>,
    /// KV-cache use, fraction 0-1, the fullest series.
    pub kv_cache_fraction: Option<f64>,
    /// Time to first token since the engine started.
    pub ttft: Option<CumulativeHistogram>,
    /// Which family names were read (renames show here).
    pub families_read: Vec<&'static str>,
}

/// One family, reduced to what podgpu reads of it.
#[derive(Debug, Default)]
struct Family {
    /// Each sample's labels and value.
    samples: Vec<(HashMap<String, String>, SampleValue)>,
}

#[derive(Debug)]
enum SampleValue {
    Number(f64),
    Histogram(CumulativeHistogram),
    Other,
}

/// A parsed body: families by name.
#[derive(Debug, Default)]
pub struct Exposition {
    families: HashMap<String, Family>,
}

fn number(value: &MetricNumber) -> f64 {
    value.as_f64()
}

fn histogram(buckets: &[openmetrics_parser::HistogramBucket]) -> CumulativeHistogram {
    let mut pairs: Vec<(f64, f64)> = buckets.iter().map(|b| (b.upper_bound, number(&b.count))).collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    CumulativeHistogram {
        bounds_s: pairs.iter().map(|p| p.0).collect(),
        cumulative: pairs.iter().map(|p| p.1).collect(),
    }
}

/// Every family name an engine's signals are read from.
fn wanted_families() -> &'static HashSet<&'static str> {
    static WANTED: OnceLock<HashSet<&'static str>> = OnceLock::new();
    WANTED.get_or_init(|| {
        ENGINES
            .iter()
            .flat_map(|spec| {
                let gauges = spec.waiting.iter().chain(spec.running).chain(spec.kv_cache).map(|s| s.family);
                gauges.chain(spec.ttft.iter().map(|h| h.series.family))
            })
            .collect()
    })
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Whether a sample or family name belongs to a family podgpu reads
/// (histogram and counter series carry a suffix).
fn is_wanted(name: &str) -> bool {
    let wanted = wanted_families();
    wanted.contains(name)
        || ["_bucket", "_count", "_sum", "_created", "_total"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(|base| wanted.contains(base)))
}

/// The lines of the families podgpu reads. An engine's body holds dozens
/// of families (vLLM's, about 30 KB, has 40) of which four are read, and
/// the parser's cost grows with what it is given: 2.4 ms for vLLM's whole
/// body against a few hundred µs for its read families (`xtask
/// bench-engines` prints both). Lines are classified, never parsed
/// here: a line that is neither a comment nor starts with a metric name
/// makes the body malformed, as the parser would have said.
pub fn read_lines(body: &str) -> Result<String, ExpositionError> {
    let mut kept = String::with_capacity(4096);
    for (index, line) in body.lines().enumerate() {
        let trimmed = line.trim_start();
        let name = if let Some(comment) = trimmed.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            match words.next() {
                Some("TYPE" | "HELP" | "UNIT") => words.next().unwrap_or_default(),
                Some("EOF") => {
                    kept.push_str("# EOF\n");
                    continue;
                }
                _ => continue,
            }
        } else if trimmed.is_empty() || trimmed.starts_with('{') {
            // Blank, or a quoted (UTF-8) name: no engine family is one.
            continue;
        } else {
            let end = trimmed.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(trimmed.len());
            let name = &trimmed[..end];
            if !is_metric_name(name) {
                let shown: String = trimmed.chars().take(60).collect();
                return Err(ExpositionError::Malformed(format!("line {}: {shown:?} is not a sample", index + 1)));
            }
            name
        };
        if is_wanted(name) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    Ok(kept)
}

impl Exposition {
    /// Parses the families podgpu reads from a body; `openmetrics` when
    /// the server said `application/openmetrics-text`.
    pub fn parse(body: &str, openmetrics: bool) -> Result<Self, ExpositionError> {
        Self::parse_read_lines(&read_lines(body)?, openmetrics)
    }

    /// Parses what `read_lines` kept of a body.
    pub fn parse_read_lines(kept: &str, openmetrics: bool) -> Result<Self, ExpositionError> {
        if kept.trim().is_empty() || kept.trim() == "# EOF" {
            // Nothing an engine writes: `read` says which names it looked for.
            return Ok(Self::default());
        }
        let malformed = |err: openmetrics_parser::ParseError| ExpositionError::Malformed(first_line(&err.to_string()));
        let families = if openmetrics {
            let parsed = openmetrics_parser::openmetrics::parse_openmetrics(kept).map_err(malformed)?;
            families(parsed, |value| match value {
                OpenMetricsValue::Gauge(n) | OpenMetricsValue::Unknown(n) => SampleValue::Number(number(n)),
                OpenMetricsValue::Counter(c) => SampleValue::Number(number(&c.value)),
                OpenMetricsValue::Histogram(h) => SampleValue::Histogram(histogram(&h.buckets)),
                _ => SampleValue::Other,
            })
        } else {
            let parsed = openmetrics_parser::prometheus::parse_prometheus(kept).map_err(malformed)?;
            families(parsed, |value| match value {
                PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => SampleValue::Number(number(n)),
                PrometheusValue::Counter(c) => SampleValue::Number(number(&c.value)),
                PrometheusValue::Histogram(h) => SampleValue::Histogram(histogram(&h.buckets)),
                PrometheusValue::Summary(_) => SampleValue::Other,
            })
        };
        Ok(Self { families })
    }

    /// The engine whose families these are. A body can carry more than
    /// one engine's names (Triton's vLLM backend writes `vllm:` beside
    /// `nv_inference_`): the engine with the most families wins, and
    /// Triton's own names win over the backend's.
    pub fn recognise(&self) -> Option<EngineKind> {
        let families_of = |spec: &EngineSpec| {
            self.families.keys().filter(|name| spec.prefixes.iter().any(|prefix| name.starts_with(prefix))).count()
        };
        if families_of(EngineKind::Triton.spec()) > 0 {
            return Some(EngineKind::Triton);
        }
        ENGINES
            .iter()
            .map(|spec| (families_of(spec), spec.kind))
            .filter(|(count, _)| *count > 0)
            .max_by_key(|(count, _)| *count)
            .map(|(_, kind)| kind)
    }

    /// Families in the body.
    pub fn len(&self) -> usize {
        self.families.len()
    }

    /// Whether the body had no family.
    pub fn is_empty(&self) -> bool {
        self.families.is_empty()
    }

    /// The signals of `engine` (recognised when `None`).
    pub fn read(&self, engine: Option<EngineKind>) -> Result<EngineReading, ExpositionError> {
        let recognised = self.recognise();
        let engine = match (engine, recognised) {
            (Some(expected), Some(found)) if expected == found => expected,
            // A hint names Triton, and the body is its vLLM backend's, or
            // the other way round: the families decide what can be read.
            (Some(expected), _) => {
                let spec = expected.spec();
                if !self.families.keys().any(|name| spec.prefixes.iter().any(|p| name.starts_with(p))) {
                    return Err(ExpositionError::NotThisEngine { engine: expected, families: self.len() });
                }
                expected
            }
            (None, Some(found)) => found,
            (None, None) => {
                let prefixes: Vec<&str> = ENGINES.iter().flat_map(|spec| spec.prefixes.iter().copied()).collect();
                return Err(ExpositionError::NoEngine(prefixes.join(" ")));
            }
        };
        let spec = engine.spec();
        let mut families_read = Vec::new();
        let requests_waiting = self.gauge(spec.waiting, Combine::Sum, &mut families_read);
        let requests_running = self.gauge(spec.running, Combine::Sum, &mut families_read);
        let kv_cache_fraction = self.gauge(spec.kv_cache, Combine::Max, &mut families_read);
        let ttft = self.histogram(spec.ttft, &mut families_read);
        Ok(EngineReading { engine, requests_waiting, requests_running, kv_cache_fraction, ttft, families_read })
    }

    /// The first of `names` present, its series combined.
    fn gauge(&self, names: &[Series], combine: Combine, read: &mut Vec<&'static str>) -> Option<f64> {
        names.iter().find_map(|series| {
            let family = self.families.get(series.family)?;
            let values = family.samples.iter().filter(|(labels, _)| selects(series, labels)).filter_map(
                |(_, value)| match value {
                    SampleValue::Number(n) if n.is_finite() => Some(*n),
                    _ => None,
                },
            );
            let combined = match combine {
                Combine::Sum => values.fold(None, |sum: Option<f64>, v| Some(sum.unwrap_or(0.0) + v)),
                Combine::Max => values.fold(None, |max: Option<f64>, v| Some(max.map_or(v, |m| m.max(v)))),
            }?;
            read.push(series.family);
            Some(combined)
        })
    }

    /// The first of `names` present, its series added bucket by bucket
    /// and its bounds turned into seconds. Series whose bounds differ from
    /// the first one's are left out.
    fn histogram(&self, names: &[HistogramSeries], read: &mut Vec<&'static str>) -> Option<CumulativeHistogram> {
        names.iter().find_map(|wanted| {
            let family = self.families.get(wanted.series.family)?;
            let mut total = CumulativeHistogram::default();
            let mut any = false;
            for (labels, value) in &family.samples {
                if let (true, SampleValue::Histogram(h)) = (selects(&wanted.series, labels), value) {
                    any |= total.add(h);
                }
            }
            if !any || total.bounds_s.is_empty() {
                return None;
            }
            for bound in &mut total.bounds_s {
                *bound *= wanted.seconds_per_unit;
            }
            read.push(wanted.series.family);
            Some(total)
        })
    }
}

enum Combine {
    Sum,
    Max,
}

/// The parser's families, each sample's value turned into ours by `value`
/// (the two formats have their own value types).
fn families<T: Clone, V: openmetrics_parser::RenderableMetricValue + Clone>(
    parsed: openmetrics_parser::MetricsExposition<T, V>,
    value: impl Fn(&V) -> SampleValue,
) -> HashMap<String, Family> {
    parsed
        .families
        .into_iter()
        .map(|(name, family)| {
            let samples = family
                .iter_samples()
                .map(|sample| (labels_of(sample.get_labelset().ok()), value(&sample.value)))
                .collect();
            (name, Family { samples })
        })
        .collect()
}

fn selects(series: &Series, labels: &HashMap<String, String>) -> bool {
    series.only.is_none_or(|(label, value)| labels.get(label).is_some_and(|v| v == value))
}

fn labels_of(set: Option<openmetrics_parser::LabelSet<'_>>) -> HashMap<String, String> {
    set.map(|set| set.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
}

/// Parse errors can quote the whole input; keep the first line, bounded.
fn first_line(text: &str) -> String {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or_default();
    line.chars().take(160).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = "\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation=\"0\"} 1234.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 7.0
vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 1.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25
vllm:gpu_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.5
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.01\",model_name=\"m\"} 1.0
vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"0.1\",model_name=\"m\"} 3.0
vllm:time_to_first_token_seconds_bucket{engine=\"0\",le=\"+Inf\",model_name=\"m\"} 4.0
vllm:time_to_first_token_seconds_count{engine=\"0\",model_name=\"m\"} 4.0
vllm:time_to_first_token_seconds_sum{engine=\"0\",model_name=\"m\"} 0.4
vllm:time_to_first_token_seconds_bucket{engine=\"1\",le=\"0.01\",model_name=\"m\"} 0.0
vllm:time_to_first_token_seconds_bucket{engine=\"1\",le=\"0.1\",model_name=\"m\"} 2.0
vllm:time_to_first_token_seconds_bucket{engine=\"1\",le=\"+Inf\",model_name=\"m\"} 2.0
vllm:time_to_first_token_seconds_count{engine=\"1\",model_name=\"m\"} 2.0
vllm:time_to_first_token_seconds_sum{engine=\"1\",model_name=\"m\"} 0.1
";

    /// Data-parallel splits add up, KV is the fullest rank, histograms add
    /// bucket by bucket, and the pre-0.9 KV name is read when the new one
    /// is absent.
    #[test]
    fn vllm_splits_and_renames() {
        let exposition = Exposition::parse(VLLM, false).unwrap();
        assert_eq!(exposition.recognise(), Some(EngineKind::Vllm));
        let reading = exposition.read(None).unwrap();
        assert_eq!(reading.requests_waiting, Some(8.0));
        assert_eq!(reading.requests_running, Some(5.0));
        assert_eq!(reading.kv_cache_fraction, Some(0.5));
        assert!(reading.families_read.contains(&"vllm:gpu_cache_usage_perc"));
        let ttft = reading.ttft.unwrap();
        assert_eq!(ttft.bounds_s, vec![0.01, 0.1, f64::INFINITY]);
        assert_eq!(ttft.cumulative, vec![1.0, 5.0, 6.0]);
    }

    /// Triton's families win over its vLLM backend's, label-selected series
    /// are read, and millisecond bounds become seconds.
    #[test]
    fn triton_with_label_selected_series() {
        let body = "\
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model=\"a\",version=\"1\"} 2
nv_inference_pending_request_count{model=\"b\",version=\"1\"} 3
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\",model=\"a\",version=\"1\"} 1000
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\",model=\"a\",version=\"1\"} 0.75
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{request_type=\"scheduled\",model=\"a\",version=\"1\"} 4
nv_trt_llm_request_metrics{request_type=\"waiting\",model=\"a\",version=\"1\"} 9
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model=\"c\",version=\"1\"} 1
# TYPE nv_inference_first_response_histogram_ms histogram
nv_inference_first_response_histogram_ms_bucket{model=\"a\",version=\"1\",le=\"100\"} 2
nv_inference_first_response_histogram_ms_bucket{model=\"a\",version=\"1\",le=\"+Inf\"} 3
nv_inference_first_response_histogram_ms_count{model=\"a\",version=\"1\"} 3
nv_inference_first_response_histogram_ms_sum{model=\"a\",version=\"1\"} 250
";
        let reading = Exposition::parse(body, false).unwrap().read(None).unwrap();
        assert_eq!(reading.engine, EngineKind::Triton);
        assert_eq!(reading.requests_waiting, Some(5.0));
        assert_eq!(reading.requests_running, Some(4.0));
        assert_eq!(reading.kv_cache_fraction, Some(0.75));
        assert_eq!(reading.ttft.unwrap().bounds_s, vec![0.1, f64::INFINITY]);
    }

    /// Garbage, other exporters and the wrong engine are errors, not zeros.
    #[test]
    fn bad_bodies_are_errors() {
        assert!(matches!(Exposition::parse("<html>nope</html>", false), Err(ExpositionError::Malformed(_))));
        assert!(matches!(
            Exposition::parse("vllm:num_requests_waiting 1\n=oops\n", false),
            Err(ExpositionError::Malformed(_))
        ));
        let node_exporter = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1\n";
        let parsed = Exposition::parse(node_exporter, false).unwrap();
        assert!(matches!(parsed.read(None), Err(ExpositionError::NoEngine(_))));
        let vllm = Exposition::parse(VLLM, false).unwrap();
        assert!(matches!(vllm.read(Some(EngineKind::Sglang)), Err(ExpositionError::NotThisEngine { .. })));
    }

    /// An engine that exports no KV figure reads `None` there, not 0.
    #[test]
    fn missing_signals_stay_unknown() {
        let body = "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\n\
                    # TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 4\n";
        let reading = Exposition::parse(body, false).unwrap().read(None).unwrap();
        assert_eq!(
            (reading.engine, reading.requests_waiting, reading.requests_running),
            (EngineKind::LlamaCpp, Some(4.0), Some(1.0))
        );
        assert_eq!((reading.kv_cache_fraction, reading.ttft), (None, None));
    }

    /// OpenMetrics bodies read the same.
    #[test]
    fn openmetrics_bodies() {
        let body = "# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs{model_name=\"m\"} 6\n# EOF\n";
        let reading = Exposition::parse(body, true).unwrap().read(None).unwrap();
        assert_eq!((reading.engine, reading.requests_waiting), (EngineKind::Sglang, Some(6.0)));
    }
}
