//! `cargo xtask bench-scaler`: how fast KEDA gets answers.
//!
//! 1. GetMetrics latency (p50/p99 over sequential calls, as KEDA polls)
//!    through the scaler role with 1, 10 and 100 node agents. The node
//!    agents are simulated on loopback by node-API servers with 20 pods
//!    each (latency histograms included), so 100 nodes fit on one machine.
//! 2. Load step to answer: a real standalone agent watches a tenant pod;
//!    from the moment traffic starts, how long until GetMetrics reports
//!    requests in flight (median of repeated steps).
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use integration::http::{drive_streams, StreamSpec};
use integration::keda::{scaled_object, KedaClient};
use integration::scene::{GpuSetup, Scene, TenantSpec};
use podgpu_agent::serve::cluster::ClusterConfig;
use podgpu_agent::signals::latency::encode_buckets;
use podgpu_agent::{run_scaler, ScalerConfig};
use podgpu_proto::node::node_signals_server::{NodeSignals, NodeSignalsServer};
use podgpu_proto::node::{NodeSnapshot, PodSignals, SnapshotRequest, WatchRequest, WindowValues};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Benchmark options.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// GetMetrics calls per node count.
    #[arg(long, default_value_t = 2000)]
    calls: u32,
    /// Load steps to time.
    #[arg(long, default_value_t = 5)]
    steps: u32,
}

const PODS_PER_NODE: usize = 20;

/// A node agent stand-in: a fixed snapshot of 20 pods.
struct FakeNode {
    snapshot: NodeSnapshot,
}

#[tonic::async_trait]
impl NodeSignals for FakeNode {
    async fn snapshot(&self, request: Request<SnapshotRequest>) -> Result<Response<NodeSnapshot>, Status> {
        let mut snapshot = self.snapshot.clone();
        let windows = request.into_inner().windows_s;
        for pod in &mut snapshot.pods {
            let template = pod.windows[0].clone();
            pod.windows = windows.iter().map(|&window_s| WindowValues { window_s, ..template.clone() }).collect();
        }
        Ok(Response::new(snapshot))
    }

    type WatchStream = tokio_stream::Empty<Result<NodeSnapshot, Status>>;

    async fn watch(&self, _request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        // The scaler polls `Snapshot`; the stand-in serves only that.
        Err(Status::unimplemented("the benchmark's node stand-in serves Snapshot only"))
    }
}

fn fake_snapshot(node: usize) -> NodeSnapshot {
    let mut ttft: Histogram<u32> = Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("bounds");
    for sample in 0..200u64 {
        let _ = ttft.record(20_000 + sample * 997 % 180_000);
    }
    let buckets = encode_buckets(&ttft);
    let pods = (0..PODS_PER_NODE)
        .map(|index| PodSignals {
            uid: format!("{node:08x}-0000-4000-8000-{index:012x}"),
            namespace: "bench".into(),
            name: format!("llm-{node}-{index}"),
            labels: [("app".to_string(), if index % 2 == 0 { "llm" } else { "other" }.to_string())].into(),
            windows: vec![WindowValues {
                window_s: 10.0,
                values: [("gpu_sm_util".to_string(), 30.0), ("requests_in_flight".to_string(), 3.0)].into(),
                ttft_us: buckets.clone(),
                latency_us: buckets.clone(),
                ports: Vec::new(),
            }],
            unavailable: Default::default(),
            owner: String::new(),
            containers: Vec::new(),
            metadata_pending: false,
        })
        .collect();
    NodeSnapshot {
        node: format!("node-{node}"),
        pods,
        unavailable_sources: Default::default(),
        at_s: 0.0,
        gpu_sample_age_s: 0.5,
    }
}

async fn start_fake_node(node: usize, shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tonic::transport::Server::builder()
        .add_service(NodeSignalsServer::new(FakeNode { snapshot: fake_snapshot(node) }))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.cancelled_owned(),
        );
    tokio::spawn(server);
    Ok(addr)
}

fn percentile_ms(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1]
}

