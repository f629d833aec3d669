//! Engine-native signals with no configuration: stand-in engines in cgroup
//! pods, each under its engine's own command line and serving its
//! engine's exposition (`scripts/stacks/engine_standin.py`), found by the
//! real agent from their processes and listening ports, and read through
//! KEDA's ExternalScaler. Faults give errors naming the cause, never 0,
//! while every other signal keeps answering.
use std::time::{Duration, Instant};

use integration::agent::AgentProcess;
use integration::engine_standin;
use integration::http::get;
use integration::keda::{scaled_object, KedaClient};
use integration::scene::{GpuSetup, Scene, TenantSpec};
use integration::stacks::Stack;
use integration::{require_root, workspace_binary};
use podgpu_agent::engines::catalog::EngineKind;
use serde_json::Value;

fn agent_args() -> Vec<String> {
    ["--tick-ms", "100", "--engine-interval-ms", "200", "--engine-rediscover-ms", "1000"].map(String::from).to_vec()
}

async fn pods(scene: &Scene) -> Value {
    serde_json::from_slice(&get(scene.agent.http, "/pods").await.expect("agent answers").body).expect("JSON")
}

fn row<'a>(pods: &'a Value, uid: &str) -> &'a Value {
    pods["pods"].as_array().and_then(|rows| rows.iter().find(|p| p["uid"] == uid)).unwrap_or(&Value::Null)
}

