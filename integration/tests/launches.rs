//! Launch accounting on libcuda (as root, real uprobes): a stand-in
//! `libcuda.so.1` built here with gcc exports the launch entry points, and
//! stand-in applications in two cgroup pods load it with `dlopen` and call
//! them through function pointers, as the CUDA runtime does, a known number
//! of times with known sizes. The agent finds the library in their maps,
//! attaches once, and counts per pod, function and size.
use integration::require_root;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration::agent::{AgentProcess, PodEntry};
use integration::eventually;
use integration::http::get;
use integration::keda::{scaled_object, KedaClient};
use integration::pod::{new_uid, CgroupPod, NodeRoot};

fn build(dir: &Path) {
    integration::cuda_standin::build(dir).expect("the libcuda stand-in builds");
}

async fn json(http: std::net::SocketAddr, path: &str) -> serde_json::Value {
    serde_json::from_slice(&get(http, path).await.expect("GET").body).unwrap()
}

/// Waits until the agent has found and probed the stand-in libcuda, then
/// writes `go`, the file the stand-in applications wait for before they
/// launch (so the probes see every launch).
async fn start_once_probed(agent: &AgentProcess, go: &Path) {
    let attached = eventually(Duration::from_secs(5), async || {
        json(agent.http, "/healthz").await["launch_libraries"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    assert!(attached, "libcuda found and probed: {}", json(agent.http, "/healthz").await);
    std::fs::write(go, b"go").unwrap();
}

/// Launches of `pid` with `entry` and `function`: (grid, block, launches, threads).
fn row(view: &serde_json::Value, pid: u32, entry: &str, function: &str) -> Option<(Vec<u64>, Vec<u64>, u64, u64)> {
    let rows = view["rows"].as_array()?;
    let row = rows.iter().find(|r| r["pid"] == pid && r["entry"] == entry && r["function"] == function)?;
    let dims = |key: &str| row[key].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
    Some((dims("grid"), dims("block"), row["launches"].as_u64()?, row["threads"].as_u64()?))
}

/// Per process, function and size counts are exact (including the `_ptsz`
/// variant and `cuLaunchKernelEx`'s config struct), `gpu_launch_rate`
/// follows the pods' launch counts, and an exited process's launches stay
/// booked on its pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn launches_are_counted_per_pod_function_and_size() {
    require_root();
    let tools = tempfile::tempdir().unwrap();
    build(tools.path());
    let ns = format!("launch-{}", std::process::id());
    // Each test here is its own node: an agent watching the host's whole
    // tree would find the other tests' libcuda and count their launches.
    let node = NodeRoot::create("launch").unwrap();
    let cgroup_root = node.0.clone();
    let root = node.agent_arg();
    let (uid_a, uid_b) = (new_uid(), new_uid());
    let mut pod_a = CgroupPod::create(&cgroup_root, &uid_a).unwrap();
    let mut pod_b = CgroupPod::create(&cgroup_root, &uid_b).unwrap();
    let pods = [
        PodEntry { uid: &uid_a, namespace: &ns, name: "train-a", app: "a" },
        PodEntry { uid: &uid_b, namespace: &ns, name: "train-b", app: "b" },
    ];
    let (agent, _files) =
        AgentProcess::start_for_pods(&pods, &["--launch-accounting", "on", &root]).expect("agent starts");
    let go = tools.path().join("go");
    let lib = tools.path().join("libcuda.so.1");
    let start = |pod: &mut CgroupPod, seed: &str, kernels: &str, ex: &str, graphs: &str| {
        let mut command = Command::new(tools.path().join("launcher"));
        command.args([lib.to_str().unwrap(), go.to_str().unwrap(), seed, kernels, ex, graphs]);
        let child = pod.spawn(command).expect("launcher runs");
        let pid = child.id();
        let mut line = String::new();
        let mut output = BufReader::new(child.stdout.take().unwrap());
        output.read_line(&mut line).unwrap();
        assert!(line.contains("ready"), "{line}");
        // Kept open: the launcher writes again when done.
        (pid, output)
    };
    let (pid_a, _output_a) = start(&mut pod_a, "1", "100", "50", "7");
    let (pid_b, _output_b) = start(&mut pod_b, "2", "300", "0", "0");
    start_once_probed(&agent, &go).await;

    let counted = eventually(Duration::from_secs(5), async || {
        let view = json(agent.http, "/launches").await;
        row(&view, pid_b, "kernel", "0x1002").is_some_and(|r| r.2 == 310)
            && row(&view, pid_a, "graph", "0x3001").is_some_and(|r| r.2 == 7)
    })
    .await;
    let view = json(agent.http, "/launches").await;
    assert!(counted, "{view}");
    assert_eq!(row(&view, pid_a, "kernel", "0x1001"), Some((vec![4, 2, 1], vec![128, 1, 1], 110, 110 * 1024)));
    assert_eq!(row(&view, pid_a, "kernel_ex", "0x2001"), Some((vec![8, 1, 1], vec![256, 1, 1], 50, 50 * 2048)));
    assert_eq!(row(&view, pid_b, "kernel", "0x1002"), Some((vec![4, 2, 1], vec![128, 1, 2], 310, 310 * 2048)));
    assert!(view["rows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["pod_uid"] == uid_a.as_str() || r["pod_uid"] == uid_b.as_str()));

    let mut keda = KedaClient::connect(agent.keda).await.unwrap();
    let mut rate = async |app: &str| {
        let selector = format!("app={app}");
        let trigger = scaled_object(
            &ns,
            app,
            &[("metric", "gpu_launch_rate"), ("target", "1"), ("podSelector", &selector), ("window", "30s")],
        );
        keda.poll(&trigger, "launches").await.expect("gpu_launch_rate").value
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rate_a, rate_b) = (rate("a").await, rate("b").await);
    assert!(rate_a > 0.0 && rate_b > 0.0, "{rate_a} {rate_b}");
    let ratio = rate_b / rate_a;
    assert!((ratio - 310.0 / 167.0).abs() < 0.1, "launch rates follow the counts: b/a = {ratio}");

    // A's process exits: its rows go, its launches stay booked on the pod.
    pod_a.kill();
    let retired = eventually(Duration::from_secs(4), async || {
        row(&json(agent.http, "/launches").await, pid_a, "kernel", "0x1001").is_none()
    })
    .await;
    assert!(retired, "exited process still listed");
    let after = rate("a").await;
    assert!(after > 0.5 * rate_a, "the pod's launches were kept: {after} vs {rate_a}");
}

/// Kernel identity: two replicas in two pods load the same image and the
/// same kernel from it by name, one through `cuModuleLoadData` (the image
/// in a fatbin wrapper) + `cuModuleGetFunction`, the other through
/// `cuLibraryLoadData` +
/// `cuLibraryGetKernel` + `cuKernelGetFunction`, and get different
/// handles (as real processes do). The identity probes name both handles,
/// so both rows carry the same kernel identity, the hash of the name and
/// of the image's first bytes; a third process launching a hard-coded
/// handle (created before any probe saw it) has none (its launch site is
/// the others', which launch two kernels from it); a fourth loads the
/// same kernel name from another image (another model's generated
/// kernel) and has another identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_kernel_in_two_processes_has_one_identity() {
    require_root();
    let tools = tempfile::tempdir().unwrap();
    build(tools.path());
    let ns = format!("identity-{}", std::process::id());
    // Its own node: the other tests here launch beside it.
    let node = NodeRoot::create("identity").unwrap();
    let uids = [new_uid(), new_uid(), new_uid(), new_uid()];
    let mut pods: Vec<CgroupPod> = uids.iter().map(|uid| CgroupPod::create(&node.0, uid).unwrap()).collect();
    let entries: Vec<PodEntry> =
        uids.iter().map(|uid| PodEntry { uid, namespace: &ns, name: "replica", app: "replica" }).collect();
    let root = node.agent_arg();
    let (agent, _files) =
        AgentProcess::start_for_pods(&entries, &["--launch-accounting", "on", &root]).expect("agent starts");
    let go = tools.path().join("go");
    let lib = tools.path().join("libcuda.so.1");
    let mut outputs = Vec::new();
    let mut pids = Vec::new();
    let loads = [Some(("module", "model-a")), Some(("library", "model-a")), None, Some(("module", "model-b"))];
    for (pod, load) in pods.iter_mut().zip(loads) {
        let mut command = Command::new(tools.path().join("launch_loop"));
        // A second of launches, then asleep (the loop spins the CPU while
        // it runs, and the tests beside this one time launches).
        command.args([lib.to_str().unwrap(), "2000000", "1", go.to_str().unwrap()]);
        if let Some((via, image)) = load {
            command.env("KERNEL_NAME", "_Z9gemm_bf16PKvS0_Pvi").env("KERNEL_VIA", via).env("KERNEL_IMAGE", image);
            // The first replica hands its image over in a fatbin wrapper,
            // as the CUDA runtime does: its pointer is this process's own.
            if via == "module" && image == "model-a" {
                command.env("KERNEL_IMAGE_WRAPPED", "1");
            }
        }
        let child = pod.spawn(command).expect("launch loop runs");
        pids.push(child.id());
        let mut output = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        outputs.push(output);
    }
    start_once_probed(&agent, &go).await;
    // The handle each replica launches, as it printed it.
    let mut handles = Vec::new();
    for output in outputs.iter_mut().take(2) {
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        let handle = line.trim().strip_prefix("function ").unwrap_or_else(|| panic!("{line}")).to_string();
        handles.push(handle);
    }
    assert_ne!(handles[0], handles[1], "the replicas' handles differ");
    let rows_of = |view: &serde_json::Value, pid: u32| -> Vec<serde_json::Value> {
        view["rows"].as_array().unwrap().iter().filter(|r| r["pid"] == pid).cloned().collect()
    };
    let named = eventually(Duration::from_secs(5), async || {
        let view = json(agent.http, "/launches").await;
        pids.iter().all(|pid| !rows_of(&view, *pid).is_empty())
    })
    .await;
    let view = json(agent.http, "/launches").await;
    assert!(named, "{view}");
    let (a, b, fixed, other) =
        (rows_of(&view, pids[0]), rows_of(&view, pids[1]), rows_of(&view, pids[2]), rows_of(&view, pids[3]));
    assert_eq!(a[0]["function"], handles[0].as_str(), "{view}");
    assert_eq!(b[0]["function"], handles[1].as_str(), "{view}");
    let identity = a[0]["kernel"].as_str().unwrap_or_else(|| panic!("replica A has an identity: {view}"));
    assert_eq!(b[0]["kernel"].as_str(), Some(identity), "one kernel, one identity: {view}");
    // The image as launch_loop lays it out: the text, then zeros.
    let image_of = |text: &str| {
        let mut image = vec![0u8; 512];
        image[..text.len()].copy_from_slice(text.as_bytes());
        podgpu_agent::probes::kernel_identity::image_hash(&image)
    };
    let expected = podgpu_agent::probes::kernel_identity::identity_of(b"_Z9gemm_bf16PKvS0_Pvi", image_of("model-a"));
    assert_eq!(identity, format!("{expected:#x}"), "the identity is the name's and the image's");
    assert!(fixed[0].get("kernel").is_none(), "a handle no probe saw created has none: {view}");
    let elsewhere = podgpu_agent::probes::kernel_identity::identity_of(b"_Z9gemm_bf16PKvS0_Pvi", image_of("model-b"));
    assert_eq!(other[0]["kernel"].as_str(), Some(format!("{elsewhere:#x}").as_str()), "{view}");
    assert_ne!(elsewhere, expected, "one name in two images is two kernels");
    drop(agent);
    drop(pods);
}

/// Launch sites: a replica that loaded its kernel before the agent
/// attached (every process, across an agent restart) has a handle the
/// identity probes never saw named, yet it launches from the same code as
/// a replica started after: its launch site (the build id of
/// `launch_loop` and the return address's offset, with the frames above
/// it) is booked with the later replica's kernel and names the older
/// handle. A launcher shared by two kernels (one call site in a helper,
/// alternating two named handles) names nothing: an older process
/// launching one handle from that site gets no identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kernel_loaded_before_the_agent_is_known_by_its_launch_site() {
    require_root();
    let tools = tempfile::tempdir().unwrap();
    build(tools.path());
    let ns = format!("sites-{}", std::process::id());
    let node = NodeRoot::create("sites").unwrap();
    let uids = [new_uid(), new_uid(), new_uid(), new_uid()];
    let mut pods: Vec<CgroupPod> = uids.iter().map(|uid| CgroupPod::create(&node.0, uid).unwrap()).collect();
    let entries: Vec<PodEntry> =
        uids.iter().map(|uid| PodEntry { uid, namespace: &ns, name: "replica", app: "replica" }).collect();
    let go = tools.path().join("go");
    let lib = tools.path().join("libcuda.so.1");
    let spawn = |pod: &mut CgroupPod, env: &[(&str, &str)]| {
        let mut command = Command::new(tools.path().join("launch_loop"));
        command.args([lib.to_str().unwrap(), "2000000", "1", go.to_str().unwrap()]);
        command.env("KERNEL_IMAGE", "model-c");
        for (name, value) in env {
            command.env(name, value);
        }
        let child = pod.spawn(command).expect("launch loop runs");
        let pid = child.id();
        let mut output = BufReader::new(child.stdout.take().unwrap());
        let mut lines = Vec::new();
        while lines.last().is_none_or(|line: &String| line != "ready") {
            let mut line = String::new();
            assert!(output.read_line(&mut line).unwrap() > 0, "launch loop ended: {lines:?}");
            lines.push(line.trim().to_string());
        }
        (pid, output)
    };
    let gemm = ("KERNEL_NAME", "_Z9gemm_bf16PKvS0_Pvi");
    // Older than the agent: their kernels are resolved before it attaches.
    let (old_replica, _old_replica_out) = spawn(&mut pods[0], &[gemm, ("KERNEL_EARLY", "1")]);
    let (old_shared, _old_shared_out) =
        spawn(&mut pods[2], &[("KERNEL_NAME", "add_f32"), ("KERNEL_EARLY", "1"), ("LAUNCH_HELPER", "1")]);
    let root = node.agent_arg();
    let (agent, _files) =
        AgentProcess::start_for_pods(&entries, &["--launch-accounting", "on", &root]).expect("agent starts");
    let (new_replica, _new_replica_out) = spawn(&mut pods[1], &[gemm]);
    let (new_shared, _new_shared_out) =
        spawn(&mut pods[3], &[("KERNEL_NAME", "add_f32"), ("KERNEL_NAME2", "mul_f32"), ("LAUNCH_HELPER", "1")]);
    start_once_probed(&agent, &go).await;
    let rows_of = |view: &serde_json::Value, pid: u32| -> Vec<serde_json::Value> {
        view["rows"].as_array().unwrap().iter().filter(|r| r["pid"] == pid).cloned().collect()
    };
    let settled = eventually(Duration::from_secs(8), async || {
        let view = json(agent.http, "/launches").await;
        let counted = [old_replica, old_shared, new_replica].iter().all(|pid| !rows_of(&view, *pid).is_empty());
        counted && rows_of(&view, new_shared).len() == 2 && rows_of(&view, old_replica)[0].get("kernel").is_some()
    })
    .await;
    let view = json(agent.http, "/launches").await;
    assert!(settled, "every process counted, the older replica named: {view}");
    let (old, new) = (&rows_of(&view, old_replica)[0], &rows_of(&view, new_replica)[0]);
    assert_ne!(old["function"], new["function"], "two processes, two handles: {view}");
    assert_eq!(new["kernel_from"], "name", "{view}");
    assert_eq!(old["kernel_from"], "site", "{view}");
    assert_eq!(old["kernel"], new["kernel"], "one kernel, one identity: {view}");
    let shared = rows_of(&view, new_shared);
    assert!(shared.iter().all(|row| row["kernel_from"] == "name"), "{view}");
    assert_ne!(shared[0]["kernel"], shared[1]["kernel"], "the launcher's two kernels: {view}");
    let older_shared = &rows_of(&view, old_shared)[0];
    assert!(older_shared.get("kernel").is_none(), "a site of two kernels names nothing: {view}");
    // The sums by source: each row's launches under where its identity came from.
    let sum_of = |from: Option<&str>| -> u64 {
        let rows = view["rows"].as_array().unwrap().iter();
        rows.filter(|r| r["kernel_from"].as_str() == from).map(|r| r["launches"].as_u64().unwrap()).sum()
    };
    let sources = &view["identity_sources"];
    assert_eq!(sources["site"].as_u64(), Some(sum_of(Some("site"))), "{view}");
    assert_eq!(sources["name"].as_u64(), Some(sum_of(Some("name"))), "{view}");
    assert_eq!(sources["none"].as_u64(), Some(sum_of(None)), "{view}");
    assert!(sum_of(Some("site")) > 0 && sum_of(None) > 0, "{view}");
    drop(agent);
    drop(pods);
}

/// Launch sites behind a runtime: every launch of `runtime_app` reaches
/// libcuda from the runtime stand-in's one call, for both of its kernels
/// (same block size, one host stub each, as nvcc generates). Only the
/// frames the stack scan finds above that call (the stubs' return
/// addresses) tell the kernels apart: a process that resolved its kernels
/// before the agent attached gets each handle's own kernel, the one a
/// process started after has under the same grid, never the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kernels_behind_a_runtime_are_told_apart_by_the_frames_above_it() {
    require_root();
    let tools = tempfile::tempdir().unwrap();
    build(tools.path());
    let ns = format!("runtime-{}", std::process::id());
    let node = NodeRoot::create("runtime").unwrap();
    let uids = [new_uid(), new_uid()];
    let mut pods: Vec<CgroupPod> = uids.iter().map(|uid| CgroupPod::create(&node.0, uid).unwrap()).collect();
    let entries: Vec<PodEntry> =
        uids.iter().map(|uid| PodEntry { uid, namespace: &ns, name: "app", app: "app" }).collect();
    let go = tools.path().join("go");
    let spawn = |pod: &mut CgroupPod, early: bool| {
        let mut command = Command::new(tools.path().join("runtime_app"));
        let (lib, runtime) = (tools.path().join("libcuda.so.1"), tools.path().join("libcudart.so.12"));
        command.args([lib.to_str().unwrap(), runtime.to_str().unwrap(), "3", go.to_str().unwrap()]);
        if early {
            command.env("RESOLVE_EARLY", "1");
        }
        let child = pod.spawn(command).expect("runtime app runs");
        let pid = child.id();
        let mut output = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        (pid, output)
    };
    let (older, _older_out) = spawn(&mut pods[0], true);
    let root = node.agent_arg();
    let (agent, _files) =
        AgentProcess::start_for_pods(&entries, &["--launch-accounting", "on", &root]).expect("agent starts");
    let (younger, _younger_out) = spawn(&mut pods[1], false);
    start_once_probed(&agent, &go).await;
    // (grid x, kernel, kernel_from) of each of the process's rows.
    let kernels_of = |view: &serde_json::Value, pid: u32| -> Vec<(u64, Option<String>, Option<String>)> {
        let mut rows: Vec<_> = view["rows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["pid"] == pid)
            .map(|r| {
                let text = |field: &str| r.get(field).and_then(|v| v.as_str()).map(str::to_string);
                (r["grid"][0].as_u64().unwrap(), text("kernel"), text("kernel_from"))
            })
            .collect();
        rows.sort();
        rows
    };
    let settled = eventually(Duration::from_secs(8), async || {
        let view = json(agent.http, "/launches").await;
        let named = |pid| kernels_of(&view, pid).iter().filter(|row| row.1.is_some()).count();
        named(older) == 2 && named(younger) == 2
    })
    .await;
    let view = json(agent.http, "/launches").await;
    assert!(settled, "both kernels of both processes named: {view}");
    let (old, young) = (kernels_of(&view, older), kernels_of(&view, younger));
    assert_eq!(old.iter().map(|row| row.0).collect::<Vec<_>>(), [64, 132], "{view}");
    for (old, young) in old.iter().zip(&young) {
        assert_eq!(young.2.as_deref(), Some("name"), "{view}");
        assert_eq!(old.2.as_deref(), Some("site"), "{view}");
        assert_eq!(old.1, young.1, "grid {}: the same kernel in both: {view}", old.0);
    }
    assert_ne!(old[0].1, old[1].1, "two kernels, two identities: {view}");
    let gemm = podgpu_agent::probes::kernel_identity::identity_of(b"_Z9gemm_f16PKvPvi", 0);
    assert_eq!(old[1].1.as_deref(), Some(format!("{gemm:#x}").as_str()), "{view}");
    drop(agent);
    drop(pods);
}

/// An agent restart keeps what the launch sites taught: a replica named by
/// one agent (its kernel loaded while the probes watched) is unnamed for
/// the next, whose identity probes were not there; the launch-site book,
/// written beside the cost catalog when the first agent stops, names it
/// again from its launch site, with the same identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kernel_identities_survive_an_agent_restart() {
    require_root();
    let tools = tempfile::tempdir().unwrap();
    build(tools.path());
    let ns = format!("restart-{}", std::process::id());
    let node = NodeRoot::create("restart").unwrap();
    let uid = new_uid();
    let mut pod = CgroupPod::create(&node.0, &uid).unwrap();
    let entries = [PodEntry { uid: &uid, namespace: &ns, name: "replica", app: "replica" }];
    let catalog = tools.path().join("cost-catalog.json");
    let args = [
        "--launch-accounting".to_string(),
        "on".to_string(),
        node.agent_arg(),
        format!("--cost-catalog={}", catalog.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut first, _first_files) = AgentProcess::start_for_pods(&entries, &args).expect("agent starts");
    let go = tools.path().join("go");
    let mut command = Command::new(tools.path().join("launch_loop"));
    command.args([tools.path().join("libcuda.so.1").to_str().unwrap(), "0", "60", go.to_str().unwrap()]);
    // 50 launches a second, paced by sleeping, through both agents' lives.
    command.env("KERNEL_NAME", "_Z9gemm_bf16PKvS0_Pvi").env("KERNEL_IMAGE", "model-c").env("LAUNCH_SCHEDULE", "50:60");
    let child = pod.spawn(command).expect("launch loop runs");
    let pid = child.id();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    start_once_probed(&first, &go).await;
    let kernel_of = |view: &serde_json::Value| -> Option<(String, String)> {
        let row = view["rows"].as_array()?.iter().find(|r| r["pid"] == pid)?;
        Some((row.get("kernel")?.as_str()?.to_string(), row["kernel_from"].as_str()?.to_string()))
    };
    let named =
        eventually(Duration::from_secs(5), async || kernel_of(&json(first.http, "/launches").await).is_some()).await;
    let view = json(first.http, "/launches").await;
    assert!(named, "{view}");
    let (identity, from) = kernel_of(&view).unwrap();
    assert_eq!(from, "name", "{view}");
    assert!(first.stop(Duration::from_secs(10)), "the first agent stops cleanly");
    let book = catalog.with_file_name("launch-sites.json");
    let text = std::fs::read_to_string(&book).expect("the book is written when the agent stops");
    assert!(text.contains("\"sites\""), "{text}");
    let (second, _second_files) = AgentProcess::start_for_pods(&entries, &args).expect("agent starts again");
    let renamed =
        eventually(Duration::from_secs(8), async || kernel_of(&json(second.http, "/launches").await).is_some()).await;
    let view = json(second.http, "/launches").await;
    assert!(renamed, "the replica is named again after the restart: {view}");
    assert_eq!(kernel_of(&view), Some((identity, "site".to_string())), "{view}");
    drop(second);
    drop(pod);
}

/// A launch-bound tenant: its rate times the calibrated cost of a probed
/// launch exceeds the overhead budget, so the probes are attached for only
/// part of each interval and the counts are scaled from that sample; the
/// estimated total stays close to the tenant's own count (it reads low by
/// the tenant's probed load, the traps' own slowdown in the window:
/// ~10-15% here, where a trap costs 5-8 µs against 50 µs of work).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn launch_bound_tenants_are_sampled_and_their_counts_hold() {
    require_root();
    let tools = tempfile::tempdir().unwrap();
    build(tools.path());
    let ns = format!("sampled-{}", std::process::id());
    let node = NodeRoot::create("sampled").unwrap();
    let cgroup_root = node.0.clone();
    let root = node.agent_arg();
    let uid = new_uid();
    let mut pod = CgroupPod::create(&cgroup_root, &uid).unwrap();
    let pods = [PodEntry { uid: &uid, namespace: &ns, name: "loop", app: "loop" }];
    // A 0.2% budget makes sampling certain whatever this machine's trap
    // cost (the default, 1%, is the chart's).
    let (agent, _files) =
        AgentProcess::start_for_pods(&pods, &["--launch-accounting", "on", "--launch-overhead-budget", "0.2", &root])
            .expect("agent starts");
    let mut command = Command::new(tools.path().join("launch_loop"));
    // 50 µs of host work per launch for 12 s: ~20,000 launches/s, slowed
    // by a tenth or more while probed on a VM whose traps cost 6-12 µs.
    let go = tools.path().join("go");
    command.args([tools.path().join("libcuda.so.1").to_str().unwrap(), "50000", "12", go.to_str().unwrap()]);
    let child = pod.spawn(command).expect("launch loop runs");
    let pid = child.id();
    let mut output = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    // Launches start once the probes are on the library (the truth counts
    // every launch).
    start_once_probed(&agent, &go).await;

    let sampled = eventually(Duration::from_secs(8), async || {
        json(agent.http, "/healthz").await["launch_duty"].as_f64().is_some_and(|duty| duty > 0.0 && duty < 1.0)
    })
    .await;
    let health = json(agent.http, "/healthz").await;
    assert!(sampled, "a launch-bound tenant is sampled: {health}");
    println!("duty {}, calibrated cost {} ns per probed launch", health["launch_duty"], health["launch_hit_cost_ns"]);

    while !line.starts_with("done") {
        line.clear();
        output.read_line(&mut line).unwrap();
    }
    let truth: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    // The estimate settles once the intervals that saw the end are read.
    let estimate = async || {
        row(&json(agent.http, "/launches").await, pid, "kernel", "0x4001").map_or(0, |(_, _, launches, _)| launches)
    };
    // Sampled reads come every 4 s (MAX_INTERVAL): settled means unchanged
    // for longer than that.
    let mut settled = estimate().await;
    let mut unchanged_since = std::time::Instant::now();
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let next = estimate().await;
        if next != settled {
            (settled, unchanged_since) = (next, std::time::Instant::now());
        } else if settled > 0 && unchanged_since.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let error = (settled as f64 - truth as f64).abs() / truth as f64;
    println!("true launches {truth}, sampled estimate {settled}, error {:.1}%", error * 100.0);
    assert!(error < 0.25, "sampled estimate {settled} vs true {truth}");
}

/// Completion spans (real uprobes on the waits): a process that works 20
/// ms of every ~100 and waits with `cuCtxSynchronize` reads busy about a
/// fifth of the time; one that waits on its only stream, or copies back
/// synchronously, closes its spans too; one whose launches went to two
/// streams and waits on one keeps its span open: it never closed one, so
/// it has no spans to report (an open span bounds nothing), and so does
/// one whose main thread waits on its default stream while another thread
/// launches on its own (the wait does not cover it); yet the time
/// it holds open is shared with the others in their fair span time. Fair
/// span time never exceeds busy time, and the fair times add up to at
/// most the wall time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waits_close_completion_spans() {
    require_root();
    let tools = tempfile::tempdir().unwrap();
    build(tools.path());
    let ns = format!("spans-{}", std::process::id());
    let node = NodeRoot::create("spans").unwrap();
    let uid = new_uid();
    let mut pod = CgroupPod::create(&node.0, &uid).unwrap();
    let pods = [PodEntry { uid: &uid, namespace: &ns, name: "serve", app: "serve" }];
    let root = node.agent_arg();
    let (agent, _files) =
        AgentProcess::start_for_pods(&pods, &["--launch-accounting", "on", &root]).expect("agent starts");
    let go = tools.path().join("go");
    let lib = tools.path().join("libcuda.so.1");
    let mut start = |mode: &str, busy_ms: &str, idle_ms: &str| {
        let mut command = Command::new(tools.path().join("waiter"));
        command.args([lib.to_str().unwrap(), go.to_str().unwrap(), mode, busy_ms, idle_ms]);
        let child = pod.spawn(command).expect("waiter runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("ready"), "{line}");
        child.id()
    };
    let ctx = start("ctx", "20", "80");
    let stream = start("stream", "50", "50");
    let copy = start("copy", "30", "70");
    let mixed = start("mixed", "20", "80");
    let threads = start("threads", "20", "80");
    start_once_probed(&agent, &go).await;
    // (busy_s, fair_s, closed) of `pid` in a /launches view.
    let spans_of = |view: &serde_json::Value, pid: u32| -> Option<(f64, f64, u64)> {
        let row = view["spans"].as_array()?.iter().find(|r| r["pid"] == pid)?.clone();
        Some((row["busy_s"].as_f64()?, row["fair_s"].as_f64()?, row["closed"].as_u64()?))
    };
    let listed = eventually(Duration::from_secs(6), async || {
        let view = json(agent.http, "/launches").await;
        [ctx, stream, copy].iter().all(|&pid| spans_of(&view, pid).is_some())
    })
    .await;
    let first = json(agent.http, "/launches").await;
    assert!(listed, "every waiter has spans: {first}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let second = json(agent.http, "/launches").await;
    let elapsed = second["read_at_unix"].as_f64().unwrap() - first["read_at_unix"].as_f64().unwrap();
    assert!(elapsed >= 2.5, "reads {elapsed} s apart");
    let delta = |pid: u32| {
        let (a, b) = (spans_of(&first, pid).unwrap(), spans_of(&second, pid).unwrap());
        ((b.0 - a.0) / elapsed, (b.1 - a.1) / elapsed, b.2 - a.2)
    };
    let per_s = |closed: u64| closed as f64 / elapsed;
    let (busy, fair, closed) = delta(ctx);
    // 20 ms of every 100 plus the sleeps' overshoot on a busy machine.
    assert!((0.12..0.32).contains(&busy) && per_s(closed) > 5.0, "ctx: {busy} busy, {closed} closed");
    // `mixed` is outstanding all the time: ctx shares every instant of its
    // spans with it at least.
    assert!(fair <= 0.6 * busy, "ctx fair {fair} busy {busy}");
    let (busy, _, closed) = delta(stream);
    assert!((0.38..0.62).contains(&busy) && per_s(closed) > 4.0, "stream: {busy} busy, {closed} closed");
    let (busy, _, closed) = delta(copy);
    assert!((0.2..0.42).contains(&busy) && per_s(closed) > 4.0, "copy: {busy} busy, {closed} closed");
    assert!(spans_of(&second, mixed).is_none(), "mixed streams keep the span open: {second}");
    assert!(spans_of(&second, threads).is_none(), "another thread's default stream keeps it open: {second}");
    let fair_sum: f64 = [ctx, stream, copy].iter().map(|&pid| delta(pid).1).sum();
    assert!(fair_sum <= 1.02, "fair times add up to at most the wall time: {fair_sum}");
    assert_eq!(second["spans_lost"], 0);
}
