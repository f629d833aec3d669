//! KEDA's ExternalScaler over gRPC, answered from the latest published
//! `NodeView`: no I/O and no probe or NVML access per call.
//!
//! Values are workload totals (see `signals::aggregate`); both the float
//! and the deprecated int64 fields are filled because KEDA falls back to the
//! int64 ones when the float is 0.
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podgpu_proto::externalscaler::external_scaler_server::ExternalScaler;
use podgpu_proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec, MetricValue,
    ScaledObjectRef,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::answer_times::{AnswerTimes, Call};
use super::trigger::Trigger;
use crate::cluster::ClusterHandle;
use crate::pods::selector::LabelSelector;
use crate::signals::aggregate::{combine, least_confident, workload_value, WorkloadQuery, WorkloadValue};
use crate::signals::metric::Metric;
use crate::signals::traffic_filter::TrafficFilter;
use crate::signals::view::NodeView;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Where answers come from: this node's view (standalone) or the merged
/// view of all node agents (scaler role). Both are read from memory.
#[derive(Clone)]
pub enum Signals {
    /// This agent's own pods.
    Local(watch::Receiver<Arc<NodeView>>),
    /// Every node agent's pods.
    Cluster(ClusterHandle),
}

/// How long a KEDA call may wait for a poll that carries its trigger
/// (a trigger's first call, or a window not asked for before).
const NEW_QUERY_WAIT: Duration = Duration::from_secs(3);

impl Signals {
    async fn evaluate(&self, namespace: &str, trigger: &Trigger) -> Result<WorkloadValue, ScalerError> {
        let value =
            self.evaluate_pods(namespace, trigger, &trigger.pod_selector, trigger.metric, &trigger.ports).await?;
        if let Some(min) = trigger.min_confidence {
            self.check_confidence(namespace, trigger, min).await?;
        }
        Ok(value)
    }

    /// `minConfidence`: an error naming the least confident selected pod
    /// when its attribution confidence over the window is below `min`.
    async fn check_confidence(&self, namespace: &str, trigger: &Trigger, min: f64) -> Result<(), ScalerError> {
        let query =
            query_of(namespace, trigger, &trigger.pod_selector, Metric::GpuAttributionConfidence, &trigger.ports);
        let least = match self {
            Signals::Local(view) => {
                let view = view.borrow().clone();
                least_confident(view.pods.iter(), &query)
            }
            Signals::Cluster(cluster) => {
                let view = cluster.ensure(&query, NEW_QUERY_WAIT).await;
                match view.coverage_error(&query) {
                    Some(reason) => Err(reason),
                    None => least_confident(view.candidates(&query), &query),
                }
            }
        }
        .map_err(ScalerError::Unavailable)?;
        match least {
            Some((pod, confidence)) if confidence < min => Err(ScalerError::Unavailable(format!(
                "gpu_sm_util for pod {namespace}/{pod} has attribution confidence {confidence:.2} over the last \
                 {:.0} s, below the trigger's minConfidence {min}: the split of its GPU between the pods sharing \
                 it is not measured well enough to scale on (docs/attribution.md)",
                query.window_s
            ))),
            _ => Ok(()),
        }
    }

    /// The value of `metric` over the pods `selector` picks (on `ports`
    /// when not empty), with the trigger's window and aggregation.
    async fn evaluate_pods(
        &self,
        namespace: &str,
        trigger: &Trigger,
        selector: &LabelSelector,
        metric: Metric,
        ports: &[u16],
    ) -> Result<WorkloadValue, ScalerError> {
        let query = query_of(namespace, trigger, selector, metric, ports);
        match self {
            Signals::Local(view) => {
                let view = view.borrow().clone();
                workload_value(&view, &query).map_err(ScalerError::Unavailable)
            }
            Signals::Cluster(cluster) => {
                let view = cluster.ensure(&query, NEW_QUERY_WAIT).await;
                let key = format!(
                    "{namespace}\0{metric:?}\0{selector:?}\0{}\0{:?}\0{:?}",
                    query.window_s, trigger.aggregation, query.traffic
                );
                view.memoized(key, || {
                    if let Some(reason) = view.coverage_error(&query) {
                        return Err(reason);
                    }
                    combine(view.candidates(&query), &query)
                })
                .map_err(ScalerError::Unavailable)
            }
        }
    }

