//! Live attribution through the real binary (as root, real uprobes): a
//! launch-loop tenant using the libcuda stand-in in a cgroup pod, on a
//! simulated GPU whose NVML view is wrong in the ways measured on an H100
//! (it misses the tenant; under MPS it books everything on the server).
//! The pod's `gpu_sm_util` comes from the estimator (device utilization
//! and launches), NVML's own number stays in `gpu_sm_util_nvml`, and
//! `podgpu-agent record` writes a trace that `replay` scores.
use integration::require_root;
use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use integration::agent::{AgentProcess, PodEntry};
use integration::eventually;
use integration::http::get;
use integration::keda::{scaled_object, KedaClient};
use integration::pod::{new_uid, pod_slice_path, CgroupPod, NodeRoot};
use integration::workspace_binary;

async fn json(http: std::net::SocketAddr, path: &str) -> serde_json::Value {
    serde_json::from_slice(&get(http, path).await.expect("GET").body).unwrap()
}

/// A pod whose launch loop runs on a simulated GPU where the pod holds
/// `percent` of the device; returns the agent, the pod and the loop's pid.
/// Fields drop in order: the agent, then the pod, then its node's root.
struct Setup {
    agent: AgentProcess,
    _files: tempfile::TempDir,
    tools: tempfile::TempDir,
    _pod: CgroupPod,
    _node: NodeRoot,
    pid: u32,
    namespace: String,
    uid: String,
}

/// What a test adds to the setup: the launch loop's environment (e.g. a
/// kernel to resolve by name) and more agent arguments.
#[derive(Default)]
struct Extra<'a> {
    loop_env: &'a [(&'a str, &'a str)],
    agent_args: &'a [String],
}

async fn start(node: &str, gpu_yaml: &str, nvml: &str, percent: u32, extra: Extra<'_>) -> Setup {
    let tools = tempfile::tempdir().unwrap();
    integration::cuda_standin::build(tools.path()).expect("the libcuda stand-in builds");
    let namespace = format!("attr-{}", std::process::id());
    let node = NodeRoot::create(node).unwrap();
    let cgroup_root = node.0.clone();
    let uid = new_uid();
    let mut pod = CgroupPod::create(&cgroup_root, &uid).unwrap();
    let scenario = tools.path().join("scenario.yaml");
    std::fs::write(
        &scenario,
        format!(
            "name: attribution\ngpus: [{gpu_yaml}]\nprocesses:\n  - {{cgroup: {}, gpu: 0, memory_bytes: 1024, nvml: {nvml}, sm_util: [{{seconds: 1, percent: {percent}}}]}}\n",
            pod_slice_path(&uid)
        ),
    )
    .unwrap();
    let gpu = format!("--gpu=sim:{}", scenario.display());
    let root = node.agent_arg();
    let pods = [PodEntry { uid: &uid, namespace: &namespace, name: "tenant", app: "tenant" }];
    // Counting every launch, read every second: at the default 1% budget a
    // slow VM's uprobe cost (20 µs a hit) puts this ~1,000 launches/s loop
    // into sampling, read every 4 s, and a 5 s recording then held two reads.
    // Sampling has its own tests (launches.rs).
    let mut args: Vec<&str> =
        vec![&gpu, &root, "--launch-accounting", "on", "--launch-overhead-budget", "10", "--gpu-interval-ms", "250"];
    args.extend(extra.agent_args.iter().map(String::as_str));
    let (agent, files) = AgentProcess::start_for_pods(&pods, &args).expect("agent starts");
    let go = tools.path().join("go");
    let mut command = Command::new(tools.path().join("launch_loop"));
    // 1 ms of host work per launch: ~1,000 launches/s, steady.
    command.args([tools.path().join("libcuda.so.1").to_str().unwrap(), "1000000", "120", go.to_str().unwrap()]);
    command.envs(extra.loop_env.iter().copied());
    let child = pod.spawn(command).expect("launch loop runs");
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let found = eventually(Duration::from_secs(5), async || {
        json(agent.http, "/healthz").await["launch_libraries"].as_u64() >= Some(1)
    })
    .await;
    assert!(found, "libcuda found: {}", json(agent.http, "/healthz").await);
    std::fs::write(&go, b"go").unwrap();
    Setup { agent, _files: files, tools, _pod: pod, _node: node, pid, namespace, uid }
}

fn pod_values(view: &serde_json::Value, uid: &str) -> serde_json::Value {
    view["pods"].as_array().unwrap().iter().find(|p| p["uid"] == uid).map_or(serde_json::Value::Null, |p| p.clone())
}

