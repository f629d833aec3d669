//! A client that speaks KEDA's ExternalScaler protocol the way KEDA does:
//! GetMetricSpec once, then per polling interval GetMetrics followed by
//! IsActive, and StreamIsActive for `external-push` triggers.
use std::collections::HashMap;
use std::net::SocketAddr;

use podgpu_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use podgpu_proto::externalscaler::{GetMetricsRequest, MetricSpec, ScaledObjectRef};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// One KEDA poll's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Poll {
    /// Metric name the scaler returned.
    pub metric_name: String,
    /// Value as KEDA reads it: the float when > 0, else the int64.
    pub value: f64,
    /// IsActive's answer.
    pub active: bool,
}

/// A connected ExternalScaler client.
pub struct KedaClient {
    client: ExternalScalerClient<Channel>,
}

/// A ScaledObjectRef as KEDA builds it from a ScaledObject's trigger.
pub fn scaled_object(namespace: &str, name: &str, metadata: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: name.to_string(),
        namespace: namespace.to_string(),
        scaler_metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>(),
    }
}

impl KedaClient {
    /// Connects over plaintext gRPC.
    pub async fn connect(addr: SocketAddr) -> Result<Self, tonic::transport::Error> {
        Ok(Self { client: ExternalScalerClient::connect(format!("http://{addr}")).await? })
    }

    /// Connects over TLS as KEDA does with `caCert` (PEM of the CA that
    /// signed the scaler's certificate) and, for mTLS, `tlsClientCert` /
    /// `tlsClientKey` (PEM).
    pub async fn connect_tls(
        addr: SocketAddr,
        server_name: &str,
        ca_cert: &[u8],
        client_identity: Option<(&[u8], &[u8])>,
    ) -> Result<Self, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_cert)).domain_name(server_name);
        if let Some((cert, key)) = client_identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        let channel = Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?.connect().await?;
        Ok(Self { client: ExternalScalerClient::new(channel) })
    }

    /// GetMetricSpec, as KEDA calls it when it builds the HPA.
    pub async fn metric_spec(&mut self, scaled_object: &ScaledObjectRef) -> Result<Vec<MetricSpec>, tonic::Status> {
        Ok(self.client.get_metric_spec(scaled_object.clone()).await?.into_inner().metric_specs)
    }

    /// One polling cycle: GetMetrics for `metric_name`, then IsActive.
    /// While the scaler says it has no value yet (a pod or an agent under
    /// half a second old) the cycle is retried for up to 2 s, as KEDA would
    /// read the value at its next poll; `get_metrics` is the raw call.
    pub async fn poll(&mut self, scaled_object: &ScaledObjectRef, metric_name: &str) -> Result<Poll, tonic::Status> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let result = self.get_metrics(scaled_object, metric_name).await;
            match result {
                Err(status) if status.message().contains("no value yet") && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(status) => return Err(status),
                Ok((metric_name, value)) => {
                    let active = self.is_active(scaled_object).await?;
                    return Ok(Poll { metric_name, value, active });
                }
            }
        }
    }

    /// GetMetrics: the metric name the scaler returned and the value as
    /// KEDA reads it.
    #[allow(deprecated)] // KEDA reads the deprecated int64 when the float is 0.
    pub async fn get_metrics(
        &mut self,
        scaled_object: &ScaledObjectRef,
        metric_name: &str,
    ) -> Result<(String, f64), tonic::Status> {
        let metrics = self
            .client
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(scaled_object.clone()),
                metric_name: metric_name.to_string(),
            })
            .await?
            .into_inner();
        let value =
            metrics.metric_values.first().ok_or_else(|| tonic::Status::internal("GetMetrics returned no value"))?;
        let as_keda_reads =
            if value.metric_value_float > 0.0 { value.metric_value_float } else { value.metric_value as f64 };
        Ok((value.metric_name.clone(), as_keda_reads))
    }

    /// IsActive.
    pub async fn is_active(&mut self, scaled_object: &ScaledObjectRef) -> Result<bool, tonic::Status> {
        Ok(self.client.is_active(scaled_object.clone()).await?.into_inner().result)
    }

    /// StreamIsActive: the push channel of `external-push` triggers.
    pub async fn stream_is_active(
        &mut self,
        scaled_object: &ScaledObjectRef,
    ) -> Result<tonic::Streaming<podgpu_proto::externalscaler::IsActiveResponse>, tonic::Status> {
        Ok(self.client.stream_is_active(scaled_object.clone()).await?.into_inner())
    }
}
