//! `cargo xtask bench-pods`: what pod identity costs. Per lookup: a pid
//! through the (pid, start time) cache (hit and miss, on the real /proc),
//! parsing a cgroup path, and cgroup id -> pod (what every probe event
//! pays); per rescan: walking a cgroup tree of N pods. Memory: bytes per
//! tracked pod in the cgroup map, the collector (at full retention, idle
//! pods) and the pid cache, counted by the allocator.
use std::collections::HashMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podgpu_agent::pods::cgroup_path;
use podgpu_agent::pods::cgroup_tree;
use podgpu_agent::pods::directory::Directory;
use podgpu_agent::pods::pid_cache::PidCache;
use podgpu_agent::proc::{write_fake_process, ProcFs};
use podgpu_agent::signals::collector::{Collector, CollectorConfig, Probes};

use crate::alloc_count::allocated_bytes;

/// Options of `bench-pods`.
#[derive(clap::Args)]
pub struct Options {
    /// Pods in the simulated node.
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Lookups per timed loop.
    #[arg(long, default_value_t = 200_000)]
    lookups: usize,
}

fn per_op(elapsed: Duration, ops: usize) -> f64 {
    elapsed.as_nanos() as f64 / ops as f64
}

/// Runs the benchmark and prints its figures.
pub fn run(options: Options) -> anyhow::Result<()> {
    let pods = options.pods;
    let container = "ab".repeat(32);
    let uid = |n: usize| format!("00000000-0000-4000-8000-{n:012}");
    let path = |n: usize| {
        format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container}.scope",
            uid(n).replace('-', "_")
        )
    };

    println!("pod identity benchmark: {pods} pods, {} lookups per figure", options.lookups);

    // pid -> pod on the real /proc: this process and its threads' pids are
    // live, so hits pay exactly what a GPU process lookup pays.
    let own_pid = std::process::id();
    let mut cache = PidCache::new(ProcFs::new(&PathBuf::from("/proc")), Duration::from_secs(60));
    let now = Instant::now();
    cache.resolve(own_pid, now);
    let started = Instant::now();
    for _ in 0..options.lookups {
        black_box(cache.resolve(black_box(own_pid), now));
    }
    let hit_ns = per_op(started.elapsed(), options.lookups);
    let misses = options.lookups / 20;
    let started = Instant::now();
    for _ in 0..misses {
        let mut cold = PidCache::new(ProcFs::new(&PathBuf::from("/proc")), Duration::from_secs(60));
        black_box(cold.resolve(black_box(own_pid), now));
    }
    let miss_ns = per_op(started.elapsed(), misses);
    println!("pid -> pod, cache hit (reads /proc/PID/stat): {hit_ns:.0} ns/lookup");
    println!("pid -> pod, cache miss (stat + cgroup + parse): {miss_ns:.0} ns/lookup");

    let paths: Vec<String> = (0..pods).map(path).collect();
    let started = Instant::now();
    for i in 0..options.lookups {
        black_box(cgroup_path::parse(black_box(&paths[i % pods])));
    }
    println!("cgroup path -> pod (parse): {:.0} ns/parse", per_op(started.elapsed(), options.lookups));

    // A cgroup tree of `pods` pods, each with one container.
    let root = tempfile::Builder::new().prefix("podgpu-bench-pods-").tempdir()?;
    for p in &paths {
        std::fs::create_dir_all(root.path().join(p.trim_start_matches('/')))?;
    }
    let before = allocated_bytes();
    let tree = cgroup_tree::scan(root.path());
    let tree_bytes = allocated_bytes().saturating_sub(before);
    let ids: Vec<u64> = tree.keys().copied().collect();
    let started = Instant::now();
    for i in 0..options.lookups {
        black_box(tree.get(black_box(&ids[i % ids.len()])));
    }
    println!("cgroup id -> pod (per probe event): {:.1} ns/lookup", per_op(started.elapsed(), options.lookups));
    let rescans = 20;
    let started = Instant::now();
    for _ in 0..rescans {
        black_box(cgroup_tree::scan(root.path()));
    }
    println!(
        "cgroup tree rescan ({} cgroups): {:.2} ms/rescan",
        tree.len(),
        started.elapsed().as_secs_f64() * 1000.0 / rescans as f64
    );
    println!(
        "memory, cgroup map: {:.0} B/pod ({} entries: pod + container cgroups)",
        tree_bytes as f64 / pods as f64,
        tree.len()
    );
    drop(tree);

    // The collector at full retention (65 s of 250 ms ticks), idle pods.
    let before = allocated_bytes();
    let config = CollectorConfig {
        tick: Duration::from_millis(250),
        rescan: Duration::from_secs(3600),
        retention: Duration::from_secs(65),
        cgroup_root: root.path().to_path_buf(),
        gpu_stale_after: Duration::from_secs(5),
        proc: podgpu_agent::proc::ProcFs::new(std::path::Path::new("/nonexistent")),
        empty_pod_grace: Duration::from_secs(30),
    };
    let probes = Probes::disabled();
    let mut collector = Collector::new(config, Directory::default(), probes, Arc::new(AtomicU64::new(0)));
    for _ in 0..=(65 * 4) {
        collector.tick();
    }
    let collector_bytes = allocated_bytes().saturating_sub(before);
    println!(
        "memory, collector (history of 261 points, empty latency windows): {:.0} B/pod",
        collector_bytes as f64 / pods as f64
    );
    drop(collector);

    // The pid cache, one process per pod.
    let proc_root = tempfile::Builder::new().prefix("podgpu-bench-proc-").tempdir()?;
    let mut owners: HashMap<u32, String> = HashMap::new();
    for (n, p) in paths.iter().enumerate() {
        let pid = 10_000 + n as u32;
        write_fake_process(proc_root.path(), pid, n as u64, &format!("0::{p}\n"))?;
        owners.insert(pid, uid(n));
    }
    let before = allocated_bytes();
    let mut cache = PidCache::new(ProcFs::new(proc_root.path()), Duration::from_secs(60));
    for (pid, owner) in &owners {
        let resolved = cache.resolve(*pid, now).map(|o| o.pod_uid.clone());
        anyhow::ensure!(resolved.as_ref() == Some(owner), "pid {pid} resolved to {resolved:?}, not {owner}");
    }
    let cache_bytes = allocated_bytes().saturating_sub(before);
    println!("memory, pid cache: {:.0} B/process", cache_bytes as f64 / pods as f64);
    Ok(())
}
