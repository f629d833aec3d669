//! Combines pod values into one workload value for KEDA.
//!
//! KEDA's default `AverageValue` computes desired replicas as
//! ceil(value / target), so the default aggregation is the SUM over the
//! workload's pods with `target` meaning "per replica". `avg` and `max` are
//! for metrics a user wants to treat as per-pod levels.
use super::latency::{new_histogram, quantile_ms};
use super::metric::{Combine, Metric};
use super::traffic_filter::TrafficFilter;
use super::view::{NodeView, PodView, WARM_UP_S};
use crate::pods::selector::LabelSelector;
use hdrhistogram::Histogram;

/// How pod values combine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Aggregation {
    /// Sum over pods (additive; right for AverageValue targets).
    #[default]
    Sum,
    /// Largest pod value.
    Max,
    /// Mean over pods that have a value.
    Avg,
}

/// Which pods and what to compute.
#[derive(Clone, Debug)]
pub struct WorkloadQuery<'a> {
    /// Pods must be in this namespace (the ScaledObject's).
    pub namespace: &'a str,
    /// And match this selector.
    pub selector: &'a LabelSelector,
    /// Metric to compute per pod.
    pub metric: Metric,
    /// Window in seconds.
    pub window_s: f64,
    /// How to combine pods.
    pub aggregation: Aggregation,
    /// Which request traffic counts (ports, probe traffic).
    pub traffic: TrafficFilter<'a>,
}

/// A workload's value and how many pods it covers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WorkloadValue {
    /// Combined value (0 when no pod matches).
    pub value: f64,
    /// Pods that matched and had a value.
    pub pods: usize,
}

