//! The scaler's node bookkeeping against in-process node agents: nodes are
//! known by name across address changes, silent nodes are held for the
//! grace period and then hold answers back, and what cannot be seen makes
//! the answer an error.
use std::net::SocketAddr;
use std::time::Duration;

use podgpu_proto::node::node_signals_server::{NodeSignals, NodeSignalsServer};
use podgpu_proto::node::{NodeSnapshot, PodSignals, SnapshotRequest, WatchRequest, WindowValues};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::interest::{Fetched, Interest};
use super::poll::Nodes;
use super::snapshot_call::EncodedRequest;
use super::*;
use crate::pods::selector::LabelSelector;
use crate::signals::metric::Metric;

struct FakeNode {
    name: String,
}

#[tonic::async_trait]
impl NodeSignals for FakeNode {
    async fn snapshot(&self, request: Request<SnapshotRequest>) -> Result<Response<NodeSnapshot>, Status> {
        let windows = request.into_inner().windows_s;
        let pod = PodSignals {
            uid: "u".into(),
            namespace: "ns".into(),
            name: format!("llm-on-{}", self.name),
            labels: [("app".to_string(), "llm".to_string())].into(),
            windows: windows
                .iter()
                .map(|&window_s| WindowValues {
                    window_s,
                    values: [("requests_in_flight".to_string(), 3.0)].into(),
                    ..WindowValues::default()
                })
                .collect(),
            ..PodSignals::default()
        };
        Ok(Response::new(NodeSnapshot { node: self.name.clone(), pods: vec![pod], ..NodeSnapshot::default() }))
    }

    type WatchStream = tokio_stream::Empty<Result<NodeSnapshot, Status>>;

    async fn watch(&self, _request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("snapshot only"))
    }
}

async fn start_node(name: &str, stop: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(NodeSignalsServer::new(FakeNode { name: name.to_string() }))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), stop.cancelled_owned());
    tokio::spawn(server);
    addr
}

/// The bookkeeping of one scaler, stepped by hand, fetching everything.
#[derive(Default)]
struct Scaler {
    nodes: Nodes,
}

impl Scaler {
    async fn poll(&mut self, resolved: &[SocketAddr], grace: Duration) -> ClusterView {
        self.nodes.set_addresses(resolved);
        let fetched = Arc::new(Fetched { windows: vec![10.0], selection: None });
        let request = EncodedRequest::new(&SnapshotRequest { windows_s: vec![10.0], selection: None });
        self.nodes.poll(&request, &fetched, Duration::from_millis(300), Duration::ZERO, None).await;
        self.nodes.publish(&[10.0], grace, Vec::new())
    }
}

fn ask<'a>(namespace: &'a str, selector: &'a LabelSelector) -> Ask<'a> {
    Ask {
        namespace,
        selector,
        metric: Metric::RequestsInFlight,
        window_s: 10.0,
        aggregation: crate::signals::aggregate::Aggregation::Sum,
        traffic: Default::default(),
    }
}

fn llm() -> LabelSelector {
    LabelSelector::parse("app=llm").unwrap()
}

/// A node agent replaced on a new address keeps its node: the old
/// snapshot holds through the gap and the new answers replace it, with no
/// moment where the node's pods go missing.
#[tokio::test]
async fn a_node_on_a_new_address_is_the_same_node() {
    let (old_stop, new_stop) = (CancellationToken::new(), CancellationToken::new());
    let old = start_node("gpu-1", old_stop.clone()).await;
    let mut scaler = Scaler::default();
    let view = scaler.poll(&[old], Duration::from_secs(30)).await;
    assert_eq!(view.nodes.len(), 1);
    assert_eq!(view.coverage_error(&ask("ns", &llm())), None);

    // The old pod is gone and DNS no longer lists it; the new one is not up.
    old_stop.cancel();
    let view = scaler.poll(&[], Duration::from_secs(30)).await;
    assert_eq!(view.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["gpu-1"], "held in grace");
    assert_eq!(view.coverage_error(&ask("ns", &llm())), None);

    let new = start_node("gpu-1", new_stop.clone()).await;
    let view = scaler.poll(&[new], Duration::from_secs(30)).await;
    assert_eq!(view.nodes.len(), 1);
    assert_eq!(view.nodes[0].addr, new);
    assert!(view.nodes[0].age_s < 1.0);
    new_stop.cancel();
}

