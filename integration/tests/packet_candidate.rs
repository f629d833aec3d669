//! The packet-layer candidates that `bench-probes` prices for issue 25
//! (`cgroup_skb` programs on one pod's cgroup that delimit HTTP/1.1 or
//! HTTP/2 requests in the kernel): real programs loaded and attached to a
//! real cgroup pod, against real servers on loopback. What the benchmark
//! reports for them is only worth something if they count what they
//! claim to.
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;

use integration::http::Client;
use integration::pod::{new_uid, CgroupPod};
use integration::stacks::{run_calls, Call, Caller, Protocol, Stack};
use integration::{require_root, workspace_binary};
use podgpu_agent::probes::baseline::{HookBaseline, PacketProtocol};
use podgpu_common::packet::bucket_floor;

/// Starts the tenant HTTP/1.1 server (empty 256-byte answers) in a new pod.
fn tenant_pod() -> (CgroupPod, SocketAddr) {
    let mut command = Command::new(workspace_binary("tenant"));
    command.args(["127.0.0.1:0", "256", "0", "-", "0"]);
    server_pod(command)
}

/// Starts `command`, a server that prints `{"listening": ADDRESS}` when
/// ready, in a new pod.
fn server_pod(command: Command) -> (CgroupPod, SocketAddr) {
    let root = podgpu_agent::pods::cgroup_tree::host_v2_root().expect("a cgroup v2 tree");
    server_pod_under(&root, command)
}

/// As `server_pod`, with the pod's cgroup under `root`.
fn server_pod_under(root: &Path, command: Command) -> (CgroupPod, SocketAddr) {
    let mut pod = CgroupPod::create(root, &new_uid()).expect("pod cgroup");
    let child = pod.spawn(command).expect("server starts");
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
    let candidate =
        HookBaseline::attach_packet_candidate(&watched.pod_dir, PacketProtocol::Http1).expect("the candidate attaches");
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
    let pods = candidate.packet_pods().unwrap();
    let pod = pods.values().next().expect("the watched pod's counts");
    assert_eq!((pod.started, pod.answered(), pod.aborted, pod.ends_unknown), (65, 65, 0, 0));
    assert_eq!(pod.ttft.iter().sum::<u64>(), 65);
    drop(candidate);
}

/// The shortest and longest durations (ms) a histogram's counts may
/// stand for: the floor of its lowest bucket with a count, and the
/// ceiling of its highest.
fn range_ms(histogram: &[u64]) -> (f64, f64) {
    let filled: Vec<usize> = (0..histogram.len()).filter(|&bucket| histogram[bucket] > 0).collect();
    let (lowest, highest) = (*filled.first().expect("a count"), *filled.last().expect("a count"));
    (bucket_floor(lowest) as f64 / 1e6, bucket_floor(highest + 1) as f64 / 1e6)
}

/// An answer is timed to its end, not its first packet: a chunked stream
/// whose first event goes out 40 ms after its head and whose three more
/// come 100 ms apart reads a TTFT of 30-80 ms and a latency over 300 ms
/// (its buckets' bounds), and Content-Length answers of 300 kB (several
/// packets, a head not alone in its packet) each end once, none left
/// open. Fails if the end is taken at the head, at the first chunk or at
/// a body packet, or a Content-Length body is never seen to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packet_candidate_times_answers_to_their_end() {
    require_root();
    let mut command = Command::new(workspace_binary("tenant"));
    command.args(["127.0.0.1:0", "300000", "0", "-", "0"]);
    let (watched, addr) = server_pod(command);
    let candidate =
        HookBaseline::attach_packet_candidate(&watched.pod_dir, PacketProtocol::Http1).expect("the candidate attaches");
    let mut client = Client::connect(addr).await.unwrap();
    let spec = integration::http::StreamSpec { first_ms: 40, chunks: 4, chunk_ms: 100 };
    let measured = client.stream(&spec.path()).await.unwrap();
    assert!(measured.latency >= std::time::Duration::from_millis(340), "{measured:?}");
    let pods = candidate.packet_pods().unwrap();
    let pod = pods.values().next().expect("the watched pod's counts");
    assert_eq!((pod.started, pod.answered()), (1, 1));
    let (ttft, latency) = (range_ms(&pod.ttft), range_ms(&pod.latency));
    assert!(ttft.0 >= 30.0 && ttft.1 <= 80.0, "TTFT {ttft:?} ms");
    assert!(latency.0 >= 300.0, "latency {latency:?} ms");

    for _ in 0..10 {
        let answer = client.request("/", b"").await.unwrap();
        assert_eq!((answer.status, answer.body.len()), (200, 300_000));
    }
    let pods = candidate.packet_pods().unwrap();
    let pod = pods.values().next().expect("the watched pod's counts");
    assert_eq!((pod.started, pod.answered(), pod.aborted, pod.ends_unknown), (11, 11, 0, 0));
    drop(candidate);
}

