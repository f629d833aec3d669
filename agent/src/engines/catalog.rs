//! The inference engines podgpu reads, as their sources write them: how a
//! process is recognised, where the exposition is served, which families
//! hold the queue, the batch, the KV cache and TTFT, and each family's
//! older names.
//!
//! The names were read from each engine's metrics code as of late 2026
//! (vLLM 0.11, SGLang 0.5, TGI 3.3, Triton 25.x, TensorRT-LLM 1.0,
//! llama.cpp's server, LMDeploy 0.10, Dynamo 0.5); docs/engines.md keeps
//! the table and what has been checked against a running engine.
use std::fmt;

/// An engine podgpu knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// vLLM (V1 engine).
    Vllm,
    /// SGLang.
    Sglang,
    /// Hugging Face text-generation-inference.
    Tgi,
    /// NVIDIA Triton Inference Server.
    Triton,
    /// TensorRT-LLM's `trtllm-serve`.
    TrtllmServe,
    /// llama.cpp's `llama-server`.
    LlamaCpp,
    /// LMDeploy's API server.
    Lmdeploy,
    /// NVIDIA Dynamo's frontend.
    Dynamo,
}

/// One series the engine writes: a family name and, where the family
/// mixes several quantities, the label that picks this one.
#[derive(Clone, Copy, Debug)]
pub struct Series {
    /// Family name as exposed (counters without `_total`, histograms
    /// without `_bucket`).
    pub family: &'static str,
    /// `(label, value)` the series must carry.
    pub only: Option<(&'static str, &'static str)>,
}

const fn series(family: &'static str) -> Series {
    Series { family, only: None }
}

const fn series_where(family: &'static str, label: &'static str, value: &'static str) -> Series {
    Series { family, only: Some((label, value)) }
}

/// A histogram family and the unit of its bucket bounds.
#[derive(Clone, Copy, Debug)]
pub struct HistogramSeries {
    /// The family.
    pub series: Series,
    /// Seconds per unit of the `le` bounds (1 for seconds, 0.001 for ms).
    pub seconds_per_unit: f64,
}

/// How an engine is found and read. Each signal lists its names newest
/// first: the first family present in a scrape is read, so a version that
/// renamed a family is read by its own name.
#[derive(Debug)]
pub struct EngineSpec {
    /// Which engine.
    pub kind: EngineKind,
    /// Words of a process command line that name the engine (any one).
    pub commands: &'static [&'static str],
    /// Family-name prefixes that recognise its exposition.
    pub prefixes: &'static [&'static str],
    /// Where it serves its exposition, most likely first: `None` means
    /// the port the server listens on (its API port).
    pub endpoints: &'static [(Option<u16>, &'static str)],
    /// Requests queued and not yet scheduled.
    pub waiting: &'static [Series],
    /// Requests in the running batch.
    pub running: &'static [Series],
    /// KV-cache use as a fraction 0-1.
    pub kv_cache: &'static [Series],
    /// Time to first token, as a cumulative histogram.
    pub ttft: &'static [HistogramSeries],
}

const SECONDS: f64 = 1.0;

