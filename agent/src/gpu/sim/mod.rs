//! Simulated GPUs driven by a scenario file: the stand-in for NVML on
//! machines without a GPU (CI, the demo), behind the same `GpuBackend` trait.
//!
//! Each tenant has a true, scripted load. The simulator derives what NVML
//! would report from it: device utilization from the true loads, and a
//! stream of per-process samples (one every 1/6 s, NVML's cadence) that goes
//! through the same `SampleCursor` folding as real NVML, with the measured
//! distortions applied (a tenant with no samples, a tenant's load booked on
//! another pid, every sample booked on the MPS server, no per-process SM %
//! under MIG). Scripted faults make polls and re-opens fail for a while.
//! A tenant's load is either scripted (`sm_util`) or follows what its
//! processes launch through the libcuda stand-in (`launch_load`).
mod launch_load;
mod scenario;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use scenario::{FaultKind, NvmlView, Scenario, SimGpu, SimProcess};

use super::samples::{RawSample, SampleCursor};
use super::{DeviceSample, GpuBackend, GpuError, GpuPoll, MigDeviceSample, ProcessSample, Sharing};
use scenario::schedule_at;

/// NVML records a process sample about every 1/6 s.
const SAMPLE_PERIOD_S: f64 = 1.0 / 6.0;
/// How far back NVML's sample ring reaches for a reader that has seen
/// nothing yet (a fresh cursor gets the recent past, not nothing).
const RING_S: f64 = 1.0;

/// The simulator backend: a scenario, its clock, and per-device cursors.
pub struct SimBackend {
    scenario: Scenario,
    cgroup_root: PathBuf,
    epoch: Instant,
    cursors: Vec<SampleCursor>,
    /// Scenario time up to which samples have been generated.
    sampled_until_s: f64,
    /// Launch counters read so far (tenants with `launch_cost_us`).
    launch_load: launch_load::LaunchLoad,
}

impl SimBackend {
    /// Opens the scenario on a timeline that started at `epoch`; fails like
    /// NVML's init would while an init-breaking fault is active.
    pub fn open(scenario: Scenario, cgroup_root: PathBuf, epoch: Instant) -> Result<Self, GpuError> {
        let backend = Self {
            cursors: vec![SampleCursor::default(); scenario.gpus.len()],
            scenario,
            cgroup_root,
            epoch,
            // The ring predates the agent (negative scenario time is the
            // scenario's first step).
            sampled_until_s: epoch.elapsed().as_secs_f64() - RING_S,
            launch_load: launch_load::LaunchLoad::default(),
        };
        let now = backend.epoch.elapsed().as_secs_f64();
        if let Some(fault) = backend.scenario.faults.iter().find(|f| f.active_at(now) && f.kind != FaultKind::Unknown) {
            return Err(fault.error(&backend.first_uuid()));
        }
        Ok(backend)
    }

    fn first_uuid(&self) -> String {
        self.scenario.gpus.first().map_or_else(|| "GPU 0".to_string(), |gpu| gpu.uuid.clone())
    }

    fn pids_of(&self, process: &SimProcess) -> Vec<u32> {
        match (&process.pid, &process.cgroup) {
            (Some(pid), _) => vec![*pid],
            (None, Some(cgroup)) => {
                let mut pids = Vec::new();
                collect_cgroup_pids(&self.cgroup_root.join(cgroup.trim_start_matches('/')), &mut pids);
                pids.sort_unstable();
                pids
            }
            (None, None) => Vec::new(),
        }
    }

    /// The pids of `process` that use the GPU: all of them for a scripted
    /// load; for a launch-driven one only those that launched through the
    /// stand-in (a pod's server or pause process holds no CUDA context,
    /// and NVML does not list it).
    fn gpu_pids_of(&self, process: &SimProcess) -> Vec<u32> {
        let pids = self.pids_of(process);
        match (&self.scenario.launch_counters, process.launch_cost_us) {
            (Some(dir), Some(_)) => pids.into_iter().filter(|pid| dir.join(pid.to_string()).is_file()).collect(),
            _ => pids,
        }
    }

