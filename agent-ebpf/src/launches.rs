//! Launch accounting on libcuda: uprobes on the kernel launch entry points
//! count launches per (process, entry point, function or graph handle,
//! grid, block) in a per-CPU hash map. Nothing is emitted per launch: user
//! space reads the sums (`agent/src/probes/launches.rs`).
//!
//! Arguments (x86-64 System V): `cuLaunchKernel(f, gx, gy, gz, bx, by, bz,
//! shmem, stream, params, extra)` has `bz` as its 7th argument, on the
//! stack just above the return address at entry; `cuLaunchKernelEx(const
//! CUlaunchConfig *config, CUfunction f, ...)` carries the sizes in
//! `config` (gridDimX/Y/Z, blockDimX/Y/Z: six u32 at offset 0);
//! `cuGraphLaunch(hGraphExec, hStream)` is counted per graph.
//!
//! Kernel identity: `cuModuleGetFunction(CUfunction *out, CUmodule,
//! const char *name)` and `cuLibraryGetKernel(CUkernel *out, CUlibrary,
//! const char *name)` are probed at entry (the out pointer and the name
//! pointer, per thread) and at return (on success, the handle written and
//! the name read into `KERNEL_NAMES`); `cuKernelGetFunction(CUfunction
//! *out, CUkernel)` gives the function its kernel's name. These are called
//! when a program loads its kernels, not per launch, and stay attached
//! while the launch probes are sampled. A name is only a name: generated
//! kernels (Triton's `triton_poi_fused_add_0`) repeat across models, so
//! the identity also carries the module image the name was looked up in.
//! The loads are probed the same way: `cuModuleLoadData`,
//! `cuModuleLoadDataEx`, `cuModuleLoadFatBinary` and `cuLibraryLoadData`
//! (out pointer, image pointer) hash the first `MODULE_IMAGE_HASH_BYTES`
//! of the image, `cuModuleLoad` and `cuLibraryLoadFromFile` the path, into
//! `MODULE_IMAGES` by (process, module or library handle).
//!
//! When user space samples (attaches for part of an interval), it also
//! sets `WINDOW` to the kernel-time span it means to count: attaching and
//! detaching eight entry points takes milliseconds, and a count over an
//! exact span is what the scaling needs.
//!
//! Completion spans (`spans`): a counted launch opens its process's span,
//! and waits (`cuCtxSynchronize`, `cuStreamSynchronize`, synchronous
//! device-to-host copies) close it.
#![no_std]
#![no_main]

mod spans;

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, bpf_probe_read_user_buf,
        bpf_probe_read_user_str_bytes, generated,
    },
    macros::{map, uprobe, uretprobe},
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use podgpu_common::{
    fnv1a, launch_kind, KernelHandle, KernelName, LaunchKey, LaunchSite, FNV_OFFSET, LAUNCH_SITE_WORDS,
    MAX_KERNEL_HANDLES, MAX_LAUNCH_KEYS, MAX_LAUNCH_SITES, MAX_MODULE_HANDLES, MODULE_IMAGE_HASH_BYTES,
};

/// Launches per key, per CPU.
#[map]
static LAUNCHES: PerCpuHashMap<LaunchKey, u64> = PerCpuHashMap::with_max_entries(MAX_LAUNCH_KEYS, 0);

/// [start, end) in `bpf_ktime_get_ns` time: launches outside it are not
/// counted. All zero (the default) counts everything.
#[map]
static WINDOW: Array<u64> = Array::with_max_entries(2, 0);

#[inline(always)]
fn in_window() -> bool {
    let end = WINDOW.get(1).copied().unwrap_or(0);
    if end == 0 {
        return true;
    }
    let start = WINDOW.get(0).copied().unwrap_or(0);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    now >= start && now < end
}

/// Counts a launch of `key` on `stream` (`None`: not known), and opens
/// the process's completion span. A key's first launch also keeps where
/// it was launched from.
#[inline(always)]
fn count(ctx: &ProbeContext, key: LaunchKey, stream: Option<u64>) {
    if !in_window() {
        return;
    }
    spans::launched(key.tgid, stream);
    match LAUNCHES.get_ptr_mut(&key) {
        // SAFETY: this CPU's value; only this CPU writes it.
        Some(launches) => unsafe { *launches += 1 },
        None => {
            // A full map drops the key (user space sees the map full),
            // and then every launch of it would come here: no site.
            if LAUNCHES.insert(&key, &1, 0).is_ok() {
                keep_site(ctx, &key);
            }
        }
    }
}

