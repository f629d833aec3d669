//! The simulated GPU's load from launches: the libcuda stand-in
//! (`integration/cuda/libcuda.c`) counts each process's launches in an
//! 8-byte shared counter per pid under the scenario's `launch_counters`
//! folder, and a tenant with `launch_cost_us` keeps the GPU busy for that
//! long per launch. The simulated device then runs what its tenants
//! launch, as a real one does, independently of the probes that count the
//! same calls: the attribution estimator sees a device whose utilization
//! follows the launches it splits.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Counters read at the previous poll, per pid.
#[derive(Debug, Default)]
pub struct LaunchLoad {
    last: HashMap<u32, (u64, f64)>,
}

impl LaunchLoad {
    /// Percent of the GPU that `pids`' launches since the last poll kept it
    /// busy for, at `cost_us` per launch, as of scenario time `now_s`. A
    /// pid seen for the first time adds nothing yet (its count so far
    /// covers an unknown time); a pid without a counter never does.
    pub fn percent(&mut self, dir: &Path, pids: &[u32], cost_us: f64, now_s: f64) -> f64 {
        let mut busy_s = 0.0;
        let mut span_s: f64 = 0.0;
        for &pid in pids {
            let Some(count) = read_counter(&dir.join(pid.to_string())) else { continue };
            if let Some((previous, at_s)) = self.last.insert(pid, (count, now_s)) {
                if now_s > at_s {
                    busy_s += count.saturating_sub(previous) as f64 * cost_us / 1e6;
                    span_s = span_s.max(now_s - at_s);
                }
            }
        }
        if span_s <= 0.0 {
            return 0.0;
        }
        (100.0 * busy_s / span_s).clamp(0.0, 100.0)
    }

    /// Forgets pids that are gone (their counters stay on disk until the
    /// folder is cleaned; a reused pid starts over).
    pub fn retain(&mut self, alive: &[u32]) {
        self.last.retain(|pid, _| alive.contains(pid));
    }
}

fn read_counter(path: &PathBuf) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    Some(u64::from_ne_bytes(bytes.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, pid: u32, count: u64) {
        std::fs::write(dir.join(pid.to_string()), count.to_ne_bytes()).unwrap();
    }

    /// Launches between two polls become busy time over the time between
    /// them; a first sight, a missing counter or a short file add nothing.
    #[test]
    fn launches_between_polls_are_the_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut load = LaunchLoad::default();
        write(dir.path(), 1, 1_000);
        write(dir.path(), 2, 50);
        std::fs::write(dir.path().join("3"), [1u8, 2]).unwrap();
        assert_eq!(load.percent(dir.path(), &[1, 2, 3, 4], 200.0, 10.0), 0.0, "first sight");
        write(dir.path(), 1, 3_000);
        write(dir.path(), 2, 550);
        // (2,000 + 500) launches x 200 µs over 2 s = 25 %.
        let percent = load.percent(dir.path(), &[1, 2, 3, 4], 200.0, 12.0);
        assert!((percent - 25.0).abs() < 1e-9, "{percent}");
        // More launches than the device could run are capped at 100 %.
        write(dir.path(), 1, 1_000_000);
        assert_eq!(load.percent(dir.path(), &[1], 200.0, 13.0), 100.0);
        load.retain(&[2]);
        assert_eq!(load.percent(dir.path(), &[1], 200.0, 14.0), 0.0, "forgotten pids start over");
    }
}
