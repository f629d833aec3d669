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
use integration::cuda_standin::{get_json as json, rows_of, start_once_probed};
use integration::eventually;
use integration::keda::{scaled_object, KedaClient};
use integration::pod::{new_uid, CgroupPod, NodeRoot};

fn build(dir: &Path) {
    integration::cuda_standin::build(dir).expect("the libcuda stand-in builds");
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
    // The launch programs' cost is on /metrics beside the request probe's,
    // once the launch reader has read (the node's tax, all of it).
    let listed = eventually(Duration::from_secs(5), async || {
        let metrics = integration::http::get(agent.http, "/metrics").await.unwrap().body;
        let metrics = String::from_utf8_lossy(&metrics).to_string();
        ["cu_launch_kernel", "cu_launch_kernel_ex", "cu_graph_launch"]
            .iter()
            .all(|program| metrics.contains(&format!("podgpu_agent_bpf_runs_total{{program=\"{program}\"}}")))
    })
    .await;
    assert!(listed, "launch programs missing from /metrics");

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
