//! Request signals count inference requests only (as root, real eBPF
//! probes): health checks and metrics scrapes on the serving port are
//! counted apart and included only when a trigger asks, and a pod whose
//! sidecar proxies to the app over loopback counts each request once.
use integration::require_root;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use integration::agent::{AgentProcess, PodEntry};
use integration::http::{get, Client, StreamSpec};
use integration::keda::{scaled_object, KedaClient};
use integration::pod::{new_uid, CgroupPod};
use integration::scene::{GpuSetup, Scene, TenantSpec};
use integration::{eventually, workspace_binary};

async fn value(keda: &mut KedaClient, namespace: &str, app: &str, metric: &str, extra: &[(&str, &str)]) -> f64 {
    let selector = format!("app={app}");
    let mut metadata = vec![("metric", metric), ("target", "1"), ("podSelector", selector.as_str())];
    metadata.extend_from_slice(extra);
    let trigger = scaled_object(namespace, app, &metadata);
    keda.poll(&trigger, metric).await.unwrap_or_else(|e| panic!("{metric}: {e}")).value
}

async fn started(http: SocketAddr, pod: &str) -> u64 {
    let view: serde_json::Value = serde_json::from_slice(&get(http, "/pods").await.unwrap().body).unwrap();
    let row = view["pods"].as_array().unwrap().iter().find(|p| p["name"] == pod).expect("pod listed").clone();
    row["requests"]["started"].as_u64().unwrap()
}

/// Kubelet-style health checks (a connection each) and Prometheus-style
/// scrapes (one keep-alive connection) leave the pod's request signals
/// alone; `includeProbeRequests: "true"` adds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_checks_and_scrapes_do_not_count() {
    require_root();
    let ns = format!("hygiene-{}", std::process::id());
    let args = ["--tick-ms", "100"].map(String::from);
    let scene = Scene::start(&ns, &[TenantSpec::new("llm", "llm")], GpuSetup::Arg("none".into()), &args).unwrap();
    let mut keda = KedaClient::connect(scene.agent.keda).await.unwrap();
    let addr = scene.tenant("llm").addr;
    for _ in 0..10 {
        assert_eq!(get(addr, "/health").await.unwrap().status, 200);
    }
    let mut scraper = Client::connect(addr).await.unwrap();
    for _ in 0..5 {
        assert_eq!(scraper.request("/metrics", b"").await.unwrap().status, 200);
    }
    let mut app = Client::connect(addr).await.unwrap();
    for _ in 0..4 {
        assert_eq!(app.request("/v1/completions", b"{}").await.unwrap().status, 200);
    }
    // Held open: 2 inference streams, 3 slow health checks.
    let held = StreamSpec { first_ms: 30_000, chunks: 1, chunk_ms: 0 };
    let mut streams = Vec::new();
    for path in ["", "", "/health", "/health", "/health"] {
        let path = format!("{path}{}", held.path());
        streams.push(tokio::spawn(async move { Client::connect(addr).await.unwrap().stream(&path).await }));
    }
    let settled = eventually(Duration::from_secs(5), async || {
        value(&mut keda, &ns, "llm", "requests_in_flight", &[("includeProbeRequests", "true")]).await == 5.0
    })
    .await;
    assert!(settled, "all five held requests seen");
    assert_eq!(value(&mut keda, &ns, "llm", "requests_in_flight", &[]).await, 2.0, "inference only by default");
    assert_eq!(started(scene.agent.http, "llm").await, 6, "4 completions + 2 streams, no probes");
    let with_probes = value(&mut keda, &ns, "llm", "request_rate", &[("includeProbeRequests", "true")]).await;
    let without = value(&mut keda, &ns, "llm", "request_rate", &[]).await;
    assert!(with_probes > 2.0 * without && without > 0.0, "rate with probes {with_probes}, without {without}");
    for stream in streams {
        stream.abort();
    }
}

/// A network namespace standing in for a pod's, reached from the host
/// over a veth pair (10.231.N.1 host side, 10.231.N.2 pod side).
struct PodNetwork {
    name: String,
    host_veth: String,
    pod_ip: String,
}

