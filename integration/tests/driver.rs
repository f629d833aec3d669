//! The NVIDIA driver path (as root, real probes): a stand-in for the
//! driver's device nodes (a FUSE file system whose files answer ioctls with
//! success, `integration/driver/standin_device.c`) and a client that makes
//! the calls a CUDA process makes, with known sizes, in two cgroup pods
//! (`driver_client.c`). The agent is told to treat the stand-in files as
//! NVIDIA devices; everything else is the production path: the request
//! probe's hooks (uprobes on the stand-in driver library's calls into
//! libc, or the syscall tracepoints) decode the ioctls (XFER unwrapped,
//! status read back at exit, unknown sizes counted), user space checks
//! the fds and rebuilds what each process holds.
use integration::require_root;
use std::io::{BufRead, BufReader};
use std::process::{ChildStdout, Command};
use std::time::Duration;

use integration::agent::{AgentProcess, PodEntry};
use integration::driver_standin::{build, library_dir, StandInDevice};
use integration::eventually;
use integration::http::get;
use integration::keda::{scaled_object, KedaClient};
use integration::pod::{new_uid, CgroupPod};

async fn json(http: std::net::SocketAddr, path: &str) -> serde_json::Value {
    serde_json::from_slice(&get(http, path).await.expect("GET").body).unwrap()
}

fn row(view: &serde_json::Value, pid: u32) -> Option<serde_json::Value> {
    view["rows"].as_array()?.iter().find(|row| row["pid"] == pid).cloned()
}

/// Reads the client's next line (it prints one per phase).
fn expect_line(output: &mut BufReader<ChildStdout>, expected: &str) {
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), expected);
}

/// The stand-in device, built and mounted in a fresh folder with its
/// client and driver library (the device unmounts before the folder goes).
fn stand_in() -> (tempfile::TempDir, StandInDevice) {
    let tools = tempfile::tempdir().unwrap();
    build(tools.path()).expect("stand-in device and client build");
    let device = StandInDevice::mount(tools.path()).expect("stand-in device mounts");
    (tools, device)
}

/// Contexts, driver memory, calls by kind and time blocked are exact per
/// pod; frees release subtrees; XFER-wrapped allocations count, refused
/// and unknown-size ones do not change memory; ioctls on fds that are not
/// NVIDIA's are ignored; an exited process's calls stay booked on its pod
/// while its contexts and memory go.
/// On the per-syscall tracepoints (`syscalls:sys_enter_ioctl`, ...), what
/// a node with tracefs gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn driver_calls_are_decoded_per_pod() {
    integration::ensure_tracefs();
    decoded_per_pod("tracepoints", "syscalls:sys_enter_ioctl").await;
}

/// On raw `sys_enter`/`sys_exit`, the fallback where tracefs cannot be
/// reached: the same calls, the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn driver_calls_are_decoded_per_pod_on_raw_hooks() {
    decoded_per_pod("raw", "raw sys_enter/sys_exit").await;
}

/// On uprobes on the driver library's PLT stubs of `ioctl` and `close`,
/// what a GPU node gets where its libcuda is found: the same calls, the
/// same answers, and no syscall hook at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn driver_calls_are_decoded_per_pod_on_library_hooks() {
    decoded_per_pod("libraries", "uprobes on the driver libraries").await;
}