    /// Whether the workload should run: its own value above the activation
    /// target, or (at zero replicas, when it has no pods) its upstream's.
    async fn is_active(&self, namespace: &str, trigger: &Trigger) -> Result<bool, ScalerError> {
        let own = self.evaluate(namespace, trigger).await;
        if matches!(&own, Ok(value) if value.value > trigger.activation_target) {
            return Ok(true);
        }
        let Some(upstream) = &trigger.upstream else {
            return own.map(|_| false);
        };
        let upstream =
            self.evaluate_pods(namespace, trigger, &upstream.pod_selector, upstream.metric, &upstream.ports).await;
        match (own, upstream) {
            (_, Ok(value)) if value.value > trigger.activation_target => Ok(true),
            // Either side answering "idle" is an answer; both failing is not.
            (Ok(_), _) | (_, Ok(_)) => Ok(false),
            (Err(err), Err(_)) => Err(err),
        }
    }

    /// Waits until the underlying view changes; false when it never will.
    async fn changed(&mut self) -> bool {
        match self {
            Signals::Local(view) => view.changed().await.is_ok(),
            Signals::Cluster(cluster) => cluster.view.changed().await.is_ok(),
        }
    }
}

/// The query for `metric` over the pods `selector` picks (on `ports` when
/// not empty), with the trigger's window and aggregation.
fn query_of<'a>(
    namespace: &'a str,
    trigger: &'a Trigger,
    selector: &'a LabelSelector,
    metric: Metric,
    ports: &'a [u16],
) -> WorkloadQuery<'a> {
    WorkloadQuery {
        namespace,
        selector,
        metric,
        window_s: trigger.window.as_secs_f64(),
        aggregation: trigger.aggregation,
        traffic: TrafficFilter { ports, include_probes: trigger.include_probe_requests },
    }
}

/// The ExternalScaler service.
#[derive(Clone)]
pub struct KedaScaler {
    signals: Signals,
    answer_times: Arc<AnswerTimes>,
}

impl KedaScaler {
    /// A scaler answering from this node's published view.
    pub fn new(view: watch::Receiver<Arc<NodeView>>) -> Self {
        Self { signals: Signals::Local(view), answer_times: Arc::default() }
    }

    /// A scaler answering from every node agent (the scaler role), timing
    /// its answers into `answer_times`.
    pub fn for_cluster(cluster: ClusterHandle, answer_times: Arc<AnswerTimes>) -> Self {
        Self { signals: Signals::Cluster(cluster), answer_times }
    }

    async fn answer_is_active(&self, scaled_object: ScaledObjectRef) -> Result<bool, ScalerError> {
        let trigger = trigger_of(&scaled_object)?;
        self.signals.is_active(&scaled_object.namespace, &trigger).await
    }

    #[allow(deprecated)]
    async fn answer_get_metrics(&self, request: GetMetricsRequest) -> Result<GetMetricsResponse, Status> {
        let scaled_object =
            request.scaled_object_ref.ok_or_else(|| Status::invalid_argument("scaledObjectRef: required"))?;
        let trigger = trigger_of(&scaled_object)?;
        let value = self.signals.evaluate(&scaled_object.namespace, &trigger).await?;
        let metric_name = if request.metric_name.is_empty() { trigger.metric_name() } else { request.metric_name };
        tracing::debug!(
            scaled_object = %scaled_object.name, namespace = %scaled_object.namespace,
            metric = %trigger.metric, value = value.value, pods = value.pods, "GetMetrics"
        );
        Ok(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name,
                metric_value: as_int(value.value),
                metric_value_float: value.value,
            }],
        })
    }
}

/// Why a request cannot be answered; each maps to one gRPC code.
#[derive(Debug, thiserror::Error)]
enum ScalerError {
    /// The request itself is wrong (InvalidArgument).
    #[error("{0}")]
    Invalid(String),
    /// The metric's source is down on this node (Unavailable).
    #[error("{0}")]
    Unavailable(String),
}