/// What aggregation needs from a pod: local pods (`PodView`) and pods of
/// remote node snapshots (the scaler role) both provide it.
pub trait PodSignals {
    /// Namespace, when known.
    fn namespace(&self) -> Option<&str>;
    /// Pod labels.
    fn labels(&self) -> &std::collections::BTreeMap<String, String>;
    /// Name for messages (name, else UID).
    fn display_name(&self) -> &str;
    /// Value of an additive metric over the window, over the traffic
    /// `filter` admits (`None`: no value yet).
    fn value(&self, metric: Metric, window_s: f64, filter: &TrafficFilter<'_>) -> Option<f64>;
    /// Adds the pod's TTFT or latency distribution over the window (of the
    /// traffic `filter` admits) to `into`.
    fn merge_latencies(&self, metric: Metric, window_s: f64, filter: &TrafficFilter<'_>, into: &mut Histogram<u32>);
    /// Why the pod can never have the metric (MIG, MPS).
    fn unavailable_reason(&self, metric: Metric) -> Option<&str>;
    /// Whether the pod's namespace and labels are not known yet (its
    /// cgroup was found before its metadata arrived).
    fn metadata_pending(&self) -> bool;
}

impl PodSignals for PodView {
    fn namespace(&self) -> Option<&str> {
        self.meta.namespace.as_deref()
    }
    fn labels(&self) -> &std::collections::BTreeMap<String, String> {
        &self.meta.labels
    }
    fn display_name(&self) -> &str {
        self.meta.name.as_deref().unwrap_or(&self.meta.uid)
    }
    fn value(&self, metric: Metric, window_s: f64, filter: &TrafficFilter<'_>) -> Option<f64> {
        PodView::value(self, metric, window_s, filter)
    }
    fn merge_latencies(&self, metric: Metric, window_s: f64, filter: &TrafficFilter<'_>, into: &mut Histogram<u32>) {
        PodView::merge_latencies(self, metric, window_s, filter, into)
    }
    fn unavailable_reason(&self, metric: Metric) -> Option<&str> {
        PodView::unavailable_reason(self, metric)
    }
    fn metadata_pending(&self) -> bool {
        self.metadata_pending
    }
}

/// The workload's value on this node, or the reason the metric's source
/// cannot serve.
pub fn workload_value(view: &NodeView, query: &WorkloadQuery<'_>) -> Result<WorkloadValue, String> {
    let status = view.source_status(query.metric);
    if !status.is_ok() {
        return Err(format!("{} is unavailable on this node: {status:?}", query.metric));
    }
    if view.warming_up(query.metric) {
        return Err(format!(
            "{} has no value yet: the agent started {:.2} s ago, and rates need {WARM_UP_S} s",
            query.metric, view.at_s
        ));
    }
    combine(view.pods.iter(), query)
}

/// The pods among `pods` that `query` selects; an error while a pod's
/// metadata is pending (it may be one the selector picks).
fn select<'a, P: PodSignals + 'a>(
    pods: impl IntoIterator<Item = &'a P>,
    query: &WorkloadQuery<'_>,
) -> Result<Vec<&'a P>, String> {
    let pods: Vec<&P> = pods.into_iter().collect();
    // A pod whose labels have not arrived may be one the selector picks:
    // answering without it would be a smaller sum than the truth.
    if let Some(pod) = pods.iter().find(|pod| pod.metadata_pending()) {
        return Err(format!(
            "{} cannot be computed yet: pod {} was found before its metadata (namespace, labels) arrived",
            query.metric,
            pod.display_name()
        ));
    }
    Ok(pods
        .into_iter()
        .filter(|pod| pod.namespace() == Some(query.namespace))
        .filter(|pod| query.selector.matches(pod.labels()))
        .collect())
}

/// The selected pod whose mean attribution confidence over the query's
/// window is lowest, with that confidence (`None`: no selected pod has
/// one, e.g. none runs on a shared GPU). The query's metric is ignored.
pub fn least_confident<'a, P: PodSignals + 'a>(
    pods: impl IntoIterator<Item = &'a P>,
    query: &WorkloadQuery<'_>,
) -> Result<Option<(String, f64)>, String> {
    let query = WorkloadQuery { metric: Metric::GpuAttributionConfidence, ..query.clone() };
    Ok(select(pods, &query)?
        .into_iter()
        .filter_map(|pod| {
            let confidence = pod.value(Metric::GpuAttributionConfidence, query.window_s, &query.traffic)?;
            Some((pod.display_name().to_string(), confidence))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1)))
}

/// Combines the selected pods among `pods` into one workload value.
pub fn combine<'a, P: PodSignals + 'a>(
    pods: impl IntoIterator<Item = &'a P>,
    query: &WorkloadQuery<'_>,
) -> Result<WorkloadValue, String> {
    let selected = select(pods, query)?;
    // One pod that cannot be measured makes the whole sum wrong: say so
    // instead of under-reporting.
    if let Some((pod, reason)) = selected.iter().find_map(|pod| Some((pod, pod.unavailable_reason(query.metric)?))) {
        return Err(format!(
            "{} is unavailable for pod {}/{}: {reason}",
            query.metric,
            query.namespace,
            pod.display_name()
        ));
    }
    if let Combine::Percentile(quantile) = query.metric.combine() {
        // Merge the distributions, then scale by the pod count: under KEDA's
        // AverageValue, ceil(value / target) = ceil(pods * p / target), the
        // proportional rule that fits a latency (docs/requests.md, "KEDA metrics").
        let mut merged = new_histogram();
        for pod in &selected {
            pod.merge_latencies(query.metric, query.window_s, &query.traffic, &mut merged);
        }
        let percentile = quantile_ms(&merged, quantile.fraction()).unwrap_or(0.0);
        return Ok(WorkloadValue { value: percentile * selected.len() as f64, pods: selected.len() });
    }
    let (mut sum, mut max, mut pods) = (0.0_f64, 0.0_f64, 0usize);
    for pod in &selected {
        // A pod without a value yet (one point of history: the pod just
        // appeared; GPU data missing all window) would make the sum
        // smaller than the truth, or a made-up 0.
        let Some(value) = pod.value(query.metric, query.window_s, &query.traffic) else {
            return Err(format!(
                "{} has no value yet for pod {}/{} (too little history: the agent or the pod just started, \
                 or its source had no data in the window)",
                query.metric,
                query.namespace,
                pod.display_name()
            ));
        };
        sum += value;
        max = max.max(value);
        pods += 1;
    }
    let value = match query.aggregation {
        Aggregation::Sum => sum,
        Aggregation::Max => max,
        Aggregation::Avg if pods > 0 => sum / pods as f64,
        Aggregation::Avg => 0.0,
    };
    Ok(WorkloadValue { value, pods })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::PodMeta;
    use crate::signals::view::{PodView, SourceStatus};

    fn pod(namespace: &str, app: &str, recv_rate: u64) -> PodView {
        PodView::fixture(namespace, app, recv_rate)
    }

    fn view() -> NodeView {
        let mut view = NodeView::empty();
        // An agent running for a minute (its rates are given out).
        view.at_s = 60.0;
        view.health.probes = SourceStatus::Ok { detail: "test".into() };
        view.pods = vec![pod("ns", "llm", 100), pod("ns", "llm", 300), pod("ns", "other", 1000), pod("x", "llm", 5000)];
        view
    }

    fn query(selector: &LabelSelector, aggregation: Aggregation) -> WorkloadQuery<'_> {
        WorkloadQuery {
            namespace: "ns",
            selector,
            metric: Metric::SocketRecvBytesRate,
            window_s: 10.0,
            aggregation,
            traffic: TrafficFilter::default(),
        }
    }