/// Where each handle was first launched from, per process.
#[map]
static LAUNCH_SITES: LruHashMap<KernelHandle, LaunchSite> = LruHashMap::with_max_entries(MAX_LAUNCH_SITES, 0);

/// Scratch for one launch site (too large for the program's stack).
#[map]
static SITE_SCRATCH: PerCpuArray<LaunchSite> = PerCpuArray::with_max_entries(1, 0);

/// Keeps the return address and the top of the user stack of a handle's
/// first launch in this process. Runs on a key's first launch only, not
/// per launch: user space names the site's code for handles the identity
/// probes never saw created (`agent/src/probes/launch_sites.rs`).
#[inline(always)]
fn keep_site(ctx: &ProbeContext, key: &LaunchKey) {
    let handle = KernelHandle { tgid: key.tgid, pad: 0, handle: key.function };
    // SAFETY: a lookup; the value is not kept.
    if unsafe { LAUNCH_SITES.get(&handle) }.is_some() {
        return;
    }
    let Some(site) = SITE_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's scratch; user memory through the checked helper.
    unsafe {
        (*site).block = key.block;
        (*site).pad = 0;
        #[cfg(not(bpf_target_arch = "aarch64"))]
        let (sp, return_address) = {
            // At entry the stack pointer holds the return address.
            let sp = (*ctx.regs).rsp;
            (sp, bpf_probe_read_user(sp as *const u64).unwrap_or(0))
        };
        #[cfg(bpf_target_arch = "aarch64")]
        let (sp, return_address) = ((*ctx.regs).sp, (*ctx.regs).regs[30]);
        (*site).return_address = return_address;
        let stack = core::slice::from_raw_parts_mut((*site).stack.as_mut_ptr() as *mut u8, 8 * LAUNCH_SITE_WORDS);
        if bpf_probe_read_user_buf(sp as *const u8, stack).is_err() {
            stack.fill(0);
        }
        let _ = LAUNCH_SITES.insert(&handle, &*site, 0);
    }
}

fn tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// `cuLaunchKernel`-shaped entry points: sizes in arguments 1-6, the 7th
/// on the stack.
#[inline(always)]
fn launch_with_sizes(ctx: &ProbeContext, kind: u32) -> u32 {
    let arg = |n: usize| ctx.arg::<u64>(n).unwrap_or(0) as u32;
    // x86-64 passes six arguments in registers: at entry the stack pointer
    // holds the return address, then argument 7. arm64 passes eight.
    // The stream is argument 9: on the stack after `bz` and `shmem`.
    #[cfg(not(bpf_target_arch = "aarch64"))]
    // SAFETY: the probed thread's stack through the checked helpers.
    let (block_z, stream) = unsafe {
        let sp = (*ctx.regs).rsp;
        (bpf_probe_read_user((sp + 8) as *const u32).unwrap_or(0), bpf_probe_read_user((sp + 24) as *const u64).ok())
    };
    #[cfg(bpf_target_arch = "aarch64")]
    let (block_z, stream) = (arg(6), None);
    count(
        ctx,
        LaunchKey {
            tgid: tgid(),
            kind,
            function: ctx.arg::<u64>(0).unwrap_or(0),
            grid: [arg(1), arg(2), arg(3)],
            block: [arg(4), arg(5), block_z],
        },
        stream,
    );
    0
}

#[uprobe]
pub fn cu_launch_kernel(ctx: ProbeContext) -> u32 {
    launch_with_sizes(&ctx, launch_kind::KERNEL)
}

#[uprobe]
pub fn cu_launch_cooperative_kernel(ctx: ProbeContext) -> u32 {
    launch_with_sizes(&ctx, launch_kind::COOPERATIVE)
}

#[uprobe]
pub fn cu_launch_kernel_ex(ctx: ProbeContext) -> u32 {
    let config = ctx.arg::<u64>(0).unwrap_or(0);
    // SAFETY: user memory through the checked helper.
    let sizes = unsafe { bpf_probe_read_user(config as *const [u32; 6]) }.unwrap_or([0; 6]);
    // `CUlaunchConfig::hStream`: after seven u32 (sizes, shared memory),
    // aligned to 8.
    // SAFETY: user memory through the checked helper.
    let stream = unsafe { bpf_probe_read_user((config + 32) as *const u64) }.ok();
    count(
        &ctx,
        LaunchKey {
            tgid: tgid(),
            kind: launch_kind::KERNEL_EX,
            function: ctx.arg::<u64>(1).unwrap_or(0),
            grid: [sizes[0], sizes[1], sizes[2]],
            block: [sizes[3], sizes[4], sizes[5]],
        },
        stream,
    );
    0
}

