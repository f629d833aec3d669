//! GPU failure behaviour through the real binary (as root, real probes):
//! scripted NVML faults in the simulator make GPU signals unavailable and
//! counted while socket signals keep serving, and the agent recovers on its
//! own; pods NVML cannot measure (MPS clients) are reported as such.
use integration::require_root;
use std::time::{Duration, Instant};

use integration::http::get;
use integration::keda::{scaled_object, KedaClient};
use integration::pod::{new_uid, pod_slice_path};
use integration::scene::{GpuSetup, Scene, TenantSpec};
use tonic::Code;

fn tenant(uid: &str, name: &str) -> TenantSpec {
    TenantSpec { uid: Some(uid.to_string()), ..TenantSpec::new(name, name) }
}

/// One value of `podgpu_agent_gpu_errors_total{kind=...}` from /metrics.
fn error_count(metrics: &str, kind: &str) -> u64 {
    let prefix = format!("podgpu_agent_gpu_errors_total{{kind=\"{kind}\"}} ");
    metrics.lines().find_map(|line| line.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Library missing at start, then a lost GPU, an unknown error and a driver
/// reload: during each the GPU metric is Unavailable and socket metrics
/// still answer; after each the scripted value comes back; every kind is
/// counted in the self-metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_degrades_and_recovers() {
    require_root();
    let ns = format!("faults-{}", std::process::id());
    let uid = new_uid();
    let scenario = format!(
        "name: faults\ngpus: [{{uuid: GPU-f, name: sim, memory_total_bytes: 100}}]\nprocesses:\n  - {{cgroup: {}, gpu: 0, memory_bytes: 1, sm_util: [{{seconds: 1, percent: 35}}]}}\nfaults:\n  - {{kind: library_missing, at_s: 0, for_s: 1}}\n  - {{kind: gpu_lost, at_s: 2.5, for_s: 1.5}}\n  - {{kind: unknown, at_s: 5.5, for_s: 1}}\n  - {{kind: driver_reload, at_s: 8, for_s: 1.5}}\n",
        pod_slice_path(&uid)
    );
    let args: Vec<String> = ["--tick-ms", "100", "--gpu-interval-ms", "200"].iter().map(|s| s.to_string()).collect();
    let scene = Scene::start(&ns, &[tenant(&uid, "a")], GpuSetup::Scenario(scenario), &args).expect("scene starts");
    let started = Instant::now();
    let mut keda = KedaClient::connect(scene.agent.keda).await.expect("connect");
    let gpu = scaled_object(&ns, "a", &[("metric", "gpu_sm_util"), ("target", "10"), ("window", "1s")]);
    let sockets = scaled_object(&ns, "a", &[("metric", "socket_recv_bytes_rate"), ("target", "10")]);

    // (scenario second, expect GPU available?) at points well inside each phase.
    let checkpoints =
        [(0.5, false), (2.0, true), (3.3, false), (5.0, true), (6.0, false), (7.5, true), (8.8, false), (11.5, true)];
    for (at_s, available) in checkpoints {
        tokio::time::sleep_until((started + Duration::from_secs_f64(at_s)).into()).await;
        let result = keda.poll(&gpu, "gpu").await;
        match (available, result) {
            (true, Ok(poll)) => assert!((poll.value - 35.0).abs() < 1.5, "t={at_s}: {poll:?}"),
            (false, Err(status)) => assert_eq!(status.code(), Code::Unavailable, "t={at_s}: {status:?}"),
            (expected, other) => panic!("t={at_s}: expected available={expected}, got {other:?}"),
        }
        assert!(keda.poll(&sockets, "s").await.is_ok(), "t={at_s}: socket metric stopped serving");
    }
    let metrics = get(scene.agent.http, "/metrics").await.expect("GET /metrics");
    let metrics = String::from_utf8(metrics.body).unwrap();
    for kind in ["library_missing", "gpu_lost", "poll", "init"] {
        assert!(error_count(&metrics, kind) >= 1, "no {kind} error counted:\n{metrics}");
    }
    assert!(metrics.contains("podgpu_agent_source_up{source=\"gpu\"} 1"), "{metrics}");
    assert!(metrics.contains("podgpu_gpu_utilization_percent{gpu=\"GPU-f\",model=\"sim\"} 35"), "{metrics}");
}

/// Under MPS, NVML books every client's work on the MPS server: a workload
/// of MPS clients gets Unavailable naming MPS, not a silent 0, and the
/// server's load is booked on no pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mps_clients_are_reported_unattributable() {
    require_root();
    let ns = format!("mps-{}", std::process::id());
    let uid = new_uid();
    let scenario = format!(
        "name: mps\ngpus: [{{uuid: GPU-m, name: sim, memory_total_bytes: 100, sharing: mps, mps_server_pid: 1}}]\nprocesses:\n  - {{cgroup: {}, gpu: 0, memory_bytes: 1, sm_util: [{{seconds: 1, percent: 40}}]}}\n",
        pod_slice_path(&uid)
    );
    let scene = Scene::start(&ns, &[tenant(&uid, "client")], GpuSetup::Scenario(scenario), &[]).expect("scene starts");
    let mut keda = KedaClient::connect(scene.agent.keda).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let gpu = scaled_object(&ns, "client", &[("metric", "gpu_sm_util"), ("target", "10")]);
    let status = keda.poll(&gpu, "gpu").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("MPS"), "{}", status.message());
    let reply = get(scene.agent.http, "/pods").await.expect("GET /pods");
    let pods: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(pods["devices"][0]["sharing"], "mps");
    assert_eq!(pods["devices"][0]["util_percent"], 40.0);
}
