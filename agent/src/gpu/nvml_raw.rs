//! NVML entry points nvml-wrapper 0.11 does not wrap: MIG instance
//! enumeration and the MPS client process list. Resolved from the same
//! library (dlopen returns the already-loaded copy); each symbol is
//! optional because older drivers lack them.
use std::ffi::c_uint;
use std::path::Path;

use libloading::Library;
use nvml_wrapper_sys::bindings::{nvmlDevice_t, nvmlProcessInfo_t, nvmlReturn_t};

const NVML_SUCCESS: nvmlReturn_t = 0;
const NVML_ERROR_INSUFFICIENT_SIZE: nvmlReturn_t = 7;

type MaxMigDeviceCount = unsafe extern "C" fn(nvmlDevice_t, *mut c_uint) -> nvmlReturn_t;
type MigDeviceHandleByIndex = unsafe extern "C" fn(nvmlDevice_t, c_uint, *mut nvmlDevice_t) -> nvmlReturn_t;
type MpsRunningProcesses = unsafe extern "C" fn(nvmlDevice_t, *mut c_uint, *mut nvmlProcessInfo_t) -> nvmlReturn_t;

/// The optional raw symbols.
pub struct RawNvml {
    // Keeps the library mapped while the function pointers are in use.
    _library: Library,
    max_mig_device_count: Option<MaxMigDeviceCount>,
    mig_device_handle_by_index: Option<MigDeviceHandleByIndex>,
    mps_running_processes: Option<MpsRunningProcesses>,
}

/// A client of the MPS server, as NVML lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MpsClient {
    /// Host pid of the client.
    pub pid: u32,
    /// Framebuffer bytes NVML attributes to it (0 when unavailable).
    pub memory_used_bytes: u64,
}

impl RawNvml {
    /// Resolves the symbols from `library`; `None` if it cannot be opened.
    pub fn open(library: &Path) -> Option<Self> {
        // SAFETY: loading NVML runs no initialisers beyond the library's own;
        // nvml-wrapper has already loaded the same file successfully.
        let library = unsafe { Library::new(library.as_os_str()) }.ok()?;
        // SAFETY: the types match NVML's C prototypes (nvml-wrapper-sys).
        let symbol = |name: &[u8]| unsafe { library.get::<*const ()>(name).ok().map(|s| *s) };
        let max = symbol(b"nvmlDeviceGetMaxMigDeviceCount\0");
        let by_index = symbol(b"nvmlDeviceGetMigDeviceHandleByIndex\0");
        let mps = symbol(b"nvmlDeviceGetMPSComputeRunningProcesses_v3\0");
        // SAFETY: transmuting a symbol address to its documented signature.
        unsafe {
            Some(Self {
                max_mig_device_count: max.map(|p| std::mem::transmute::<*const (), MaxMigDeviceCount>(p)),
                mig_device_handle_by_index: by_index
                    .map(|p| std::mem::transmute::<*const (), MigDeviceHandleByIndex>(p)),
                mps_running_processes: mps.map(|p| std::mem::transmute::<*const (), MpsRunningProcesses>(p)),
                _library: library,
            })
        }
    }

    /// Handles of the MIG instances of `device` (empty when MIG is off or
    /// unsupported).
    ///
    /// # Safety
    /// `device` must be a live handle from the same NVML instance.
    pub unsafe fn mig_devices(&self, device: nvmlDevice_t) -> Vec<nvmlDevice_t> {
        let (Some(max), Some(by_index)) = (self.max_mig_device_count, self.mig_device_handle_by_index) else {
            return Vec::new();
        };
        let mut count: c_uint = 0;
        if unsafe { max(device, &mut count) } != NVML_SUCCESS {
            return Vec::new();
        }
        (0..count)
            .filter_map(|index| {
                let mut handle: nvmlDevice_t = std::ptr::null_mut();
                // Unpopulated slots answer NOT_FOUND: skipped.
                (unsafe { by_index(device, index, &mut handle) } == NVML_SUCCESS && !handle.is_null()).then_some(handle)
            })
            .collect()
    }

    /// MPS client processes on `device` (empty without MPS).
    ///
    /// # Safety
    /// `device` must be a live handle from the same NVML instance.
    pub unsafe fn mps_clients(&self, device: nvmlDevice_t) -> Vec<MpsClient> {
        let Some(list) = self.mps_running_processes else { return Vec::new() };
        let mut count: c_uint = 0;
        let first = unsafe { list(device, &mut count, std::ptr::null_mut()) };
        if first == NVML_SUCCESS || first != NVML_ERROR_INSUFFICIENT_SIZE {
            return Vec::new();
        }
        // Processes may start between the two calls: leave headroom.
        let mut capacity = count + 8;
        // SAFETY: nvmlProcessInfo_t is plain old data.
        let mut infos: Vec<nvmlProcessInfo_t> = vec![unsafe { std::mem::zeroed() }; capacity as usize];
        if unsafe { list(device, &mut capacity, infos.as_mut_ptr()) } != NVML_SUCCESS {
            return Vec::new();
        }
        infos.truncate(capacity as usize);
        infos
            .iter()
            .map(|info| MpsClient {
                pid: info.pid,
                // NVML_VALUE_NOT_AVAILABLE is all ones.
                memory_used_bytes: if info.usedGpuMemory == u64::MAX { 0 } else { info.usedGpuMemory },
            })
            .collect()
    }
}
