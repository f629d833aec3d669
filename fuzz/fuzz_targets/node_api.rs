//! Both ends of the node API fed any bytes: a node agent decoding a
//! Snapshot request (the selection a scaler sends) and picking pods with
//! it, and the scaler decoding a node's snapshot and answering every
//! metric from its pods (histogram buckets of any value and count). Never
//! panics; a pick names only queries that exist.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use podgpu_agent::cluster::RemotePod;
use podgpu_agent::pods::selector::LabelSelector;
use podgpu_agent::selection::PodSelection;
use podgpu_agent::signals::aggregate::{combine, Aggregation, WorkloadQuery};
use podgpu_agent::signals::metric::Metric;
use podgpu_agent::signals::traffic_filter::TrafficFilter;
use podgpu_proto::node::{NodeSnapshot, SnapshotRequest};
use prost::Message as _;

fuzz_target!(|input: (Vec<u8>, Vec<u8>, Vec<(String, String)>, String, Vec<u16>, bool)| {
    let (request_bytes, snapshot_bytes, labels, namespace, ports, include_probes) = input;
    let labels: BTreeMap<String, String> = labels.into_iter().collect();
    if let Ok(request) = SnapshotRequest::decode(request_bytes.as_slice()) {
        if let Some(selection) = request.selection {
            let queries = selection.queries.len();
            if let Ok(selection) = PodSelection::decode(selection) {
                for pending in [false, true] {
                    if let Some(pick) = selection.pick(&namespace, &labels, pending) {
                        assert!(pick.selected_by.iter().all(|&index| (index as usize) < queries));
                        for metric in Metric::ALL {
                            let wanted = selection.wants(&pick, metric);
                            assert!(!wanted || !pick.selected_by.is_empty(), "a pending pod wants nothing");
                        }
                        let _ = selection.ports(&pick);
                    }
                }
            }
        }
    }
    if let Ok(snapshot) = NodeSnapshot::decode(snapshot_bytes.as_slice()) {
        let pods: Vec<RemotePod> = snapshot.pods.into_iter().map(RemotePod::decode).collect();
        let everyone = LabelSelector::default();
        for metric in Metric::ALL {
            for window_s in [1.0, 10.0] {
                let query = WorkloadQuery {
                    namespace: &namespace,
                    selector: &everyone,
                    metric,
                    window_s,
                    aggregation: Aggregation::Sum,
                    traffic: TrafficFilter { ports: &ports, include_probes },
                };
                if let Ok(value) = combine(pods.iter(), &query) {
                    assert!(value.pods <= pods.len());
                }
            }
        }
    }
});
