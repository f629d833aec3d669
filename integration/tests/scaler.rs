//! The scaler role over three node agents on loopback, each node a nested
//! cgroup root with its own pods (as root, real probes, simulated GPUs):
//! KEDA's protocol gets workload answers summed across nodes, percentiles
//! merged across nodes, last-known-good while a node is down, an error
//! (never a smaller sum) after the grace period for workloads with pods
//! there, recovery when it returns, and errors whenever the scaler cannot
//! see everything (names that do not resolve, windows not polled yet).
use integration::require_root;
use std::time::{Duration, Instant};

use integration::agent::AgentProcess;
use integration::http::{get, Client, StreamSpec};
use integration::keda::{scaled_object, KedaClient};
use integration::scene::{GpuSetup, Scene, TenantSpec};
use integration::workspace_binary;

fn node(name: &str, ns: &str, pod: &str, app: &str, gpu_percent: f64) -> Scene {
    let mut tenant = TenantSpec::new(pod, app);
    tenant.gpu_steps = vec![(1.0, gpu_percent)];
    let args = ["--tick-ms", "100", "--gpu-interval-ms", "200"].map(String::from);
    Scene::start_on(Some(name), ns, &[tenant], GpuSetup::SimPerTenant, &args).expect("node scene starts")
}

async fn value_eventually(
    keda: &mut KedaClient,
    trigger: &podgpu_proto::externalscaler::ScaledObjectRef,
    metric: &str,
    expected: f64,
    within: Duration,
) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let value = keda.poll(trigger, metric).await.map(|p| p.value).unwrap_or(f64::NAN);
        if (value - expected).abs() < 1.5 || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Workload values come from all nodes; a killed node keeps its last good
/// values for the grace period, is then excluded, and counts again once
/// restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaler_merges_nodes_and_survives_a_node_restart() {
    require_root();
    let pid = std::process::id();
    let ns = format!("cluster-{pid}");
    let node_a = node(&format!("podgpu-node-a-{pid}"), &ns, "llm-a", "llm", 20.0);
    let mut node_b = node(&format!("podgpu-node-b-{pid}"), &ns, "llm-b", "llm", 30.0);
    let node_c = node(&format!("podgpu-node-c-{pid}"), &ns, "other-c", "other", 50.0);
    let nodes = [&node_a, &node_b, &node_c].map(|n| n.agent.keda.to_string()).join(",");
    let args =
        ["--nodes", &nodes, "--poll-ms", "200", "--node-deadline-ms", "300", "--node-grace-s", "3"].map(String::from);
    let scaler = AgentProcess::start_role(&workspace_binary("podgpu-agent"), "scaler", &args).expect("scaler starts");
    let mut keda = KedaClient::connect(scaler.keda).await.expect("connect to the scaler");

    let gpu = scaled_object(
        &ns,
        "llm",
        &[("metric", "gpu_sm_util"), ("target", "10"), ("podSelector", "app=llm"), ("window", "2s")],
    );
    let spec = keda.metric_spec(&gpu).await.expect("GetMetricSpec");
    assert_eq!(spec[0].target_size_float, 10.0);
    let merged = value_eventually(&mut keda, &gpu, "gpu", 50.0, Duration::from_secs(10)).await;
    assert!((merged - 50.0).abs() < 1.5, "llm pods on nodes a and b: {merged}");
    let other = scaled_object(
        &ns,
        "other",
        &[("metric", "gpu_sm_util"), ("target", "10"), ("podSelector", "app=other"), ("window", "2s")],
    );
    assert!((value_eventually(&mut keda, &other, "gpu", 50.0, Duration::from_secs(5)).await - 50.0).abs() < 1.5);
    // The scaler's /pods lists every node's pods, as `top` shows them.
    let listed: serde_json::Value =
        serde_json::from_slice(&get(scaler.http, "/pods").await.unwrap().body).expect("scaler /pods");
    let llm: Vec<&serde_json::Value> =
        listed["pods"].as_array().unwrap().iter().filter(|p| p["labels"]["app"] == "llm").collect();
    let nodes: std::collections::BTreeSet<&str> = llm.iter().filter_map(|p| p["node"].as_str()).collect();
    assert_eq!(nodes.len(), 2, "llm pods on two nodes: {listed}");
    let total: f64 = llm.iter().filter_map(|p| p["values"]["gpu_sm_util"].as_f64()).sum();
    assert!((total - 50.0).abs() < 1.5, "{listed}");
    assert_eq!(listed["nodes"].as_array().map(Vec::len), Some(3), "{listed}");
    // Each node's GPU sample age travels with its snapshot.
    let health: serde_json::Value = serde_json::from_slice(&get(scaler.http, "/healthz").await.unwrap().body).unwrap();
    for node in health["nodes"].as_array().expect("nodes listed") {
        let age = node["gpu_sample_age_s"].as_f64().unwrap_or(f64::NAN);
        assert!((0.0..2.0).contains(&age), "GPU sample age of a node polling every 200 ms: {node}");
    }

    // Percentiles merge histograms across nodes: streams of 60 ms on a, 180 ms on b.
    for (scene, first_ms) in [(&node_a, 60), (&node_b, 180)] {
        let mut client = Client::connect(scene.tenants[0].addr).await.unwrap();
        for _ in 0..5 {
            client.stream(&StreamSpec { first_ms, chunks: 1, chunk_ms: 0 }.path()).await.unwrap();
        }
    }
    let ttft = scaled_object(
        &ns,
        "llm",
        &[("metric", "ttft_ms_p90"), ("target", "100"), ("podSelector", "app=llm"), ("window", "30s")],
    );
    // p90 of the merged 10 samples is a 180 ms one; times 2 pods.
    let p90 = value_eventually(&mut keda, &ttft, "ttft", 360.0, Duration::from_secs(10)).await;
    assert!((p90 - 360.0).abs() < 10.0, "merged p90 x pods: {p90}");

    // Node b goes away: last known good first, then an error naming it
    // for the workload that had a pod there; the other workload is whole.
    node_b.agent.stop(Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let held = keda.poll(&gpu, "gpu").await.unwrap().value;
    assert!((held - 50.0).abs() < 1.5, "within the grace period the last snapshot counts: {held}");
    let lost = error_eventually(&mut keda, &gpu, "gpu", Duration::from_secs(8)).await;
    assert_eq!(lost.code(), tonic::Code::Unavailable, "{lost:?}");
    assert!(lost.message().contains(&format!("podgpu-node-b-{pid}")), "names the lost node: {lost:?}");
    let other_value = keda.poll(&other, "gpu").await.expect("a workload without pods on node b still answers").value;
    assert!((other_value - 50.0).abs() < 1.5, "{other_value}");
    let health: serde_json::Value = serde_json::from_slice(&get(scaler.http, "/healthz").await.unwrap().body).unwrap();
    assert_eq!((health["nodes_total"].as_u64(), health["nodes_covered"].as_u64()), (Some(3), Some(2)), "{health}");

    // It comes back on the same address.
    node_b.restart_agent().expect("node b restarts");
    let back = value_eventually(&mut keda, &gpu, "gpu", 50.0, Duration::from_secs(10)).await;
    assert!((back - 50.0).abs() < 1.5, "node b counted again: {back}");
}

