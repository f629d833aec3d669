//! The demo's GPU work on the simulated GPU: one launch loop per tenant pod,
//! launching through the libcuda stand-in at a scheduled rate. The stand-in
//! counts each launch where the embedded scenario's simulated device reads
//! it (`launch_counters`, every launch runs for the tenant's
//! `launch_cost_us`), so the device's utilization follows the launches the
//! agent's probes count, as on a real GPU. Tenant A's load comes and goes
//! every 3 s for the first half of the run (B runs alone in between: both
//! costs per launch get measured), then both run steady (only the costs
//! learned before hold the split up, and the confidence falls as they
//! age).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use integration::scene::Tenant;

/// Where the embedded demo scenario (`agent/src/gpu/sim/demo-scenario.yaml`)
/// reads the stand-in's launch counters.
const LAUNCH_COUNTERS: &str = "/run/podgpu-demo/launches";

/// Launch loops running in the tenants' pods; stopped on drop.
pub struct GpuWork {
    loops: Vec<Child>,
    _tools: tempfile::TempDir,
}

impl GpuWork {
    /// Builds the libcuda stand-in and starts a launch loop in each tenant's
    /// pod: `schedules[i]` (LAUNCH_SCHEDULE) for `tenants[i]`.
    pub fn start(tenants: &[Tenant], schedules: &[String]) -> anyhow::Result<Self> {
        let tools = tempfile::tempdir().context("a folder for the libcuda stand-in")?;
        integration::cuda_standin::build(tools.path()).context("building the libcuda stand-in (gcc)")?;
        std::fs::create_dir_all(LAUNCH_COUNTERS).with_context(|| format!("creating {LAUNCH_COUNTERS}"))?;
        let mut work = Self { loops: Vec::new(), _tools: tools };
        for (tenant, schedule) in tenants.iter().zip(schedules) {
            let child = launch_loop(work._tools.path(), schedule)?;
            let procs = tenant.pod.container_dir.join("cgroup.procs");
            let pid = child.id();
            work.loops.push(child);
            std::fs::write(&procs, pid.to_string())
                .with_context(|| format!("moving the launch loop into {procs:?}"))?;
        }
        Ok(work)
    }

    /// A tenant's schedule over a run of `duration`: `moving` launches per
    /// second for 3 s and none for 3 s, by turns, for the first half, then
    /// `steady`.
    pub fn schedule(duration: Duration, moving: Option<u32>, steady: u32) -> String {
        let mut steps = Vec::new();
        if let Some(rate) = moving {
            let phases = (duration.as_secs() / 2 / 3).max(1);
            steps.extend((0..phases).map(|i| format!("{}:3", if i % 2 == 0 { rate } else { 0 })));
        }
        steps.push(format!("{steady}:86400"));
        steps.join(",")
    }
}

fn launch_loop(tools: &Path, schedule: &str) -> anyhow::Result<Child> {
    let mut command = Command::new(tools.join("launch_loop"));
    // No host work per launch: the schedule paces it (sleeping).
    command.args([tools.join("libcuda.so.1").to_str().context("stand-in path")?, "0"]);
    command.env("PODGPU_SIM_LAUNCHES_DIR", LAUNCH_COUNTERS).env("LAUNCH_SCHEDULE", schedule);
    command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
    command.spawn().context("starting a launch loop")
}

impl Drop for GpuWork {
    fn drop(&mut self) {
        for child in &mut self.loops {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Counters of pids that are gone; a later demo writes its own.
        let _ = std::fs::remove_dir_all(PathBuf::from(LAUNCH_COUNTERS));
    }
}
