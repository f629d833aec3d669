//! Many node agents in one process, for measuring the scaler on its own:
//! `node-standins --count N --pods P --deployments D` serves N node APIs on
//! loopback, each with P pods, prints their addresses comma-separated on
//! one line, and serves until stdin closes (its parent went away). With
//! `--stats FILE` it keeps `SENT RECEIVED` there: the protobuf bytes of
//! every snapshot sent and request received, for the scaler's traffic.
//!
//! Each pod carries what a busy node agent sends: every additive metric,
//! TTFT and latency histograms of 200 requests, and one server port with
//! its own values. Pods are labelled `app=llm-K`, K = (node * P + pod) % D,
//! so a selector picks a deployment spread over the nodes. Requests with a
//! selection get only the selected pods and metrics, as `node_api` sends.
use std::collections::HashMap;
use std::io::Read as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use podgpu_agent::selection::{PodPick, PodSelection};
use podgpu_agent::signals::latency::{encode_buckets, new_histogram};
use podgpu_agent::signals::metric::{Combine, Metric, Quantile};
use podgpu_proto::node::node_signals_server::{NodeSignals, NodeSignalsServer};
use podgpu_proto::node::{NodeSnapshot, PodSignals, PortValues, SnapshotRequest, WatchRequest, WindowValues};
use prost::Message as _;
use tonic::{Request, Response, Status};

struct StandIn {
    node: String,
    pods: Vec<PodSignals>,
    traffic: Arc<Traffic>,
}

/// Bytes of every stand-in together.
#[derive(Default)]
struct Traffic {
    sent: AtomicU64,
    received: AtomicU64,
}

/// `window` trimmed to what `selection` asks for of a pod picked by `pick`.
fn trimmed(window: &WindowValues, selection: &PodSelection, pick: &PodPick) -> WindowValues {
    let wanted = |values: &HashMap<String, f64>| {
        values
            .iter()
            .filter(|(name, _)| Metric::from_name(name).is_some_and(|m| selection.wants(pick, m)))
            .map(|(name, value)| (name.clone(), *value))
            .collect()
    };
    let histogram =
        |buckets: &Vec<u64>, metric: Metric| if selection.wants(pick, metric) { buckets.clone() } else { Vec::new() };
    let (ttft, latency) = (Metric::TtftMs(Quantile::P50), Metric::LatencyMs(Quantile::P50));
    WindowValues {
        window_s: window.window_s,
        values: wanted(&window.values),
        ttft_us: histogram(&window.ttft_us, ttft),
        latency_us: histogram(&window.latency_us, latency),
        engine_ttft_us: histogram(&window.engine_ttft_us, Metric::EngineTtftMs(Quantile::P50)),
        ports: if selection.ports(pick) {
            window
                .ports
                .iter()
                .map(|port| PortValues {
                    port: port.port,
                    values: wanted(&port.values),
                    ttft_us: histogram(&port.ttft_us, ttft),
                    latency_us: histogram(&port.latency_us, latency),
                    probe: port.probe,
                })
                .collect()
        } else {
            Vec::new()
        },
    }
}

#[tonic::async_trait]
impl NodeSignals for StandIn {
    async fn snapshot(&self, request: Request<SnapshotRequest>) -> Result<Response<NodeSnapshot>, Status> {
        let request = request.into_inner();
        self.traffic.received.fetch_add(request.encoded_len() as u64, Ordering::Relaxed);
        let selection = request.selection.map(PodSelection::decode).transpose().map_err(Status::invalid_argument)?;
        let pods = self
            .pods
            .iter()
            .filter_map(|pod| match &selection {
                None => Some((pod, None)),
                Some(s) => {
                    s.pick(&pod.namespace, &pod.labels.clone().into_iter().collect(), false).map(|p| (pod, Some(p)))
                }
            })
            .map(|(pod, pick)| {
                let template = &pod.windows[0];
                let windows = request
                    .windows_s
                    .iter()
                    .map(|&window_s| {
                        let window = WindowValues { window_s, ..template.clone() };
                        match (&selection, &pick) {
                            (Some(selection), Some(pick)) => trimmed(&window, selection, pick),
                            _ => window,
                        }
                    })
                    .collect();
                let selected_by = pick.map(|p| p.selected_by).unwrap_or_default();
                PodSignals { windows, selected_by, ..pod.clone() }
            })
            .collect();
        let snapshot = NodeSnapshot {
            node: self.node.clone(),
            pods,
            unavailable_sources: HashMap::new(),
            at_s: 0.0,
            gpu_sample_age_s: 0.5,
        };
        self.traffic.sent.fetch_add(snapshot.encoded_len() as u64, Ordering::Relaxed);
        Ok(Response::new(snapshot))
    }

