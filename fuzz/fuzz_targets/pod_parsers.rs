//! What the agent reads from the node about pods: cgroup paths (any
//! runtime's layout), `/proc/PID/cgroup` files under any cgroup namespace
//! root, and label selectors from triggers. None may panic.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use podgpu_agent::pods::{cgroup_path, selector::LabelSelector};
use podgpu_agent::proc::parse_cgroup_file;

fuzz_target!(|input: (String, String, Vec<(String, String)>)| {
    let (text, ns_root, labels) = input;
    let _ = cgroup_path::parse(&text);
    for line in parse_cgroup_file(&text, &ns_root) {
        let _ = line;
    }
    if let Ok(selector) = LabelSelector::parse(&text) {
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        let _ = selector.matches(&labels);
        // Selectors travel to node agents as text: the canonical form must
        // read back to the same selector.
        assert_eq!(LabelSelector::parse(&selector.to_string()), Ok(selector.clone()), "{text:?}");
    }
});
