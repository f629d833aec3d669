//! The node agent as the DaemonSet runs it (as root, real eBPF probes,
//! `runc`): in a container with its own mount and cgroup namespaces, the
//! host's PID namespace, the chart's hostPath mounts (read-only where the
//! chart says) and exactly the chart's capabilities, all read from
//! `chart/templates/daemonset.yaml`. Tenants run in their own containers
//! with kubelet-shaped cgroups (systemd and cgroupfs layouts; guaranteed,
//! burstable and besteffort pods) and their own PID namespaces.
//!
//! One deviation from a cluster: every container shares the host network,
//! so the test reaches the servers and the agent on loopback. The probes
//! and procfs reads do not depend on it (`/proc/PID/net` is the target's).
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration::container::{kubelet_cgroup_path, Bind, CgroupLayout, ChartAgent, Container, ContainerSpec, Qos};
use integration::driver_standin::{self, StandInDevice};
use integration::http::{get, Client, StreamSpec};
use integration::keda::{scaled_object, KedaClient};
use integration::pod::new_uid;
use integration::{eventually, require_root, workspace_binary};

const NAMESPACE: &str = "ds";

/// What containerd gives a container that asks for nothing: the agent may
/// not read such a process's `/proc/PID/fd` unless it holds every one of
/// these or CAP_SYS_PTRACE.
const CONTAINERD_DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The agent's image, as `scripts/test.sh` builds it.
fn image_archive() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/podgpu-agent-oci.tar")
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A tenant pod: its sandbox (a pause process, as a kubelet's runtime
/// starts before any container) and one container running the test HTTP
/// server.
struct TenantPod {
    name: &'static str,
    uid: String,
    container: Container,
    addr: SocketAddr,
    second: Option<SocketAddr>,
    /// Held by the pod's first container; a restarted container takes it over.
    sandbox: Option<Container>,
}

/// The pod's sandbox container: `sleep infinity` standing in for pause, in
/// `cri-containerd-<sandbox id>.scope` beside the pod's containers.
fn start_sandbox(uid: &str, layout: CgroupLayout, qos: Qos) -> Container {
    let spec = ContainerSpec {
        args: ["/usr/bin/sleep", "infinity"].map(String::from).to_vec(),
        env: vec!["PATH=/usr/bin".to_string()],
        cgroup_path: kubelet_cgroup_path(layout, qos, uid, &container_id(uid, 0x5a)),
        host_pid: false,
        capabilities: Vec::new(),
        binds: Vec::new(),
        rootfs: None,
        seccomp: None,
    };
    Container::run(&format!("podgpu-pause-{}-{}", &uid[..13], std::process::id()), &spec).expect("sandbox runs")
}

fn container_id(uid: &str, salt: u8) -> String {
    format!("{salt:02x}{}", uid.replace('-', "")).repeat(2)[..64].to_string()
}

fn start_tenant(
    name: &'static str,
    layout: CgroupLayout,
    qos: Qos,
    salt: u8,
    second_port: bool,
    engine_metrics: Option<&Path>,
) -> TenantPod {
    let uid = new_uid();
    let sandbox = start_sandbox(&uid, layout, qos);
    let mut pod = restart_tenant(name, uid, layout, qos, salt, second_port, engine_metrics);
    pod.sandbox = Some(sandbox);
    pod
}

/// A container of pod `uid` (a restarted container has a new id, hence a
/// new cgroup, in the same pod). With `engine_metrics` (a directory
/// holding `metrics.prom`) it runs as vLLM does, as a program named `vllm`,
/// and serves that file as its `/metrics`.
fn restart_tenant(
    name: &'static str,
    uid: String,
    layout: CgroupLayout,
    qos: Qos,
    salt: u8,
    second_port: bool,
    engine_metrics: Option<&Path>,
) -> TenantPod {
    let id = container_id(&uid, salt);
    let cgroup_path = kubelet_cgroup_path(layout, qos, &uid, &id);
    let program = if engine_metrics.is_some() { "/vllm" } else { "/tenant" };
    let mut args = vec![program.to_string(), "127.0.0.1:0".to_string(), "256".to_string()];
    if second_port {
        args.extend(["0".to_string(), "127.0.0.1:0".to_string()]);
    }
    let mut env = vec!["PATH=/usr/bin".to_string()];
    let mut binds = vec![Bind { source: workspace_binary("tenant"), destination: program.into(), read_only: true }];
    if let Some(dir) = engine_metrics {
        binds.push(Bind { source: dir.to_path_buf(), destination: "/engine".into(), read_only: true });
        env.push("PODGPU_TENANT_METRICS=/engine/metrics.prom".to_string());
    }
    let spec = ContainerSpec {
        args,
        env,
        cgroup_path,
        host_pid: false,
        capabilities: CONTAINERD_DEFAULT_CAPS.map(String::from).to_vec(),
        binds,
        rootfs: None,
        seccomp: None,
    };
    let container =
        Container::run(&format!("podgpu-{name}-{salt}-{}", std::process::id()), &spec).expect("tenant runs");
    let line = container.wait_for_line(Duration::from_secs(10), |l| l.contains("listening")).expect("tenant ready");
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addr = ready["listening"].as_str().unwrap().parse().unwrap();
    let second = ready["second"].as_str().map(|s| s.parse().unwrap());
    TenantPod { name, uid, container, addr, second, sandbox: None }
}

/// vLLM's exposition with `waiting` requests queued, written atomically.
fn write_vllm_metrics(dir: &Path, waiting: u32) {
    let text = format!(
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"m\"}} {waiting}.0\n\
         # HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} 1.0\n"
    );
    std::fs::write(dir.join("metrics.tmp"), text).unwrap();
    std::fs::rename(dir.join("metrics.tmp"), dir.join("metrics.prom")).unwrap();
}

/// The agent, in a container set up as the chart sets it up.
struct AgentPod {
    container: Container,
    keda: SocketAddr,
    http: SocketAddr,
    _files: tempfile::TempDir,
    _created: Vec<tempfile::TempDir>,
}

/// Where the agent's container sees the stand-in driver devices.
const STAND_IN_IN_CONTAINER: &str = "/stand-in";

fn start_agent(chart: &ChartAgent, pods: &[&TenantPod], stand_in: &Path, driver_libraries: &Path) -> AgentPod {
    let files = tempfile::tempdir().unwrap();
    let mut metadata = String::from("pods:\n");
    let mut scenario = String::from(
        "name: daemonset\ngpus: [{uuid: GPU-ds, name: sim, memory_total_bytes: 85899345920}]\nprocesses:\n",
    );
    for (index, pod) in pods.iter().enumerate() {
        let _ = writeln!(
            metadata,
            "  - {{uid: {}, namespace: {NAMESPACE}, name: {}, labels: {{app: {}}}}}",
            pod.uid, pod.name, pod.name
        );
        // NVML reports host pids: the simulator does too.
        let percent = 10 * (index + 1);
        let _ = writeln!(
            scenario,
            "  - {{pid: {}, gpu: 0, memory_bytes: {}, sm_util: [{{seconds: 1, percent: {percent}}}]}}",
            pod.container.pid,
            (index + 1) << 30
        );
    }
    std::fs::create_dir_all(files.path().join("config")).unwrap();
    std::fs::write(files.path().join("config/pods.yaml"), metadata).unwrap();
    std::fs::write(files.path().join("config/scenario.yaml"), scenario).unwrap();

    // The agent runs from its image, as deployed: nothing of the host's
    // /usr, only what scripts/build-image.sh put in it.
    let image = integration::container::unpack_image(&image_archive(), files.path()).expect("the agent's image");
    let mut binds = vec![
        Bind { source: files.path().join("config"), destination: "/etc/podgpu".into(), read_only: true },
        // Not a chart mount: the stand-in NVIDIA devices (a GPU node's
        // /dev/nvidia* need no mount; the agent reaches them through
        // /proc/PID/fd like any other pod's files).
        Bind { source: stand_in.to_path_buf(), destination: STAND_IN_IN_CONTAINER.into(), read_only: true },
    ];
    let mut created = Vec::new();
    for mount in &chart.mounts {
        let host = PathBuf::from(&mount.host_path);
        // DirectoryOrCreate volumes (NVIDIA libraries, kubelet's socket
        // directory) are empty stand-ins here: no GPU, no kubelet. The
        // NVIDIA library directory holds the stand-in driver library, as
        // a GPU node's holds libcuda.
        let source = if mount.name == "nvidia" {
            driver_libraries.to_path_buf()
        } else if host.exists() {
            host
        } else {
            let stand_in = tempfile::tempdir().unwrap();
            let path = stand_in.path().to_path_buf();
            created.push(stand_in);
            path
        };
        binds.push(Bind { source, destination: mount.mount_path.clone(), read_only: mount.read_only });
    }
    let (keda, http) = (free_port(), free_port());
    let uid = new_uid();
    let cgroup_path = kubelet_cgroup_path(CgroupLayout::Systemd, Qos::Burstable, &uid, &container_id(&uid, 0xa9));
    let spec = ContainerSpec {
        args: [
            "/podgpu-agent",
            "node",
            "--gpu=sim:/etc/podgpu/scenario.yaml",
            &format!("--keda-listen=127.0.0.1:{keda}"),
            &format!("--http-listen=127.0.0.1:{http}"),
            "--tick-ms=100",
            "--gpu-interval-ms=200",
            "--kube-api=off",
            "--kubelet-socket=/var/lib/kubelet/pod-resources/kubelet.sock",
            "--pod-metadata=/etc/podgpu/pods.yaml",
            "--require-ebpf",
            // Off in the chart by default; on here so the launch uprobes
            // are shown to load, and calibrate their cost, with the
            // chart's capabilities too.
            "--launch-accounting=on",
            "--node-name=ds-node",
            // 30 s by default; short here so that an emptied pod is seen to go.
            "--empty-pod-grace-s=3",
        ]
        .map(String::from)
        .into_iter()
        .chain(StandInDevice::agent_args(Path::new(STAND_IN_IN_CONTAINER)))
        .collect(),
        // The chart's environment (LD_LIBRARY_PATH: the NVIDIA libraries).
        env: ["PATH=/usr/bin".to_string(), "RUST_LOG=info".to_string()].into_iter().chain(chart.env.clone()).collect(),
        cgroup_path,
        host_pid: chart.host_pid,
        capabilities: chart.capabilities.iter().map(|cap| format!("CAP_{cap}")).collect(),
        binds,
        rootfs: Some(image),
        // The chart's default: the agent's own allowlist. The probes,
        // uprobes and calibration must all load under it.
        seccomp: Some(chart.seccomp.clone().expect("the chart's default gives the agent its seccomp profile")),
    };
    let container = Container::run(&format!("podgpu-agent-{}", std::process::id()), &spec).expect("agent container");
    container
        .wait_for_line(Duration::from_secs(20), |line| line.contains("\"event\":\"ready\""))
        .unwrap_or_else(|err| panic!("{err}"));
    // The filter is in force (mode 2: a BPF filter), and the agent got
    // ready under it: probes, uprobes and calibration loaded.
    let status = std::fs::read_to_string(format!("/proc/{}/status", container.pid)).unwrap();
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "the agent runs without its seccomp filter:\n{status}");
    AgentPod {
        container,
        keda: format!("127.0.0.1:{keda}").parse().unwrap(),
        http: format!("127.0.0.1:{http}").parse().unwrap(),
        _files: files,
        _created: created,
    }
}

