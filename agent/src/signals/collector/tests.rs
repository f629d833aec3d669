//! The collector against a temporary cgroup tree: pods follow cgroups, GPU
//! updates and staleness, in flight as the tracker's level.
use super::*;
use crate::signals::metric::Metric;

fn collector(root: &std::path::Path) -> Collector {
    let config = CollectorConfig {
        tick: Duration::from_millis(10),
        rescan: Duration::ZERO,
        retention: Duration::from_secs(60),
        cgroup_root: root.to_path_buf(),
        gpu_stale_after: Duration::from_millis(200),
        proc: crate::proc::ProcFs::new(std::path::Path::new("/nonexistent")),
        empty_pod_grace: Duration::from_secs(30),
    };
    let probes = Probes::disabled();
    Collector::new(config, Directory::default(), probes, Arc::new(AtomicU64::new(0)))
}

/// Pods appear with their cgroups and vanish with them; GPU updates set
/// per-pod use and an outage clears it and marks the source degraded.
#[test]
fn pods_follow_cgroups_and_gpu_updates() {
    let root = tempfile::tempdir().unwrap();
    let uid = "7d1c2a4e-0000-4000-8000-00000000000a";
    let pod_dir = root.path().join(format!("kubepods/pod{uid}"));
    std::fs::create_dir_all(&pod_dir).unwrap();
    let mut collector = collector(root.path());
    collector.tick();
    assert_eq!(collector.view().pods.len(), 1);

    collector.apply_gpu(GpuUpdate::Polled {
        backend: "sim:test".into(),
        devices: vec![],
        pods: [(uid.to_string(), PodGpu { sm_util_percent: 40.0, memory_used_bytes: 7, ..PodGpu::default() })].into(),
        attribution: vec![],
    });
    std::thread::sleep(Duration::from_millis(20));
    collector.tick();
    std::thread::sleep(Duration::from_millis(20));
    collector.tick();
    let view = collector.view();
    assert!(view.health.gpu.is_ok());
    let util = view.pods[0].value(Metric::GpuSmUtil, 0.02, &Default::default()).unwrap();
    assert!((util - 40.0).abs() < 1e-6, "{util}");
    assert_eq!(view.pods[0].value(Metric::GpuMemUsedBytes, 10.0, &Default::default()), Some(7.0));

    collector.apply_gpu(GpuUpdate::Unavailable { kind: "gpu_lost", reason: "GPU lost".into() });
    let view = collector.view();
    assert!(!view.health.gpu.is_ok());
    assert_eq!(view.health.gpu_errors["gpu_lost"], 1);
    assert_eq!(view.pods[0].gpu.memory_used_bytes, 0);

    std::fs::remove_dir(&pod_dir).unwrap();
    collector.tick();
    assert!(collector.view().pods.is_empty());
}

/// A pod whose cgroup appears after a GPU poll starts with that poll's
/// values, not with zeros until the next one.
#[test]
fn new_pod_starts_from_latest_gpu_poll() {
    let root = tempfile::tempdir().unwrap();
    let uid = "7d1c2a4e-0000-4000-8000-00000000000c";
    let mut collector = collector(root.path());
    collector.tick();
    collector.apply_gpu(GpuUpdate::Polled {
        backend: "sim".into(),
        devices: vec![],
        pods: [(uid.to_string(), PodGpu { sm_util_percent: 25.0, ..PodGpu::default() })].into(),
        attribution: vec![],
    });
    std::fs::create_dir_all(root.path().join(format!("kubepods/pod{uid}"))).unwrap();
    collector.tick();
    assert_eq!(collector.view().pods[0].gpu.sm_util_percent, 25.0);
}

/// A poller that stops reporting makes GPU signals unavailable after
/// the staleness limit instead of serving old values as fresh.
#[test]
fn silent_poller_turns_stale() {
    let root = tempfile::tempdir().unwrap();
    let mut collector = collector(root.path());
    collector.apply_gpu(GpuUpdate::Polled {
        backend: "sim".into(),
        devices: vec![],
        pods: HashMap::new(),
        attribution: vec![],
    });
    collector.tick();
    assert!(collector.view().health.gpu.is_ok());
    std::thread::sleep(Duration::from_millis(250));
    collector.tick();
    let view = collector.view();
    match &view.health.gpu {
        SourceStatus::Degraded { reason } => assert!(reason.contains("stale"), "{reason}"),
        other => panic!("expected stale, got {other:?}"),
    }
    assert!(view.health.gpu_sample_age_s.unwrap() >= 0.25);
}

