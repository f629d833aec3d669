//! Launch sites (as root, real uprobes on the stand-in libcuda): handles
//! created before the probes attached have no name the identity probes
//! saw, and get one from the code they are launched from where that code
//! stands for one kernel (`agent/src/probes/launch_sites.rs`,
//! `site_book.rs`), in this agent's life or, through the book beside the
//! cost catalog, in an earlier agent's.
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration::agent::{AgentProcess, PodEntry};
use integration::cuda_standin::{get_json as json, rows_of, spawn_until_ready, start_once_probed};
use integration::eventually;
use integration::pod::{new_uid, CgroupPod, NodeRoot};
use integration::require_root;

/// A node of its own with cgroup pods, the stand-in tools built.
struct Scene {
    tools: tempfile::TempDir,
    node: NodeRoot,
    namespace: String,
    uids: Vec<String>,
    pods: Vec<CgroupPod>,
}

impl Scene {
    fn new(name: &str, pods: usize) -> Self {
        require_root();
        let tools = tempfile::tempdir().unwrap();
        integration::cuda_standin::build(tools.path()).expect("the libcuda stand-in builds");
        let node = NodeRoot::create(name).unwrap();
        let uids: Vec<String> = (0..pods).map(|_| new_uid()).collect();
        let pods = uids.iter().map(|uid| CgroupPod::create(&node.0, uid).unwrap()).collect();
        Self { tools, node, namespace: format!("{name}-{}", std::process::id()), uids, pods }
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.tools.path().join(name)
    }

    /// The file the applications wait for before they launch.
    fn go(&self) -> PathBuf {
        self.tool("go")
    }

    /// An agent with launch accounting on this node's pods.
    fn agent(&self, extra: &[&str]) -> (AgentProcess, tempfile::TempDir) {
        let entries: Vec<PodEntry> =
            self.uids.iter().map(|uid| PodEntry { uid, namespace: &self.namespace, name: "app", app: "app" }).collect();
        let root = self.node.agent_arg();
        let mut args = vec!["--launch-accounting", "on", &root];
        args.extend_from_slice(extra);
        AgentProcess::start_for_pods(&entries, &args).expect("agent starts")
    }

    /// `launch_loop` for a second of launches, after `go`, with `env`.
    fn launch_loop(&self, env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(self.tool("launch_loop"));
        let lib = self.tool("libcuda.so.1");
        command.args([lib.to_str().unwrap(), "2000000", "1", self.go().to_str().unwrap()]);
        command.env("KERNEL_IMAGE", "model-c").envs(env.iter().copied());
        command
    }
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
    let mut scene = Scene::new("sites", 4);
    let gemm = ("KERNEL_NAME", "_Z9gemm_bf16PKvS0_Pvi");
    // Older than the agent: their kernels are resolved before it attaches.
    let command = scene.launch_loop(&[gemm, ("KERNEL_EARLY", "1")]);
    let (old_replica, _old_replica_out) = spawn_until_ready(&mut scene.pods[0], command);
    let command = scene.launch_loop(&[("KERNEL_NAME", "add_f32"), ("KERNEL_EARLY", "1"), ("LAUNCH_HELPER", "1")]);
    let (old_shared, _old_shared_out) = spawn_until_ready(&mut scene.pods[2], command);
    let (agent, _files) = scene.agent(&[]);
    let command = scene.launch_loop(&[gemm]);
    let (new_replica, _new_replica_out) = spawn_until_ready(&mut scene.pods[1], command);
    let command = scene.launch_loop(&[("KERNEL_NAME", "add_f32"), ("KERNEL_NAME2", "mul_f32"), ("LAUNCH_HELPER", "1")]);
    let (new_shared, _new_shared_out) = spawn_until_ready(&mut scene.pods[3], command);
    start_once_probed(&agent, &scene.go()).await;
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
    drop(scene);
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
    let mut scene = Scene::new("runtime", 2);
    let runtime_app = |early: bool| {
        let mut command = Command::new(scene.tool("runtime_app"));
        let (lib, runtime, go) = (scene.tool("libcuda.so.1"), scene.tool("libcudart.so.12"), scene.go());
        command.args([lib.to_str().unwrap(), runtime.to_str().unwrap(), "3", go.to_str().unwrap()]);
        if early {
            command.env("RESOLVE_EARLY", "1");
        }
        command
    };
    let (older_command, younger_command) = (runtime_app(true), runtime_app(false));
    let (older, _older_out) = spawn_until_ready(&mut scene.pods[0], older_command);
    let (agent, _files) = scene.agent(&[]);
    let (younger, _younger_out) = spawn_until_ready(&mut scene.pods[1], younger_command);
    start_once_probed(&agent, &scene.go()).await;
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
    drop(scene);
}

/// An agent restart keeps what the launch sites taught: a replica named by
/// one agent (its kernel loaded while the probes watched) is unnamed for
/// the next, whose identity probes were not there; the launch-site book,
/// written beside the cost catalog when the first agent stops, names it
/// again from its launch site, with the same identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kernel_identities_survive_an_agent_restart() {
    let mut scene = Scene::new("restart", 1);
    let catalog = scene.tool("cost-catalog.json");
    let catalog_arg = format!("--cost-catalog={}", catalog.display());
    let (mut first, _first_files) = scene.agent(&[&catalog_arg]);
    let mut command = Command::new(scene.tool("launch_loop"));
    let lib = scene.tool("libcuda.so.1");
    command.args([lib.to_str().unwrap(), "0", "60", scene.go().to_str().unwrap()]);
    // 50 launches a second, paced by sleeping, through both agents' lives.
    command.env("KERNEL_NAME", "_Z9gemm_bf16PKvS0_Pvi").env("KERNEL_IMAGE", "model-c").env("LAUNCH_SCHEDULE", "50:60");
    let (pid, _output) = spawn_until_ready(&mut scene.pods[0], command);
    start_once_probed(&first, &scene.go()).await;
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
    let (second, _second_files) = scene.agent(&[&catalog_arg]);
    let renamed =
        eventually(Duration::from_secs(8), async || kernel_of(&json(second.http, "/launches").await).is_some()).await;
    let view = json(second.http, "/launches").await;
    assert!(renamed, "the replica is named again after the restart: {view}");
    assert_eq!(kernel_of(&view), Some((identity, "site".to_string())), "{view}");
    drop(second);
    drop(scene);
}