async fn decoded_per_pod(hooks: &str, described_as: &str) {
    require_root();
    let (tools, device) = stand_in();
    let ns = format!("driver-{}", std::process::id());
    let cgroup_root = podgpu_agent::pods::cgroup_tree::host_v2_root().unwrap();
    let (uid_a, uid_b) = (new_uid(), new_uid());
    let mut pod_a = CgroupPod::create(&cgroup_root, &uid_a).unwrap();
    let mut pod_b = CgroupPod::create(&cgroup_root, &uid_b).unwrap();
    let pods = [
        PodEntry { uid: &uid_a, namespace: &ns, name: "infer-a", app: "a" },
        PodEntry { uid: &uid_b, namespace: &ns, name: "infer-b", app: "b" },
    ];
    let mut stand_in_args = StandInDevice::agent_args(&device.mountpoint);
    stand_in_args.extend(["--driver-hooks".to_string(), hooks.to_string()]);
    let library = library_dir(tools.path()).join("libcuda.so.1");
    stand_in_args.push(format!("--driver-libraries={}", library.display()));
    let stand_in_args: Vec<&str> = stand_in_args.iter().map(String::as_str).collect();
    // The eBPF programs' own log at debug: the odd-sized call below is one
    // of the rare conditions they report through aya-log.
    let (agent, files) =
        AgentProcess::start_for_pods_logged(&pods, &stand_in_args, Some("info,podgpu::ebpf=debug")).expect("agent");
    let health = json(agent.http, "/healthz").await;
    let detail = health["driver"]["detail"].as_str().unwrap_or_default().to_string();
    assert!(detail.contains(described_as), "the driver path on {hooks}: {health}");
    let go = tools.path().join("go");
    let start = |pod: &mut CgroupPod, first_mib: &str, second_mib: &str| {
        let mut command = Command::new(tools.path().join("driver_client"));
        command.args([device.mountpoint.to_str().unwrap(), first_mib, second_mib, go.to_str().unwrap()]);
        let child = pod.spawn(command).expect("driver client runs");
        (child.id(), BufReader::new(child.stdout.take().unwrap()))
    };
    let (pid_a, mut output_a) = start(&mut pod_a, "64", "32");
    let (pid_b, mut output_b) = start(&mut pod_b, "512", "256");
    // Both are in their pods' cgroups now: phase 1.
    std::fs::write(go.with_extension("0"), b"").unwrap();
    expect_line(&mut output_a, "allocated");
    expect_line(&mut output_b, "allocated");

    let seen = eventually(Duration::from_secs(5), async || {
        let view = json(agent.http, "/driver").await;
        [pid_a, pid_b].iter().all(|pid| row(&view, *pid).is_some_and(|r| r["calls"] == 16))
    })
    .await;
    let view = json(agent.http, "/driver").await;
    assert!(seen, "{view}");
    let a = row(&view, pid_a).unwrap();
    assert_eq!(a["pod_uid"], uid_a.as_str());
    assert_eq!(a["context_devices"], serde_json::json!([0]));
    assert_eq!(a["vram_bytes"], 96u64 << 20, "NVOS21 + XFER(NVOS64); the refused 1 GiB not counted");
    let expected_kinds = serde_json::json!({
        "setup": 3, "control": 3, "context": 3, "vram_alloc": 2, "failed": 1,
        "undecoded": 1, "mapping": 1, "uvm": 1, "uvm_registration": 1,
    });
    assert_eq!(a["calls_by_kind"], expected_kinds);
    // The kernel side said why it left the odd-sized RM_ALLOC undecoded,
    // through aya-log into the agent's log.
    let log_path = files.path().join("agent.log");
    let logged = eventually(Duration::from_secs(3), async || {
        std::fs::read_to_string(&log_path).is_ok_and(|log| {
            log.lines().any(|l| {
                l.contains("podgpu::ebpf") && l.contains("driver call nr 2b with 40 bytes of parameters not decoded")
            })
        })
    })
    .await;
    assert!(
        logged,
        "no aya-log line for the odd-sized call in {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    // Three controls blocked 20 ms each in the stand-in.
    let blocked_ms = a["blocked_ms"].as_f64().unwrap();
    assert!((60.0..200.0).contains(&blocked_ms), "time blocked in the driver: {blocked_ms} ms");
    let b = row(&view, pid_b).unwrap();
    assert_eq!((&b["pod_uid"], &b["vram_bytes"]), (&serde_json::json!(uid_b), &serde_json::json!(768u64 << 20)));
    // The escape-shaped ioctl on /dev/null was checked and ignored.
    assert!(view["reader"]["fds_not_nvidia"].as_u64().unwrap() >= 2, "{view}");

    let mut keda = KedaClient::connect(agent.keda).await.unwrap();
    let mut value = async |app: &str, metric: &str| {
        let selector = format!("app={app}");
        let trigger = scaled_object(
            &ns,
            app,
            &[("metric", metric), ("target", "1"), ("podSelector", &selector), ("window", "30s")],
        );
        keda.poll(&trigger, metric).await.map(|poll| poll.value)
    };
    assert_eq!(value("a", "gpu_contexts").await.unwrap(), 1.0);
    assert_eq!(value("b", "gpu_driver_mem_bytes").await.unwrap(), (768u64 << 20) as f64);
    let call_rate = value("a", "gpu_driver_call_rate").await.unwrap();
    assert!(call_rate > 0.0, "calls per second over the window: {call_rate}");
    let blocked = value("a", "gpu_driver_blocked_ratio").await.unwrap();
    assert!(blocked > 0.0, "time blocked per second: {blocked}");
    let metrics = String::from_utf8(get(agent.http, "/metrics").await.unwrap().body).unwrap();
    let line = format!("podgpu_pod_gpu_driver_mem_bytes{{namespace=\"{ns}\",pod=\"infer-a\"");
    let exported = |l: &str| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    assert!(metrics.lines().any(|l| l.starts_with(&line) && exported(l) == Some((96u64 << 20) as f64)), "{metrics}");

    // Phase 2: A frees its first allocation and its channel group.
    std::fs::write(go.with_extension("1"), b"").unwrap();
    expect_line(&mut output_a, "freed");
    expect_line(&mut output_b, "freed");
    let freed = eventually(Duration::from_secs(3), async || {
        row(&json(agent.http, "/driver").await, pid_a)
            .is_some_and(|r| r["vram_bytes"] == 32u64 << 20 && r["context_devices"] == serde_json::json!([]))
    })
    .await;
    assert!(freed, "{}", json(agent.http, "/driver").await);
    assert_eq!(value("a", "gpu_contexts").await.unwrap(), 0.0);
    assert_eq!(value("a", "gpu_driver_mem_bytes").await.unwrap(), (32u64 << 20) as f64);

    // Phase 3: the processes exit; contexts and memory go, calls stay.
    std::fs::write(go.with_extension("2"), b"").unwrap();
    let gone = eventually(Duration::from_secs(4), async || {
        let view = json(agent.http, "/driver").await;
        row(&view, pid_a).is_none() && row(&view, pid_b).is_none()
    })
    .await;
    assert!(gone, "exited processes still listed");
    assert_eq!(value("b", "gpu_driver_mem_bytes").await.unwrap(), 0.0);
    let pods = json(agent.http, "/pods").await;
    let pod_a_row = pods["pods"].as_array().unwrap().iter().find(|p| p["uid"] == uid_a.as_str()).unwrap().clone();
    assert_eq!(pod_a_row["gpu_driver"]["calls"], 18, "{pod_a_row}");
    assert_eq!(pod_a_row["gpu_driver"]["calls_by_kind"]["free"], 2);
}

/// `CAP_SYS_ADMIN` (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;

/// Without CAP_SYS_ADMIN (the chart's `uprobes: false`, or a kernel that
/// refuses uprobes otherwise) the agent says why launch accounting is off
/// and keeps the driver path on the syscall tracepoints, where the
/// client's calls are still decoded: a refused hook degrades, it does not
/// drop the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_uprobes_the_driver_path_stays_on_the_syscall_hooks() {
    require_root();
    integration::ensure_tracefs();
    let (tools, device) = stand_in();
    let library = library_dir(tools.path()).join("libcuda.so.1");
    let mut args: Vec<String> =
        ["--gpu", "none", "--launch-accounting", "on", "--driver-hooks", "auto"].map(String::from).to_vec();
    args.extend(StandInDevice::agent_args(&device.mountpoint));
    args.push(format!("--driver-libraries={}", library.display()));
    let agent = AgentProcess::start_role_without_capability(
        &integration::workspace_binary("podgpu-agent"),
        "standalone",
        &args,
        CAP_SYS_ADMIN,
    )
    .expect("agent");
    let health = json(agent.http, "/healthz").await;
    assert_eq!(health["launches"]["state"], "degraded", "{health}");
    let launches = health["launches"]["reason"].as_str().unwrap_or_default();
    assert!(launches.contains("CAP_SYS_ADMIN"), "{health}");
    let driver = health["driver"]["detail"].as_str().unwrap_or_default();
    assert!(
        driver.contains("syscalls:sys_enter_ioctl") && driver.contains("CAP_SYS_ADMIN"),
        "on the tracepoints, saying why not on the library: {health}"
    );

    let go = tools.path().join("go");
    let mut command = Command::new(tools.path().join("driver_client"));
    command.args([device.mountpoint.to_str().unwrap(), "64", "32", go.to_str().unwrap()]);
    let mut client = command.stdout(std::process::Stdio::piped()).spawn().expect("driver client runs");
    let mut output = BufReader::new(client.stdout.take().unwrap());
    std::fs::write(go.with_extension("0"), b"").unwrap();
    expect_line(&mut output, "allocated");
    let pid = client.id();
    let seen = eventually(Duration::from_secs(5), async || {
        row(&json(agent.http, "/driver").await, pid).is_some_and(|r| r["calls"] == 16)
    })
    .await;
    assert!(seen, "{}", json(agent.http, "/driver").await);
    for phase in ["1", "2"] {
        std::fs::write(go.with_extension(phase), b"").unwrap();
    }
    let _ = client.wait();
}