/// Past the grace period a silent node holds back the answers of queries
/// that selected its pods (and only those); an address that never answered
/// holds back every answer.
#[tokio::test]
async fn lost_and_silent_nodes_are_errors() {
    let stop = CancellationToken::new();
    let addr = start_node("gpu-2", stop.clone()).await;
    let mut scaler = Scaler::default();
    scaler.poll(&[addr], Duration::ZERO).await;
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let view = scaler.poll(&[addr], Duration::ZERO).await;
    assert!(view.nodes.is_empty());
    assert_eq!(view.lost_nodes.len(), 1);
    let error = view.coverage_error(&ask("ns", &llm())).expect("lost node's pods selected");
    assert!(error.contains("gpu-2"), "{error}");
    let other = LabelSelector::parse("app=other").unwrap();
    assert_eq!(view.coverage_error(&ask("ns", &other)), None);
    assert_eq!(view.coverage_error(&ask("elsewhere", &llm())), None);

    let mut fresh = Scaler::default();
    let view = fresh.poll(&[addr], Duration::from_secs(30)).await;
    let error = view.coverage_error(&ask("elsewhere", &other)).expect("never answered");
    assert!(error.contains(&addr.to_string()), "{error}");
    assert!(ClusterView::default().coverage_error(&ask("ns", &llm())).is_some(), "not polled");
}

/// A node polled before a trigger was first asked cannot answer it: while
/// the node is silent the trigger is an error, not a sum without its pods;
/// once it answers a poll carrying the trigger, the answer is whole.
#[tokio::test]
async fn a_node_not_polled_for_a_trigger_holds_it_back() {
    let stop = CancellationToken::new();
    let addr = start_node("gpu-3", stop.clone()).await;
    let mut nodes = Nodes::default();
    nodes.set_addresses(&[addr]);
    let mut interest = Interest::default();
    let llm = llm();
    interest.note(&ask("ns", &llm));
    let (request, fetched) = interest.request(10.0, FetchMode::Selected);
    nodes
        .poll(&EncodedRequest::new(&request), &Arc::new(fetched), Duration::from_millis(300), Duration::ZERO, None)
        .await;
    let view = nodes.publish(&[10.0], Duration::from_secs(30), Vec::new());
    assert!(view.covers(&ask("ns", &llm)));
    assert_eq!(view.coverage_error(&ask("ns", &llm)), None);

    // A new trigger while the node's agent is gone (DNS no longer lists
    // it): its last snapshot was not fetched for the trigger.
    stop.cancel();
    nodes.set_addresses(&[]);
    let other = LabelSelector::parse("app=other").unwrap();
    interest.note(&ask("ns", &other));
    let (request, fetched) = interest.request(10.0, FetchMode::Selected);
    nodes
        .poll(&EncodedRequest::new(&request), &Arc::new(fetched), Duration::from_millis(300), Duration::ZERO, None)
        .await;
    let view = nodes.publish(&[10.0], Duration::from_secs(30), Vec::new());
    assert_eq!(view.nodes.len(), 1, "still within grace");
    assert!(!view.covers(&ask("ns", &other)));
    let error = view.coverage_error(&ask("ns", &other)).expect("not fetched for this trigger");
    assert!(error.contains("gpu-3") && error.contains("since this trigger was first asked"), "{error}");
    assert_eq!(view.coverage_error(&ask("ns", &llm)), None, "the old trigger still answers in grace");

    let back = CancellationToken::new();
    let new_addr = start_node("gpu-3", back.clone()).await;
    nodes.set_addresses(&[new_addr]);
    let (request, fetched) = interest.request(10.0, FetchMode::Selected);
    nodes
        .poll(&EncodedRequest::new(&request), &Arc::new(fetched), Duration::from_millis(300), Duration::ZERO, None)
        .await;
    let view = nodes.publish(&[10.0], Duration::from_secs(30), Vec::new());
    assert_eq!(view.coverage_error(&ask("ns", &other)), None);
    back.cancel();
}

/// A node pod's engine reaches the scaler's `/pods` in the node's shape:
/// read, found but failing, or none.
#[test]
fn remote_engine_reads_as_the_nodes_does() {
    let remote = |engine: &str, failing: bool| {
        view::RemotePod::decode(PodSignals {
            engine: engine.to_string(),
            engine_failing: failing,
            ..PodSignals::default()
        })
        .engine_json()
    };
    let read = remote("vllm", false);
    assert_eq!((read["engine"].as_str(), read["unavailable"].is_null()), (Some("vllm"), true), "{read}");
    let failing = remote("tgi", true);
    assert_eq!(failing["engine"], "tgi");
    assert!(failing["unavailable"].as_str().is_some_and(|why| why.contains("not read")), "{failing}");
    let none = remote("", false);
    assert!(none["engine"].is_null() && none["unavailable"].is_string(), "{none}");
}