    /// What NVML would report at scenario time `now_s`.
    fn poll_at(&mut self, now_s: f64) -> Result<GpuPoll, GpuError> {
        if let Some(fault) = self.scenario.faults.iter().find(|fault| fault.active_at(now_s)) {
            return Err(fault.error(&self.first_uuid()));
        }
        let tenants: Vec<(usize, Vec<u32>)> = self
            .scenario
            .processes
            .iter()
            .enumerate()
            .map(|(index, process)| (index, self.gpu_pids_of(process)))
            .filter(|(_, pids)| !pids.is_empty())
            .collect();
        let first_pid: HashMap<&str, u32> = tenants
            .iter()
            .filter_map(|(index, pids)| Some((self.scenario.processes[*index].name.as_deref()?, pids[0])))
            .collect();

        let mut devices: Vec<DeviceSample> = self.scenario.gpus.iter().map(device_template).collect();
        let mut processes: Vec<ProcessSample> = Vec::new();
        // Samples NVML would have recorded since the last poll, per device,
        // keyed by (booked pid, timestamp) so distortions can pile onto a pid.
        let mut booked: Vec<HashMap<(u32, u64), (f64, f64)>> = vec![HashMap::new(); devices.len()];
        let first_tick = (self.sampled_until_s / SAMPLE_PERIOD_S).floor() as i64 + 1;
        let last_tick = (now_s / SAMPLE_PERIOD_S).floor() as i64;

        // Launch-driven tenants: what they launched since the last poll.
        let mut launched: HashMap<usize, f64> = HashMap::new();
        if let Some(dir) = &self.scenario.launch_counters {
            for (index, pids) in &tenants {
                if let Some(cost_us) = self.scenario.processes[*index].launch_cost_us {
                    launched.insert(*index, self.launch_load.percent(dir, pids, cost_us, now_s));
                }
            }
            let alive: Vec<u32> = tenants.iter().flat_map(|(_, pids)| pids.iter().copied()).collect();
            self.launch_load.retain(&alive);
        }
        // Busy tenants per device, for the time-slicing overhead.
        let mut busy_tenants = vec![0usize; devices.len()];
        for (index, pids) in &tenants {
            let process = &self.scenario.processes[*index];
            let gpu = &self.scenario.gpus[process.gpu];
            let device = &mut devices[process.gpu];
            // SM % at a moment: scripted, or what was launched (the same
            // over the interval since the last poll).
            let sm_at = |at_s: f64| launched.get(index).copied().unwrap_or_else(|| schedule_at(&process.sm_util, at_s));
            // As NVML: no device utilization on a MIG-enabled GPU.
            if gpu.sharing != Sharing::Mig {
                let add = |total: Option<f64>, percent: f64| Some((total.unwrap_or(0.0) + percent).min(100.0));
                device.util_percent = add(device.util_percent, sm_at(now_s));
                busy_tenants[process.gpu] += usize::from(sm_at(now_s) > 0.0);
                device.mem_bw_util_percent = add(device.mem_bw_util_percent, schedule_at(&process.mem_bw_util, now_s));
            }
            // A cgroup tenant's memory is the tenant's, split across its
            // processes as its load is: a pod's sandbox (pause) process or
            // a helper does not add to it.
            let memory = process.memory_bytes;
            device.memory_used_bytes += memory;
            let memory_of =
                |index: usize| memory / pids.len() as u64 + u64::from(index == 0) * (memory % pids.len() as u64);

            if let (Sharing::Mig, Some(mig)) = (gpu.sharing, process.mig) {
                device.mig_devices[mig].memory_used_bytes += memory;
                for (index, &pid) in pids.iter().enumerate() {
                    processes.push(ProcessSample {
                        pid,
                        gpu_uuid: gpu.mig[mig].uuid.clone(),
                        util: None,
                        memory_used_bytes: memory_of(index),
                        sharing: Sharing::Mig,
                    });
                }
                continue;
            }
            for (index, &pid) in pids.iter().enumerate() {
                // Under MPS NVML books memory on the server, not the client.
                let own_memory = if gpu.sharing == Sharing::Mps { 0 } else { memory_of(index) };
                processes.push(ProcessSample {
                    pid,
                    gpu_uuid: gpu.uuid.clone(),
                    util: None,
                    memory_used_bytes: own_memory,
                    sharing: gpu.sharing,
                });
            }
            let booked_on: Option<Vec<u32>> = match (&process.nvml, gpu.sharing) {
                (_, Sharing::Mps) => gpu.mps_server_pid.map(|server| vec![server; pids.len()]),
                (NvmlView::Missing, _) => None,
                (NvmlView::ReportAs(target), _) => first_pid.get(target.as_str()).map(|pid| vec![*pid; pids.len()]),
                (NvmlView::Normal, _) => Some(pids.clone()),
            };
            let Some(booked_on) = booked_on else { continue };
            for tick in first_tick..=last_tick {
                let at_s = tick as f64 * SAMPLE_PERIOD_S;
                let per_pid = pids.len() as f64;
                for &pid in &booked_on {
                    let timestamp_us = ((at_s + RING_S) * 1e6) as u64;
                    let entry = booked[process.gpu].entry((pid, timestamp_us)).or_default();
                    entry.0 += sm_at(at_s) / per_pid;
                    entry.1 += schedule_at(&process.mem_bw_util, at_s) / per_pid;
                }
            }
        }
        self.sampled_until_s = now_s;
        for ((device, gpu), busy) in devices.iter_mut().zip(&self.scenario.gpus).zip(busy_tenants) {
            if gpu.sharing == Sharing::TimeSliced && busy > 1 {
                let overhead = gpu.switch_overhead_percent * (busy - 1) as f64;
                device.util_percent = device.util_percent.map(|util| (util + overhead).min(100.0));
            }
        }

        for (gpu_index, gpu) in self.scenario.gpus.iter().enumerate() {
            if gpu.sharing == Sharing::Mps {
                if let Some(server) = gpu.mps_server_pid {
                    processes.push(ProcessSample {
                        pid: server,
                        gpu_uuid: gpu.uuid.clone(),
                        util: None,
                        memory_used_bytes: devices[gpu_index].memory_used_bytes,
                        sharing: Sharing::Mps,
                    });
                }
            }
            let raw: Vec<RawSample> = booked[gpu_index]
                .iter()
                .map(|(&(pid, timestamp_us), &(sm, mem))| RawSample {
                    pid,
                    timestamp_us,
                    sm: sm.min(100.0).round() as u32,
                    mem: mem.min(100.0).round() as u32,
                    enc: 0,
                    dec: 0,
                })
                .collect();
            let folded = self.cursors[gpu_index].fold(&raw);
            for process in processes.iter_mut().filter(|p| p.gpu_uuid == gpu.uuid) {
                process.util = folded.get(&process.pid).copied();
            }
        }
        Ok(GpuPoll { devices, processes })
    }
}

