//! Retry pacing shared by every source that reconnects (NVML, kubelet,
//! Kubernetes API): the base interval doubled per consecutive failure,
//! capped, so a long outage costs one attempt per cap interval.
use std::time::Duration;

/// `base`, 2x, 4x, ... after `failures` consecutive failures, at most `cap`.
pub fn backoff(base: Duration, failures: u32, cap: Duration) -> Duration {
    base.saturating_mul(1u32 << failures.min(16)).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Doubles from the base and stops at the cap.
    #[test]
    fn doubles_and_caps() {
        let base = Duration::from_millis(200);
        let cap = Duration::from_secs(60);
        assert_eq!(backoff(base, 0, cap), base);
        assert_eq!(backoff(base, 3, cap), Duration::from_millis(1600));
        assert_eq!(backoff(base, 40, cap), cap);
    }
}