/// Waits until `check` holds for the pod's engine row in /pods; the last
/// row either way.
async fn engine_row(scene: &Scene, uid: &str, within: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let engine = row(&pods(scene).await, uid)["engine"].clone();
        if check(&engine) || Instant::now() > deadline {
            return engine;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One engine metric of the workload `app` as KEDA reads it.
async fn read(keda: &mut KedaClient, ns: &str, app: &str, metric: &str) -> Result<f64, tonic::Status> {
    let trigger =
        scaled_object(ns, app, &[("metric", metric), ("target", "1"), ("podSelector", &format!("app={app}"))]);
    keda.get_metrics(&trigger, &format!("podgpu-{}", metric.replace('_', "-"))).await.map(|(_, value)| value)
}

/// Polls `metric` until it reads `wanted` (within 1e-6) or `within` passes.
async fn reads(
    keda: &mut KedaClient,
    ns: &str,
    app: &str,
    metric: &str,
    wanted: f64,
    within: Duration,
) -> Result<f64, String> {
    let deadline = Instant::now() + within;
    loop {
        let last = read(keda, ns, app, metric).await;
        match &last {
            Ok(value) if (value - wanted).abs() < 1e-6 => return Ok(*value),
            _ if Instant::now() > deadline => return Err(format!("{metric} of {app}: wanted {wanted}, last {last:?}")),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Polls `metric` until KEDA's error contains `needle`; panics on a value
/// of 0 (a fault must never read as an idle engine) or after `within`.
async fn fails_with(
    keda: &mut KedaClient,
    ns: &str,
    app: &str,
    metric: &str,
    needle: &str,
    within: Duration,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        match read(keda, ns, app, metric).await {
            Err(status) if status.message().contains(needle) => return status.message().to_string(),
            Ok(0.0) => panic!("{metric} of {app} read 0 while faulty (waiting for {needle:?})"),
            last if Instant::now() > deadline => panic!("{metric} of {app}: no error with {needle:?}; last {last:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

const ENGINES: [EngineKind; 8] = [
    EngineKind::Vllm,
    EngineKind::Sglang,
    EngineKind::Tgi,
    EngineKind::Triton,
    EngineKind::TrtllmServe,
    EngineKind::LlamaCpp,
    EngineKind::Lmdeploy,
    EngineKind::Dynamo,
];

/// Every engine in the table is found by its process and port, with no
/// configuration, and its queue, batch, KV cache and TTFT reach KEDA;
/// what an engine does not export is an error saying so. A second vLLM
/// pod runs two data-parallel ranks under the pre-0.9 KV name: ranks add
/// up and the renamed family is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_engine_is_found_by_its_process_and_read() {
    require_root();
    let ns = format!("engines-{}", std::process::id());
    let mut specs: Vec<TenantSpec> = ENGINES
        .iter()
        .map(|engine| TenantSpec { server: Stack::Engine(*engine), ..TenantSpec::new(engine.name(), engine.name()) })
        .collect();
    let mut old_vllm = TenantSpec { server: Stack::Engine(EngineKind::Vllm), ..TenantSpec::new("vllm-dp", "vllm-dp") };
    old_vllm.env = vec![("PODGPU_STANDIN_RANKS".into(), "2".into()), ("PODGPU_STANDIN_VLLM_OLD".into(), "1".into())];
    specs.push(old_vllm);
    let scene = Scene::start(&ns, &specs, GpuSetup::Arg("none".into()), &agent_args()).expect("scene starts");

    for (index, tenant) in scene.tenants.iter().enumerate() {
        let index = index as u32;
        engine_standin::set(tenant.addr, 3 + index, 1 + index, 0.05 * f64::from(index + 1)).await.unwrap();
    }
    for tenant in &scene.tenants {
        let uid = tenant.pod.uid.clone();
        let engine = engine_row(&scene, &uid, Duration::from_secs(20), |e| e["unavailable"].is_null()).await;
        let Stack::Engine(kind) = tenant.spec.server else { unreachable!() };
        assert_eq!(engine["engine"], kind.name(), "{} found as {engine}", tenant.spec.name);
        assert!(engine["named_by"].as_str().unwrap().starts_with("command "), "found by its process: {engine}");
        assert!(
            engine["endpoint"].as_str().unwrap().starts_with(&tenant.addr.to_string()),
            "read where it listens ({}): {engine}",
            tenant.addr
        );
    }
    // First tokens after discovery, so the window's difference holds them.
    for tenant in &scene.tenants {
        engine_standin::observe(tenant.addr, 0.3, 20).await.unwrap();
    }

    let mut keda = KedaClient::connect(scene.agent.keda).await.unwrap();
    let within = Duration::from_secs(5);
    for (index, tenant) in scene.tenants.iter().enumerate() {
        let (app, index) = (tenant.spec.app.as_str(), index as u32);
        let Stack::Engine(kind) = tenant.spec.server else { unreachable!() };
        reads(&mut keda, &ns, app, "engine_requests_waiting", f64::from(3 + index), within).await.unwrap();
        reads(&mut keda, &ns, app, "engine_requests_running", f64::from(1 + index), within).await.unwrap();
        let kv_percent = 5.0 * f64::from(index + 1);
        match kind {
            EngineKind::Tgi | EngineKind::LlamaCpp | EngineKind::Dynamo => {
                fails_with(&mut keda, &ns, app, "kv_cache_usage", "exports no KV-cache gauge", within).await;
            }
            _ => {
                let kv = reads(&mut keda, &ns, app, "kv_cache_usage", kv_percent, within).await;
                assert!(kv.is_ok(), "{kv:?}");
            }
        }
        match kind {
            EngineKind::Tgi | EngineKind::LlamaCpp => {
                fails_with(&mut keda, &ns, app, "engine_ttft_ms_p50", "exports no TTFT histogram", within).await;
            }
            _ => {
                // 20 first tokens of 300 ms: the p50 lies in the engine's
                // bucket holding 0.3 s (0.25-0.5 s for vLLM's buckets,
                // 0.2-0.4 s for SGLang's, 100-500 ms for Triton's).
                let deadline = Instant::now() + within;
                let p50 = loop {
                    match read(&mut keda, &ns, app, "engine_ttft_ms_p50").await {
                        Ok(p50) if p50 > 0.0 => break p50,
                        last if Instant::now() > deadline => panic!("{app}: engine TTFT never read: {last:?}"),
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                };
                assert!((100.0..=500.0).contains(&p50), "{app}: engine p50 TTFT {p50} ms for 300 ms first tokens");
            }
        }
    }
    // Fusion: vLLM holds 3 waiting + 1 running while its sockets hold no
    // request (the stand-in's scrapes are probe traffic, its control
    // calls are answered), so the engine sees 4 requests the sockets do not.
    let vllm = &scene.tenants[0];
    let fusion =
        engine_row(&scene, &vllm.pod.uid, within, |e| e["fusion"]["requests_gap"] == 4.0).await["fusion"].clone();
    assert_eq!(fusion["engine_requests"], 4.0, "{fusion}");
    assert_eq!(fusion["socket_requests_in_flight"], 0.0, "{fusion}");
    assert_eq!(fusion["requests_gap"], 4.0, "{fusion}");

    let dp = scene.tenants.last().unwrap();
    let engine = engine_row(&scene, &dp.pod.uid, within, |_| true).await;
    assert!(
        engine["families_read"].as_array().unwrap().iter().any(|f| f == "vllm:gpu_cache_usage_perc"),
        "the pre-0.9 KV family is read: {engine}"
    );

    // The same through the scaler: queue and engine TTFT cross the node
    // API (the TTFT as window buckets) and merge there.
    let args = ["--nodes", &scene.agent.keda.to_string(), "--poll-ms", "200"].map(String::from);
    let scaler = AgentProcess::start_role(&workspace_binary("podgpu-agent"), "scaler", &args).expect("scaler starts");
    let mut through_scaler = KedaClient::connect(scaler.keda).await.unwrap();
    reads(&mut through_scaler, &ns, "vllm", "engine_requests_waiting", 3.0, within).await.unwrap();
    let p50 = read(&mut through_scaler, &ns, "vllm", "engine_ttft_ms_p50").await.expect("engine TTFT via the scaler");
    assert!((250.0..=500.0).contains(&p50), "vLLM's 0.25-0.5 s bucket, through the scaler: {p50} ms");
    // The scaler's /pods names each pod's engine as the node's does, so
    // `top` against the scaler shows it.
    let scaler_pods: Value = serde_json::from_slice(&get(scaler.http, "/pods").await.unwrap().body).expect("JSON");
    let scaler_engine = |name: &str| {
        scaler_pods["pods"].as_array().unwrap().iter().find(|p| p["name"] == name).map(|p| p["engine"].clone())
    };
    let vllm_engine = scaler_engine("vllm").unwrap_or_default();
    assert_eq!(vllm_engine["engine"], "vllm", "{scaler_pods}");
    assert!(vllm_engine["unavailable"].is_null(), "{scaler_pods}");

    // /healthz says, per pod, what was found where and how.
    let health: Value = serde_json::from_slice(&get(scene.agent.http, "/healthz").await.unwrap().body).expect("JSON");
    let summary = health["engine_pods"][format!("{ns}/sglang")].as_str().unwrap_or_default().to_string();
    assert!(
        summary.starts_with("sglang at 127.0.0.1:") && summary.ends_with("(command sglang.launch_server)"),
        "{health}"
    );

    // Prometheus sees the engine's gauges beside podgpu's own.
    let metrics = String::from_utf8(get(scene.agent.http, "/metrics").await.unwrap().body).unwrap();
    for family in ["podgpu_pod_engine_requests_waiting", "podgpu_pod_kv_cache_usage", "podgpu_pod_engine_up"] {
        assert!(metrics.contains(family), "{family} missing from /metrics");
    }
    assert!(metrics.contains("engine=\"triton\""), "podgpu_pod_engine_up names the engine");
}

/// A pod whose processes name no engine: once the request probe has seen
/// HTTP on its port, that port's /metrics body names the engine by its
/// families. A pod serving no HTTP is never asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unnamed_engine_is_found_by_its_metrics() {
    require_root();
    let ns = format!("engine-unnamed-{}", std::process::id());
    let specs = [
        TenantSpec {
            server: Stack::EngineUnnamed(EngineKind::Sglang, "serve.py"),
            ..TenantSpec::new("custom", "custom")
        },
        TenantSpec { server: Stack::EngineUnnamed(EngineKind::Vllm, "quiet.py"), ..TenantSpec::new("quiet", "quiet") },
    ];
    let scene = Scene::start(&ns, &specs, GpuSetup::Arg("none".into()), &agent_args()).expect("scene starts");
    let (custom, quiet) = (&scene.tenants[0], &scene.tenants[1]);
    let within = Duration::from_secs(10);
    let engine = engine_row(&scene, &custom.pod.uid, within, |e| e["named_by"] != "").await;
    assert_eq!(engine["named_by"], "no label, annotation or command names an engine", "{engine}");
    assert!(engine["endpoint"].is_null(), "nothing is asked before the port serves HTTP: {engine}");
    // A request: now the probe knows the port speaks HTTP.
    engine_standin::set(custom.addr, 7, 2, 0.3).await.unwrap();
    let engine = engine_row(&scene, &custom.pod.uid, within, |e| e["unavailable"].is_null()).await;
    assert_eq!(engine["engine"], "sglang", "named by its families: {engine}");
    let mut keda = KedaClient::connect(scene.agent.keda).await.unwrap();
    reads(&mut keda, &ns, "custom", "engine_requests_waiting", 7.0, within).await.unwrap();
    // The pod that served no HTTP request was never asked for metrics.
    let quiet_engine = engine_row(&scene, &quiet.pod.uid, Duration::ZERO, |_| true).await;
    assert!(quiet_engine["endpoint"].is_null() && quiet_engine["tried"].is_null(), "{quiet_engine}");
    fails_with(&mut keda, &ns, "quiet", "engine_requests_waiting", "no inference engine found", within).await;
}

/// Faults on a found engine: 401, garbage, a 50 MB body, a scrape slower
/// than the timeout, the endpoint gone, then two engines in one pod. Each
/// is a KEDA error naming the cause, never 0; the pod's socket signals
/// and a healthy engine beside it keep answering; the engine recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn engine_faults_are_errors_never_zeros() {
    require_root();
    let ns = format!("engine-faults-{}", std::process::id());
    let specs = [
        TenantSpec { server: Stack::Engine(EngineKind::Vllm), ..TenantSpec::new("flaky", "flaky") },
        TenantSpec { server: Stack::Engine(EngineKind::Sglang), ..TenantSpec::new("steady", "steady") },
    ];
    let mut scene = Scene::start(&ns, &specs, GpuSetup::Arg("none".into()), &agent_args()).expect("scene starts");
    let (flaky, steady) = (scene.tenants[0].addr, scene.tenants[1].addr);
    engine_standin::set(flaky, 3, 2, 0.5).await.unwrap();
    engine_standin::set(steady, 6, 1, 0.25).await.unwrap();
    let mut keda = KedaClient::connect(scene.agent.keda).await.unwrap();
    let within = Duration::from_secs(15);
    reads(&mut keda, &ns, "flaky", "engine_requests_waiting", 3.0, within).await.unwrap();

    for (mode, needle) in [
        ("401", "requires authorization"),
        ("garbage", "not Prometheus text"),
        ("huge", "body larger than"),
        ("slow", "no complete answer within"),
    ] {
        engine_standin::fault(flaky, mode).await.unwrap();
        let message = fails_with(&mut keda, &ns, "flaky", "engine_requests_waiting", needle, within).await;
        assert!(message.contains("engine endpoint 127.0.0.1:"), "the error names the endpoint: {message}");
        // Everything else keeps answering.
        reads(&mut keda, &ns, "steady", "engine_requests_waiting", 6.0, within).await.unwrap();
        read(&mut keda, &ns, "flaky", "requests_in_flight").await.expect("socket signals answer");
        engine_standin::fault(flaky, "none").await.unwrap();
        reads(&mut keda, &ns, "flaky", "engine_requests_waiting", 3.0, within).await.unwrap();
    }

    // The endpoint gone: an error, then (after rediscovery finds no
    // engine process) "no inference engine found".
    scene.tenants[0].pod.kill();
    fails_with(&mut keda, &ns, "flaky", "engine_requests_waiting", "no inference engine found", within).await;

    // Two engines in one pod: which one a trigger means cannot be guessed.
    let pod = &mut scene.tenants[0].pod;
    for engine in [EngineKind::Vllm, EngineKind::Sglang] {
        let child = pod.spawn(engine_standin::command(engine).unwrap()).expect("stand-in starts");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    }
    let message = fails_with(&mut keda, &ns, "flaky", "engine_requests_waiting", "2 engines", within).await;
    assert!(message.contains("podgpu.io/engine"), "the error says how to choose: {message}");
    reads(&mut keda, &ns, "steady", "engine_requests_waiting", 6.0, within).await.unwrap();
}
