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
//! When user space samples (attaches for part of an interval), it also
//! sets `WINDOW` to the kernel-time span it means to count: attaching and
//! detaching eight entry points takes milliseconds, and a count over an
//! exact span is what the scaling needs.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe},
    maps::{Array, PerCpuHashMap},
    programs::ProbeContext,
};
use podgpu_common::{launch_kind, LaunchKey, MAX_LAUNCH_KEYS};

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

#[inline(always)]
fn count(key: LaunchKey) {
    if !in_window() {
        return;
    }
    match LAUNCHES.get_ptr_mut(&key) {
        // SAFETY: this CPU's value; only this CPU writes it.
        Some(launches) => unsafe { *launches += 1 },
        None => {
            // A full map drops the key (user space sees the map full).
            let _ = LAUNCHES.insert(&key, &1, 0);
        }
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
    #[cfg(not(bpf_target_arch = "aarch64"))]
    // SAFETY: the probed thread's stack through the checked helper.
    let block_z = unsafe { bpf_probe_read_user(((*ctx.regs).rsp + 8) as *const u32) }.unwrap_or(0);
    #[cfg(bpf_target_arch = "aarch64")]
    let block_z = arg(6);
    count(LaunchKey {
        tgid: tgid(),
        kind,
        function: ctx.arg::<u64>(0).unwrap_or(0),
        grid: [arg(1), arg(2), arg(3)],
        block: [arg(4), arg(5), block_z],
    });
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
    count(LaunchKey {
        tgid: tgid(),
        kind: launch_kind::KERNEL_EX,
        function: ctx.arg::<u64>(1).unwrap_or(0),
        grid: [sizes[0], sizes[1], sizes[2]],
        block: [sizes[3], sizes[4], sizes[5]],
    });
    0
}

#[uprobe]
pub fn cu_graph_launch(ctx: ProbeContext) -> u32 {
    count(LaunchKey {
        tgid: tgid(),
        kind: launch_kind::GRAPH,
        function: ctx.arg::<u64>(0).unwrap_or(0),
        ..LaunchKey::default()
    });
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
