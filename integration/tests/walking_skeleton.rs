//! End to end through the real binary, as root: tenant servers in cgroup
//! "pods", the agent with real eBPF probes and a simulated GPU, and a client
//! speaking KEDA's ExternalScaler protocol.
use integration::require_root;
use std::time::Duration;

use integration::http::{drive, Load};
use integration::keda::{scaled_object, KedaClient};
use integration::scene::{GpuSetup, Scene, TenantSpec};
use tonic::Code;

fn namespace(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Bytes of one request the load generator sends: its head plus body.
fn request_size(addr: std::net::SocketAddr, body: usize) -> usize {
    format!("POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {body}\r\n\r\n").len() + body
}

/// Traffic into one pod shows in that pod's socket metric over KEDA's
/// protocol at the rate the client sent, the idle pod reads zero and is
/// inactive, and GPU values follow each pod's simulated load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_pod_is_nonzero_and_idle_pod_is_zero() {
    require_root();
    let ns = namespace("skeleton");
    let mut busy = TenantSpec::new("busy-0", "busy");
    busy.gpu_steps = vec![(1.0, 40.0)];
    busy.gpu_memory_bytes = 3 << 30;
    let mut idle = TenantSpec::new("idle-0", "idle");
    idle.gpu_steps = vec![(1.0, 10.0)];
    let scene = Scene::start(
        &ns,
        &[busy, idle],
        GpuSetup::SimPerTenant,
        &args(&["--tick-ms", "100", "--gpu-interval-ms", "200"]),
    )
    .expect("scene starts (requires root and loadable eBPF)");
    let mut keda = KedaClient::connect(scene.agent.keda).await.expect("connect to the scaler");

    let trigger = |app: &'static str, metric: &'static str| {
        scaled_object(
            &ns,
            app,
            &[
                ("metric", metric),
                ("target", "1000"),
                ("podSelector", if app == "busy" { "app=busy" } else { "app=idle" }),
                ("window", "2s"),
            ],
        )
    };
    let busy_sockets = trigger("busy", "socket_recv_bytes_rate");
    let idle_sockets = trigger("idle", "socket_recv_bytes_rate");
    let spec = keda.metric_spec(&busy_sockets).await.expect("GetMetricSpec");
    assert_eq!(spec.len(), 1);
    assert_eq!(spec[0].metric_name, "podgpu-socket-recv-bytes-rate");
    assert_eq!(spec[0].target_size_float, 1000.0);

    let target = scene.tenant("busy-0").addr;
    let load = Load { rate: 50.0, request_bytes: 200, connections: 2, duration: Duration::from_secs(4) };
    let running = tokio::spawn(drive(target, load));
    tokio::time::sleep(Duration::from_secs(3)).await;
    // KEDA sends back the name it got from GetMetricSpec, with its own
    // `s0-` prefix stripped; the scaler must echo whatever it is sent.
    let busy_poll = keda.poll(&busy_sockets, "podgpu-socket-recv-bytes-rate").await.expect("busy poll");
    let idle_poll = keda.poll(&idle_sockets, "podgpu-socket-recv-bytes-rate").await.expect("idle poll");
    let report = running.await.expect("load task");

    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.ok >= 150, "{report:?}");
    assert_eq!(busy_poll.metric_name, "podgpu-socket-recv-bytes-rate");
    let expected = load.rate * request_size(target, load.request_bytes) as f64;
    let error = (busy_poll.value - expected).abs() / expected;
    assert!(error < 0.25, "busy pod received {} B/s, client sent {expected} B/s", busy_poll.value);
    assert!(busy_poll.active);
    assert_eq!(idle_poll.value, 0.0, "idle pod saw traffic: {idle_poll:?}");
    assert!(!idle_poll.active);

    let busy_gpu = keda.poll(&trigger("busy", "gpu_sm_util"), "gpu").await.expect("busy GPU poll");
    let idle_gpu = keda.poll(&trigger("idle", "gpu_sm_util"), "gpu").await.expect("idle GPU poll");
    assert!((busy_gpu.value - 40.0).abs() < 1.0, "{busy_gpu:?}");
    assert!((idle_gpu.value - 10.0).abs() < 1.0, "{idle_gpu:?}");
    let memory = keda.poll(&trigger("busy", "gpu_mem_used_bytes"), "mem").await.expect("memory poll");
    assert_eq!(memory.value, (3u64 << 30) as f64);
}

/// Malformed trigger metadata is InvalidArgument naming the key, on every
/// RPC that takes metadata, and the scaler keeps serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_metadata_is_invalid_argument_naming_the_key() {
    require_root();
    let ns = namespace("badmeta");
    let scene =
        Scene::start(&ns, &[TenantSpec::new("a-0", "a")], GpuSetup::Arg("none".into()), &[]).expect("scene starts");
    let mut keda = KedaClient::connect(scene.agent.keda).await.expect("connect");
    let cases = [
        (vec![("metric", "socket_recv_bytes_rate"), ("target", "abc")], "scalerMetadata.target"),
        (vec![("metric", "gpu_util"), ("target", "1")], "scalerMetadata.metric"),
        (
            vec![("metric", "socket_recv_bytes_rate"), ("target", "1"), ("podSelector", "app in (x")],
            "scalerMetadata.podSelector",
        ),
        (vec![("metric", "socket_recv_bytes_rate"), ("target", "1"), ("colour", "blue")], "scalerMetadata.colour"),
    ];
    for (metadata, key) in cases {
        let scaled_object = scaled_object(&ns, "a", &metadata);
        let spec = keda.metric_spec(&scaled_object).await.unwrap_err();
        let poll = keda.poll(&scaled_object, "x").await.unwrap_err();
        for status in [spec, poll] {
            assert_eq!(status.code(), Code::InvalidArgument, "{metadata:?}: {status:?}");
            assert!(status.message().starts_with(key), "{metadata:?}: {}", status.message());
        }
    }
    let good = scaled_object(&ns, "a", &[("metric", "socket_recv_bytes_rate"), ("target", "1")]);
    assert!(keda.poll(&good, "x").await.is_ok());
}