impl PodNetwork {
    fn create() -> Self {
        let id = std::process::id() % 200 + 20;
        let name = format!("podgpu-hyg-{id}");
        let host_veth = format!("pgh{id}");
        let pod_ip = format!("10.231.{id}.2");
        let ip = |args: &str| {
            let status = Command::new("ip").args(args.split_whitespace()).status().expect("ip (iproute2)");
            assert!(status.success(), "ip {args}");
        };
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let _ = Command::new("ip").args(["link", "del", &host_veth]).status();
        ip(&format!("netns add {name}"));
        ip(&format!("link add {host_veth} type veth peer name pgp{id}"));
        ip(&format!("link set pgp{id} netns {name}"));
        ip(&format!("addr add 10.231.{id}.1/24 dev {host_veth}"));
        ip(&format!("link set {host_veth} up"));
        ip(&format!("netns exec {name} ip addr add {pod_ip}/24 dev pgp{id}"));
        ip(&format!("netns exec {name} ip link set pgp{id} up"));
        ip(&format!("netns exec {name} ip link set lo up"));
        Self { name, host_veth, pod_ip }
    }

    /// `binary args` inside the namespace (`ip netns exec` execs it: the
    /// pid, hence the cgroup placement, is the server's).
    fn command(&self, binary: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(workspace_binary(binary)).args(args);
        command
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_veth]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The address a server in `pod` printed on its first stdout line.
fn listening(pod: &mut CgroupPod, command: Command) -> SocketAddr {
    let child = pod.spawn(command).expect("server starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("server said {line:?}"));
    ready["listening"].as_str().unwrap().parse().unwrap()
}

/// A two-container pod in its own network namespace: a sidecar proxy takes
/// the requests from outside and relays them to the app over loopback.
/// Each request counts once (at the sidecar, where it entered the pod), in
/// flight equals the streams held open, not twice that.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_hop_counts_once() {
    require_root();
    let ns = format!("sidecar-{}", std::process::id());
    let network = PodNetwork::create();
    let cgroup_root = podgpu_agent::pods::cgroup_tree::host_v2_root().unwrap();
    let uid = new_uid();
    let mut app = CgroupPod::create(&cgroup_root, &uid).unwrap();
    let app_addr = listening(&mut app, network.command("tenant", &["127.0.0.1:0"]));
    let mut sidecar = CgroupPod::create_container(&cgroup_root, &uid, &"5c".repeat(32)).unwrap();
    let listen = format!("{}:0", network.pod_ip);
    let proxy_addr = listening(&mut sidecar, network.command("proxy", &[&listen, &app_addr.to_string()]));

    let pods = [PodEntry { uid: &uid, namespace: &ns, name: "llm-0", app: "llm" }];
    let (agent, _files) = AgentProcess::start_for_pods(&pods, &[]).expect("agent starts");
    let mut keda = KedaClient::connect(agent.keda).await.unwrap();

    let mut client = Client::connect(proxy_addr).await.expect("the pod, through its sidecar");
    for _ in 0..4 {
        assert_eq!(client.request("/v1/completions", b"{}").await.unwrap().status, 200);
    }
    let held = StreamSpec { first_ms: 30_000, chunks: 1, chunk_ms: 0 };
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams
            .push(tokio::spawn(async move { Client::connect(proxy_addr).await.unwrap().stream(&held.path()).await }));
    }
    let settled = eventually(Duration::from_secs(5), async || {
        value(&mut keda, &ns, "llm", "requests_in_flight", &[]).await == 3.0
    })
    .await;
    if !settled {
        let metrics = String::from_utf8(get(agent.http, "/metrics").await.unwrap().body).unwrap();
        let debug: Vec<&str> =
            metrics.lines().filter(|l| l.contains("intra_pod") || l.contains("connections")).collect();
        panic!("in flight: {}\n{debug:#?}", value(&mut keda, &ns, "llm", "requests_in_flight", &[]).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(value(&mut keda, &ns, "llm", "requests_in_flight", &[]).await, 3.0, "not 6: the hop is not counted");
    assert_eq!(started(agent.http, "llm-0").await, 7, "4 requests + 3 streams, once each");
    // Tracker counters are published with its sweep (every second).
    let counted_hops = eventually(Duration::from_secs(3), async || {
        let metrics = String::from_utf8(get(agent.http, "/metrics").await.unwrap().body).unwrap();
        metrics.lines().any(|l| l.starts_with("podgpu_agent_intra_pod_connections_total") && !l.ends_with(" 0"))
    })
    .await;
    assert!(counted_hops, "intra-pod connections exported");
    for stream in streams {
        stream.abort();
    }
    drop(agent);
    drop(sidecar);
    drop(app);
}
