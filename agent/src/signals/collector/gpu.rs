//! The collector's GPU side: what each poll brings (devices, per-pod use,
//! the split), and the poller's silence or failure turned into data that
//! is unavailable rather than stale.
use std::sync::Arc;
use std::time::Instant;

use super::Collector;
use crate::gpu::poller::{GpuUpdate, PodGpu};
use crate::signals::view::SourceStatus;

impl Collector {
    /// Applies one update from the GPU poller.
    pub fn apply_gpu(&mut self, update: GpuUpdate) {
        match update {
            GpuUpdate::Polled { backend, devices, pods, attribution } => {
                self.gpu_status = SourceStatus::Ok { detail: backend };
                self.gpu_polled_at = Some(Instant::now());
                self.gpu_devices = devices;
                self.gpu_attribution = Arc::new(attribution);
                for (uid, pod) in self.pods.iter_mut() {
                    pod.gpu = pods.get(uid).copied().unwrap_or_default();
                }
                self.gpu_latest = pods;
            }
            GpuUpdate::Unavailable { kind, reason } => {
                *self.gpu_errors.entry(kind).or_default() += 1;
                self.mark_gpu_unavailable(reason);
            }
            GpuUpdate::Disabled => self.gpu_status = SourceStatus::Disabled,
        }
    }

    pub(super) fn mark_gpu_unavailable(&mut self, reason: String) {
        self.gpu_status = SourceStatus::Degraded { reason };
        self.gpu_devices.clear();
        self.gpu_attribution = Arc::default();
        self.gpu_latest.clear();
        for pod in self.pods.values_mut() {
            pod.gpu = PodGpu::default();
        }
    }

    /// A poller stuck in a slow driver call sends nothing: without this,
    /// the last values would be served as if fresh.
    pub(super) fn check_gpu_staleness(&mut self) {
        let Some(polled_at) = self.gpu_polled_at else { return };
        if self.gpu_status.is_ok() && polled_at.elapsed() > self.config.gpu_stale_after {
            let age = polled_at.elapsed().as_secs_f64();
            tracing::warn!(age_s = age, "GPU data is stale");
            self.mark_gpu_unavailable(format!("GPU data is stale: last successful poll {age:.1} s ago"));
        }
    }
}
