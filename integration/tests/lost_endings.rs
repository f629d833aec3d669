//! Requests whose ending the probe never sees must not stay in flight (as
//! root, real eBPF probes, tenant servers in cgroup pods): a server killed
//! with SIGKILL while streams are open closes its sockets without a close
//! syscall, and its open requests are ended by the tracker's sweep.
use integration::require_root;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration::http::{get, Client, StreamSpec};
use integration::keda::{scaled_object, KedaClient};
use integration::scene::{GpuSetup, Scene, TenantSpec};

async fn in_flight(keda: &mut KedaClient, scene: &Scene, app: &str) -> f64 {
    let selector = format!("app={app}");
    let trigger = scaled_object(
        &scene.namespace,
        app,
        &[("metric", "requests_in_flight"), ("target", "1"), ("podSelector", &selector)],
    );
    keda.poll(&trigger, "inflight").await.expect("requests_in_flight").value
}

async fn metrics(http: SocketAddr) -> String {
    String::from_utf8(get(http, "/metrics").await.expect("GET /metrics").body).unwrap()
}

/// Five streams held open, then the server is SIGKILLed: in flight goes
/// back to 0 within the sweep interval (1 s) plus a tick, the endings are
/// counted as missed (process exited), and the other pod is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_server_releases_its_open_requests() {
    require_root();
    let ns = format!("killed-{}", std::process::id());
    let specs = [TenantSpec::new("doomed", "doomed"), TenantSpec::new("steady", "steady")];
    let args = ["--tick-ms", "100"].map(String::from);
    let mut scene = Scene::start(&ns, &specs, GpuSetup::Arg("none".into()), &args).expect("scene starts");
    let mut keda = KedaClient::connect(scene.agent.keda).await.unwrap();
    let (doomed, steady) = (scene.tenant("doomed").addr, scene.tenant("steady").addr);
    let held = StreamSpec { first_ms: 30_000, chunks: 1, chunk_ms: 0 };
    let mut streams = Vec::new();
    for addr in [doomed, doomed, doomed, doomed, doomed, steady, steady] {
        streams.push(tokio::spawn(async move { Client::connect(addr).await.unwrap().stream(&held.path()).await }));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_flight(&mut keda, &scene, "doomed").await != 5.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(in_flight(&mut keda, &scene, "doomed").await, 5.0);
    assert_eq!(in_flight(&mut keda, &scene, "steady").await, 2.0);

    let killed_at = Instant::now();
    scene.tenants.iter_mut().find(|t| t.spec.name == "doomed").unwrap().pod.kill();
    let mut released_after = None;
    while killed_at.elapsed() < Duration::from_secs(5) {
        if in_flight(&mut keda, &scene, "doomed").await == 0.0 {
            released_after = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let released_after = released_after.expect("in flight still up 5 s after the server was killed");
    println!("in flight back to 0 {} ms after SIGKILL", released_after.as_millis());
    assert!(released_after < Duration::from_millis(1600), "{released_after:?}: more than a sweep and a tick");
    assert_eq!(in_flight(&mut keda, &scene, "steady").await, 2.0, "the other pod keeps its streams");
    let text = metrics(scene.agent.http).await;
    let exited = text
        .lines()
        .find(|l| l.starts_with("podgpu_agent_missed_connection_endings_total{reason=\"process_exited\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .expect("missed endings exported");
    assert!(exited >= 5.0, "{exited}");
    for stream in streams {
        stream.abort();
    }
}