fn device_template(gpu: &SimGpu) -> DeviceSample {
    let idle = (gpu.sharing != Sharing::Mig).then_some(0.0);
    DeviceSample {
        uuid: gpu.uuid.clone(),
        util_percent: idle,
        mem_bw_util_percent: idle,
        name: gpu.name.clone(),
        memory_total_bytes: gpu.memory_total_bytes,
        power_watts: Some(70.0),
        temperature_c: Some(35),
        compute_mode: Some("default".to_string()),
        sharing: gpu.sharing,
        mig_devices: gpu
            .mig
            .iter()
            .map(|mig| MigDeviceSample {
                uuid: mig.uuid.clone(),
                memory_used_bytes: 0,
                memory_total_bytes: mig.memory_total_bytes,
            })
            .collect(),
        ..DeviceSample::default()
    }
}

/// Every pid in `dir` and its descendants; a missing directory has none.
fn collect_cgroup_pids(dir: &Path, pids: &mut Vec<u32>) {
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(procs.lines().filter_map(|line| line.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                collect_cgroup_pids(&entry.path(), pids);
            }
        }
    }
}

impl GpuBackend for SimBackend {
    fn describe(&self) -> String {
        format!("sim:{}", self.scenario.name)
    }

    fn poll(&mut self) -> Result<GpuPoll, GpuError> {
        let now_s = self.epoch.elapsed().as_secs_f64();
        self.poll_at(now_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(yaml: &str, cgroup_root: &Path) -> SimBackend {
        // Built directly (not through `open`) so scenario time is whatever
        // the test passes to `poll_at`.
        let scenario = Scenario::parse(yaml, "test").unwrap();
        SimBackend {
            cursors: vec![SampleCursor::default(); scenario.gpus.len()],
            scenario,
            cgroup_root: cgroup_root.to_path_buf(),
            epoch: Instant::now(),
            sampled_until_s: 0.0,
            launch_load: launch_load::LaunchLoad::default(),
        }
    }

    fn by_pid(poll: &GpuPoll, pid: u32) -> &ProcessSample {
        poll.processes.iter().find(|p| p.pid == pid).unwrap_or_else(|| panic!("no pid {pid} in {poll:?}"))
    }

    /// A cgroup tenant reports every pid of its subtree and splits its load
    /// and memory across them; device utilization is the sum of true loads.
    #[test]
    fn cgroup_tenants_cover_their_subtree() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("kubepods.slice/pod-a");
        fs::create_dir_all(pod.join("ctr")).unwrap();
        fs::write(pod.join("cgroup.procs"), "").unwrap();
        fs::write(pod.join("ctr/cgroup.procs"), "11\n12\n").unwrap();
        let mut sim = backend(
            "name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 100}]\nprocesses:\n  - {cgroup: /kubepods.slice/pod-a, gpu: 0, memory_bytes: 5, sm_util: [{seconds: 1, percent: 40}]}\n  - {pid: 99, gpu: 0, sm_util: [{seconds: 1, percent: 10}]}\n",
            root.path(),
        );
        let poll = sim.poll_at(1.0).unwrap();
        let mut pids: Vec<u32> = poll.processes.iter().map(|p| p.pid).collect();
        pids.sort_unstable();
        assert_eq!(pids, vec![11, 12, 99]);
        assert_eq!(by_pid(&poll, 11).util.unwrap().sm_percent, 20.0);
        assert_eq!(by_pid(&poll, 11).util.unwrap().samples, 6);
        assert_eq!(poll.devices[0].util_percent, Some(50.0));
        assert_eq!(poll.devices[0].memory_used_bytes, 5);
        assert_eq!((by_pid(&poll, 11).memory_used_bytes, by_pid(&poll, 12).memory_used_bytes), (3, 2));
    }

    /// A time-sliced device with a switching overhead shows it per busy
    /// tenant beyond the first, and only while more than one is busy;
    /// NVML's per-process samples carry the tenants' own loads only.
    #[test]
    fn switching_overhead_shows_only_while_tenants_share() {
        let root = tempfile::tempdir().unwrap();
        let mut sim = backend(
            "name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1, switch_overhead_percent: 3}]\nprocesses:\n  - {pid: 7, gpu: 0, sm_util: [{seconds: 1, percent: 20}, {seconds: 1, percent: 0}]}\n  - {pid: 8, gpu: 0, sm_util: [{seconds: 2, percent: 10}]}\n  - {pid: 9, gpu: 0, sm_util: [{seconds: 2, percent: 5}]}\n",
            root.path(),
        );
        let poll = sim.poll_at(0.5).unwrap();
        assert_eq!(poll.devices[0].util_percent, Some(35.0 + 2.0 * 3.0), "three busy: two switches' worth");
        let poll = sim.poll_at(1.5).unwrap();
        assert_eq!(poll.devices[0].util_percent, Some(15.0 + 3.0), "7 idle: one extra tenant");
        assert_eq!(by_pid(&poll, 8).util.unwrap().sm_percent, 10.0);
    }

    /// Samples are consumed incrementally: a poll right after another has
    /// no new samples (like NVML's NotFound), the next full second does.
    #[test]
    fn samples_are_incremental() {
        let root = tempfile::tempdir().unwrap();
        let mut sim = backend(
            "name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1}]\nprocesses:\n  - {pid: 7, gpu: 0, sm_util: [{seconds: 1, percent: 30}, {seconds: 1, percent: 90}]}\n",
            root.path(),
        );
        assert_eq!(sim.poll_at(0.9).unwrap().processes[0].util.unwrap().sm_percent, 30.0);
        assert_eq!(sim.poll_at(0.95).unwrap().processes[0].util, None);
        assert_eq!(sim.poll_at(1.95).unwrap().processes[0].util.unwrap().sm_percent, 90.0);
    }

    /// NVML's measured distortions: a tenant with no samples, and a tenant
    /// whose load is booked on another tenant's pid.
    #[test]
    fn distortions() {
        let root = tempfile::tempdir().unwrap();
        let mut sim = backend(
            "name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1}]\nprocesses:\n  - {name: a, pid: 1, gpu: 0, sm_util: [{seconds: 1, percent: 25}], nvml: missing}\n  - {name: b, pid: 2, gpu: 0, sm_util: [{seconds: 1, percent: 20}], nvml: {report_as: c}}\n  - {name: c, pid: 3, gpu: 0, sm_util: [{seconds: 1, percent: 30}]}\n",
            root.path(),
        );
        let poll = sim.poll_at(2.0).unwrap();
        assert_eq!(by_pid(&poll, 1).util, None);
        assert_eq!(by_pid(&poll, 2).util, None);
        assert_eq!(by_pid(&poll, 3).util.unwrap().sm_percent, 50.0);
        assert_eq!(poll.devices[0].util_percent, Some(75.0));
    }

    /// MIG: memory per instance, no per-process SM %; MPS: everything is
    /// booked on the server pid, clients carry no sample and no memory.
    #[test]
    fn mig_and_mps() {
        let root = tempfile::tempdir().unwrap();
        let mut sim = backend(
            "name: t\ngpus:\n  - {uuid: G0, name: n, memory_total_bytes: 100, sharing: mig, mig: [{uuid: MIG-a, memory_total_bytes: 40}, {uuid: MIG-b, memory_total_bytes: 40}]}\n  - {uuid: G1, name: n, memory_total_bytes: 100, sharing: mps, mps_server_pid: 500}\nprocesses:\n  - {pid: 1, gpu: 0, mig: 1, memory_bytes: 7, sm_util: [{seconds: 1, percent: 60}]}\n  - {pid: 2, gpu: 1, memory_bytes: 3, sm_util: [{seconds: 1, percent: 20}]}\n  - {pid: 3, gpu: 1, memory_bytes: 4, sm_util: [{seconds: 1, percent: 30}]}\n",
            root.path(),
        );
        let poll = sim.poll_at(1.0).unwrap();
        let mig = by_pid(&poll, 1);
        assert_eq!((mig.gpu_uuid.as_str(), mig.util, mig.sharing), ("MIG-b", None, Sharing::Mig));
        assert_eq!(poll.devices[0].mig_devices[1].memory_used_bytes, 7);
        assert_eq!(poll.devices[0].util_percent, None, "NVML has no device utilization under MIG");
        assert_eq!(poll.devices[1].util_percent, Some(50.0));
        for client in [2, 3] {
            assert_eq!((by_pid(&poll, client).util, by_pid(&poll, client).memory_used_bytes), (None, 0));
        }
        let server = by_pid(&poll, 500);
        assert_eq!(server.util.unwrap().sm_percent, 50.0);
        assert_eq!(server.memory_used_bytes, 7);
    }

    /// A tenant with `launch_cost_us` loads the device by what its pids
    /// launched since the last poll, and NVML's samples carry that load;
    /// a scenario that asks for it without a counters folder, or with a
    /// schedule as well, is refused naming the field.
    #[test]
    fn launch_driven_tenants_load_the_device_by_their_launches() {
        let root = tempfile::tempdir().unwrap();
        let counters = tempfile::tempdir().unwrap();
        let yaml = format!(
            "name: t\ngpus: [{{uuid: G, name: n, memory_total_bytes: 1}}]\nlaunch_counters: {}\nprocesses:\n  - {{pid: 7, gpu: 0, launch_cost_us: 100}}\n  - {{pid: 8, gpu: 0, sm_util: [{{seconds: 1, percent: 10}}]}}\n",
            counters.path().display()
        );
        let mut sim = backend(&yaml, root.path());
        assert!(sim.poll_at(0.5).unwrap().processes.iter().all(|p| p.pid != 7), "no launches yet, no GPU process");
        let write = |count: u64| fs::write(counters.path().join("7"), count.to_ne_bytes()).unwrap();
        write(500);
        assert_eq!(sim.poll_at(1.0).unwrap().devices[0].util_percent, Some(10.0), "first sight adds nothing");
        // 3,000 launches x 100 µs over 1 s: 30 %.
        write(3_500);
        let poll = sim.poll_at(2.0).unwrap();
        assert_eq!(poll.devices[0].util_percent, Some(40.0));
        assert_eq!(by_pid(&poll, 7).util.unwrap().sm_percent, 30.0);
        write(3_500);
        assert_eq!(sim.poll_at(3.0).unwrap().devices[0].util_percent, Some(10.0), "idle when it stops launching");

        for (yaml, field) in [
            ("name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1}]\nprocesses: [{pid: 7, gpu: 0, launch_cost_us: 100}]\n", "launch_cost_us"),
            ("name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1}]\nlaunch_counters: /x\nprocesses: [{pid: 7, gpu: 0, launch_cost_us: 0}]\n", "launch_cost_us"),
            ("name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1}]\nlaunch_counters: /x\nprocesses: [{pid: 7, gpu: 0, launch_cost_us: 5, sm_util: [{seconds: 1, percent: 1}]}]\n", "launch_cost_us"),
            ("name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1}]\nprocesses: [{pid: 7, gpu: 0}]\n", "sm_util"),
        ] {
            let err = Scenario::parse(yaml, "test").unwrap_err().to_string();
            assert!(err.contains(&format!("processes[0].{field}")), "{err}");
        }
    }

    /// Faults fail polls (and re-opens) only inside their window.
    #[test]
    fn faults_fail_inside_their_window() {
        let root = tempfile::tempdir().unwrap();
        let yaml = "name: t\ngpus: [{uuid: G, name: n, memory_total_bytes: 1}]\nfaults:\n  - {kind: unknown, at_s: 1, for_s: 1}\n  - {kind: gpu_lost, at_s: 3, for_s: 1}\n  - {kind: library_missing, at_s: 0, for_s: 0.5}\n";
        let mut sim = backend(yaml, root.path());
        assert!(matches!(sim.poll_at(0.2), Err(GpuError::LibraryMissing { .. })));
        assert!(sim.poll_at(0.6).is_ok());
        assert!(matches!(sim.poll_at(1.5), Err(GpuError::Poll(_))));
        assert!(sim.poll_at(2.5).is_ok());
        assert!(matches!(sim.poll_at(3.5), Err(GpuError::GpuLost { .. })));
        let scenario = Scenario::parse(yaml, "test").unwrap();
        assert!(matches!(
            SimBackend::open(scenario, root.path().to_path_buf(), Instant::now()),
            Err(GpuError::LibraryMissing { .. })
        ));
    }
}