async fn error_eventually(
    keda: &mut KedaClient,
    trigger: &podgpu_proto::externalscaler::ScaledObjectRef,
    metric: &str,
    within: Duration,
) -> tonic::Status {
    let deadline = Instant::now() + within;
    loop {
        match keda.poll(trigger, metric).await {
            Err(status) => return status,
            Ok(poll) if Instant::now() > deadline => panic!("still answering {poll:?}"),
            Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A node list that does not resolve, and a window no snapshot carries
/// yet, are errors (KEDA's fallback applies), never a 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scaler_answers_errors_when_it_cannot_see() {
    require_root();
    let pid = std::process::id();
    let ns = format!("blind-{pid}");
    let args = ["--nodes", "no-such-node.invalid:6000", "--poll-ms", "200"].map(String::from);
    let scaler = AgentProcess::start_role(&workspace_binary("podgpu-agent"), "scaler", &args).expect("scaler");
    let mut keda = KedaClient::connect(scaler.keda).await.unwrap();
    let trigger = scaled_object(&ns, "llm", &[("metric", "requests_in_flight"), ("target", "10")]);
    let status = error_eventually(&mut keda, &trigger, "inflight", Duration::from_secs(5)).await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no-such-node.invalid"), "{status:?}");
    let active = keda.poll(&trigger, "inflight").await;
    assert!(active.is_err(), "IsActive must not say false either: {active:?}");
}

/// The node API's Watch streams a snapshot per published tick, each newer
/// than the last, and rejects bad windows by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_api_watch_streams_every_tick() {
    use podgpu_proto::node::node_signals_client::NodeSignalsClient;
    use podgpu_proto::node::WatchRequest;
    require_root();
    let pid = std::process::id();
    let ns = format!("watch-{pid}");
    let scene = node(&format!("podgpu-node-w-{pid}"), &ns, "llm-w", "llm", 40.0);
    let mut client = NodeSignalsClient::connect(format!("http://{}", scene.agent.keda)).await.expect("node API");
    let bad = client.watch(WatchRequest { windows_s: vec![0.0], min_interval_ms: 0 }).await;
    let Err(status) = bad else { panic!("a zero window was accepted") };
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("windows_s"), "{status:?}");

    let mut stream =
        client.watch(WatchRequest { windows_s: vec![1.0], min_interval_ms: 0 }).await.expect("Watch").into_inner();
    let started = Instant::now();
    let mut stamps = Vec::new();
    while stamps.len() < 5 {
        let snapshot = tokio::time::timeout(Duration::from_secs(3), stream.message())
            .await
            .expect("a snapshot within 3 s")
            .expect("stream healthy")
            .expect("stream open");
        assert!(snapshot.pods.iter().any(|p| p.name == "llm-w"), "{snapshot:?}");
        stamps.push(snapshot.at_s);
    }
    let elapsed = started.elapsed();
    assert!(stamps.windows(2).all(|w| w[1] > w[0]), "snapshots not newer each time: {stamps:?}");
    // Five snapshots at a 100 ms tick: live updates, not a 1 s poll.
    assert!(elapsed < Duration::from_secs(2), "5 snapshots took {elapsed:?}");
}
