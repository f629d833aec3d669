//! Kernel identity from libcuda (the identity programs of
//! `agent-ebpf/src/launches.rs`): which kernel each `CUfunction` or
//! `CUkernel` handle of a process was created for, so that the same kernel
//! launched by two processes (two replicas of one model) is known to be
//! the same and shares one learned cost (`gpu::attribution`).
//!
//! A handle's identity is a hash of the kernel's name as the process asked
//! for it (`cuModuleGetFunction`, `cuLibraryGetKernel`; a function from
//! `cuKernelGetFunction` takes its kernel's) and of the image of the
//! module or library it was looked up in. Names repeat across images:
//! generated kernels (Triton's `triton_poi_fused_add_0`) in two models,
//! one kernel in two versions of a library. The image hash covers the
//! image's first `MODULE_IMAGE_HASH_BYTES` (a fatbin's header with its
//! sizes), or the path of a module loaded from a file. Where the module's
//! load was not seen (loaded before the probes attached) the handle takes
//! the one image its name is known with elsewhere (`resolve`), or is
//! known by its name alone.
//!
//! Handles created before the probes were attached (a process that loaded
//! its kernels before the agent started, or before its libcuda was found)
//! have no identity: their launches keep per-process costs.
use std::collections::HashMap;

use aya::maps::HashMap as BpfHashMap;
use aya::Ebpf;
use podgpu_common::{fnv1a, KernelHandle, KernelName, FNV_OFFSET, MODULE_IMAGE_HASH_BYTES};

use super::ProbeError;

/// (program, exported symbol) of the identity calls: each is probed at
/// entry and at return.
pub const IDENTITY_POINTS: [(&str, &str); 18] = [
    ("cu_load_image", "cuModuleLoadData"),
    ("load_return", "cuModuleLoadData"),
    ("cu_load_image", "cuModuleLoadDataEx"),
    ("load_return", "cuModuleLoadDataEx"),
    ("cu_load_image", "cuModuleLoadFatBinary"),
    ("load_return", "cuModuleLoadFatBinary"),
    ("cu_load_image", "cuLibraryLoadData"),
    ("load_return", "cuLibraryLoadData"),
    ("cu_load_path", "cuModuleLoad"),
    ("load_return", "cuModuleLoad"),
    ("cu_load_path", "cuLibraryLoadFromFile"),
    ("load_return", "cuLibraryLoadFromFile"),
    ("cu_module_get_function", "cuModuleGetFunction"),
    ("identity_return", "cuModuleGetFunction"),
    ("cu_library_get_kernel", "cuLibraryGetKernel"),
    ("identity_return", "cuLibraryGetKernel"),
    ("cu_kernel_get_function", "cuKernelGetFunction"),
    ("identity_return", "cuKernelGetFunction"),
];

/// The identity programs, loaded with the launch programs.
pub const IDENTITY_PROGRAMS: [&str; 7] = [
    "cu_load_image",
    "cu_load_path",
    "load_return",
    "cu_module_get_function",
    "cu_library_get_kernel",
    "cu_kernel_get_function",
    "identity_return",
];

const KERNEL_NAMES: &str = "KERNEL_NAMES";

/// The identity of a kernel name looked up in a module whose image hash
/// is `image` (0: not seen): FNV-1a over the name's bytes (up to the
/// first NUL), then over the image hash's when there is one; never 0.
pub fn identity_of(name: &[u8], image: u64) -> u64 {
    let name = name.split(|&b| b == 0).next().unwrap_or_default();
    with_image(fnv1a(FNV_OFFSET, name).max(1), image)
}

/// A name's identity (`identity_of(name, 0)`) with an image hash added.
fn with_image(name: u64, image: u64) -> u64 {
    if image == 0 {
        name
    } else {
        fnv1a(name, &image.to_le_bytes()).max(1)
    }
}

/// The image hash the probes give a module loaded from `image` (its first
/// `MODULE_IMAGE_HASH_BYTES`; a shorter slice stands for an image of which
/// only that much was mapped).
pub fn image_hash(image: &[u8]) -> u64 {
    fnv1a(FNV_OFFSET, &image[..image.len().min(MODULE_IMAGE_HASH_BYTES)]) | 1
}