/// A client that gives up mid-stream aborts its request when the
/// connection closes, and the connection's state goes with it; a request
/// on a new connection after that is counted as usual. Fails if the close
/// is missed (the request would stay open for good) or taken for an
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packet_candidate_aborts_a_request_whose_connection_closes() {
    require_root();
    let (watched, addr) = tenant_pod();
    let candidate =
        HookBaseline::attach_packet_candidate(&watched.pod_dir, PacketProtocol::Http1).expect("the candidate attaches");
    let spec = integration::http::StreamSpec { first_ms: 0, chunks: 20, chunk_ms: 50 };
    Client::connect(addr).await.unwrap().abandon_stream(&spec.path()).await.unwrap();
    // The tenant's next chunk meets the closed socket: an RST back, or
    // its own close.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let mut client = Client::connect(addr).await.unwrap();
    assert_eq!(client.request("/", b"").await.unwrap().status, 200);
    let pods = candidate.packet_pods().unwrap();
    let pod = pods.values().next().expect("the watched pod's counts");
    assert_eq!((pod.started, pod.answered(), pod.aborted, pod.ends_unknown), (2, 1, 1, 0));
    drop(candidate);
}

/// HTTP/2: calls multiplexed eight at a time on one connection to the
/// watched pod (Node.js's `http2`, nghttp2) and on a second one are each
/// counted once, none is reset, the frame boundary is never lost, and the
/// unwatched pod's calls count nothing. Fails if a frame header is
/// misread (a stream opened or ended twice or not at all), a packet is
/// walked twice, or the programs run for another cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http2_packet_candidate_counts_each_stream_once() {
    require_root();
    let (watched, watched_addr) = server_pod(Stack::NodeHttp2.command(0, false));
    let (_other, other_addr) = server_pod(Stack::NodeHttp2.command(0, false));
    let candidate =
        HookBaseline::attach_packet_candidate(&watched.pod_dir, PacketProtocol::Http2).expect("the candidate attaches");
    assert_eq!(candidate.packet_requests().unwrap(), 0);

    let call = Call { first_ms: 0, messages: 1, interval_ms: 0 };
    let first = Caller::connect(Protocol::Http2, watched_addr).await.unwrap();
    let second = Caller::connect(Protocol::Http2, watched_addr).await.unwrap();
    let unwatched = Caller::connect(Protocol::Http2, other_addr).await.unwrap();
    assert_eq!(run_calls(&first, vec![call; 60], 8).await.unwrap().len(), 60);
    assert_eq!(run_calls(&unwatched, vec![call; 30], 8).await.unwrap().len(), 30);
    assert_eq!(run_calls(&second, vec![call; 20], 4).await.unwrap().len(), 20);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(candidate.packet_h2_losses().unwrap(), [0, 0, 0]);
    assert_eq!(candidate.packet_requests().unwrap(), 80);
    let pods = candidate.packet_pods().unwrap();
    let pod = pods.values().next().expect("the watched pod's counts");
    assert_eq!((pod.started, pod.answered(), pod.aborted, pod.ends_unknown), (80, 80, 0, 0));
    assert_eq!(pod.ttft.iter().sum::<u64>(), 80);
    drop(candidate);
}

/// Attached once above two pods (as a node agent would attach at the
/// pods' common parent), the candidate keeps each pod's answers apart,
/// by the cgroup of the answering socket: 40 and 25 keep-alive requests
/// read 40 and 25 under the two containers' cgroup ids, and nothing
/// else. Fails if a connection's cgroup is read from the wrong side or
/// the answers are pooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packet_candidate_keeps_pods_apart_from_one_attachment() {
    require_root();
    let root = podgpu_agent::pods::cgroup_tree::host_v2_root().expect("a cgroup v2 tree");
    let parent = root.join(format!("podgpu-packet-test-{}", new_uid()));
    std::fs::create_dir(&parent).expect("parent cgroup");
    let tenant = || {
        let mut command = Command::new(workspace_binary("tenant"));
        command.args(["127.0.0.1:0", "256", "0", "-", "0"]);
        command
    };
    let (first_pod, first_addr) = server_pod_under(&parent, tenant());
    let (second_pod, second_addr) = server_pod_under(&parent, tenant());
    let cgroup_id = |pod: &CgroupPod| std::fs::metadata(&pod.container_dir).expect("container cgroup").ino();
    let (first_id, second_id) = (cgroup_id(&first_pod), cgroup_id(&second_pod));
    let candidate =
        HookBaseline::attach_packet_candidate(&parent, PacketProtocol::Http1).expect("the candidate attaches");

    let (mut first, mut second) =
        (Client::connect(first_addr).await.unwrap(), Client::connect(second_addr).await.unwrap());
    for _ in 0..40 {
        assert_eq!(first.request("/", b"").await.unwrap().status, 200);
    }
    for _ in 0..25 {
        assert_eq!(second.request("/", b"").await.unwrap().status, 200);
    }
    let by_cgroup = candidate.packet_requests_by_cgroup().unwrap();
    assert_eq!(by_cgroup, [(first_id, 40), (second_id, 25)].into_iter().collect(), "{by_cgroup:?}");
    drop(candidate);
    drop((first, second, first_pod, second_pod));
    // The pods' own directories went with them; the slice they shared and
    // the parent are this test's.
    let _ = std::fs::remove_dir(parent.join("kubepods.slice"));
    let _ = std::fs::remove_dir(&parent);
}

