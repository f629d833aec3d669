//! Faults under traffic, each asserting the agent keeps serving, recovers,
//! and never reports what it cannot know: the agent restarted while a pod
//! takes requests (signals back within one window), and a pod's cgroup
//! removed while its events are still in flight (no stale pod, no leaked
//! connection, the other pods unaffected), the probe's map of watched
//! cgroups full (an error, never a 0, until room frees), and its map of
//! connections overfilled (evicted connections' requests ended and
//! counted, never left in flight). The other fault tests are listed in
//! docs/reliability.md.
use std::time::{Duration, Instant};

use integration::http::{drive, get, Client, Load, StreamSpec};
use integration::keda::{scaled_object, KedaClient};
use integration::require_root;
use integration::scene::{GpuSetup, Scene, TenantSpec};

fn start(test: &str, tenants: &[&str]) -> Scene {
    let ns = format!("{test}-{}", std::process::id());
    let specs: Vec<TenantSpec> = tenants.iter().map(|name| TenantSpec::new(name, name)).collect();
    let args = ["--tick-ms", "100"].map(String::from);
    Scene::start(&ns, &specs, GpuSetup::Arg("none".into()), &args).expect("scene starts")
}

fn trigger(scene: &Scene, app: &str, metric: &str, window: &str) -> podgpu_proto::externalscaler::ScaledObjectRef {
    let selector = format!("app={app}");
    scaled_object(
        &scene.namespace,
        app,
        &[("metric", metric), ("target", "1"), ("podSelector", &selector), ("window", window)],
    )
}

/// `count` streams to `addr`, each on its own connection, whose first byte
/// comes after `first_ms`: requests held in flight.
fn hold_streams(
    addr: std::net::SocketAddr,
    count: usize,
    first_ms: u64,
) -> Vec<tokio::task::JoinHandle<std::io::Result<()>>> {
    let path = StreamSpec { first_ms, chunks: 1, chunk_ms: 0 }.path();
    (0..count)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move { Client::connect(addr).await?.stream(&path).await.map(|_| ()) })
        })
        .collect()
}

async fn json(scene: &Scene, path: &str) -> serde_json::Value {
    serde_json::from_slice(&get(scene.agent.http, path).await.expect("agent HTTP").body).expect("JSON")
}