#[uprobe]
pub fn cu_graph_launch(ctx: ProbeContext) -> u32 {
    count(
        &ctx,
        LaunchKey {
            tgid: tgid(),
            kind: launch_kind::GRAPH,
            function: ctx.arg::<u64>(0).unwrap_or(0),
            ..LaunchKey::default()
        },
        ctx.arg::<u64>(1),
    );
    0
}

/// Name of each kernel handle, per process.
#[map]
static KERNEL_NAMES: LruHashMap<KernelHandle, KernelName> = LruHashMap::with_max_entries(MAX_KERNEL_HANDLES, 0);

/// Per thread inside an identity call: [out pointer, name pointer or
/// kernel handle, what the second is (`BY_NAME` or `BY_KERNEL`), the
/// module or library the name is looked up in].
/// LRU: a thread killed inside a call leaves its entry, which ages out
/// instead of filling the map.
#[map]
static PENDING_IDENTITY: LruHashMap<u64, [u64; 4]> = LruHashMap::with_max_entries(4096, 0);

/// Image hash of each module or library handle, per process (never 0).
#[map]
static MODULE_IMAGES: LruHashMap<KernelHandle, u64> = LruHashMap::with_max_entries(MAX_MODULE_HANDLES, 0);

/// Per thread inside a load call: [out pointer, image or path pointer,
/// which (`FROM_IMAGE` or `FROM_PATH`)].
#[map]
static PENDING_LOAD: LruHashMap<u64, [u64; 3]> = LruHashMap::with_max_entries(4096, 0);

/// Scratch for the bytes of one image (or path) being hashed.
#[map]
static IMAGE_SCRATCH: PerCpuArray<[u8; MODULE_IMAGE_HASH_BYTES]> = PerCpuArray::with_max_entries(1, 0);

const FROM_IMAGE: u64 = 0;
const FROM_PATH: u64 = 1;
/// Image bytes read when the full `MODULE_IMAGE_HASH_BYTES` are not all
/// mapped (an image at the end of its mapping): the fatbin header.
const SHORT_IMAGE_BYTES: u32 = 64;
/// `__fatBinC_Wrapper_t::magic`: what the CUDA runtime registers and
/// `cuModuleLoadFatBinary` takes is a wrapper `{ magic, version, data,
/// filename_or_fatbins }` whose `data` (at 8) points at the fatbin. Its
/// pointers differ per process (ASLR), so the fatbin is hashed instead.
const FATBINC_MAGIC: u32 = 0x4662_43b1;

/// Scratch for one name (too large for comfort on the 512-byte stack).
#[map]
static NAME_SCRATCH: PerCpuArray<KernelName> = PerCpuArray::with_max_entries(1, 0);

const BY_NAME: u64 = 0;
const BY_KERNEL: u64 = 1;

#[inline(always)]
fn remember_call(ctx: &ProbeContext, source_arg: usize, by: u64) -> u32 {
    let out = ctx.arg::<u64>(0).unwrap_or(0);
    let source = ctx.arg::<u64>(source_arg).unwrap_or(0);
    let module = if by == BY_NAME { ctx.arg::<u64>(1).unwrap_or(0) } else { 0 };
    // A full map loses this handle's identity, nothing else.
    let _ = PENDING_IDENTITY.insert(&bpf_get_current_pid_tgid(), &[out, source, by, module], 0);
    0
}

#[inline(always)]
fn remember_load(ctx: &ProbeContext, from: u64) -> u32 {
    let out = ctx.arg::<u64>(0).unwrap_or(0);
    let source = ctx.arg::<u64>(1).unwrap_or(0);
    // A full map loses this module's image hash: its kernels are then
    // known by name alone.
    let _ = PENDING_LOAD.insert(&bpf_get_current_pid_tgid(), &[out, source, from], 0);
    0
}

/// `cuModuleLoadData(CUmodule *, const void *image)` and its kin whose
/// second argument is the image (`Ex`, `FatBinary`, `cuLibraryLoadData`).
#[uprobe]
pub fn cu_load_image(ctx: ProbeContext) -> u32 {
    remember_load(&ctx, FROM_IMAGE)
}

/// `cuModuleLoad(CUmodule *, const char *path)`, `cuLibraryLoadFromFile`.
#[uprobe]
pub fn cu_load_path(ctx: ProbeContext) -> u32 {
    remember_load(&ctx, FROM_PATH)
}