impl From<ScalerError> for Status {
    fn from(err: ScalerError) -> Self {
        match err {
            ScalerError::Invalid(message) => Status::invalid_argument(message),
            ScalerError::Unavailable(message) => Status::unavailable(message),
        }
    }
}

/// Validates a ScaledObjectRef into a trigger.
fn trigger_of(scaled_object: &ScaledObjectRef) -> Result<Trigger, ScalerError> {
    if scaled_object.namespace.is_empty() {
        return Err(ScalerError::Invalid("scaledObjectRef.namespace: required".to_string()));
    }
    Trigger::from_metadata(&scaled_object.scaler_metadata).map_err(|err| ScalerError::Invalid(err.to_string()))
}

/// KEDA reads `metricValue`/`targetSize` when the float field is 0; keep
/// the two consistent and saturate instead of overflowing.
fn as_int(value: f64) -> i64 {
    value.round().clamp(i64::MIN as f64, i64::MAX as f64) as i64
}

#[tonic::async_trait]
impl ExternalScaler for KedaScaler {
    async fn is_active(&self, request: Request<ScaledObjectRef>) -> Result<Response<IsActiveResponse>, Status> {
        let started = Instant::now();
        let answer = self.answer_is_active(request.into_inner()).await;
        self.answer_times.record(Call::IsActive, started.elapsed());
        Ok(Response::new(IsActiveResponse { result: answer? }))
    }

    type StreamIsActiveStream = ResponseStream<IsActiveResponse>;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let scaled_object = request.into_inner();
        let trigger = trigger_of(&scaled_object)?;
        let mut signals = self.signals.clone();
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(async move {
            // Sends the first state at once, then only changes: a `true`
            // reaches KEDA within one collector tick of the load appearing.
            let mut last_sent = None;
            loop {
                match signals.is_active(&scaled_object.namespace, &trigger).await {
                    Ok(active) => {
                        if last_sent != Some(active) {
                            if sender.send(Ok(IsActiveResponse { result: active })).await.is_err() {
                                break;
                            }
                            last_sent = Some(active);
                        }
                    }
                    Err(status) => {
                        tracing::debug!(error = %status, "push activation has no value")
                    }
                }
                tokio::select! {
                    changed = signals.changed() => if !changed { break },
                    _ = sender.closed() => break,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    // KEDA still reads the deprecated int64 fields when the float is 0.
    #[allow(deprecated)]
    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let trigger = trigger_of(request.get_ref())?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: trigger.metric_name(),
                target_size: as_int(trigger.target).max(1),
                target_size_float: trigger.target,
            }],
        }))
    }

    async fn get_metrics(&self, request: Request<GetMetricsRequest>) -> Result<Response<GetMetricsResponse>, Status> {
        let started = Instant::now();
        let answer = self.answer_get_metrics(request.into_inner()).await;
        self.answer_times.record(Call::GetMetrics, started.elapsed());
        answer.map(Response::new)
    }

    type StreamMetricSpecStream = ResponseStream<GetMetricSpecResponse>;

    async fn stream_metric_spec(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        // KEDA falls back to GetMetricSpec when this is unimplemented, and
        // podgpu's specs only change when the ScaledObject does.
        Err(Status::unimplemented("StreamMetricSpec: use GetMetricSpec"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Int64 fields saturate and round instead of wrapping.
    #[test]
    fn int_fields_round_and_saturate() {
        assert_eq!(as_int(2.5), 3);
        assert_eq!(as_int(1e30), i64::MAX);
        assert_eq!(as_int(0.4), 0);
    }

    /// A ScaledObjectRef without a namespace is rejected by name.
    #[test]
    fn namespace_is_required() {
        let scaled_object =
            ScaledObjectRef { name: "x".into(), namespace: String::new(), scaler_metadata: Default::default() };
        let status = Status::from(trigger_of(&scaled_object).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("namespace"));
    }
}