/// The agent restarted while a pod serves 100 requests/s: within one 2 s
/// window of the new agent being ready, KEDA's request rate is the
/// offered rate again, no answer before is a made-up 0, and streams opened
/// after the restart are in flight exactly. Every answer is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_restarted_under_traffic() {
    require_root();
    let mut scene = start("restart", &["busy"]);
    let addr = scene.tenant("busy").addr;
    const RATE: f64 = 100.0;
    let load = tokio::spawn(drive(
        addr,
        Load { rate: RATE, request_bytes: 64, connections: 4, duration: Duration::from_secs(14) },
    ));
    let rate = trigger(&scene, "busy", "request_rate", "2s");
    let mut keda = KedaClient::connect(scene.agent.keda).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = keda.poll(&rate, "rate").await.expect("rate before the restart").value;
    assert!((before - RATE).abs() < 0.25 * RATE, "rate before the restart: {before}");

    scene.restart_agent().expect("agent restarts");
    let ready = Instant::now();
    // Same gRPC address (a restarted pod behind its Service); KEDA reconnects.
    let mut keda = KedaClient::connect(scene.agent.keda).await.unwrap();
    let mut series = Vec::new();
    let mut back_after = None;
    while ready.elapsed() < Duration::from_secs(5) {
        let answer = keda.get_metrics(&rate, "rate").await.map(|(_, value)| value);
        series.push((ready.elapsed().as_millis(), answer.as_ref().map_err(|s| s.message().to_string()).cloned()));
        if back_after.is_none() && answer.as_ref().is_ok_and(|v| (v - RATE).abs() < 0.25 * RATE) {
            back_after = Some(ready.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("after the restart (ms, answer): {series:?}");
    // Until the new agent knows the rate it says so: no answer is a value
    // far from the truth (a made-up 0, or a rate over one tick).
    let wrong: Vec<_> =
        series.iter().filter(|(_, a)| a.as_ref().is_ok_and(|v| (v - RATE).abs() >= 0.3 * RATE)).collect();
    assert!(wrong.is_empty(), "values the new agent could not know: {wrong:?}");
    let back_after = back_after.expect("the request rate never came back");
    eprintln!("request rate back {back_after:?} after the new agent was ready");
    assert!(back_after <= Duration::from_millis(2500), "not back within one 2 s window: {back_after:?}");

    // Streams opened now are counted exactly by the new agent.
    let streams = hold_streams(addr, 3, 2500);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let in_flight = trigger(&scene, "busy", "requests_in_flight", "2s");
    let level = keda.poll(&in_flight, "in-flight").await.expect("in flight").value;
    // The load's own requests may be in flight too (at most one per connection).
    assert!((3.0..=7.0).contains(&level), "3 held streams (+ up to 4 load requests): {level}");
    for stream in streams {
        stream.await.unwrap().expect("stream completes");
    }
    let report = load.await.unwrap();
    assert_eq!(report.failed, 0, "the server never noticed the agent restart");
}

/// A pod's processes killed and its cgroup removed at once, while it takes
/// requests and holds streams (their events still in the ring and the
/// collector): the pod leaves /pods, its workload answers 0 in flight from
/// 0 pods (not its last level), its connections are forgotten, and the
/// neighbour pod keeps its exact counts throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cgroup_removed_with_events_in_flight() {
    require_root();
    let mut scene = start("cgroupgone", &["doomed", "neighbour"]);
    let (doomed, neighbour) = (scene.tenant("doomed").addr, scene.tenant("neighbour").addr);
    let baseline = json(&scene, "/healthz").await["request_reader"]["connections"].as_u64().unwrap();
    let doomed_load = tokio::spawn(drive(
        doomed,
        Load { rate: 200.0, request_bytes: 64, connections: 8, duration: Duration::from_secs(3) },
    ));
    let doomed_streams = hold_streams(doomed, 5, 10_000);
    let neighbour_streams = hold_streams(neighbour, 2, 6_000);
    let mut keda = KedaClient::connect(scene.agent.keda).await.unwrap();
    let doomed_in_flight = trigger(&scene, "doomed", "requests_in_flight", "2s");
    let neighbour_in_flight = trigger(&scene, "neighbour", "requests_in_flight", "2s");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let level = keda.poll(&doomed_in_flight, "x").await.expect("doomed pod in flight").value;
    assert!(level >= 5.0, "5 held streams (+ load) in flight: {level}");

    // SIGKILL and rmdir together, mid-traffic.
    let index = scene.tenants.iter().position(|t| t.spec.name == "doomed").unwrap();
    drop(scene.tenants.remove(index));
    let gone_at = Instant::now();
    let _ = doomed_load.await;
    for stream in doomed_streams {
        assert!(stream.await.unwrap().is_err(), "the doomed pod's streams end with it");
    }

    let mut gone = false;
    while gone_at.elapsed() < Duration::from_secs(10) {
        let pods = json(&scene, "/pods").await;
        if !pods["pods"].as_array().unwrap().iter().any(|p| p["name"] == "doomed") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gone, "the removed pod is still listed after 10 s");
    eprintln!("removed pod left /pods after {:?}", gone_at.elapsed());
    let after = keda.get_metrics(&doomed_in_flight, "x").await.expect("a workload without pods answers").1;
    assert_eq!(after, 0.0, "no pods left: in flight is 0, not the last level");
    assert_eq!(keda.poll(&neighbour_in_flight, "x").await.expect("neighbour answers").value, 2.0);
    for stream in neighbour_streams {
        stream.await.unwrap().expect("neighbour streams complete");
    }
    let settled = integration::eventually(Duration::from_secs(10), async || {
        json(&scene, "/healthz").await["request_reader"]["connections"].as_u64().unwrap() <= baseline + 2
    })
    .await;
    let connections = json(&scene, "/healthz").await["request_reader"]["connections"].clone();
    assert!(settled, "the removed pod's connections were not forgotten: {connections} (baseline {baseline})");
    assert!(scene.agent.is_running(), "the agent survived");
}

/// The request probe's map of watched cgroups full: three pods (a pod, a
/// sandbox and a container cgroup each, nine entries) against
/// `--max-watched-cgroups 7`.
/// A pod the map cannot hold answers KEDA with an error naming the map,
/// never a 0, while fully watched pods count exactly; once those go away,
/// the refused pods are watched and count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watched_cgroup_map_full() {
    require_root();
    let pid = std::process::id();
    let ns = format!("mapfull-{pid}");
    let specs = ["a", "b", "c"].map(|name| TenantSpec::new(name, name));
    let args = ["--tick-ms", "100", "--max-watched-cgroups", "7"].map(String::from);
    let node = format!("podgpu-mapfull-{pid}");
    let mut scene =
        Scene::start_on(Some(&node), &ns, &specs, GpuSetup::Arg("none".into()), &args).expect("scene starts");
    let mut keda = KedaClient::connect(scene.agent.keda).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut refused = Vec::new();
    for app in ["a", "b", "c"] {
        match keda.get_metrics(&trigger(&scene, app, "requests_in_flight", "2s"), "x").await {
            Ok((_, value)) => assert_eq!(value, 0.0, "{app}: idle"),
            Err(status) => {
                assert!(status.message().contains("watched cgroups is full"), "{app}: {}", status.message());
                refused.push(app);
            }
        }
    }
    // Two of nine entries do not fit: one pod or two lose one.
    assert!((1..=2).contains(&refused.len()), "pods beyond the map: {refused:?}");
    let watched: Vec<&str> = ["a", "b", "c"].into_iter().filter(|app| !refused.contains(app)).collect();

    // The watched pods count their requests exactly.
    for app in &watched {
        let mut client = Client::connect(scene.tenant(app).addr).await.unwrap();
        for _ in 0..4 {
            assert_eq!(client.request("/", b"x").await.unwrap().status, 200);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pods = json(&scene, "/pods").await;
    let started = |pods: &serde_json::Value, app: &str| {
        pods["pods"].as_array().unwrap().iter().find(|p| p["name"] == app).map(|p| p["requests"]["started"].clone())
    };
    for app in &watched {
        assert_eq!(started(&pods, app), Some(serde_json::json!(4)), "{app}: {pods}");
    }

    // The watched pods go away: their entries free, and the refused pods
    // are watched at the next rescan and count from then on.
    scene.tenants.retain(|tenant| refused.contains(&tenant.spec.name.as_str()));
    for app in &refused {
        let in_flight = trigger(&scene, app, "requests_in_flight", "2s");
        let answered =
            integration::eventually(Duration::from_secs(15), async || keda.get_metrics(&in_flight, "x").await.is_ok())
                .await;
        assert!(answered, "{app} was never watched after room freed");
        let mut client = Client::connect(scene.tenant(app).addr).await.unwrap();
        for _ in 0..3 {
            assert_eq!(client.request("/", b"x").await.unwrap().status, 200);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pods = json(&scene, "/pods").await;
    for app in &refused {
        assert_eq!(started(&pods, app), Some(serde_json::json!(3)), "{app} counts once watched: {pods}");
    }
}

/// A missed-ending counter of the agent's /metrics.
async fn missed_endings(scene: &Scene, reason: &str) -> f64 {
    let samples = integration::http::metric_samples(scene.agent.http, "podgpu_agent_missed_connection_endings_total")
        .await
        .expect("agent HTTP");
    let labels = format!("reason=\"{reason}\"");
    samples.into_iter().find_map(|(l, value)| (l == labels).then_some(value)).expect("series present")
}

/// The request probe's connection map (an LRU) overfilled: four streams
/// held open against `--max-tracked-connections 64`, then 400 idle
/// connections. The kernel evicts the least recently used; each held
/// connection it evicted is ended by the tracker's sweep and counted
/// (`kernel_evicted`), so the pod's in-flight level is exactly the held
/// connections the kernel still follows, never a level no event will
/// lower. Once the idle connections close, new streams count exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_map_overfilled() {
    require_root();
    let pid = std::process::id();
    let (ns, node) = (format!("connfull-{pid}"), format!("podgpu-connfull-{pid}"));
    let args = ["--tick-ms", "100", "--max-tracked-connections", "64"].map(String::from);
    let specs = [TenantSpec::new("busy", "busy")];
    let mut scene =
        Scene::start_on(Some(&node), &ns, &specs, GpuSetup::Arg("none".into()), &args).expect("scene starts");
    let addr = scene.tenant("busy").addr;
    // The pod's in-flight level; -1 until it is listed.
    let level = async || {
        let pods = json(&scene, "/pods").await;
        let pod = pods["pods"].as_array().unwrap().iter().find(|p| p["name"] == "busy").cloned();
        pod.and_then(|p| p["values"]["requests_in_flight"].as_f64()).unwrap_or(-1.0)
    };
    assert!(integration::eventually(Duration::from_secs(5), async || level().await == 0.0).await, "pod listed");
    let held = hold_streams(addr, 4, 9_000);
    let holding = integration::eventually(Duration::from_secs(5), async || level().await == 4.0).await;
    assert!(holding, "4 held streams: {}", json(&scene, "/pods").await);
    let evicted_before = missed_endings(&scene, "kernel_evicted").await;

    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // The sweep checks connections quiet for a second, about once a second:
    // after two sweeps, whatever the kernel evicted has been ended. Which
    // held connections the kernel's LRU evicts depends on its per-CPU
    // lists (a run evicted none of the 4): the bar is that the level is
    // exactly the held connections still followed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let healed = integration::eventually(Duration::from_secs(5), async || {
        let evicted = missed_endings(&scene, "kernel_evicted").await - evicted_before;
        level().await + evicted == 4.0
    })
    .await;
    let evicted = missed_endings(&scene, "kernel_evicted").await - evicted_before;
    let after_flood = level().await;
    eprintln!(
        "400 idle connections through a map of 64: {evicted} of 4 held connections evicted, in flight {after_flood}"
    );
    assert!(healed, "evicted {evicted} held connections, in flight {after_flood}: not the 4 held minus the evicted");
    let health = json(&scene, "/healthz").await;
    assert_eq!(health["request_probe"]["connection_map_full"], 0, "an LRU evicts, it never refuses: {health}");

    drop(idle);
    for stream in held {
        let _ = stream.await.unwrap();
    }
    assert!(integration::eventually(Duration::from_secs(5), async || level().await == 0.0).await, "held streams done");
    let fresh = hold_streams(addr, 3, 2_000);
    assert!(integration::eventually(Duration::from_secs(2), async || level().await == 3.0).await, "3 new streams");
    for stream in fresh {
        stream.await.unwrap().expect("new streams complete");
    }
    assert!(integration::eventually(Duration::from_secs(3), async || level().await == 0.0).await, "all done");
    assert!(scene.agent.is_running(), "the agent survived");
}
