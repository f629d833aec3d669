//! `/metrics` rendered from small views: families, labels, formats.
use super::*;
use crate::pods::PodMeta;
use crate::signals::history::{History, Point};
use crate::signals::view::{PodView, SourceStatus};

/// Per-pod lines carry escaped labels; degraded sources emit no pod
/// series but do show as down.
#[test]
fn renders_pods_and_self_metrics() {
    let mut view = NodeView::empty();
    view.health.probes = SourceStatus::Ok { detail: "ebpf".into() };
    let mut history = History::new(60.0);
    history.push(Point { at_s: 0.0, ..Point::default() });
    history.push(Point { at_s: 10.0, recv_bytes: 5000, gpu_launches: 42, ..Point::default() });
    view.pods.push(PodView {
        meta: PodMeta {
            uid: "u1".into(),
            namespace: Some("ns".into()),
            name: Some("we\"ird".into()),
            containers: vec![crate::pods::ContainerMeta {
                name: "vllm".into(),
                id: None,
                devices: vec!["GPU-1234::2".into()],
            }],
            ..PodMeta::default()
        },
        history,
        gpu: Default::default(),
        driver: crate::probes::driver::PodDriver {
            contexts: 2,
            vram_bytes: 1 << 30,
            calls_by_kind: [(crate::probes::driver::objects::CallKind::Context, 6)].into(),
            ..Default::default()
        },
        requests_in_flight: 0,
        requests: Default::default(),
        ports: Vec::new(),
        metadata_pending: false,
        requests_unwatched: false,
        engine: Default::default(),
    });
    let text = render_metrics(Arc::new(view.clone()), Format::Prometheus);
    // Driver signals only while the driver path serves.
    assert!(!text.contains("podgpu_pod_gpu_contexts{"), "{text}");
    assert!(!text.contains("podgpu_pod_gpu_launches_total{"), "{text}");
    view.health.driver = SourceStatus::Ok { detail: "ioctls".into() };
    view.health.launches = SourceStatus::Ok { detail: "uprobes".into() };
    let text = render_metrics(Arc::new(view.clone()), Format::Prometheus);
    let labels = "namespace=\"ns\",pod=\"we\\\"ird\",container=\"vllm\",pod_uid=\"u1\",gpu=\"GPU-1234\"";
    assert!(text.contains(&format!("podgpu_pod_gpu_contexts{{{labels}}} 2.0\n")), "{text}");
    assert!(text.contains(&format!("podgpu_pod_gpu_driver_mem_bytes{{{labels}}} 1073741824.0\n")), "{text}");
    assert!(text.contains(&format!("podgpu_pod_gpu_driver_calls_total{{{labels},kind=\"context\"}} 6\n")), "{text}");
    assert!(text.contains(&format!("podgpu_pod_gpu_launches_total{{{labels}}} 42\n")), "{text}");
    assert!(!text.contains("podgpu_gpu_launch_identity_share"), "no launches, no shares: {text}");
    let row = |kernel_from: Option<&'static str>, launches: u64| crate::probes::launches::LaunchRow {
        pid: 7,
        pod_uid: Some("u1".into()),
        entry: "kernel",
        function: "0x1f".into(),
        kernel: kernel_from.map(|_| "0xfeed".into()),
        kernel_from,
        grid: [1, 1, 1],
        block: [32, 1, 1],
        launches,
        threads: launches * 32,
    };
    view.launches = Arc::new(vec![row(Some("name"), 60), row(Some("site"), 30), row(None, 10)]);
    let text = render_metrics(Arc::new(view.clone()), Format::Prometheus);
    for (source, share) in [("name", "0.6"), ("site", "0.3"), ("none", "0.1")] {
        let line = format!("podgpu_gpu_launch_identity_share{{source=\"{source}\"}} {share}\n");
        assert!(text.contains(&line), "{line} in {text}");
    }
    assert!(
        text.contains(
            "podgpu_pod_socket_recv_bytes_rate{namespace=\"ns\",pod=\"we\\\"ird\",container=\"vllm\",pod_uid=\"u1\",gpu=\"GPU-1234\"} 500.0\n"
        ),
        "{text}"
    );
    assert!(!text.contains("podgpu_pod_gpu_sm_util{"), "{text}");
    assert!(text.contains("podgpu_agent_source_up{source=\"gpu\"} 0"));
    assert!(text.contains("podgpu_agent_tracked_pods 1.0\n"));
    assert!(text.contains("# TYPE podgpu_pod_requests_total counter\n"), "{text}");
    // OpenMetrics, when asked for: counters typed without `_total`,
    // samples with it, and the closing `# EOF`.
    let open = render_metrics(Arc::new(view.clone()), Format::OpenMetrics);
    assert!(open.contains("# TYPE podgpu_pod_requests counter\n"), "{open}");
    assert!(open.contains(&format!("podgpu_pod_requests_total{{{labels},outcome=\"started\"}} 0\n")), "{open}");
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert_eq!(
        Format::from_accept(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")),
        Format::OpenMetrics
    );
    assert_eq!(Format::from_accept(Some("text/plain")), Format::Prometheus);
    assert_eq!(Format::from_accept(None), Format::Prometheus);
}

/// TTFT and latency are histograms over the pod's ports, its probe
/// traffic left out: cumulative `le` buckets ending at `+Inf`, with sum
/// and count.
#[test]
fn request_timings_are_prometheus_histograms() {
    let mut view = NodeView::empty();
    view.health.probes = SourceStatus::Ok { detail: "ebpf".into() };
    let mut served = crate::signals::view::PortView::fixture(8000, 0, 0);
    for ms in [40, 80, 90] {
        served.ttft_total.record(ms * 1_000_000);
        served.latency_total.record(ms * 10_000_000);
    }
    let mut health_checks = crate::signals::view::PortView::fixture(8081, 0, 0);
    health_checks.probe = true;
    health_checks.ttft_total.record(1_000_000);
    view.pods.push(PodView {
        meta: PodMeta { uid: "u1".into(), namespace: Some("ns".into()), name: Some("p".into()), ..PodMeta::default() },
        history: History::new(60.0),
        gpu: Default::default(),
        driver: Default::default(),
        requests_in_flight: 0,
        requests: Default::default(),
        ports: vec![served, health_checks],
        metadata_pending: false,
        requests_unwatched: false,
        engine: Default::default(),
    });
    let text = render_metrics(Arc::new(view.clone()), Format::Prometheus);
    let labels = "namespace=\"ns\",pod=\"p\",container=\"\",pod_uid=\"u1\",gpu=\"\"";
    assert!(text.contains("# TYPE podgpu_pod_ttft_seconds histogram\n"), "{text}");
    for (le, count) in [("0.005", 0), ("0.05", 1), ("0.075", 1), ("0.1", 3), ("+Inf", 3)] {
        let line = format!("podgpu_pod_ttft_seconds_bucket{{{labels},le=\"{le}\"}} {count}\n");
        assert!(text.contains(&line), "{line} in {text}");
    }
    assert!(text.contains(&format!("podgpu_pod_ttft_seconds_count{{{labels}}} 3\n")), "{text}");
    assert!(text.contains(&format!("podgpu_pod_ttft_seconds_sum{{{labels}}} 0.21")), "{text}");
    // Latencies of 0.4, 0.8 and 0.9 s.
    for (le, count) in [("0.5", 1), ("0.75", 1), ("1", 3)] {
        let line = format!("podgpu_pod_request_latency_seconds_bucket{{{labels},le=\"{le}\"}} {count}\n");
        assert!(text.contains(&line), "{line} in {text}");
    }
}