/// NVML misses the tenant (as it misses whole tenants on a time-sliced
/// H100): `gpu_sm_util_nvml` reads 0, while the estimator measures the
/// pod at the device's 40 % from its launches, with high confidence, in
/// `/pods`, `/attribution` and KEDA. `record` then writes a trace of the
/// live node, and `replay` scores it against the tenant's truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_launching_pod_gets_the_share_nvml_misses() {
    require_root();
    let setup =
        start("attr-slice", "{uuid: GPU-attr, name: sim, memory_total_bytes: 100}", "missing", 40, Extra::default())
            .await;
    let http = setup.agent.http;
    // Measured: the loop's costs are learned (basis "measured", not the
    // newcomer's "residual") and the pod's value settled on the device's.
    let learned = async || {
        let attribution = json(http, "/attribution").await;
        let shares = attribution["gpus"][0]["attribution"]["processes"].as_array().cloned().unwrap_or_default();
        shares.iter().any(|p| p["pid"] == setup.pid && p["basis"] == "measured")
    };
    let measured = eventually(Duration::from_secs(15), async || {
        let values = pod_values(&json(http, "/pods?window=2").await, &setup.uid);
        learned().await
            && values["values"]["gpu_sm_util"].as_f64().is_some_and(|v| (v - 40.0).abs() < 3.0)
            // Confidence 0.5 is σ 2.5 points (2σ at the 5-point tolerance).
            && values["gpu_attribution_confidence"].as_f64().is_some_and(|c| c >= 0.5)
    })
    .await;
    let view = json(http, "/pods?window=2").await;
    assert!(measured, "{}", pod_values(&view, &setup.uid));
    assert_eq!(pod_values(&view, &setup.uid)["values"]["gpu_sm_util_nvml"].as_f64(), Some(0.0));
    assert!(view["devices"][0]["attribution_confidence"].as_f64().is_some_and(|c| c > 0.3), "{}", view["devices"]);

    let attribution = json(http, "/attribution").await;
    let shares = &attribution["gpus"][0]["attribution"]["processes"];
    let share = shares.as_array().unwrap().iter().find(|p| p["pid"] == setup.pid).expect("the loop has a share");
    assert_eq!(share["basis"], "measured", "{attribution}");

    let mut keda = KedaClient::connect(setup.agent.keda).await.unwrap();
    let trigger = scaled_object(
        &setup.namespace,
        "tenant",
        &[("metric", "gpu_sm_util"), ("target", "10"), ("podSelector", "app=tenant"), ("window", "2s")],
    );
    let value = keda.poll(&trigger, "util").await.expect("gpu_sm_util").value;
    assert!((value - 40.0).abs() < 3.0, "KEDA got {value}");
    let confidence = pod_values(&json(http, "/pods?window=2").await, &setup.uid)["values"]
        ["gpu_attribution_confidence"]
        .as_f64()
        .expect("the window's mean confidence is a pod value");
    // The window's mean: the simulated device's utilization does not follow
    // the loop's launch rate, whose jitter keeps σ near 2-3 points.
    assert!(confidence > 0.3 && confidence < 1.0, "{confidence}");

    // minConfidence: a measured split passes; a bar no estimate reaches (σ
    // is never 0) gets an error naming the pod and its confidence instead
    // of the number; a bad value is InvalidArgument naming the key.
    let with_min = |min: &'static str| {
        scaled_object(
            &setup.namespace,
            "tenant",
            &[
                ("metric", "gpu_sm_util"),
                ("target", "10"),
                ("podSelector", "app=tenant"),
                ("window", "2s"),
                ("minConfidence", min),
            ],
        )
    };
    let value = keda.poll(&with_min("0.25"), "util").await.expect("a measured split passes").value;
    assert!((value - 40.0).abs() < 3.0, "KEDA got {value}");
    let refused = keda.get_metrics(&with_min("1"), "util").await.expect_err("refused below minConfidence");
    let message = refused.message();
    assert!(
        message.contains("tenant") && message.contains("minConfidence 1") && message.contains("confidence 0."),
        "{message}"
    );
    assert_ne!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let invalid = keda.get_metrics(&with_min("2"), "util").await.expect_err("out of range");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument, "{invalid:?}");
    assert!(invalid.message().contains("minConfidence"), "{invalid:?}");

    // A trace of the live node, with the tenant's truth (the simulated 40 %).
    let out = setup.tools.path().join("live.json");
    let truth = setup.tools.path().join("truth.json");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let periods: Vec<[f64; 3]> = (0..120).map(|i| [now - 1.0 + f64::from(i) * 0.1, 0.04, 0.1]).collect();
    std::fs::write(&truth, serde_json::json!({ "pid": setup.pid, "periods": periods }).to_string()).unwrap();
    let recorded = Command::new(workspace_binary("podgpu-agent"))
        .args(["record", "--agent", &http.to_string(), "--seconds", "5", "--scenario", "live"])
        .arg("--out")
        .arg(&out)
        .arg("--truth")
        .arg(&truth)
        .output()
        .unwrap();
    assert!(recorded.status.success(), "{}", String::from_utf8_lossy(&recorded.stderr));
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(trace["device_util"].as_array().unwrap().len() >= 10, "{trace}");
    let launch_lines = std::fs::read_to_string(setup.tools.path().join("live-launch.jsonl")).unwrap();
    assert!(launch_lines.lines().count() >= 3, "{launch_lines}");
    assert!(launch_lines.contains(&format!("[{},0,{}", setup.pid, 0x4001)), "{launch_lines}");

    let replayed = Command::new(workspace_binary("podgpu-agent")).arg("replay").arg(&out).output().unwrap();
    assert!(replayed.status.success(), "{}", String::from_utf8_lossy(&replayed.stderr));
    let score: serde_json::Value = serde_json::from_slice(&replayed.stdout).expect("one tenant line");
    assert_eq!(score["pid"], setup.pid);
    assert!(score["podgpu_mae"].as_f64().unwrap() < 5.0, "{score}");
    assert!(score["nvml_mae"].as_f64().unwrap() > 30.0, "{score}");
}