/// Without a GPU library the agent degrades: GPU metrics are Unavailable
/// (never a made-up zero), /healthz says why, socket metrics still serve,
/// and SIGTERM stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_gpu_degrades_and_keeps_serving() {
    require_root();
    let ns = namespace("nogpu");
    let mut scene = Scene::start(
        &ns,
        &[TenantSpec::new("a-0", "a")],
        GpuSetup::Arg("nvml:/nonexistent/libnvidia-ml.so.1".into()),
        &[],
    )
    .expect("scene starts");
    let mut keda = KedaClient::connect(scene.agent.keda).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(600)).await;

    let gpu = scaled_object(&ns, "a", &[("metric", "gpu_sm_util"), ("target", "50")]);
    let status = keda.poll(&gpu, "gpu").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("NVML library not available"), "{}", status.message());

    let sockets = scaled_object(&ns, "a", &[("metric", "socket_recv_bytes_rate"), ("target", "50")]);
    assert!(keda.poll(&sockets, "s").await.is_ok());

    let health = integration::http::get(scene.agent.http, "/healthz").await.expect("GET /healthz");
    assert_eq!(health.status, 200);
    let body: serde_json::Value = serde_json::from_slice(&health.body).unwrap();
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["gpu"]["state"], "degraded");
    assert_eq!(body["probes"]["state"], "ok");

    assert!(scene.agent.stop(Duration::from_secs(5)), "agent did not exit cleanly on SIGTERM");
}

/// Starts 3 s of 20 req/s at `addr` and returns the load task with the
/// next StreamIsActive message (which must come within 3 s).
async fn load_and_next_push(
    addr: std::net::SocketAddr,
    stream: &mut tonic::Streaming<podgpu_proto::externalscaler::IsActiveResponse>,
) -> (tokio::task::JoinHandle<integration::http::LoadReport>, podgpu_proto::externalscaler::IsActiveResponse) {
    let load = tokio::spawn(drive(
        addr,
        Load { rate: 20.0, request_bytes: 64, connections: 1, duration: Duration::from_secs(3) },
    ));
    let next = tokio::time::timeout(Duration::from_secs(3), stream.message())
        .await
        .expect("activation within 3 s")
        .expect("stream healthy")
        .expect("stream open");
    (load, next)
}

/// `external-push`: StreamIsActive says false while the pod is idle and
/// true soon after traffic starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_is_active_turns_true_when_traffic_starts() {
    require_root();
    let ns = namespace("push");
    let scene =
        Scene::start(&ns, &[TenantSpec::new("a-0", "a")], GpuSetup::Arg("none".into()), &args(&["--tick-ms", "100"]))
            .expect("scene starts");
    let mut keda = KedaClient::connect(scene.agent.keda).await.expect("connect");
    let trigger = scaled_object(&ns, "a", &[("metric", "socket_recv_bytes_rate"), ("target", "100"), ("window", "1s")]);
    let mut stream = keda.stream_is_active(&trigger).await.expect("StreamIsActive");
    let first =
        tokio::time::timeout(Duration::from_secs(5), stream.message()).await.expect("first message").unwrap().unwrap();
    assert!(!first.result, "idle pod reported active");

    let started = std::time::Instant::now();
    let (load, next) = load_and_next_push(scene.tenant("a-0").addr, &mut stream).await;
    assert!(next.result);
    eprintln!("push activation after {:?}", started.elapsed());
    load.await.unwrap();
}

/// Scale from zero: a workload with no pods is activated by traffic at an
/// upstream (gateway) pod named by `activationPodSelector`, while its own
/// metric stays 0 for the HPA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_traffic_activates_a_workload_at_zero_replicas() {
    require_root();
    let ns = namespace("zero");
    let scene = Scene::start(
        &ns,
        &[TenantSpec::new("gateway-0", "gateway")],
        GpuSetup::Arg("none".into()),
        &args(&["--tick-ms", "100"]),
    )
    .expect("scene starts");
    let mut keda = KedaClient::connect(scene.agent.keda).await.expect("connect");
    let trigger = scaled_object(
        &ns,
        "llm",
        &[
            ("scalerAddress", "podgpu.podgpu-system:6000"),
            ("metric", "request_rate"),
            ("target", "5"),
            ("window", "1s"),
            ("podSelector", "app=llm"),
            ("activationPodSelector", "app=gateway"),
        ],
    );
    let idle = keda.poll(&trigger, "podgpu-request-rate").await.expect("poll while idle");
    assert!(!idle.active, "idle gateway activated the workload");
    let mut stream = keda.stream_is_active(&trigger).await.expect("StreamIsActive");
    let first =
        tokio::time::timeout(Duration::from_secs(5), stream.message()).await.expect("first message").unwrap().unwrap();
    assert!(!first.result, "idle gateway reported active");

    let (load, next) = load_and_next_push(scene.tenant("gateway-0").addr, &mut stream).await;
    assert!(next.result, "gateway traffic did not activate the workload");
    let busy = keda.poll(&trigger, "podgpu-request-rate").await.expect("poll under gateway load");
    assert!(busy.active);
    // The workload's own pods (none) carry the HPA value, not the gateway's.
    assert_eq!(busy.value, 0.0, "gateway traffic leaked into the workload's metric");
    load.await.unwrap();
}