/// In flight is the tracker's open-request level, not started minus
/// ended: starts whose endings were lost (a full channel, a container
/// restart) leave no residue once the tracker's level says 0.
#[test]
fn in_flight_is_the_trackers_level() {
    use crate::probes::requests::http1::Outcome;
    use std::os::unix::fs::MetadataExt;
    let root = tempfile::tempdir().unwrap();
    let uid = "7d1c2a4e-0000-4000-8000-00000000000d";
    let pod_dir = root.path().join(format!("kubepods/pod{uid}"));
    std::fs::create_dir_all(&pod_dir).unwrap();
    let cgroup_id = std::fs::metadata(&pod_dir).unwrap().ino();
    let mut collector = collector(root.path());
    collector.tick();
    for at_ns in 0..5 {
        let outcome = Outcome::Started { at_ns };
        collector.apply_probe(ProbeUpdate::Request(RequestEvent { cgroup_id, port: 8000, probe: false, outcome }));
    }
    let level = |collector: &Collector, open: u64| {
        let mut levels = collector.probes.reader.open_requests.lock().unwrap();
        levels.clear();
        if open > 0 {
            levels.insert((cgroup_id, 8000, false), open);
        }
    };
    level(&collector, 2);
    collector.tick();
    let view = collector.view();
    assert_eq!(view.pods[0].requests.started, 5);
    assert_eq!(view.pods[0].requests_in_flight, 2);
    assert_eq!(view.pods[0].ports[0].requests_in_flight, 2);
    level(&collector, 0);
    collector.tick();
    assert_eq!(collector.view().pods[0].requests_in_flight, 0, "no residue of the 3 lost endings");
}

/// Launch counts that stop arriving turn the launch source degraded, so
/// `gpu_launch_rate` is unavailable rather than read as "no launches".
#[test]
fn stale_launch_counts_are_unavailable() {
    let root = tempfile::tempdir().unwrap();
    let mut collector = collector(root.path());
    collector.probes.launch_status = SourceStatus::Ok { detail: "test".into() };
    let fresh = Instant::now();
    collector.probes.launches.lock().unwrap().published = Some(fresh);
    collector.tick();
    assert!(collector.view().health.launches.is_ok());
    collector.probes.launches.lock().unwrap().published = fresh.checked_sub(LAUNCHES_STALE_AFTER * 2);
    collector.tick();
    let view = collector.view();
    match &view.health.launches {
        SourceStatus::Degraded { reason } => assert!(reason.contains("stale"), "{reason}"),
        other => panic!("expected stale, got {other:?}"),
    }
    assert!(!view.source_status(Metric::GpuLaunchRate).is_ok());
}

/// Driver state that stops arriving (a stuck reader) turns the driver
/// source degraded: `gpu_contexts` and `gpu_driver_mem_bytes` answer
/// unavailable instead of holding their last level.
#[test]
fn stale_driver_state_is_unavailable() {
    let root = tempfile::tempdir().unwrap();
    let mut collector = collector(root.path());
    collector.probes.driver_status = SourceStatus::Ok { detail: "test".into() };
    let fresh = Instant::now();
    collector.probes.driver.lock().unwrap().published = Some(fresh);
    collector.tick();
    assert!(collector.view().source_status(Metric::GpuContexts).is_ok());
    collector.probes.driver.lock().unwrap().published = fresh.checked_sub(READER_STALE_AFTER * 2);
    collector.tick();
    let view = collector.view();
    match &view.health.driver {
        SourceStatus::Degraded { reason } => assert!(reason.contains("stale"), "{reason}"),
        other => panic!("expected stale, got {other:?}"),
    }
    for metric in [Metric::GpuContexts, Metric::GpuDriverMemBytes, Metric::GpuDriverCallRate] {
        assert!(!view.source_status(metric).is_ok(), "{metric}");
    }
}
