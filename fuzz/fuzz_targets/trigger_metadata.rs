//! KEDA trigger metadata, as any ScaledObject author may write it: the
//! validator returns a trigger or an error naming the field; it never
//! panics, and what it accepts has a metric name.
#![no_main]
use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use podgpu_agent::serve::trigger::Trigger;

fuzz_target!(|pairs: Vec<(String, String)>| {
    let metadata: HashMap<String, String> = pairs.into_iter().collect();
    if let Ok(trigger) = Trigger::from_metadata(&metadata) {
        assert!(!trigger.metric_name().is_empty());
    }
});