async fn get_metrics_latency(nodes: usize, calls: u32) -> anyhow::Result<(f64, f64, f64, f64)> {
    let shutdown = CancellationToken::new();
    let mut addresses = Vec::new();
    for node in 0..nodes {
        addresses.push(start_fake_node(node, shutdown.clone()).await?.to_string());
    }
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let config = ScalerConfig {
        keda_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        cluster: ClusterConfig {
            nodes: addresses,
            poll_interval: Duration::from_millis(500),
            deadline: Duration::from_millis(400),
            grace: Duration::from_secs(30),
            forget: Duration::from_secs(600),
            node_tls: Default::default(),
        },
        tls: Default::default(),
        tls_reload: Duration::from_secs(10),
    };
    let scaler_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let _ = run_scaler(config, scaler_shutdown, move |bound| {
            let _ = ready_tx.send(bound);
        })
        .await;
    });
    let bound = ready_rx.await.context("scaler did not start")?;
    let mut keda = KedaClient::connect(bound.keda).await?;
    let sum = scaled_object("bench", "llm", &[("metric", "gpu_sm_util"), ("target", "50"), ("podSelector", "app=llm")]);
    let p99 =
        scaled_object("bench", "llm", &[("metric", "ttft_ms_p99"), ("target", "100"), ("podSelector", "app=llm")]);
    // Wait until every node is covered (first poll done).
    let expected = 30.0 * (nodes * PODS_PER_NODE / 2) as f64;
    let deadline = Instant::now() + Duration::from_secs(20);
    while keda.poll(&sum, "m").await.map(|p| p.value).unwrap_or(0.0) < expected - 0.5 {
        anyhow::ensure!(Instant::now() < deadline, "scaler never covered all {nodes} nodes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut additive = Vec::new();
    let mut percentile = Vec::new();
    for _ in 0..calls {
        let started = Instant::now();
        keda.poll(&sum, "m").await?;
        additive.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        keda.poll(&p99, "m").await?;
        percentile.push(started.elapsed().as_secs_f64() * 1e3);
    }
    shutdown.cancel();
    Ok((
        percentile_ms(&mut additive, 0.5),
        percentile_ms(&mut additive, 0.99),
        percentile_ms(&mut percentile, 0.5),
        percentile_ms(&mut percentile, 0.99),
    ))
}

async fn load_step(steps: u32) -> anyhow::Result<Vec<f64>> {
    let ns = format!("step-{}", std::process::id());
    let scene = Scene::start(&ns, &[TenantSpec::new("llm-0", "llm")], GpuSetup::Arg("none".into()), &[])?;
    let mut keda = KedaClient::connect(scene.agent.keda).await?;
    let trigger =
        scaled_object(&ns, "llm", &[("metric", "requests_in_flight"), ("target", "1"), ("podSelector", "app=llm")]);
    let addr = scene.tenant("llm-0").addr;
    let mut visible = Vec::new();
    for _ in 0..steps {
        // Streams held for 2 s: in flight from their first byte.
        let started = Instant::now();
        let load = tokio::spawn(drive_streams(
            addr,
            StreamSpec { first_ms: 2000, chunks: 1, chunk_ms: 0 },
            4,
            Duration::from_millis(100),
        ));
        loop {
            if keda.poll(&trigger, "m").await.map(|p| p.value).unwrap_or(0.0) > 0.0 {
                visible.push(started.elapsed().as_secs_f64() * 1e3);
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(5), "load step never became visible");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        load.await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(visible)
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let runtime = crate::root_runtime("the load-step part")?;
    runtime.block_on(async {
        println!("GetMetrics + IsActive latency through the scaler role ({} sequential polls each):", options.calls);
        println!("{:>6} {:>8} {:>22} {:>22}", "nodes", "pods", "sum p50 / p99 (ms)", "merged p99 p50 / p99 (ms)");
        for nodes in [1usize, 10, 100] {
            let (a50, a99, p50, p99) = get_metrics_latency(nodes, options.calls).await?;
            println!(
                "{nodes:>6} {:>8} {:>10.3} / {:<9.3} {:>10.3} / {:<9.3}",
                nodes * PODS_PER_NODE,
                a50,
                a99,
                p50,
                p99
            );
        }
        let mut visible = load_step(options.steps).await?;
        let median = percentile_ms(&mut visible, 0.5);
        println!("\nload step -> requests_in_flight > 0 over GetMetrics (standalone agent, tick 250 ms):");
        println!(
            "median {median:.0} ms, max {:.0} ms over {} steps (target <= 1000 ms)",
            visible.last().copied().unwrap_or(0.0),
            visible.len()
        );
        Ok(())
    })
}
