//! Requests whose ending the probe never sees must not stay in flight (as
//! root, real eBPF probes, tenant servers in cgroup pods): a server killed
//! with SIGKILL while streams are open has its sockets closed by the
//! kernel, and its open requests end as aborted (by the probe's close, or
//! by the tracker's sweep where that close is missed); an
//! HTTP/2 server that answers many streams in one write (more frames than
//! one walk of the kernel program follows) still ends every stream.
use integration::require_root;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration::agent::{AgentProcess, PodEntry};
use integration::http::{get, Client, StreamSpec};
use integration::keda::{scaled_object, KedaClient};
use integration::pod::{new_uid, CgroupPod};
use integration::scene::{GpuSetup, Scene, TenantSpec};
use std::io::{BufRead, BufReader};
use tokio::io::AsyncWriteExt;

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
/// back to 0 within the sweep interval (1 s) plus a tick, the five
/// requests count as aborted (the exit's close reaches the socket
/// tracepoints; had it not, the sweep's `process_exited` rule), and the
/// other pod is untouched.
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
    let value = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{prefix} exported"))
    };
    let exited = value("podgpu_agent_missed_connection_endings_total{reason=\"process_exited\"}");
    let aborted = text
        .lines()
        .find(|l| {
            l.starts_with("podgpu_pod_requests_total{")
                && l.contains("pod=\"doomed\"")
                && l.contains("outcome=\"aborted\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .expect("the doomed pod's aborted requests exported");
    println!("aborted {aborted}, of them ended by the sweep {exited}");
    assert_eq!(aborted, 5.0, "every held stream of the killed server aborted, none completed");
    for stream in streams {
        stream.abort();
    }
}

/// An HTTP/2 frame header and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// 40 streams requested in one write and answered in one write (120
/// response frames): more frames than one kernel walk records (16) or
/// steps through (64), so the walker continues in fresh invocations.
/// All 40 show in flight, then all 40 end; no frame boundary is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http2_write_of_many_streams_ends_them_all() {
    many_streams_at_once("h2bulk", false).await;
}

/// The same 40 streams with every frame boundary split: the client sends
/// its requests 5 bytes per write (the server's reads end inside frame
/// headers), and the server writes its answer as 1-23-byte iovecs, 40 per
/// sendmsg (headers straddle iovecs and syscalls). Every header is joined
/// from its pieces: all 40 start and end, and no boundary is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_frame_headers_split_anywhere_are_joined() {
    many_streams_at_once("h2split", true).await;
}

async fn many_streams_at_once(label: &str, scatter: bool) {
    require_root();
    const STREAMS: u32 = 40;
    let ns = format!("{label}-{}", std::process::id());
    let cgroup_root = podgpu_agent::pods::cgroup_tree::host_v2_root().unwrap();
    let uid = new_uid();
    let mut pod = CgroupPod::create(&cgroup_root, &uid).unwrap();
    let pods = [PodEntry { uid: &uid, namespace: &ns, name: "grpc-0", app: "grpc" }];
    let (agent, _files) = AgentProcess::start_for_pods(&pods, &[]).expect("agent starts");
    // Started once the agent watches: an accept() entered before the
    // probes were attached is not seen (its connection would be missed).
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/h2_bulk_server.py");
    let mut command = std::process::Command::new("python3");
    command.arg(&script).args([STREAMS.to_string(), "3".to_string()]);
    if scatter {
        command.arg("scatter");
    }
    let child = pod.spawn(command).expect("python3 runs the raw HTTP/2 server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("server said {line:?}"));
    let addr: SocketAddr = ready["listening"].as_str().unwrap().parse().unwrap();

    let mut keda = KedaClient::connect(agent.keda).await.unwrap();
    let trigger =
        scaled_object(&ns, "grpc", &[("metric", "requests_in_flight"), ("target", "1"), ("podSelector", "app=grpc")]);

    let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    request.extend(h2_frame(4, 0, 0, b""));
    for stream in (1..=2 * STREAMS).step_by(2) {
        request.extend(h2_frame(1, 0x5, stream, b"\x82\x84"));
    }
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client.set_nodelay(true).unwrap();
    if scatter {
        for piece in request.chunks(5) {
            client.write_all(piece).await.unwrap();
            // Lets the server read each piece on its own.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    } else {
        client.write_all(&request).await.unwrap();
    }

    let in_flight =
        async |keda: &mut KedaClient| keda.poll(&trigger, "inflight").await.map(|p| p.value).unwrap_or(-1.0);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut peak = 0.0f64;
    while Instant::now() < deadline && peak < STREAMS as f64 {
        peak = peak.max(in_flight(&mut keda).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(peak, STREAMS as f64, "every stream of the one read seen starting");
    let deadline = Instant::now() + Duration::from_secs(6);
    while in_flight(&mut keda).await != 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(in_flight(&mut keda).await, 0.0, "every stream of the one write seen ending");
    // The counters on /pods follow within a tick of the level (CI once read
    // them a moment early).
    let pods = async || -> serde_json::Value {
        serde_json::from_slice(&get(agent.http, "/pods").await.unwrap().body).unwrap()
    };
    let grpc_row = |view: &serde_json::Value| {
        view["pods"].as_array().unwrap().iter().find(|p| p["name"] == "grpc-0").unwrap().clone()
    };
    integration::eventually(Duration::from_secs(3), async || grpc_row(&pods().await)["requests"]["completed"] == 40)
        .await;
    let view = pods().await;
    let row = grpc_row(&view);
    assert_eq!(
        (row["requests"]["started"].as_u64(), row["requests"]["completed"].as_u64()),
        (Some(40), Some(40)),
        "{row}"
    );
    let probe = &view["health"]["request_probe"];
    assert_eq!(probe["http2_lost_sync"], 0, "{probe}");
    if scatter {
        // Pieces of the preface and 40 request headers, and most of the 120
        // answer headers, arrive split.
        assert!(probe["http2_headers_joined"].as_u64().unwrap() >= 100, "{probe}");
    }
    drop(client);
}
