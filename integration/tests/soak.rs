//! Soak: the agent under steady traffic and pod churn for
//! `PODGPU_SOAK_SECONDS` (300 by default; `PODGPU_SOAK_SECONDS=3600` for the
//! hour on demand). Two steady pods serve requests and streams the whole
//! time; every `PODGPU_SOAK_CHURN_MS` (2000 by default) a pod is created,
//! takes requests and a held stream, and 2 s later is killed and removed
//! with them open, so churn pods overlap when the period is shorter.
//! The test command runs 120 s with a pod every 500 ms: the same bounds
//! over more churned pods (about 240, against 150 in 300 s at 2 s) in less
//! than half the time. Every 10 s the agent's RSS, open fds, tracked
//! connections and pods are sampled and KEDA is asked for the steady pods'
//! request rate.
//!
//! Fails when, after the first fifth of the run (warm-up), RSS grows more
//! than 16 MiB or fds more than 16; when tracked connections or pods do not
//! return to the steady set at the end; or when a KEDA answer is wrong.
//! Figures are in docs/reliability.md.
use std::time::{Duration, Instant};

use integration::http::{drive, get, Client, Load, StreamSpec};
use integration::keda::{scaled_object, KedaClient};
use integration::require_root;
use integration::scale::ProcessSample;
use integration::scene::{GpuSetup, Scene, Tenant, TenantSpec};

const RSS_GROWTH_KIB: u64 = 16 * 1024;
const FD_GROWTH: usize = 16;
const STEADY_RATE: f64 = 40.0;

async fn health(scene: &Scene) -> serde_json::Value {
    serde_json::from_slice(&get(scene.agent.http, "/healthz").await.expect("healthz").body).expect("JSON")
}