/// The identity of every named handle, by (process, handle).
pub fn identities(ebpf: &Ebpf) -> Result<HashMap<(u32, u64), u64>, ProbeError> {
    let map = ebpf.map(KERNEL_NAMES).ok_or(ProbeError::MissingMap(KERNEL_NAMES))?;
    let names: BpfHashMap<_, KernelHandle, KernelName> =
        BpfHashMap::try_from(map).map_err(|source| ProbeError::Map { name: KERNEL_NAMES, source })?;
    let mut named = Vec::new();
    // An entry evicted or replaced while iterating is skipped, not fatal.
    for (handle, name) in names.iter().flatten() {
        if name.len == 0 {
            continue;
        }
        let len = (name.len as usize).min(name.name.len());
        named.push(((handle.tgid, handle.handle), identity_of(&name.name[..len], 0), name.image));
    }
    Ok(resolve(&named))
}

/// Identities from `(handle, name-only identity, image hash)`. A handle
/// whose module load was not seen (image 0: the process loaded it before
/// the agent attached, as every process does across an agent restart)
/// takes the image of the other handles of its name when they all agree
/// on one: otherwise a replica started after a restart and one started
/// before would never share a cost. Where images of the name differ, or
/// none is known, it is known by its name alone.
pub fn resolve(named: &[((u32, u64), u64, u64)]) -> HashMap<(u32, u64), u64> {
    let mut images: HashMap<u64, Option<u64>> = HashMap::new();
    for &(_, name, image) in named.iter().filter(|(_, _, image)| *image != 0) {
        images
            .entry(name)
            .and_modify(|seen| {
                if *seen != Some(image) {
                    *seen = None;
                }
            })
            .or_insert(Some(image));
    }
    named
        .iter()
        .map(|&(handle, name, image)| {
            let image = if image != 0 { image } else { images.get(&name).copied().flatten().unwrap_or(0) };
            (handle, with_image(name, image))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same name gives the same identity whatever follows its NUL;
    /// different names differ.
    #[test]
    fn identities_hash_the_name() {
        assert_eq!(identity_of(b"ampere_bf16_gemm\0garbage", 0), identity_of(b"ampere_bf16_gemm", 0));
        assert_ne!(identity_of(b"ampere_bf16_gemm", 0), identity_of(b"ampere_bf16_gemv", 0));
        assert_ne!(identity_of(b"", 0), 0);
    }

    /// A handle whose module load was not seen takes the one image its
    /// name is known with; with two images known, or none, the name alone.
    #[test]
    fn unseen_modules_take_the_one_image_their_name_has() {
        let (gemm, add) = (identity_of(b"gemm", 0), identity_of(b"triton_add", 0));
        let (model_a, model_b) = (image_hash(b"model a"), image_hash(b"model b"));
        let named = [
            ((1, 0x10), gemm, model_a),
            ((2, 0x20), gemm, 0),
            ((3, 0x30), add, model_a),
            ((4, 0x40), add, model_b),
            ((5, 0x50), add, 0),
            ((6, 0x60), identity_of(b"lonely", 0), 0),
        ];
        let resolved = resolve(&named);
        assert_eq!(resolved[&(1, 0x10)], identity_of(b"gemm", model_a));
        assert_eq!(resolved[&(2, 0x20)], identity_of(b"gemm", model_a), "the replica from before the restart");
        assert_eq!(resolved[&(3, 0x30)], identity_of(b"triton_add", model_a));
        assert_eq!(resolved[&(4, 0x40)], identity_of(b"triton_add", model_b));
        assert_eq!(resolved[&(5, 0x50)], identity_of(b"triton_add", 0), "two images: which is unknown");
        assert_eq!(resolved[&(6, 0x60)], identity_of(b"lonely", 0));
    }

    /// One name in two images is two kernels; in one image, one.
    #[test]
    fn identities_hash_the_image_too() {
        let (model_a, model_b) = (image_hash(b"fatbin of model a"), image_hash(b"fatbin of model b"));
        let name = b"triton_poi_fused_add_0";
        assert_eq!(identity_of(name, model_a), identity_of(name, model_a));
        assert_ne!(identity_of(name, model_a), identity_of(name, model_b));
        assert_ne!(identity_of(name, model_a), identity_of(name, 0));
        // Only the hashed prefix of an image counts.
        let long = [7u8; 1000];
        assert_eq!(image_hash(&long), image_hash(&long[..MODULE_IMAGE_HASH_BYTES]));
        assert_ne!(image_hash(&long), 0);
    }
}
