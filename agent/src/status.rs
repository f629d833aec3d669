//! The health vocabulary every source reports in (probes, GPU, kubelet,
//! Kubernetes API), shown on /healthz and as `podgpu_agent_source_up`.
use serde::Serialize;

/// Health of one source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum SourceStatus {
    /// Working; `detail` says what is serving (e.g. the GPU backend).
    Ok {
        /// What is serving.
        detail: String,
    },
    /// Wanted but failing; the agent keeps serving the other sources.
    Degraded {
        /// Why.
        reason: String,
    },
    /// Switched off by configuration.
    Disabled,
    /// Not running because this node does not need it (e.g. the driver
    /// path on a node without an NVIDIA driver); `reason` says why.
    Inactive {
        /// Why.
        reason: String,
    },
}

impl SourceStatus {
    /// Whether the source's signals can be served.
    pub fn is_ok(&self) -> bool {
        matches!(self, SourceStatus::Ok { .. })
    }
}