/// The return of a load call: on success, the handle it wrote gets the
/// hash of its image (or path).
#[uretprobe]
pub fn load_return(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: a value of this map, copied before the entry is removed.
    let Some(&[out, source, from]) = (unsafe { PENDING_LOAD.get(&id) }) else {
        return 0;
    };
    let _ = PENDING_LOAD.remove(&id);
    let result: u64 = ctx.ret();
    if result as u32 != 0 {
        return 0;
    }
    // SAFETY: user memory through the checked helper.
    let Ok(handle) = (unsafe { bpf_probe_read_user(out as *const u64) }) else {
        return 0;
    };
    let Some(scratch) = IMAGE_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch slot, used by this program only.
    let scratch = unsafe { &mut *scratch };
    let len = if from == FROM_PATH {
        // SAFETY: user memory through the checked helper, bounded by the
        // buffer.
        match unsafe { bpf_probe_read_user_str_bytes(source as *const u8, scratch) } {
            Ok(read) => read.len(),
            Err(_) => 0,
        }
    } else {
        // SAFETY: user memory through the checked helper.
        let source = match unsafe { bpf_probe_read_user(source as *const u32) } {
            Ok(FATBINC_MAGIC) => unsafe { bpf_probe_read_user((source + 8) as *const u64) }.unwrap_or(source),
            _ => source,
        };
        let dst = scratch.as_mut_ptr() as *mut c_void;
        // SAFETY: reads of at most the scratch's size into it, from user
        // memory through the checked helper.
        unsafe {
            if generated::bpf_probe_read_user(dst, MODULE_IMAGE_HASH_BYTES as u32, source as *const c_void) == 0 {
                MODULE_IMAGE_HASH_BYTES
            } else if generated::bpf_probe_read_user(dst, SHORT_IMAGE_BYTES, source as *const c_void) == 0 {
                SHORT_IMAGE_BYTES as usize
            } else {
                0
            }
        }
    };
    if len == 0 || len > MODULE_IMAGE_HASH_BYTES {
        return 0;
    }
    let hash = fnv1a(FNV_OFFSET, &scratch[..len]) | 1;
    let key = KernelHandle { tgid: (id >> 32) as u32, pad: 0, handle };
    let _ = MODULE_IMAGES.insert(&key, &hash, 0);
    0
}

#[uprobe]
pub fn cu_module_get_function(ctx: ProbeContext) -> u32 {
    remember_call(&ctx, 2, BY_NAME)
}

#[uprobe]
pub fn cu_library_get_kernel(ctx: ProbeContext) -> u32 {
    remember_call(&ctx, 2, BY_NAME)
}

#[uprobe]
pub fn cu_kernel_get_function(ctx: ProbeContext) -> u32 {
    remember_call(&ctx, 1, BY_KERNEL)
}

/// The return of any identity call: on success, the handle it wrote gets
/// its name.
#[uretprobe]
pub fn identity_return(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: a value of this map, copied before the entry is removed.
    let Some(&[out, source, by, module]) = (unsafe { PENDING_IDENTITY.get(&id) }) else {
        return 0;
    };
    let _ = PENDING_IDENTITY.remove(&id);
    // CUresult: 0 is CUDA_SUCCESS; on failure `out` holds nothing.
    let result: u64 = ctx.ret();
    if result as u32 != 0 {
        return 0;
    }
    let tgid = (id >> 32) as u32;
    // SAFETY: user memory through the checked helper.
    let Ok(handle) = (unsafe { bpf_probe_read_user(out as *const u64) }) else {
        return 0;
    };
    let key = KernelHandle { tgid, pad: 0, handle };
    if by == BY_KERNEL {
        let kernel = KernelHandle { tgid, pad: 0, handle: source };
        // SAFETY: a value of this map, read by the helper into our copy.
        if let Some(name) = unsafe { KERNEL_NAMES.get(&kernel) } {
            let name = *name;
            let _ = KERNEL_NAMES.insert(&key, &name, 0);
        }
        return 0;
    }
    let Some(scratch) = NAME_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch slot, used by this program only.
    let scratch = unsafe { &mut *scratch };
    // SAFETY: user memory through the checked helper (bounded by the buffer).
    let len = match unsafe { bpf_probe_read_user_str_bytes(source as *const u8, &mut scratch.name) } {
        Ok(read) => read.len() as u32,
        Err(_) => return 0,
    };
    scratch.len = len;
    scratch.pad = 0;
    let module = KernelHandle { tgid, pad: 0, handle: module };
    // SAFETY: a value of this map, copied.
    scratch.image = unsafe { MODULE_IMAGES.get(&module) }.copied().unwrap_or(0);
    let _ = KERNEL_NAMES.insert(&key, scratch, 0);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
