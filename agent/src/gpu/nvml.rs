//! Real GPUs through NVML (nvml-wrapper), with the library loaded at runtime
//! so the agent starts on nodes without one.
//!
//! Per device: utilization, memory, power, temperature, compute mode, MIG
//! mode and instances. Per process: memory from the compute and graphics
//! process lists (per MIG instance when MIG is on), utilization from the
//! process-sample ring consumed incrementally through a `SampleCursor`
//! (NotFound only means "no new samples"), and MPS clients from the MPS
//! list. NVML gives no per-process SM % under MIG, and under MPS it books
//! all samples on the MPS server: those processes carry their sharing mode
//! so later stages do not mistake "no sample" for "idle".
use std::collections::HashMap;
use std::path::Path;

use nvml_wrapper::enum_wrappers::device::{ComputeMode, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use super::nvml_raw::RawNvml;
use super::samples::{RawSample, SampleCursor};
use super::{DeviceSample, GpuBackend, GpuError, GpuPoll, MigDeviceSample, ProcessSample, Sharing};

/// Library name tried when `--gpu nvml` gives no path.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// An initialised NVML and the per-device sample cursors.
pub struct NvmlBackend {
    nvml: Nvml,
    raw: Option<RawNvml>,
    driver_version: String,
    /// Sample cursor per device UUID (indices can change across reloads).
    cursors: HashMap<String, SampleCursor>,
}

impl NvmlBackend {
    /// Loads the library at `library` and initialises NVML.
    pub fn open(library: &Path) -> Result<Self, GpuError> {
        let missing = |reason: String| GpuError::LibraryMissing { path: library.display().to_string(), reason };
        let nvml = Nvml::builder().lib_path(library.as_os_str()).init().map_err(|err| match err {
            NvmlError::LibloadingError(reason) => missing(reason.to_string()),
            NvmlError::LibraryNotFound => missing(err.to_string()),
            other => GpuError::Init(other.to_string()),
        })?;
        let driver_version = nvml.sys_driver_version().unwrap_or_else(|_| "unknown".to_string());
        Ok(Self { nvml, raw: RawNvml::open(library), driver_version, cursors: HashMap::new() })
    }
}

fn poll_error(device: &str, err: NvmlError) -> GpuError {
    match err {
        NvmlError::GpuLost => GpuError::GpuLost { uuid: device.to_string(), reason: err.to_string() },
        other => GpuError::Poll(format!("{device}: {other}")),
    }
}

/// NotSupported and friends mean "this device has no such reading".
fn optional<T>(result: Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(NvmlError::NotSupported | NvmlError::NotFound | NvmlError::FunctionNotFound) => Ok(None),
        Err(err) => Err(err),
    }
}

fn bytes(memory: &UsedGpuMemory) -> u64 {
    match memory {
        UsedGpuMemory::Used(bytes) => *bytes,
        UsedGpuMemory::Unavailable => 0,
    }
}

fn compute_mode_name(mode: ComputeMode) -> &'static str {
    match mode {
        ComputeMode::Default => "default",
        ComputeMode::ExclusiveThread => "exclusive_thread",
        ComputeMode::Prohibited => "prohibited",
        ComputeMode::ExclusiveProcess => "exclusive_process",
    }
}

/// Memory per pid from the compute and graphics lists (a process in both
/// is counted once, with the larger figure).
fn process_memory(device: &Device<'_>) -> Result<HashMap<u32, u64>, NvmlError> {
    let mut memory: HashMap<u32, u64> = HashMap::new();
    let compute = device.running_compute_processes()?;
    let graphics = optional(device.running_graphics_processes())?.unwrap_or_default();
    for process in compute.iter().chain(graphics.iter()) {
        let entry = memory.entry(process.pid).or_default();
        *entry = (*entry).max(bytes(&process.used_gpu_memory));
    }
    Ok(memory)
}

