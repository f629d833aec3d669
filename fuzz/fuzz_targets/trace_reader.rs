//! The attribution trace reader fed any text, and replay over what it
//! accepts: a trace is a file a person hands `podgpu-agent replay`. Besides
//! raw text, a well-formed trace of any values is written as `record`
//! writes it and read back, so replay sees every shape the reader lets
//! through. Never panics; what replays is finite.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use podgpu_agent::gpu::attribution::trace::{self, LaunchLine, Tenant, Trace};
use podgpu_agent::gpu::attribution::{replay, EstimatorConfig};
use podgpu_agent::gpu::Sharing;

/// A trace of arbitrary values in the trace's shape.
#[derive(Debug, arbitrary::Arbitrary)]
struct Shaped {
    sharing: Option<u8>,
    tenants: Vec<(u32, Vec<(f64, f64, f64)>)>,
    device_util: Vec<(f64, f64)>,
    nvml_process_samples: Vec<(u32, u64, f64)>,
    /// Each line's rows and kernel identities (shared kernels included:
    /// the estimator ties their costs across processes), completion spans
    /// and span events lost.
    #[allow(clippy::type_complexity)]
    launches: Vec<(f64, Vec<(u32, u32, u64, u64, u64)>, Vec<(u32, u64, u64)>, Vec<(u32, f64, f64, u64)>, u64)>,
}

impl Shaped {
    fn texts(self) -> Option<(String, String)> {
        let trace = Trace {
            scenario: "fuzz".into(),
            sharing: self.sharing.map(|s| [Sharing::TimeSliced, Sharing::Mig, Sharing::Mps][usize::from(s % 3)]),
            tenants: self
                .tenants
                .into_iter()
                .map(|(pid, periods)| Tenant {
                    pid,
                    segments: Vec::new(),
                    periods: periods.into_iter().map(|(end, work, period)| vec![end, work, period]).collect(),
                })
                .collect(),
            device_util: self.device_util,
            nvml_process_samples: self.nvml_process_samples,
            ..Trace::default()
        };
        let mut launches = String::new();
        for (t, rows, kernels, spans, spans_lost) in self.launches {
            launches.push_str(&serde_json::to_string(&LaunchLine { t, rows, kernels, spans, spans_lost }).ok()?);
            launches.push('\n');
        }
        Some((serde_json::to_string(&trace).ok()?, launches))
    }
}

fuzz_target!(|input: (String, String, Option<Shaped>)| {
    let (trace_json, launch_jsonl, shaped) = input;
    let path = Path::new("fuzz.json");
    let mut accepted = trace::parse(path, &trace_json, &launch_jsonl).ok().into_iter().collect::<Vec<_>>();
    if let Some((trace_json, launch_jsonl)) = shaped.and_then(Shaped::texts) {
        accepted.extend(trace::parse(path, &trace_json, &launch_jsonl).ok());
    }
    for (trace, launches) in accepted {
        let replayed = replay::replay(&trace, &launches, EstimatorConfig::default());
        for window in &replayed.windows {
            if let Some(attribution) = &window.attribution {
                assert!(attribution.device_util.is_finite() && attribution.confidence.is_finite(), "{attribution:?}");
                for process in &attribution.processes {
                    assert!(process.util_percent.is_finite(), "{process:?}");
                }
            }
        }
    }
});
