//! A gRPC tenant for tests: serves the ExternalScaler service (reused as a
//! convenient unary + server-streaming API) with scripted timing taken
//! from the request's metadata. Prints its address as one JSON line.
//!
//! - GetMetrics: answers after `delay_ms`.
//! - StreamIsActive: `messages` replies, the first after `first_ms`, then
//!   every `interval_ms`.
use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use podgpu_proto::externalscaler::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use podgpu_proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricValue, ScaledObjectRef,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

struct Scripted;

fn millis(metadata: &HashMap<String, String>, key: &str) -> u64 {
    metadata.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

type Replies = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Scripted {
    async fn is_active(&self, _: Request<ScaledObjectRef>) -> Result<Response<IsActiveResponse>, Status> {
        Ok(Response::new(IsActiveResponse { result: true }))
    }

    type StreamIsActiveStream = Replies;

    async fn stream_is_active(&self, request: Request<ScaledObjectRef>) -> Result<Response<Replies>, Status> {
        let metadata = request.into_inner().scaler_metadata;
        let (first, interval, messages) =
            (millis(&metadata, "first_ms"), millis(&metadata, "interval_ms"), millis(&metadata, "messages"));
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(first)).await;
            for index in 0..messages {
                if index > 0 {
                    tokio::time::sleep(Duration::from_millis(interval)).await;
                }
                if sender.send(Ok(IsActiveResponse { result: index % 2 == 0 })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))))
    }

    async fn get_metric_spec(&self, _: Request<ScaledObjectRef>) -> Result<Response<GetMetricSpecResponse>, Status> {
        Ok(Response::new(GetMetricSpecResponse { metric_specs: vec![] }))
    }

    #[allow(deprecated)]
    async fn get_metrics(&self, request: Request<GetMetricsRequest>) -> Result<Response<GetMetricsResponse>, Status> {
        let request = request.into_inner();
        let metadata = request.scaled_object_ref.map(|r| r.scaler_metadata).unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(millis(&metadata, "delay_ms"))).await;
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: request.metric_name,
                metric_value: 1,
                metric_value_float: 1.0,
            }],
        }))
    }

    type StreamMetricSpecStream = Pin<Box<dyn Stream<Item = Result<GetMetricSpecResponse, Status>> + Send>>;

    async fn stream_metric_spec(
        &self,
        _: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let listen = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".to_string());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("{{\"listening\":\"{}\"}}", listener.local_addr()?);
    // Without TCP_NODELAY a unary answer's trailers wait for the client's
    // delayed ACK (up to 40 ms) after the server wrote them: time a
    // syscall probe cannot see. Production gRPC servers set it.
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |stream| {
        stream.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    });
    tonic::transport::Server::builder()
        .add_service(ExternalScalerServer::new(Scripted))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
