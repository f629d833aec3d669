//! The packet-layer candidate that `bench-probes` prices for issue 25
//! (`cgroup_skb` programs on one pod's cgroup that delimit HTTP/1.1
//! requests in the kernel): real programs loaded and attached to a real
//! cgroup pod, against the tenant server on loopback. What the benchmark
//! reports for it is only worth something if it counts what it claims to.
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Command;

use integration::http::Client;
use integration::pod::{new_uid, CgroupPod};
use integration::{require_root, workspace_binary};
use podgpu_agent::probes::baseline::HookBaseline;

/// Starts the tenant HTTP/1.1 server (empty 256-byte answers) in a new pod.
fn tenant_pod() -> (CgroupPod, SocketAddr) {
    let root = podgpu_agent::pods::cgroup_tree::host_v2_root().expect("a cgroup v2 tree");
    let mut pod = CgroupPod::create(&root, &new_uid()).expect("pod cgroup");
    let mut command = Command::new(workspace_binary("tenant"));
    command.args(["127.0.0.1:0", "256", "0", "-", "0"]);
    let child = pod.spawn(command).expect("tenant starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("tenant stdout")).read_line(&mut line).expect("ready line");
    let ready: serde_json::Value = serde_json::from_str(&line).expect("ready JSON");
    let addr = ready["listening"].as_str().expect("listening address").parse().expect("an address");
    (pod, addr)
}

/// Keep-alive requests on two connections to the watched pod are each
/// counted once (the programs run on the pod's packets: the request in,
/// the answer out), and requests to a pod the programs are not attached
/// to are not counted at all. Fails if a request is missed, a pure ACK
/// or a second response packet is taken for an answer, or the programs
/// run for another cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packet_candidate_counts_each_request_once() {
    require_root();
    let (watched, watched_addr) = tenant_pod();
    let (_other, other_addr) = tenant_pod();
    let candidate = HookBaseline::attach_packet_candidate(&watched.pod_dir).expect("the candidate attaches");
    assert_eq!(candidate.packet_requests().unwrap(), 0);

    let (mut first, mut second) =
        (Client::connect(watched_addr).await.unwrap(), Client::connect(watched_addr).await.unwrap());
    let mut unwatched = Client::connect(other_addr).await.unwrap();
    for _ in 0..40 {
        assert_eq!(first.request("/", b"").await.unwrap().status, 200);
        assert_eq!(unwatched.request("/", b"").await.unwrap().status, 200);
    }
    for _ in 0..25 {
        assert_eq!(second.request("/", b"").await.unwrap().status, 200);
    }
    assert_eq!(candidate.packet_requests().unwrap(), 65);
    drop(candidate);
}