/// A pod that brings a libcuda of its own (a file other than the node's,
/// such as CUDA's forward-compatibility libcuda): the launch probe finds
/// it in the pod's process, and the driver path probes it too, or, for a
/// libcuda whose calls into libc have no PLT stub (built `-fno-plt`), adds
/// the syscall tracepoints, saying why. Either way the pod's later driver
/// calls are decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn libcuda_files_found_in_pods_are_probed_or_fall_back() {
    require_root();
    integration::ensure_tracefs();
    let (tools, device) = stand_in();
    let own = integration::driver_standin::build_library_into(&tools.path().join("own"), &[]).unwrap();
    let no_plt = integration::driver_standin::build_library_into(&tools.path().join("no-plt"), &["-fno-plt"]).unwrap();
    let ns = format!("driver-late-{}", std::process::id());
    let cgroup_root = podgpu_agent::pods::cgroup_tree::host_v2_root().unwrap();
    let (uid_a, uid_b, uid_c) = (new_uid(), new_uid(), new_uid());
    let mut pod_a = CgroupPod::create(&cgroup_root, &uid_a).unwrap();
    let mut pod_b = CgroupPod::create(&cgroup_root, &uid_b).unwrap();
    let pods = [
        PodEntry { uid: &uid_a, namespace: &ns, name: "own-libcuda", app: "a" },
        PodEntry { uid: &uid_b, namespace: &ns, name: "no-plt-libcuda", app: "b" },
        PodEntry { uid: &uid_c, namespace: &ns, name: "late-libcuda", app: "c" },
    ];
    let mut args = StandInDevice::agent_args(&device.mountpoint);
    args.extend([
        "--driver-hooks".to_string(),
        "auto".to_string(),
        "--launch-accounting".to_string(),
        "on".to_string(),
    ]);
    // The node's libcuda: the one built beside the client.
    args.push(format!("--driver-libraries={}", library_dir(tools.path()).join("libcuda.so.1").display()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (agent, _files) = AgentProcess::start_for_pods(&pods, &args).expect("agent");
    let driver_detail =
        async || json(agent.http, "/healthz").await["driver"]["detail"].as_str().unwrap_or("").to_string();
    assert!(driver_detail().await.contains("uprobes on the driver libraries"), "{}", driver_detail().await);

    // The client loads the libcuda its LD_LIBRARY_PATH names (ahead of its
    // run path), and waits for GO.0 before its first driver call.
    let run = |pod: &mut CgroupPod, library: &std::path::Path, go: &std::path::Path| {
        let mut command = Command::new(tools.path().join("driver_client"));
        command
            .args([device.mountpoint.to_str().unwrap(), "64", "32", go.to_str().unwrap()])
            .env("LD_LIBRARY_PATH", library.parent().unwrap());
        let child = pod.spawn(command).expect("driver client runs");
        (child.id(), BufReader::new(child.stdout.take().unwrap()))
    };
    let decoded = async |pid: u32| {
        eventually(Duration::from_secs(5), async || {
            row(&json(agent.http, "/driver").await, pid).is_some_and(|r| r["calls"] == 16)
        })
        .await
    };

    let go_a = tools.path().join("go-a");
    let (pid_a, mut output_a) = run(&mut pod_a, &own, &go_a);
    let probed = eventually(Duration::from_secs(10), async || driver_detail().await.contains("own/libcuda.so.1")).await;
    assert!(probed, "the pod's own libcuda probed too: {}", driver_detail().await);
    std::fs::write(go_a.with_extension("0"), b"").unwrap();
    expect_line(&mut output_a, "allocated");
    assert!(decoded(pid_a).await, "{}", json(agent.http, "/driver").await);

    // A third pod's libcuda is found after its process already called
    // the driver through it, unseen: that process is joined late, and its
    // pod's contexts are unknown, not 0.
    let late_library = integration::driver_standin::build_library_into(&tools.path().join("late"), &[]).unwrap();
    let mut pod_c = CgroupPod::create(&cgroup_root, &uid_c).unwrap();
    let go_c = tools.path().join("go-c");
    std::fs::write(go_c.with_extension("0"), b"").unwrap();
    let (pid_c, mut output_c) = run(&mut pod_c, &late_library, &go_c);
    expect_line(&mut output_c, "allocated");
    let adopted = eventually(Duration::from_secs(10), async || {
        row(&json(agent.http, "/driver").await, pid_c).is_some_and(|r| r["joined_late"] == true)
    })
    .await;
    assert!(adopted, "{} / {}", driver_detail().await, json(agent.http, "/driver").await);
    let mut keda = KedaClient::connect(agent.keda).await.unwrap();
    let trigger = scaled_object(&ns, "c", &[("metric", "gpu_contexts"), ("target", "1"), ("podSelector", "app=c")]);
    let status = keda.poll(&trigger, "gpu_contexts").await.expect_err("unknown, not 0");
    assert!(status.message().contains("before the driver path watched"), "{status:?}");

    let go_b = tools.path().join("go-b");
    let (pid_b, mut output_b) = run(&mut pod_b, &no_plt, &go_b);
    let fell_back = eventually(Duration::from_secs(10), async || {
        let detail = driver_detail().await;
        detail.contains("syscalls:sys_enter_ioctl") && detail.contains("no-plt/libcuda.so.1 cannot be probed")
    })
    .await;
    assert!(
        fell_back,
        "a libcuda without PLT stubs moves the driver path onto the tracepoints: {}",
        driver_detail().await
    );
    std::fs::write(go_b.with_extension("0"), b"").unwrap();
    expect_line(&mut output_b, "allocated");
    assert!(decoded(pid_b).await, "{}", json(agent.http, "/driver").await);
    // Both hooks now see the first pod's calls (its library's uprobes and
    // the tracepoints): each is booked once, not once per hook.
    std::fs::write(go_a.with_extension("1"), b"").unwrap();
    expect_line(&mut output_a, "freed");
    let freed = eventually(Duration::from_secs(5), async || {
        row(&json(agent.http, "/driver").await, pid_a).is_some_and(|r| r["calls"] == 18)
    })
    .await;
    assert!(freed, "{}", json(agent.http, "/driver").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(row(&json(agent.http, "/driver").await, pid_a).unwrap()["calls"], 18, "two frees, once each");
    for go in [&go_a, &go_b, &go_c] {
        for phase in ["1", "2"] {
            std::fs::write(go.with_extension(phase), b"").unwrap();
        }
    }
}

/// Without launch accounting nothing would find the libcuda files pods
/// bring, so `auto` keeps the driver path on the syscall tracepoints and
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_launch_accounting_auto_keeps_the_syscall_hooks() {
    require_root();
    integration::ensure_tracefs();
    let library = tempfile::tempdir().unwrap();
    let library = integration::driver_standin::build_library(library.path()).unwrap();
    let args = ["--gpu", "none", "--launch-accounting", "off", "--driver-path", "on", "--driver-hooks", "auto"]
        .map(String::from)
        .into_iter()
        .chain([format!("--driver-libraries={}", library.display())])
        .collect::<Vec<_>>();
    let agent = AgentProcess::start(&integration::workspace_binary("podgpu-agent"), &args).expect("agent");
    let health = json(agent.http, "/healthz").await;
    let driver = health["driver"]["detail"].as_str().unwrap_or_default();
    assert!(driver.contains("syscalls:sys_enter_ioctl") && driver.contains("launch accounting is off"), "{health}");
}

/// The agent started beside a process that already holds the GPU (an
/// agent restart on a busy node): what that process allocated before is
/// unknown, so KEDA gets an error for its pod's contexts and driver
/// memory, never a made-up 0, until the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_older_than_the_agent_is_unknown_not_zero() {
    require_root();
    integration::ensure_tracefs();
    let (tools, device) = stand_in();
    let ns = format!("driver-old-{}", std::process::id());
    let cgroup_root = podgpu_agent::pods::cgroup_tree::host_v2_root().unwrap();
    let uid = new_uid();
    let mut pod = CgroupPod::create(&cgroup_root, &uid).unwrap();
    let go = tools.path().join("go");
    let mut command = Command::new(tools.path().join("driver_client"));
    command.args([device.mountpoint.to_str().unwrap(), "64", "32", go.to_str().unwrap()]);
    let child = pod.spawn(command).expect("driver client runs");
    let pid = child.id();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    // Its devices are open (it opens them first thing), and it allocates
    // before the agent exists.
    std::fs::write(go.with_extension("0"), b"").unwrap();
    expect_line(&mut output, "allocated");

    let pods = [PodEntry { uid: &uid, namespace: &ns, name: "old", app: "old" }];
    let mut args = StandInDevice::agent_args(&device.mountpoint);
    args.extend(["--driver-hooks".to_string(), "tracepoints".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (agent, _files) = AgentProcess::start_for_pods(&pods, &args).expect("agent");
    let adopted = eventually(Duration::from_secs(3), async || {
        row(&json(agent.http, "/driver").await, pid).is_some_and(|r| r["joined_late"] == true)
    })
    .await;
    assert!(adopted, "{}", json(agent.http, "/driver").await);
    let mut keda = KedaClient::connect(agent.keda).await.unwrap();
    let selector = "app=old".to_string();
    let trigger = |metric: &str| {
        scaled_object(&ns, "old", &[("metric", metric), ("target", "1"), ("podSelector", &selector), ("window", "30s")])
    };
    for metric in ["gpu_contexts", "gpu_driver_mem_bytes"] {
        let answer = keda.poll(&trigger(metric), metric).await;
        let status = answer.expect_err("an unknown level is an error, not 0");
        assert!(status.message().contains("before the driver path watched"), "{metric}: {status:?}");
    }

    // It frees, closes and exits: the pod's levels are known (0) again.
    for phase in ["1", "2"] {
        std::fs::write(go.with_extension(phase), b"").unwrap();
    }
    let known = eventually(Duration::from_secs(5), async || {
        keda.poll(&trigger("gpu_contexts"), "gpu_contexts").await.is_ok_and(|poll| poll.value == 0.0)
    })
    .await;
    assert!(known, "{}", json(agent.http, "/driver").await);
}
