//! The request probe against the server stacks people deploy (as root,
//! real eBPF probes, each server in its own cgroup pod): gRPC C-core
//! (grpcio, as Triton's front end), tonic, nghttp2 (Node.js `http2`),
//! hypercorn (Python `h2`), uvicorn + FastAPI with SSE (vLLM's stack) and
//! Node.js `http`. For every stack, against the client's own timings:
//! streams held open read as exactly that many in flight, every request
//! is counted once, and TTFT and latency percentiles are within 5%.
use integration::{percentile, require_root};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration::http::{get, Measured};
use integration::keda::{scaled_object, KedaClient};
use integration::scene::{GpuSetup, Scene, TenantSpec};
use integration::stacks::{run_calls, spread_calls, Call, Caller, Protocol, Stack};

/// Concurrent calls, as a busy inference server sees them.
const CONCURRENCY: usize = 8;
/// Calls made under load (besides the held ones).
const CALLS: usize = 64;

async fn pod_view(http: SocketAddr) -> serde_json::Value {
    serde_json::from_slice(&get(http, "/pods").await.expect("GET /pods").body).expect("/pods is JSON")
}

async fn metric(keda: &mut KedaClient, namespace: &str, metric: &str) -> f64 {
    let trigger = scaled_object(namespace, "stack", &[("metric", metric), ("target", "1"), ("window", "60s")]);
    keda.poll(&trigger, metric).await.unwrap_or_else(|e| panic!("{metric}: {e}")).value
}

fn millis(measured: &[Measured], pick: fn(&Measured) -> Duration) -> Vec<f64> {
    measured.iter().map(|m| pick(m).as_secs_f64() * 1e3).collect()
}

/// Runs the whole check on one stack with its protocol's Rust client;
/// `unary` adds gRPC unary calls.
async fn check_stack(stack: Stack, label: &str, unary: bool) {
    check_stack_with(stack, label, unary, None).await;
}

/// As `check_stack`, with the client `connect` makes instead.
async fn check_stack_with(stack: Stack, label: &str, unary: bool, client: Option<fn(SocketAddr) -> Caller>) {
    require_root();
    let namespace = format!("{label}-{}", std::process::id());
    let spec = TenantSpec { server: stack, ..TenantSpec::new("stack", "stack") };
    let scene =
        Scene::start(&namespace, &[spec], GpuSetup::Arg("none".into()), &["--tick-ms", "100"].map(String::from))
            .unwrap_or_else(|e| panic!("{label}: scene starts: {e:#}"));
    let addr = scene.tenant("stack").addr;
    let mut keda = KedaClient::connect(scene.agent.keda).await.unwrap();
    // HTTP/2 and gRPC: every call of the test on one connection, so one
    // write of the server carries frames of many streams.
    let caller = match client {
        Some(make) => make(addr),
        None => Caller::connect(stack.protocol(), addr).await.unwrap_or_else(|e| panic!("{label}: connect: {e}")),
    };

    // One call before the measured ones: a server's first request may do
    // one-off work (imports, schema building) that stalls its event loop
    // before it reads the requests queued behind it. The client counts
    // that wait, the probe counts from the server's read, and held calls
    // made into the stall read a second apart on a busy machine. It is
    // counted and measured like the rest.
    let warm_up = Call { first_ms: 60, messages: 1, interval_ms: 0 };
    let warm_up = run_calls(&caller, vec![warm_up], 1).await.unwrap_or_else(|e| panic!("{label}: first call: {e}"));

    // Streams held open read as in flight, exactly.
    let held_calls = vec![Call { first_ms: 2_500, messages: 2, interval_ms: 20 }; CONCURRENCY];
    let held = {
        let caller = caller.clone();
        tokio::spawn(async move { run_calls(&caller, held_calls, CONCURRENCY).await })
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut in_flight = 0.0;
    while Instant::now() < deadline {
        in_flight = metric(&mut keda, &scene.namespace, "requests_in_flight").await;
        if in_flight == CONCURRENCY as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(in_flight, CONCURRENCY as f64, "{label}: in flight while {CONCURRENCY} streams are held open");
    let mut measured = held.await.unwrap().unwrap_or_else(|e| panic!("{label}: held calls: {e}"));
    measured.extend(warm_up);

    // Load: first messages after 60-400 ms, then 4 more 20 ms apart.
    let mut calls = spread_calls(CALLS, (60, 400), 5, 20);
    if unary {
        calls.extend(spread_calls(CALLS / 2, (60, 400), 0, 0));
    }
    let made = 1 + CONCURRENCY + calls.len();
    measured.extend(run_calls(&caller, calls, CONCURRENCY).await.unwrap_or_else(|e| panic!("{label}: calls: {e}")));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let view = pod_view(scene.agent.http).await;
    let row = view["pods"].as_array().unwrap().iter().find(|p| p["name"] == "stack").expect("pod listed").clone();
    let count = |key: &str| row["requests"][key].as_u64().unwrap_or(u64::MAX);
    let lost_sync = view["health"]["request_probe"]["http2_lost_sync"].as_u64();
    let joined = view["health"]["request_probe"]["http2_headers_joined"].as_u64();
    eprintln!(
        "{label}: started {} completed {} aborted {} of {made}; http2_lost_sync {lost_sync:?}, headers joined {joined:?}",
        count("started"),
        count("completed"),
        count("aborted")
    );
    assert_eq!(
        (count("started"), count("completed"), count("aborted")),
        (made as u64, made as u64, 0),
        "{label}: every call counted once (started, completed, aborted)"
    );
    assert_eq!(metric(&mut keda, &scene.namespace, "requests_in_flight").await, 0.0, "{label}: nothing left in flight");
    if stack.protocol() != Protocol::Http1 {
        assert_eq!(lost_sync, Some(0), "{label}: no HTTP/2 frame boundary lost");
    }

    let (ttft, latency) = (millis(&measured, |m| m.ttft), millis(&measured, |m| m.latency));
    for (q, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
        let (client_ttft, client_latency) = (percentile(ttft.clone(), q), percentile(latency.clone(), q));
        let probe_ttft = metric(&mut keda, &scene.namespace, &format!("ttft_ms_{name}")).await;
        let probe_latency = metric(&mut keda, &scene.namespace, &format!("latency_ms_{name}")).await;
        eprintln!(
            "{label} {name}: ttft probe {probe_ttft:.1} / client {client_ttft:.1} ms; latency probe {probe_latency:.1} / client {client_latency:.1} ms"
        );
        let close = |probe: f64, client: f64| (probe - client).abs() <= 0.05 * client;
        assert!(close(probe_ttft, client_ttft), "{label} {name} TTFT: probe {probe_ttft}, client {client_ttft}");
        assert!(
            close(probe_latency, client_latency),
            "{label} {name} latency: probe {probe_latency}, client {client_latency}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcio_c_core() {
    check_stack(Stack::Grpcio, "grpcio", true).await;
}

/// C-core on both ends: grpcio's client writes every frame header as an
/// iovec of its own and batches many streams' frames per write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcio_c_core_client_and_server() {
    check_stack_with(Stack::Grpcio, "grpcio-both", true, Some(Caller::GrpcioProcess)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tonic() {
    check_stack(Stack::Tonic, "tonic", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_http2_nghttp2() {
    check_stack(Stack::NodeHttp2, "node-http2", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hypercorn_h2() {
    check_stack(Stack::Hypercorn, "hypercorn", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uvicorn_fastapi_sse() {
    check_stack(Stack::Uvicorn, "uvicorn", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_http() {
    check_stack(Stack::NodeHttp, "node-http", false).await;
}