async fn pod_count(scene: &Scene) -> usize {
    let body = get(scene.agent.http, "/pods").await.expect("pods").body;
    serde_json::from_slice::<serde_json::Value>(&body).expect("JSON")["pods"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_with_churn_and_traffic() {
    require_root();
    integration::raise_fd_limit();
    let seconds: u64 = std::env::var("PODGPU_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let churn_ms: u64 = std::env::var("PODGPU_SOAK_CHURN_MS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let churn_period = Duration::from_millis(churn_ms.max(100));
    let run = Duration::from_secs(seconds);
    let warm_up = run / 5;
    let ns = format!("soak-{}", std::process::id());
    let specs = [TenantSpec::new("steady-0", "steady"), TenantSpec::new("steady-1", "steady")];
    let args = ["--tick-ms", "250"].map(String::from);
    let scene = Scene::start(&ns, &specs, GpuSetup::Arg("sim".into()), &args).expect("scene starts");
    let started = Instant::now();

    // Steady traffic on both pods for the whole run: requests, and streams
    // of 0.5 s on their own connections.
    let mut traffic = Vec::new();
    for tenant in &scene.tenants {
        let load = Load { rate: STEADY_RATE / 2.0, request_bytes: 256, connections: 2, duration: run };
        let addr = tenant.addr;
        traffic.push(tokio::spawn(async move {
            drive(addr, load).await;
        }));
        traffic.push(tokio::spawn(async move {
            let stream = StreamSpec { first_ms: 200, chunks: 3, chunk_ms: 100 };
            integration::http::drive_streams(addr, stream, 2, run).await;
        }));
    }

    // Churn: a pod every period, each killed 2 s after it started, with a
    // request stream open.
    let cgroup_root = scene.cgroup_root.clone();
    let churn = tokio::spawn(async move {
        let mut lives = Vec::new();
        let mut next = Instant::now();
        while started.elapsed() + Duration::from_secs(3) < run {
            let spec = TenantSpec::new(&format!("churn-{}", lives.len()), "churn");
            let root = cgroup_root.clone();
            lives.push(tokio::spawn(churn_pod(root, spec)));
            next += churn_period;
            tokio::time::sleep_until(next.into()).await;
        }
        let mut churned = 0u32;
        for life in lives {
            life.await.expect("churn task");
            churned += 1;
        }
        churned
    });

    let mut keda = KedaClient::connect(scene.agent.keda).await.unwrap();
    let rate = scaled_object(
        &ns,
        "steady",
        &[("metric", "request_rate"), ("target", "10"), ("podSelector", "app=steady"), ("window", "10s")],
    );
    let mut samples = Vec::new();
    let mut baseline: Option<ProcessSample> = None;
    let mut wrong_answers = Vec::new();
    // Every sample falls inside the load: one taken after it ends would
    // compare a rate over a window the traffic left with the full rate.
    while started.elapsed() + Duration::from_secs(10) <= run {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let sample = ProcessSample::of(scene.agent.pid()).expect("agent /proc");
        let health = health(&scene).await;
        let connections = health["request_reader"]["connections"].as_u64().unwrap_or(0);
        let pods = pod_count(&scene).await;
        let answer = keda.get_metrics(&rate, "rate").await.map(|(_, v)| v);
        eprintln!(
            "soak {:>4.0} s: RSS {} KiB, fds {}, tracked connections {connections}, pods {pods}, steady rate {answer:?}",
            started.elapsed().as_secs_f64(),
            sample.rss_kib,
            sample.fds
        );
        // The request rate counts requests started; streams add 2 per
        // 0.5 s per pod on top of the driven rate.
        match &answer {
            Ok(value) if (value - (STEADY_RATE + 8.0)).abs() <= 0.3 * (STEADY_RATE + 8.0) => {}
            _ if started.elapsed() < Duration::from_secs(15) => {}
            other => wrong_answers.push(format!("{:.0} s: {other:?}", started.elapsed().as_secs_f64())),
        }
        if baseline.is_none() && started.elapsed() >= warm_up {
            baseline = Some(sample);
        }
        samples.push(sample);
    }
    let churned = churn.await.expect("churn task");
    for task in traffic {
        let _ = task.await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end_health = health(&scene).await;
    let end_pods = pod_count(&scene).await;
    let baseline = baseline.expect("a sample after the warm-up");
    let peak_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let peak_fds = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    eprintln!(
        "soak: {seconds} s, {churned} pods churned; RSS after warm-up {} KiB, peak {peak_rss} KiB; fds after warm-up {}, peak {peak_fds}",
        baseline.rss_kib, baseline.fds
    );
    let expected = seconds.saturating_sub(3) * 1000 / churn_period.as_millis() as u64;
    assert!(u64::from(churned) * 3 >= expected * 2, "churn kept up: {churned} pods of {expected}");
    assert!(wrong_answers.is_empty(), "KEDA answers off the steady rate: {wrong_answers:?}");
    assert!(
        peak_rss <= baseline.rss_kib + RSS_GROWTH_KIB,
        "RSS grew {} KiB after the warm-up",
        peak_rss - baseline.rss_kib
    );
    assert!(peak_fds <= baseline.fds + FD_GROWTH, "fds grew from {} to {peak_fds}", baseline.fds);
    assert_eq!(end_pods, 2, "only the steady pods remain: {end_pods}");
    let connections = end_health["request_reader"]["connections"].as_u64().unwrap_or(u64::MAX);
    assert!(connections <= 4, "connections left tracked after the traffic stopped: {connections}");
}

/// One churn pod's life: started, 5 requests and a held stream, killed
/// with the stream open 2 s after it started, its cgroups removed.
async fn churn_pod(cgroup_root: std::path::PathBuf, spec: TenantSpec) {
    let tenant = tokio::task::spawn_blocking(move || Tenant::start(&cgroup_root, &spec))
        .await
        .expect("churn task")
        .expect("churn pod starts");
    let born = Instant::now();
    let addr = tenant.addr;
    let held = tokio::spawn(async move {
        let path = StreamSpec { first_ms: 5_000, chunks: 1, chunk_ms: 0 }.path();
        if let Ok(mut client) = Client::connect(addr).await {
            let _ = client.stream(&path).await;
        }
    });
    if let Ok(mut client) = Client::connect(addr).await {
        for _ in 0..5 {
            let _ = client.request("/", b"churn").await;
        }
    }
    tokio::time::sleep_until((born + Duration::from_secs(2)).into()).await;
    tokio::task::spawn_blocking(move || drop(tenant)).await.expect("churn pod removed");
    held.abort();
}
