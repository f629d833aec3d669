//! Real GPUs through NVML (nvml-wrapper), with the library loaded at runtime
//! so the agent starts on nodes without one.
//!
//! Process utilization is consumed incrementally: NVML keeps a ring of
//! samples per device and returns those newer than a timestamp we pass, so
//! each device remembers the newest timestamp it has seen. NotFound only
//! means "no new samples" (idle processes have none).
use std::collections::HashMap;
use std::path::Path;

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use super::{DeviceSample, GpuBackend, GpuError, GpuPoll, ProcessSample};

/// Library name tried when `--gpu nvml` gives no path.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// An initialised NVML and the per-device sample cursors.
pub struct NvmlBackend {
    nvml: Nvml,
    driver_version: String,
    /// Newest process-sample timestamp (µs) seen per device index.
    last_sample_us: HashMap<u32, u64>,
}

impl NvmlBackend {
    /// Loads the library at `library` and initialises NVML.
    pub fn open(library: &Path) -> Result<Self, GpuError> {
        let nvml = Nvml::builder().lib_path(library.as_os_str()).init().map_err(|err| match err {
            NvmlError::LibloadingError(reason) => {
                GpuError::LibraryMissing { path: library.display().to_string(), reason: reason.to_string() }
            }
            NvmlError::LibraryNotFound => {
                GpuError::LibraryMissing { path: library.display().to_string(), reason: err.to_string() }
            }
            other => GpuError::Init(other.to_string()),
        })?;
        let driver_version = nvml.sys_driver_version().unwrap_or_else(|_| "unknown".to_string());
        Ok(Self { nvml, driver_version, last_sample_us: HashMap::new() })
    }
}

fn poll_error(device: &str, err: NvmlError) -> GpuError {
    match err {
        NvmlError::GpuLost => GpuError::GpuLost { uuid: device.to_string(), reason: err.to_string() },
        other => GpuError::Poll(format!("{device}: {other}")),
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
            let label = format!("GPU {index}");
            let device = self.nvml.device_by_index(index).map_err(|err| poll_error(&label, err))?;
            let uuid = device.uuid().map_err(|err| poll_error(&label, err))?;
            let name = device.name().unwrap_or_default();
            let util = device.utilization_rates().map_err(|err| poll_error(&uuid, err))?;
            let memory = device.memory_info().map_err(|err| poll_error(&uuid, err))?;
            // Temperature and power are health signals for a later issue;
            // reading them here proves the device answers.
            let _ = device.temperature(TemperatureSensor::Gpu);

            let mut processes: HashMap<u32, ProcessSample> = HashMap::new();
            for process in device.running_compute_processes().map_err(|err| poll_error(&uuid, err))? {
                let bytes = match process.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => bytes,
                    UsedGpuMemory::Unavailable => 0,
                };
                processes.insert(
                    process.pid,
                    ProcessSample {
                        pid: process.pid,
                        gpu_uuid: uuid.clone(),
                        sm_util_percent: None,
                        memory_used_bytes: bytes,
                    },
                );
            }
            let since = self.last_sample_us.get(&index).copied();
            match device.process_utilization_stats(since) {
                Ok(samples) => {
                    // Several samples per pid may be new; the mean of the new
                    // ones is this interval's value.
                    let mut sums: HashMap<u32, (f64, u32)> = HashMap::new();
                    for sample in samples.iter().filter(|s| since.is_none_or(|t| s.timestamp > t)) {
                        let entry = sums.entry(sample.pid).or_default();
                        entry.0 += f64::from(sample.sm_util);
                        entry.1 += 1;
                        let newest = self.last_sample_us.entry(index).or_default();
                        *newest = (*newest).max(sample.timestamp);
                    }
                    for (pid, (sum, n)) in sums {
                        processes
                            .entry(pid)
                            .or_insert_with(|| ProcessSample {
                                pid,
                                gpu_uuid: uuid.clone(),
                                sm_util_percent: None,
                                memory_used_bytes: 0,
                            })
                            .sm_util_percent = Some(sum / f64::from(n));
                    }
                }
                Err(NvmlError::NotFound) => {}
                Err(err) => return Err(poll_error(&uuid, err)),
            }
            poll.processes.extend(processes.into_values());
            poll.devices.push(DeviceSample {
                uuid,
                name,
                util_percent: f64::from(util.gpu),
                memory_used_bytes: memory.used,
                memory_total_bytes: memory.total,
            });
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
}