/// A connection that ends with nothing on the wire (the pod's socket
/// closed in TCP repair mode, as when its peer has dropped off the
/// network) still ends its open request, at the socket's release, and
/// leaves no state behind. Fails if the candidate ends requests only on a
/// FIN or RST it sees (the request would stay open for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packet_candidate_ends_a_request_whose_socket_vanishes() {
    require_root();
    let (watched, addr) = tenant_pod();
    let candidate =
        HookBaseline::attach_packet_candidate(&watched.pod_dir, PacketProtocol::Http1).expect("the candidate attaches");
    let mut vanishing = Client::connect(addr).await.unwrap();
    vanishing
        .send_raw(format!("GET {} HTTP/1.1\r\nHost: test\r\n\r\n", integration::http::VANISH_PATH).as_bytes())
        .await
        .unwrap();
    let mut client = Client::connect(addr).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let pod = loop {
        let pods = candidate.packet_pods().unwrap();
        let pod = *pods.values().next().expect("the watched pod's counts");
        if pod.aborted > 0 || std::time::Instant::now() > deadline {
            break pod;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!((pod.started, pod.answered(), pod.aborted, pod.ends_unknown), (1, 0, 1, 0));
    assert_eq!(client.request("/", b"").await.unwrap().status, 200);
    let pods = candidate.packet_pods().unwrap();
    let pod = pods.values().next().expect("the watched pod's counts");
    assert_eq!((pod.started, pod.answered(), pod.aborted), (2, 1, 1));
    drop((candidate, vanishing));
}

/// Polls the candidate's open requests until they equal `expected` (as
/// (cgroup id, open) pairs) or three seconds pass; returns the last read.
async fn open_requests_become(candidate: &HookBaseline, expected: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let open: Vec<(u64, u64)> = candidate.packet_open_requests().unwrap().into_iter().collect();
        if open == expected || std::time::Instant::now() > deadline {
            return open;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// The in-flight level, read from the connections' own state: two
/// HTTP/1.1 streams held open read 2 for the pod's container while a
/// third, abandoned mid-stream, drops out at its close; all end at 0.
/// Four HTTP/2 calls held open on one connection read 4, then 0. Fails
/// if open requests are not kept per connection, a close or an end
/// leaves one behind, or they are filed under the wrong cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packet_candidate_counts_open_requests_per_pod() {
    require_root();
    let (watched, addr) = tenant_pod();
    let container = std::fs::metadata(&watched.container_dir).expect("container cgroup").ino();
    let candidate =
        HookBaseline::attach_packet_candidate(&watched.pod_dir, PacketProtocol::Http1).expect("the candidate attaches");
    let spec = integration::http::StreamSpec { first_ms: 0, chunks: 6, chunk_ms: 200 };
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { Client::connect(addr).await.unwrap().stream(&spec.path()).await.unwrap() }))
        .collect();
    Client::connect(addr).await.unwrap().abandon_stream(&spec.path()).await.unwrap();
    // The abandoned stream's next event meets the closed socket after
    // 200 ms; the two held ones run for a second.
    assert_eq!(open_requests_become(&candidate, &[(container, 2)]).await, [(container, 2)]);
    for stream in held {
        stream.await.unwrap();
    }
    assert_eq!(open_requests_become(&candidate, &[]).await, []);
    drop(candidate);

    let (watched, addr) = server_pod(Stack::NodeHttp2.command(0, false));
    let container = std::fs::metadata(&watched.container_dir).expect("container cgroup").ino();
    let candidate =
        HookBaseline::attach_packet_candidate(&watched.pod_dir, PacketProtocol::Http2).expect("the candidate attaches");
    let caller = Caller::connect(Protocol::Http2, addr).await.unwrap();
    let calls = tokio::spawn(async move {
        let slow = Call { first_ms: 1_000, messages: 1, interval_ms: 0 };
        run_calls(&caller, vec![slow; 4], 4).await.unwrap().len()
    });
    assert_eq!(open_requests_become(&candidate, &[(container, 4)]).await, [(container, 4)]);
    assert_eq!(calls.await.unwrap(), 4);
    assert_eq!(open_requests_become(&candidate, &[]).await, []);
    drop(candidate);
}
