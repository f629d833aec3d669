//! 10,000 pod create/delete cycles through the identity paths the agent
//! keeps state in: the cgroup tree (cgroup id -> pod), the collector's pod
//! table, the Kubernetes API metadata and the (pid, start time) cache, with
//! pids reused across pods. Nothing may be misattributed on the way, and
//! nothing may remain after the expiry window.
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podgpu_agent::pods::directory::Directory;
use podgpu_agent::pods::kube_api::KubePods;
use podgpu_agent::pods::pid_cache::PidCache;
use podgpu_agent::pods::PodMeta;
use podgpu_agent::proc::{write_fake_process, ProcFs};
use podgpu_agent::signals::collector::{Collector, CollectorConfig, Probes};
use podgpu_agent::status::SourceStatus;
use tokio::sync::watch;

const CYCLES: u64 = 10_000;
/// Few pids for many pods: every pid is reused 20 times.
const PIDS: u64 = 500;
const PID_EXPIRY: Duration = Duration::from_secs(60);

#[test]
fn ten_thousand_pod_cycles_leave_nothing_behind() {
    let cgroup_root = tempfile::tempdir().unwrap();
    let proc_root = tempfile::tempdir().unwrap();
    let (api, api_rx) =
        watch::channel(Arc::new(KubePods { status: SourceStatus::Ok { detail: "test".into() }, pods: HashMap::new() }));
    let config = CollectorConfig {
        tick: Duration::from_millis(10),
        rescan: Duration::ZERO,
        retention: Duration::from_secs(60),
        cgroup_root: cgroup_root.path().to_path_buf(),
        gpu_stale_after: Duration::from_secs(5),
        proc: ProcFs::new(std::path::Path::new("/nonexistent")),
        empty_pod_grace: Duration::from_secs(30),
    };
    let probes = Probes::disabled();
    let directory = Directory::new(HashMap::new(), Some(api_rx), None);
    let mut collector = Collector::new(config, directory, probes, Arc::new(AtomicU64::new(0)));
    let mut pids = PidCache::new(ProcFs::new(proc_root.path()), PID_EXPIRY);
    let container = "ab".repeat(32);
    let now = Instant::now();

    for cycle in 0..CYCLES {
        let uid = format!("00000000-0000-4000-8000-{cycle:012}");
        let pod_dir = cgroup_root.path().join(format!("kubepods/burstable/pod{uid}"));
        std::fs::create_dir_all(pod_dir.join(&container)).unwrap();
        let pid = 1000 + (cycle % PIDS) as u32;
        let cgroup = format!("0::/kubepods/burstable/pod{uid}/{container}\n");
        write_fake_process(proc_root.path(), pid, cycle, &cgroup).unwrap();
        let meta = PodMeta {
            uid: uid.clone(),
            namespace: Some("churn".into()),
            name: Some(format!("p{cycle}")),
            ..PodMeta::default()
        };
        api.send_replace(Arc::new(KubePods {
            status: SourceStatus::Ok { detail: "test".into() },
            pods: HashMap::from([(uid.clone(), meta)]),
        }));

        collector.tick();
        // The reused pid must resolve to this cycle's pod, never an older one.
        let owner = pids.resolve(pid, now).expect("live process resolves");
        assert_eq!(owner.pod_uid, uid, "cycle {cycle}: pid {pid} misattributed");
        if cycle % 1000 == 0 {
            let view = collector.view();
            assert_eq!(
                view.pods.len(),
                1,
                "cycle {cycle}: {:?}",
                view.pods.iter().map(|p| &p.meta.uid).collect::<Vec<_>>()
            );
            assert_eq!(view.pods[0].meta.name.as_deref(), Some(format!("p{cycle}").as_str()));
        }

        std::fs::remove_dir_all(&pod_dir).unwrap();
        std::fs::remove_dir_all(proc_root.path().join(pid.to_string())).unwrap();
        api.send_replace(Arc::new(KubePods {
            status: SourceStatus::Ok { detail: "test".into() },
            pods: HashMap::new(),
        }));
        collector.tick();
    }

    let view = collector.view();
    assert!(view.pods.is_empty(), "{} pods left after churn", view.pods.len());
    assert_eq!(view.health.api_pods, 0);
    assert!(pids.len() <= PIDS as usize, "the pid cache grew past the live pid set: {}", pids.len());
    pids.sweep(now);
    assert_eq!(pids.len(), 0, "exited processes survive a sweep");
    let stats = pids.stats();
    assert_eq!(stats.misses, CYCLES);
    assert_eq!(stats.reused, CYCLES - PIDS, "every reuse of a cached pid is detected");
}