    type WatchStream = tokio_stream::Empty<Result<NodeSnapshot, Status>>;

    async fn watch(&self, _request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("the stand-in serves Snapshot only, as the scaler polls"))
    }
}

fn pods(node: usize, count: usize, deployments: usize) -> Vec<PodSignals> {
    let mut histogram = new_histogram();
    for sample in 0..200u64 {
        let _ = histogram.record(20_000 + sample * 997 % 180_000);
    }
    let buckets = encode_buckets(&histogram);
    let additive: HashMap<String, f64> = Metric::ALL
        .into_iter()
        .filter(|m| m.combine() == Combine::Additive)
        .enumerate()
        .map(|(index, m)| (m.name().to_string(), 1.0 + index as f64))
        .collect();
    (0..count)
        .map(|index| {
            let deployment = (node * count + index) % deployments;
            PodSignals {
                uid: format!("{node:08x}-0000-4000-8000-{index:012x}"),
                namespace: "bench".into(),
                name: format!("llm-{deployment}-{node}-{index}"),
                labels: [
                    ("app".to_string(), format!("llm-{deployment}")),
                    ("pod-template-hash".to_string(), "5d8f7c9b4".to_string()),
                ]
                .into(),
                owner: format!("Deployment/llm-{deployment}"),
                windows: vec![WindowValues {
                    window_s: 10.0,
                    values: additive.clone(),
                    ttft_us: buckets.clone(),
                    latency_us: buckets.clone(),
                    engine_ttft_us: Vec::new(),
                    ports: vec![PortValues {
                        port: 8000,
                        values: additive.clone(),
                        ttft_us: buckets.clone(),
                        latency_us: buckets.clone(),
                        probe: false,
                    }],
                }],
                ..PodSignals::default()
            }
        })
        .collect()
}

fn flag(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(at) => {
            args.get(at + 1).with_context(|| format!("{name} needs a value"))?.parse().context(name.to_string())
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count = flag(&args, "--count", 100)?;
    let pods_per_node = flag(&args, "--pods", 20)?;
    let deployments = flag(&args, "--deployments", 200)?.max(1);
    let threads = flag(&args, "--threads", 4)?.max(1);
    let stats = args.iter().position(|a| a == "--stats").and_then(|at| args.get(at + 1)).cloned();
    let traffic = Arc::new(Traffic::default());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;
    runtime.block_on(async {
        let mut addresses = Vec::with_capacity(count);
        for node in 0..count {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addresses.push(listener.local_addr()?.to_string());
            let service = NodeSignalsServer::new(StandIn {
                node: format!("standin-{node}"),
                pods: pods(node, pods_per_node, deployments),
                traffic: traffic.clone(),
            });
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
        }
        if let Some(path) = stats {
            let traffic = traffic.clone();
            tokio::spawn(async move {
                loop {
                    let line = format!(
                        "{} {}\n",
                        traffic.sent.load(Ordering::Relaxed),
                        traffic.received.load(Ordering::Relaxed)
                    );
                    // Whole-file replace, so a reader never sees half a line.
                    let partial = format!("{path}.partial");
                    if std::fs::write(&partial, line).is_ok() {
                        let _ = std::fs::rename(&partial, &path);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        println!("{}", addresses.join(","));
        // Serve until the parent closes our stdin.
        tokio::task::spawn_blocking(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        })
        .await?;
        Ok(())
    })
}