/// Every engine, in the order discovery tries them when nothing names one.
pub const ENGINES: &[EngineSpec] = &[
    EngineSpec {
        kind: EngineKind::Vllm,
        commands: &["vllm", "vllm.entrypoints.openai.api_server", "dynamo.vllm"],
        prefixes: &["vllm:"],
        endpoints: &[(None, "/metrics"), (Some(8000), "/metrics")],
        waiting: &[series("vllm:num_requests_waiting")],
        running: &[series("vllm:num_requests_running")],
        // `gpu_cache_usage_perc` until 0.9, removed in late 2025.
        kv_cache: &[series("vllm:kv_cache_usage_perc"), series("vllm:gpu_cache_usage_perc")],
        ttft: &[HistogramSeries { series: series("vllm:time_to_first_token_seconds"), seconds_per_unit: SECONDS }],
    },
    EngineSpec {
        kind: EngineKind::Sglang,
        commands: &["sglang.launch_server", "sglang"],
        prefixes: &["sglang:"],
        endpoints: &[(None, "/metrics"), (Some(30000), "/metrics")],
        waiting: &[series("sglang:num_queue_reqs")],
        running: &[series("sglang:num_running_reqs")],
        kv_cache: &[series("sglang:token_usage")],
        ttft: &[HistogramSeries { series: series("sglang:time_to_first_token_seconds"), seconds_per_unit: SECONDS }],
    },
    EngineSpec {
        kind: EngineKind::Tgi,
        commands: &["text-generation-launcher", "text-generation-router"],
        prefixes: &["tgi_"],
        endpoints: &[(None, "/metrics"), (Some(9000), "/metrics"), (Some(80), "/metrics"), (Some(3000), "/metrics")],
        waiting: &[series("tgi_queue_size")],
        running: &[series("tgi_batch_current_size")],
        kv_cache: &[],
        ttft: &[],
    },
    EngineSpec {
        kind: EngineKind::Triton,
        commands: &["tritonserver"],
        prefixes: &["nv_inference_", "nv_trt_llm_"],
        endpoints: &[(Some(8002), "/metrics"), (None, "/metrics")],
        waiting: &[
            series("nv_inference_pending_request_count"),
            series_where("nv_trt_llm_request_metrics", "request_type", "waiting"),
        ],
        running: &[series_where("nv_trt_llm_request_metrics", "request_type", "scheduled")],
        // The TRT-LLM backend's block fraction; Triton's vLLM backend
        // writes vLLM's own names beside Triton's.
        kv_cache: &[
            series_where("nv_trt_llm_kv_cache_block_metrics", "kv_cache_block_type", "fraction"),
            series("vllm:kv_cache_usage_perc"),
            series("vllm:gpu_cache_usage_perc"),
        ],
        ttft: &[HistogramSeries {
            series: series("nv_inference_first_response_histogram_ms"),
            seconds_per_unit: 0.001,
        }],
    },
    EngineSpec {
        kind: EngineKind::TrtllmServe,
        commands: &["trtllm-serve"],
        prefixes: &["trtllm_"],
        // `/metrics` there is JSON iteration stats, not Prometheus.
        endpoints: &[(None, "/prometheus/metrics"), (Some(8000), "/prometheus/metrics")],
        waiting: &[series("trtllm_num_requests_waiting")],
        running: &[series("trtllm_num_requests_running")],
        kv_cache: &[series("trtllm_kv_cache_utilization")],
        ttft: &[HistogramSeries { series: series("trtllm_time_to_first_token_seconds"), seconds_per_unit: SECONDS }],
    },
    EngineSpec {
        kind: EngineKind::LlamaCpp,
        commands: &["llama-server"],
        prefixes: &["llamacpp:"],
        endpoints: &[(None, "/metrics"), (Some(8080), "/metrics")],
        waiting: &[series("llamacpp:requests_deferred")],
        running: &[series("llamacpp:requests_processing")],
        kv_cache: &[],
        ttft: &[],
    },
    EngineSpec {
        kind: EngineKind::Lmdeploy,
        commands: &["lmdeploy"],
        prefixes: &["lmdeploy:"],
        endpoints: &[(None, "/metrics"), (Some(23333), "/metrics")],
        waiting: &[series("lmdeploy:num_requests_waiting")],
        running: &[series("lmdeploy:num_requests_running")],
        kv_cache: &[series("lmdeploy:gpu_cache_usage_perc")],
        ttft: &[HistogramSeries { series: series("lmdeploy:time_to_first_token_seconds"), seconds_per_unit: SECONDS }],
    },
    EngineSpec {
        kind: EngineKind::Dynamo,
        commands: &["dynamo.frontend", "dynamo-run"],
        prefixes: &["dynamo_"],
        endpoints: &[(None, "/metrics"), (Some(8000), "/metrics")],
        waiting: &[series("dynamo_frontend_queued_requests")],
        running: &[series("dynamo_frontend_inflight_requests")],
        kv_cache: &[series("dynamo_component_kvstats_gpu_cache_usage_percent")],
        ttft: &[HistogramSeries {
            series: series("dynamo_frontend_time_to_first_token_seconds"),
            seconds_per_unit: SECONDS,
        }],
    },
];

impl EngineKind {
    /// Every engine.
    pub fn all() -> impl Iterator<Item = EngineKind> {
        ENGINES.iter().map(|spec| spec.kind)
    }

    /// The engine's spec.
    pub fn spec(self) -> &'static EngineSpec {
        ENGINES.iter().find(|spec| spec.kind == self).expect("every kind has a spec")
    }

    /// Name in `/pods`, labels and errors.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::Tgi => "tgi",
            EngineKind::Triton => "triton",
            EngineKind::TrtllmServe => "trtllm-serve",
            EngineKind::LlamaCpp => "llama-cpp",
            EngineKind::Lmdeploy => "lmdeploy",
            EngineKind::Dynamo => "dynamo",
        }
    }

    /// The engine a label or annotation value names. Accepts podgpu's own
    /// names and the spellings the Gateway API Inference Extension, llm-d
    /// and AIBrix use (`vllm`, `sglang`, `triton-tensorrt-llm`, `tgi`, ...).
    pub fn from_hint(value: &str) -> Option<EngineKind> {
        let value = value.trim().to_ascii_lowercase();
        let value = value.as_str();
        match value {
            "trtllm-serve" | "trtllm" | "tensorrt-llm" => Some(EngineKind::TrtllmServe),
            "llama-cpp" | "llamacpp" | "llama.cpp" | "llama-server" => Some(EngineKind::LlamaCpp),
            "text-generation-inference" | "tgi" => Some(EngineKind::Tgi),
            _ if value.starts_with("triton") => Some(EngineKind::Triton),
            _ => EngineKind::all().find(|kind| kind.name() == value),
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every engine has a spec with a command and a prefix, and its names
    /// round-trip through the hint parser.
    #[test]
    fn every_engine_is_complete() {
        for spec in ENGINES {
            assert!(!spec.commands.is_empty() && !spec.prefixes.is_empty() && !spec.endpoints.is_empty());
            assert!(!spec.waiting.is_empty(), "{:?} has no queue", spec.kind);
            assert_eq!(EngineKind::from_hint(spec.kind.name()), Some(spec.kind));
            assert_eq!(spec.kind.spec().kind, spec.kind);
        }
        assert_eq!(EngineKind::from_hint("triton-tensorrt-llm"), Some(EngineKind::Triton));
        assert_eq!(EngineKind::from_hint(" vLLM "), Some(EngineKind::Vllm));
        assert_eq!(EngineKind::from_hint("ollama"), None);
    }
}