    fn port(port: u16, in_flight: u64, recv_rate: u64) -> crate::signals::view::PortView {
        crate::signals::view::PortView::fixture(port, in_flight, recv_rate)
    }

    /// With `ports`, request metrics count only those ports' connections;
    /// GPU metrics stay per pod.
    #[test]
    fn ports_filter_request_metrics() {
        let mut view = view();
        view.pods[0].requests_in_flight = 7;
        view.pods[0].ports = vec![port(8000, 5, 60), port(8002, 2, 40)];
        view.pods[1].requests_in_flight = 1;
        view.pods[1].ports = vec![port(8000, 1, 300)];
        let selector = LabelSelector::parse("app=llm").unwrap();
        // Pod 0 also answered 3 health checks on 8000, counted apart.
        view.pods[0].ports.push(crate::signals::view::PortView { probe: true, ..port(8000, 3, 10) });
        let in_flight = |ports: &[u16], include_probes: bool| {
            let traffic = TrafficFilter { ports, include_probes };
            let query =
                WorkloadQuery { metric: Metric::RequestsInFlight, traffic, ..query(&selector, Aggregation::Sum) };
            workload_value(&view, &query).unwrap().value
        };
        assert_eq!(in_flight(&[], false), 8.0);
        assert_eq!(in_flight(&[8000], false), 6.0);
        assert_eq!(in_flight(&[8002], false), 2.0);
        assert_eq!(in_flight(&[9999], false), 0.0);
        assert_eq!(in_flight(&[], true), 11.0, "probe traffic only when asked for");
        assert_eq!(in_flight(&[8000], true), 9.0);
        let rate = WorkloadQuery { traffic: TrafficFilter::ports(&[8002]), ..query(&selector, Aggregation::Sum) };
        assert_eq!(workload_value(&view, &rate).unwrap().value, 40.0);
    }

    /// The least confident selected pod is named with its window-mean
    /// confidence; pods without one (no shared GPU) are not candidates.
    #[test]
    fn least_confident_names_the_weakest_selected_pod() {
        let mut view = view();
        // One second of history at the given confidence.
        let point = |at_s: f64, confidence: f64| crate::signals::history::Point {
            at_s,
            gpu_confidence_integral: confidence * at_s,
            gpu_confidence_known_s: at_s,
            ..Default::default()
        };
        for (pod, confidence) in view.pods.iter_mut().zip([0.9, 0.4, 0.1, 0.05]) {
            pod.history = crate::signals::history::History::new(60.0);
            pod.history.push(point(0.0, confidence));
            pod.history.push(point(1.0, confidence));
        }
        let selector = LabelSelector::parse("app=llm").unwrap();
        let least = least_confident(view.pods.iter(), &query(&selector, Aggregation::Sum)).unwrap();
        let (name, confidence) = least.expect("two selected pods have a confidence");
        assert_eq!(name, view.pods[1].display_name());
        assert!((confidence - 0.4).abs() < 1e-9, "{confidence}");
        view.pods.iter_mut().for_each(|pod| pod.history = crate::signals::history::History::new(60.0));
        assert_eq!(least_confident(view.pods.iter(), &query(&selector, Aggregation::Sum)).unwrap(), None);
    }

    /// Sum, max and avg cover exactly the selected pods of the namespace.
    #[test]
    fn aggregations_over_selected_pods() {
        let selector = LabelSelector::parse("app=llm").unwrap();
        let view = view();
        assert_eq!(
            workload_value(&view, &query(&selector, Aggregation::Sum)),
            Ok(WorkloadValue { value: 400.0, pods: 2 })
        );
        assert_eq!(workload_value(&view, &query(&selector, Aggregation::Max)).unwrap().value, 300.0);
        assert_eq!(workload_value(&view, &query(&selector, Aggregation::Avg)).unwrap().value, 200.0);
        let nobody = LabelSelector::parse("app=none").unwrap();
        assert_eq!(workload_value(&view, &query(&nobody, Aggregation::Avg)), Ok(WorkloadValue { value: 0.0, pods: 0 }));
    }