async fn pods_json(http: SocketAddr) -> serde_json::Value {
    serde_json::from_slice(&get(http, "/pods?window=2").await.expect("GET /pods").body).unwrap()
}

fn row<'a>(view: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    view["pods"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{name} in {view}"))
}

async fn value(keda: &mut KedaClient, app: &str, metric: &str, extra: &[(&str, &str)]) -> f64 {
    let selector = format!("app={app}");
    let mut metadata = vec![("metric", metric), ("target", "1"), ("podSelector", selector.as_str()), ("window", "10s")];
    metadata.extend_from_slice(extra);
    let trigger = scaled_object(NAMESPACE, app, &metadata);
    keda.poll(&trigger, metric).await.unwrap_or_else(|e| panic!("{app} {metric}: {e}")).value
}

/// `metric` of `app` as KEDA reads it, or its error.
async fn try_value(keda: &mut KedaClient, app: &str, metric: &str) -> Result<f64, tonic::Status> {
    let selector = format!("app={app}");
    let trigger = scaled_object(NAMESPACE, app, &[("metric", metric), ("target", "1"), ("podSelector", &selector)]);
    keda.get_metrics(&trigger, &format!("podgpu-{}", metric.replace('_', "-"))).await.map(|(_, value)| value)
}

/// The agent in a chart-shaped container attributes requests and GPU
/// processes of containerised tenants to their pods, joins a connection
/// that is older than the agent, names server ports, and releases the
/// requests of a container that is SIGKILLed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_as_the_daemonset_runs_it() {
    require_root();
    let chart = ChartAgent::read(&chart_dir()).expect("chart readable");
    assert!(chart.drops_all && !chart.privileged && chart.host_pid, "the chart's security settings changed: {chart:?}");
    println!("chart capabilities: {:?}; mounts: {:?}", chart.capabilities, chart.mounts);

    // A pod cgroup with no process, as a runtime that died mid-teardown
    // leaves it: not a pod, from the agent's first scan.
    let stale = StaleCgroup::create();
    let mut guaranteed = start_tenant("llm-a", CgroupLayout::Systemd, Qos::Guaranteed, 1, false, None);
    let burstable = start_tenant("llm-b", CgroupLayout::Systemd, Qos::Burstable, 2, true, None);
    // llm-c runs as vLLM does and serves vLLM's exposition: the engine
    // scraper finds and reads it from inside the agent's container.
    let engine_metrics = tempfile::tempdir().unwrap();
    write_vllm_metrics(engine_metrics.path(), 4);
    let besteffort =
        start_tenant("llm-c", CgroupLayout::Cgroupfs, Qos::BestEffort, 3, false, Some(engine_metrics.path()));
    // A keep-alive connection made before the agent exists.
    let mut old_connection = Client::connect(burstable.addr).await.unwrap();
    assert_eq!(old_connection.request("/", b"before").await.unwrap().status, 200);

    let tools = tempfile::tempdir().unwrap();
    driver_standin::build(tools.path()).expect("stand-in device and client build");
    let device = StandInDevice::mount(tools.path()).expect("stand-in device mounts");
    // A node with tracefs mounted, as systemd mounts it (the chart mounts
    // the host's tracefs for the driver path's fallback).
    integration::ensure_tracefs();
    let driver_libraries = driver_standin::library_dir(tools.path());
    let agent = start_agent(&chart, &[&guaranteed, &burstable, &besteffort], &device.mountpoint, &driver_libraries);
    let health: serde_json::Value = serde_json::from_slice(&get(agent.http, "/healthz").await.unwrap().body).unwrap();
    assert_eq!(health["probes"]["state"], "ok", "probes load with the chart's capabilities: {health}");
    // Uprobes (launch accounting, the driver library hooks) need the
    // chart's SYS_ADMIN on current kernels.
    assert_eq!(health["launches"]["state"], "ok", "uprobes with the chart's capabilities: {health}");
    let driver_detail = health["driver"]["detail"].as_str().unwrap_or_default();
    assert!(
        driver_detail.contains("uprobes on the driver libraries")
            && driver_detail.contains("/host-nvidia/libcuda.so.1"),
        "the driver path on the libcuda in the chart's NVIDIA library mount: {health}"
    );
    assert_eq!(health["launches"]["state"], "ok", "launch uprobes load with the chart's capabilities: {health}");
    assert_eq!(get(agent.http, "/readyz").await.unwrap().status, 200);
    let mut keda = KedaClient::connect(agent.keda).await.expect("the agent's gRPC port");

    // GPU: host pids of containerised processes resolve to their pods from
    // inside the agent's cgroup namespace.
    let gpu_ok = eventually(Duration::from_secs(10), async || {
        let view = pods_json(agent.http).await;
        ["llm-a", "llm-b", "llm-c"]
            .iter()
            .enumerate()
            .all(|(i, name)| row(&view, name)["values"]["gpu_mem_used_bytes"].as_f64() == Some(((i + 1) << 30) as f64))
    })
    .await;
    assert!(gpu_ok, "GPU memory per pod: {}", pods_json(agent.http).await);
    assert_eq!(uids(&pods_json(agent.http).await).len(), 3, "only the tenants are pods");
    assert!(!uids(&pods_json(agent.http).await).contains(&stale.uid), "a pod cgroup that never held a process");
    let util = value(&mut keda, "llm-b", "gpu_sm_util", &[]).await;
    assert!((util - 20.0).abs() < 1.0, "llm-b GPU share {util}");

    // Engine signals: found by the process's command line, read over the
    // pod's listening address from the agent's container, and followed.
    let engine_read = eventually(Duration::from_secs(10), async || {
        try_value(&mut keda, "llm-c", "engine_requests_waiting").await.ok() == Some(4.0)
    })
    .await;
    let engine = row(&pods_json(agent.http).await, "llm-c")["engine"].clone();
    assert!(engine_read, "llm-c's vLLM queue through KEDA: {engine}");
    assert_eq!(engine["named_by"], "command vllm", "{engine}");
    write_vllm_metrics(engine_metrics.path(), 9);
    let followed = eventually(Duration::from_secs(5), async || {
        try_value(&mut keda, "llm-c", "engine_requests_waiting").await.ok() == Some(9.0)
    })
    .await;
    assert!(followed, "a changed engine gauge reaches KEDA");

    // Requests: streams held on the guaranteed pod, the pre-agent
    // connection on the burstable one (named by its port), nothing on the
    // besteffort one.
    let held = StreamSpec { first_ms: 30_000, chunks: 1, chunk_ms: 0 };
    let mut streams = Vec::new();
    for _ in 0..3 {
        let addr = guaranteed.addr;
        streams.push(tokio::spawn(async move { Client::connect(addr).await.unwrap().stream(&held.path()).await }));
    }
    for _ in 0..2 {
        assert_eq!(old_connection.request("/", b"after").await.unwrap().status, 200);
    }
    let port = burstable.addr.port().to_string();
    let counted = eventually(Duration::from_secs(5), async || {
        value(&mut keda, "llm-a", "requests_in_flight", &[]).await == 3.0
            && row(&pods_json(agent.http).await, "llm-b")["requests"]["completed"] == 2
    })
    .await;
    assert!(counted, "{}", pods_json(agent.http).await);
    let on_port = value(&mut keda, "llm-b", "request_rate", &[("ports", &port)]).await;
    let all = value(&mut keda, "llm-b", "request_rate", &[]).await;
    // All of llm-b's requests are on that port, so filtering by it loses
    // nothing. (A port's history starts at its first request, a pod's when
    // the pod was found, so over a window longer than the port's history
    // the port's rate is the higher one.)
    assert!(on_port > 0.0 && on_port >= 0.95 * all, "port named from /proc: {on_port} of {all}");
    let second = burstable.second.unwrap().port().to_string();
    assert_eq!(value(&mut keda, "llm-b", "request_rate", &[("ports", &second)]).await, 0.0);
    assert_eq!(row(&pods_json(agent.http).await, "llm-c")["requests"]["started"], 0);

    // SIGKILL the guaranteed pod's container with its streams open.
    let killed_at = Instant::now();
    guaranteed.container.kill().expect("container killed");
    let released =
        eventually(Duration::from_secs(3), async || value(&mut keda, "llm-a", "requests_in_flight", &[]).await == 0.0)
            .await;
    assert!(released, "in flight still up {:?} after the container was killed", killed_at.elapsed());
    println!("in flight back to 0 within {} ms of the kill", killed_at.elapsed().as_millis());
    for stream in streams {
        stream.abort();
    }

    // The container restarts in the same pod (new id, new cgroup): its
    // requests count for the same pod, from zero in flight.
    let mut restarted =
        restart_tenant("llm-a", guaranteed.uid.clone(), CgroupLayout::Systemd, Qos::Guaranteed, 4, false, None);
    restarted.sandbox = guaranteed.sandbox.take();
    drop(guaranteed);
    // A new cgroup is watched from the next rescan (every 2 s, sooner when
    // pod metadata changes): traffic accepted before that is not seen.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let addr = restarted.addr;
    let again = tokio::spawn(async move { Client::connect(addr).await.unwrap().stream(&held.path()).await });
    let counted_again =
        eventually(Duration::from_secs(5), async || value(&mut keda, "llm-a", "requests_in_flight", &[]).await == 1.0)
            .await;
    assert!(counted_again, "{}", pods_json(agent.http).await);
    again.abort();
    let names: Vec<String> =
        pods_json(agent.http).await["pods"].as_array().unwrap().iter().map(|p| p["name"].to_string()).collect();
    assert_eq!(names.len(), 3, "the agent's own pod is not a tenant: {names:?}");

    // The driver path as deployed: a CUDA-shaped client in a container of
    // its own, the agent in its container checking the client's fds
    // through /proc with the chart's capabilities.
    let go = tempfile::tempdir().unwrap();
    let client_uid = new_uid();
    let client = Container::run(
        &format!("podgpu-driver-client-{}", std::process::id()),
        &ContainerSpec {
            args: ["/driver_client", "/stand-in", "64", "32", "/go/go"].map(String::from).to_vec(),
            env: vec!["PATH=/usr/bin".to_string()],
            cgroup_path: kubelet_cgroup_path(
                CgroupLayout::Systemd,
                Qos::BestEffort,
                &client_uid,
                &container_id(&client_uid, 0xd1),
            ),
            host_pid: false,
            capabilities: CONTAINERD_DEFAULT_CAPS.map(String::from).to_vec(),
            binds: vec![
                Bind {
                    source: tools.path().join("driver_client"),
                    destination: "/driver_client".into(),
                    read_only: true,
                },
                // The host's libcuda, as the NVIDIA container runtime
                // mounts it into GPU containers: the very file the agent
                // probes through its own mount.
                Bind {
                    source: driver_libraries.join("libcuda.so.1"),
                    destination: format!("{}/libcuda.so.1", driver_standin::LIBRARY_DIR_IN_CONTAINER),
                    read_only: true,
                },
                // Opened read-write, as /dev/nvidia* are.
                Bind { source: device.mountpoint.clone(), destination: "/stand-in".into(), read_only: false },
                Bind { source: go.path().to_path_buf(), destination: "/go".into(), read_only: false },
            ],
            rootfs: None,
            seccomp: None,
        },
    )
    .expect("driver client container");
    std::fs::write(go.path().join("go.0"), b"").unwrap();
    client.wait_for_line(Duration::from_secs(10), |line| line.contains("allocated")).expect("client allocated");
    let driver_row = async || {
        let view: serde_json::Value = serde_json::from_slice(&get(agent.http, "/driver").await.unwrap().body).unwrap();
        view["rows"].as_array().unwrap().iter().find(|row| row["pid"] == client.pid).cloned()
    };
    let decoded =
        eventually(Duration::from_secs(5), async || driver_row().await.is_some_and(|row| row["calls"] == 16)).await;
    let row = driver_row().await;
    assert!(decoded, "the client's driver calls, decoded in the agent's container: {row:?}");
    let row = row.unwrap();
    assert_eq!(row["pod_uid"], client_uid.as_str());
    assert_eq!(row["vram_bytes"], 96u64 << 20);
    assert_eq!(row["context_devices"], serde_json::json!([0]));
    drop(client);

    // Launch accounting calibrated its cost inside the container too.
    let health: serde_json::Value = serde_json::from_slice(&get(agent.http, "/healthz").await.unwrap().body).unwrap();
    assert!(health["launch_hit_cost_ns"].as_u64().unwrap_or(0) > 0, "{health}");

    // A pod whose every process is gone (container and sandbox killed, the
    // cgroups left) is a pod for the grace period, then not.
    besteffort.container.kill().expect("container killed");
    besteffort.sandbox.as_ref().expect("first container holds the sandbox").kill().expect("sandbox killed");
    let emptied_at = Instant::now();
    assert!(uids(&pods_json(agent.http).await).contains(&besteffort.uid), "within the grace period");
    let gone =
        eventually(Duration::from_secs(10), async || !uids(&pods_json(agent.http).await).contains(&besteffort.uid))
            .await;
    assert!(gone, "an emptied pod stays a pod: {}", pods_json(agent.http).await);
    assert!(emptied_at.elapsed() >= Duration::from_secs(3), "dropped before the grace period");
    println!("emptied pod dropped {} ms after its last process", emptied_at.elapsed().as_millis());

    let output = agent.container.output();
    assert!(output.contains("rebased on this agent's cgroup namespace"), "agent log:\n{output}");
    drop(stale);
}

fn uids(view: &serde_json::Value) -> Vec<String> {
    view["pods"].as_array().unwrap().iter().filter_map(|p| p["uid"].as_str().map(String::from)).collect()
}

/// A pod's cgroups with no process in them, removed on drop.
struct StaleCgroup {
    uid: String,
    path: String,
}

impl StaleCgroup {
    fn create() -> Self {
        let uid = new_uid();
        let path = kubelet_cgroup_path(CgroupLayout::Systemd, Qos::BestEffort, &uid, &container_id(&uid, 0x57));
        let root = podgpu_agent::pods::cgroup_tree::host_v2_root().expect("cgroup v2 mount");
        std::fs::create_dir_all(root.join(path.trim_start_matches('/'))).expect("stale pod cgroup");
        Self { uid, path }
    }
}

impl Drop for StaleCgroup {
    fn drop(&mut self) {
        integration::container::remove_cgroup_dirs(&self.path);
    }
}
