//! Kernel identity from libcuda (the identity programs of
//! `agent-ebpf/src/launches.rs`): which kernel each `CUfunction` or
//! `CUkernel` handle of a process was created for, so that the same kernel
//! launched by two processes (two replicas of one model) is known to be
//! the same and shares one learned cost (`gpu::attribution`).
//!
//! A handle's identity is a hash of the kernel's name as the process asked
//! for it (`cuModuleGetFunction`, `cuLibraryGetKernel`; a function from
//! `cuKernelGetFunction` takes its kernel's). The names of kernels in
//! different modules may repeat (two versions of one library in two
//! images); the module image is not hashed yet.
//!
//! Handles created before the probes were attached (a process that loaded
//! its kernels before the agent started, or before its libcuda was found)
//! have no identity: their launches keep per-process costs.
use std::collections::HashMap;

use aya::maps::HashMap as BpfHashMap;
use aya::Ebpf;
use podgpu_common::{KernelHandle, KernelName};

use super::ProbeError;

/// (program, exported symbol) of the identity calls: each is probed at
/// entry and at return.
pub const IDENTITY_POINTS: [(&str, &str); 6] = [
    ("cu_module_get_function", "cuModuleGetFunction"),
    ("identity_return", "cuModuleGetFunction"),
    ("cu_library_get_kernel", "cuLibraryGetKernel"),
    ("identity_return", "cuLibraryGetKernel"),
    ("cu_kernel_get_function", "cuKernelGetFunction"),
    ("identity_return", "cuKernelGetFunction"),
];

/// The identity programs, loaded with the launch programs.
pub const IDENTITY_PROGRAMS: [&str; 4] =
    ["cu_module_get_function", "cu_library_get_kernel", "cu_kernel_get_function", "identity_return"];

const KERNEL_NAMES: &str = "KERNEL_NAMES";

/// The identity of a kernel name: FNV-1a over its bytes (up to the first
/// NUL), never 0.
pub fn identity_of(name: &[u8]) -> u64 {
    let name = name.split(|&b| b == 0).next().unwrap_or_default();
    let hash = name
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3));
    hash.max(1)
}

/// The identity of every named handle, by (process, handle).
pub fn identities(ebpf: &Ebpf) -> Result<HashMap<(u32, u64), u64>, ProbeError> {
    let map = ebpf.map(KERNEL_NAMES).ok_or(ProbeError::MissingMap(KERNEL_NAMES))?;
    let names: BpfHashMap<_, KernelHandle, KernelName> =
        BpfHashMap::try_from(map).map_err(|source| ProbeError::Map { name: KERNEL_NAMES, source })?;
    let mut out = HashMap::new();
    // An entry evicted or replaced while iterating is skipped, not fatal.
    for (handle, name) in names.iter().flatten() {
        if name.len == 0 {
            continue;
        }
        let len = (name.len as usize).min(name.name.len());
        out.insert((handle.tgid, handle.handle), identity_of(&name.name[..len]));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same name gives the same identity whatever follows its NUL;
    /// different names differ.
    #[test]
    fn identities_hash_the_name() {
        assert_eq!(identity_of(b"ampere_bf16_gemm\0garbage"), identity_of(b"ampere_bf16_gemm"));
        assert_ne!(identity_of(b"ampere_bf16_gemm"), identity_of(b"ampere_bf16_gemv"));
        assert_ne!(identity_of(b""), 0);
    }
}