    /// Percentiles merge histograms across pods (not averages of pod
    /// percentiles) and scale by the pod count.
    #[test]
    fn percentiles_merge_histograms_and_scale_by_pods() {
        use crate::signals::latency::LatencyWindow;
        let mut view = view();
        view.health.probes = SourceStatus::Ok { detail: "test".into() };
        let mut fast = LatencyWindow::new(60.0);
        for _ in 0..90 {
            fast.record(9.0, 10_000_000);
        }
        let mut slow = LatencyWindow::new(60.0);
        for _ in 0..10 {
            slow.record(9.0, 1_000_000_000);
        }
        view.pods[0].ports = vec![crate::signals::view::PortView { latency: fast.snapshot(), ..port(8000, 0, 0) }];
        view.pods[1].ports = vec![crate::signals::view::PortView { latency: slow.snapshot(), ..port(8000, 0, 0) }];
        let llm = LabelSelector::parse("app=llm").unwrap();
        let mut q = query(&llm, Aggregation::Sum);
        q.metric = Metric::LatencyMs(crate::signals::metric::Quantile::P50);
        let value = workload_value(&view, &q).unwrap();
        // Merged median is 10 ms (90 of 100 samples), times 2 pods. An
        // average of the pods' medians would say 505 ms.
        assert_eq!(value.pods, 2);
        assert!((value.value - 20.0).abs() < 0.2, "{value:?}");
    }

    /// A pod with one point of history has no rate yet: the workload's
    /// answer is an error naming it, not a 0 summed over pods that have no
    /// value. So is any rate in the agent's first half second.
    #[test]
    fn too_little_history_is_an_error() {
        use crate::signals::history::{History, Point};
        let mut view = view();
        let mut young = History::new(60.0);
        young.push(Point { at_s: 0.0, ..Point::default() });
        view.pods[0].history = young;
        let llm = LabelSelector::parse("app=llm").unwrap();
        let err = workload_value(&view, &query(&llm, Aggregation::Sum)).unwrap_err();
        assert!(err.contains("no value yet") && err.contains("ns/llm"), "{err}");
        view.pods[0].history.push(Point { at_s: 0.5, recv_bytes: 50, ..Point::default() });
        let value = workload_value(&view, &query(&llm, Aggregation::Sum)).unwrap();
        // The young pod over its 0.5 s, the other over the 10 s window.
        assert!((value.value - (50.0 / 0.5 + 300.0)).abs() < 1e-6, "{value:?}");
        view.at_s = 0.2;
        let err = workload_value(&view, &query(&llm, Aggregation::Sum)).unwrap_err();
        assert!(err.contains("agent started"), "{err}");
    }

    /// A selected pod NVML cannot measure (MPS client) makes the answer an
    /// error naming the pod; unselected ones do not matter.
    #[test]
    fn unattributable_pod_is_an_error() {
        let mut view = view();
        view.health.gpu = SourceStatus::Ok { detail: "test".into() };
        view.pods[1].gpu.unattributable = Some(crate::gpu::Sharing::Mps);
        let llm = LabelSelector::parse("app=llm").unwrap();
        let mut q = query(&llm, Aggregation::Sum);
        q.metric = Metric::GpuSmUtil;
        let err = workload_value(&view, &q).unwrap_err();
        assert!(err.contains("MPS") && err.contains("ns/llm"), "{err}");
        let other = LabelSelector::parse("app=other").unwrap();
        let mut q = query(&other, Aggregation::Sum);
        q.metric = Metric::GpuSmUtil;
        assert!(workload_value(&view, &q).is_ok());
    }

    /// A metric whose source is down is an error, never a silent zero.
    #[test]
    fn unavailable_source_is_an_error() {
        let selector = LabelSelector::default();
        let mut q = query(&selector, Aggregation::Sum);
        q.metric = Metric::GpuSmUtil;
        let err = workload_value(&view(), &q).unwrap_err();
        assert!(err.contains("gpu_sm_util is unavailable"), "{err}");
    }

    /// A pod found before its namespace and labels arrived may be one the
    /// selector picks: the answer is an error naming it, not a smaller sum.
    #[test]
    fn metadata_pending_pod_is_an_error() {
        let mut view = view();
        view.health.probes = SourceStatus::Ok { detail: "test".into() };
        let selector = LabelSelector::parse("app=llm").unwrap();
        let q = query(&selector, Aggregation::Sum);
        assert!(workload_value(&view, &q).is_ok());
        let mut newcomer = pod("ns", "llm", 0);
        newcomer.meta = PodMeta::unknown("7d1c2a4e-0000-4000-8000-0000000000ff");
        newcomer.metadata_pending = true;
        view.pods.push(newcomer);
        let err = workload_value(&view, &q).unwrap_err();
        assert!(err.contains("7d1c2a4e-0000-4000-8000-0000000000ff") && err.contains("metadata"), "{err}");
    }
}