impl NvmlBackend {
    fn poll_device(&mut self, index: u32, poll: &mut GpuPoll) -> Result<(), GpuError> {
        let label = format!("GPU {index}");
        let device = self.nvml.device_by_index(index).map_err(|err| poll_error(&label, err))?;
        let uuid = device.uuid().map_err(|err| poll_error(&label, err))?;
        let fail = |err| poll_error(&uuid, err);
        // NotSupported on a MIG-enabled GPU: the poll goes on without it
        // (memory and per-instance processes still come).
        let util = optional(device.utilization_rates()).map_err(fail)?;
        let memory = device.memory_info().map_err(fail)?;
        let mig_on = optional(device.mig_mode()).map_err(fail)?.is_some_and(|mode| mode.current == 1);
        let mut sample = DeviceSample {
            uuid: uuid.clone(),
            name: device.name().unwrap_or_default(),
            util_percent: util.as_ref().map(|u| f64::from(u.gpu)),
            mem_bw_util_percent: util.as_ref().map(|u| f64::from(u.memory)),
            memory_used_bytes: memory.used,
            memory_total_bytes: memory.total,
            power_watts: optional(device.power_usage()).map_err(fail)?.map(|mw| f64::from(mw) / 1000.0),
            temperature_c: optional(device.temperature(TemperatureSensor::Gpu)).map_err(fail)?,
            compute_mode: optional(device.compute_mode()).map_err(fail)?.map(|m| compute_mode_name(m).to_string()),
            sharing: if mig_on { Sharing::Mig } else { Sharing::TimeSliced },
            mig_devices: Vec::new(),
            attribution_confidence: None,
            sharing_overhead_percent: None,
        };

        if mig_on {
            // Memory per process per instance; NVML has no per-process SM %
            // under MIG, so util stays None with the sharing mode saying why.
            // SAFETY: the handle comes from this NVML instance and lives as
            // long as `device`.
            let handles = match &self.raw {
                Some(raw) => unsafe { raw.mig_devices(device.handle()) },
                None => Vec::new(),
            };
            for handle in handles {
                // SAFETY: a live MIG handle from the same NVML instance.
                let mig = unsafe { Device::new(handle, &self.nvml) };
                let mig_uuid = mig.uuid().map_err(fail)?;
                let mig_memory = mig.memory_info().map_err(fail)?;
                for (pid, used) in process_memory(&mig).map_err(fail)? {
                    poll.processes.push(ProcessSample {
                        pid,
                        gpu_uuid: mig_uuid.clone(),
                        util: None,
                        memory_used_bytes: used,
                        sharing: Sharing::Mig,
                    });
                }
                sample.mig_devices.push(MigDeviceSample {
                    uuid: mig_uuid,
                    memory_used_bytes: mig_memory.used,
                    memory_total_bytes: mig_memory.total,
                });
            }
            poll.devices.push(sample);
            return Ok(());
        }

        // SAFETY: a live handle from this NVML instance.
        let mps_clients = match &self.raw {
            Some(raw) => unsafe { raw.mps_clients(device.handle()) },
            None => Vec::new(),
        };
        if !mps_clients.is_empty() {
            sample.sharing = Sharing::Mps;
        }
        let mut processes: HashMap<u32, ProcessSample> = process_memory(&device)
            .map_err(fail)?
            .into_iter()
            .map(|(pid, used)| {
                (
                    pid,
                    ProcessSample {
                        pid,
                        gpu_uuid: uuid.clone(),
                        util: None,
                        memory_used_bytes: used,
                        sharing: sample.sharing,
                    },
                )
            })
            .collect();
        for client in &mps_clients {
            processes.entry(client.pid).or_insert_with(|| ProcessSample {
                pid: client.pid,
                gpu_uuid: uuid.clone(),
                util: None,
                memory_used_bytes: client.memory_used_bytes,
                sharing: Sharing::Mps,
            });
        }
        let cursor = self.cursors.entry(uuid.clone()).or_default();
        let raw_samples: Vec<RawSample> = match device.process_utilization_stats(cursor.last_seen_us()) {
            Ok(samples) => samples
                .iter()
                .map(|s| RawSample {
                    pid: s.pid,
                    timestamp_us: s.timestamp,
                    sm: s.sm_util,
                    mem: s.mem_util,
                    enc: s.enc_util,
                    dec: s.dec_util,
                })
                .collect(),
            Err(NvmlError::NotFound) => Vec::new(),
            Err(err) => return Err(fail(err)),
        };
        for (pid, util) in cursor.fold(&raw_samples) {
            processes
                .entry(pid)
                .or_insert_with(|| ProcessSample {
                    pid,
                    gpu_uuid: uuid.clone(),
                    util: None,
                    memory_used_bytes: 0,
                    sharing: sample.sharing,
                })
                .util = Some(util);
        }
        poll.processes.extend(processes.into_values());
        poll.devices.push(sample);
        Ok(())
    }
}

impl GpuBackend for NvmlBackend {
    fn describe(&self) -> String {
        format!("nvml (driver {})", self.driver_version)
    }

    fn poll(&mut self) -> Result<GpuPoll, GpuError> {
        let count = self.nvml.device_count().map_err(|err| poll_error("device count", err))?;
        let mut poll = GpuPoll::default();
        for index in 0..count {
            self.poll_device(index, &mut poll)?;
        }
        Ok(poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node without the NVML library gets a typed "library missing" error
    /// (the agent turns it into a "no GPU" state), never a panic.
    #[test]
    fn missing_library_is_a_clear_state() {
        let result = NvmlBackend::open(Path::new("/nonexistent/libnvidia-ml.so.1"));
        match result {
            Err(GpuError::LibraryMissing { path, .. }) => assert!(path.contains("/nonexistent/")),
            Err(other) => panic!("expected LibraryMissing, got {other}"),
            Ok(_) => panic!("NVML loaded from a path that does not exist"),
        }
    }

    /// "Not supported" readings become absent values; real errors stay errors.
    #[test]
    fn optional_readings() {
        assert_eq!(optional::<u32>(Err(NvmlError::NotSupported)).unwrap(), None);
        assert_eq!(optional(Ok(5)).unwrap(), Some(5));
        assert!(matches!(optional::<u32>(Err(NvmlError::GpuLost)), Err(NvmlError::GpuLost)));
    }
}