/// The node's cost catalog through the real binary: the tenant launches a
/// kernel it resolved by name (the identity probes name it), runs alone so
/// its cost is pinned, and the agent, stopped, leaves the cost in the
/// catalog under the GPU model and the kernel's identity; the next agent
/// loads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn learned_kernel_costs_outlive_the_agent() {
    require_root();
    let catalog_dir = tempfile::tempdir().unwrap();
    let catalog = catalog_dir.path().join("cost-catalog.json");
    let agent_args = [format!("--cost-catalog={}", catalog.display())];
    let kernel = "_Z11decode_stepPK6__halfPS_i";
    let mut setup = start(
        "attr-catalog",
        "{uuid: GPU-cat, name: sim-h100, memory_total_bytes: 100}",
        "missing",
        30,
        Extra { loop_env: &[("KERNEL_NAME", kernel)], agent_args: &agent_args },
    )
    .await;
    let http = setup.agent.http;
    let identity = podgpu_agent::probes::kernel_identity::identity_of(kernel.as_bytes(), 0);
    let named_and_measured = eventually(Duration::from_secs(15), async || {
        let launches = json(http, "/launches").await;
        let named = launches["rows"]
            .as_array()
            .is_some_and(|rows| rows.iter().any(|r| r["pid"] == setup.pid && r["kernel"] == format!("{identity:#x}")));
        let attribution = json(http, "/attribution").await;
        let shares = attribution["gpus"][0]["attribution"]["processes"].as_array().cloned().unwrap_or_default();
        // Pinned: σ at most 2.5 points.
        named
            && shares.iter().any(|p| {
                p["pid"] == setup.pid && p["basis"] == "measured" && p["confidence"].as_f64().is_some_and(|c| c >= 0.5)
            })
    })
    .await;
    assert!(named_and_measured, "{} {}", json(http, "/launches").await, json(http, "/attribution").await);
    assert!(setup.agent.stop(Duration::from_secs(5)), "the agent stops cleanly");
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&catalog).expect("the catalog is written at shutdown")).unwrap();
    let costs = stored["models"]["sim-h100"].as_array().unwrap_or_else(|| panic!("{stored}"));
    let entry = costs.iter().find(|c| c["kernel"].as_u64() == Some(identity)).unwrap_or_else(|| panic!("{stored}"));
    let (cost, variance) = (entry["cost"].as_f64().unwrap(), entry["variance"].as_f64().unwrap());
    assert!(cost > 0.0 && variance.sqrt() < 0.25 * cost, "a pinned cost: {entry}");

    let (again, _files) = AgentProcess::start_for_pods(&[], &agent_args.iter().map(String::as_str).collect::<Vec<_>>())
        .expect("a second agent starts");
    drop(again);
    let reread: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&catalog).unwrap()).unwrap();
    assert_eq!(reread["models"]["sim-h100"], stored["models"]["sim-h100"], "loaded, kept, not clobbered");
}

/// Under MPS NVML names only the server; with launch counts the client pod
/// gets a measured share instead of Unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mps_clients_are_measured_from_their_launches() {
    require_root();
    let setup = start(
        "attr-mps",
        "{uuid: GPU-mps, name: sim, memory_total_bytes: 100, sharing: mps, mps_server_pid: 1}",
        "normal",
        35,
        Extra::default(),
    )
    .await;
    let mut keda = KedaClient::connect(setup.agent.keda).await.unwrap();
    let trigger = scaled_object(
        &setup.namespace,
        "tenant",
        &[("metric", "gpu_sm_util"), ("target", "10"), ("podSelector", "app=tenant"), ("window", "2s")],
    );
    let mut last = None;
    let measured = eventually(Duration::from_secs(15), async || {
        last = Some(keda.poll(&trigger, "util").await);
        matches!(&last, Some(Ok(poll)) if (poll.value - 35.0).abs() < 3.0)
    })
    .await;
    assert!(measured, "{last:?}");
}
