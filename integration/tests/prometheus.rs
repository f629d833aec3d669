//! A real Prometheus (Debian's `prometheus`) scrapes a running agent: the
//! exposition passes `promtool check metrics`, a PromQL query returns the
//! expected pod's values, and every expression of the Grafana dashboard
//! (`chart/dashboards/podgpu.json`) returns data (as root: the agent loads
//! its eBPF probes).
use integration::require_root;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration::http::get;
use integration::scene::{GpuSetup, Scene, TenantSpec};

/// A Prometheus server that is killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: podgpu\n    static_configs:\n      - targets: ['{target}']\n"),
        )
        .unwrap();
        // A free loopback port (released just before Prometheus binds it).
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus (apt-get install prometheus; scripts/setup.sh does)");
        Self { child, addr, _dir: dir }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'_' { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// The GPU of the scene's simulated scenario.
const SIM_GPU: &str = "GPU-00000000-0000-4000-8000-5ce4e0000000";

/// The exposition is valid for promtool, and Prometheus scrapes it: the
/// tenant pod's simulated GPU load and request counts come back over PromQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_agent() {
    require_root();
    let ns = format!("prom-{}", std::process::id());
    let mut tenant = TenantSpec::new("scraped-0", "scraped");
    tenant.gpu_steps = vec![(1.0, 37.0)];
    // An engine beside it, for the dashboard's engine panels.
    let engine = TenantSpec {
        server: integration::stacks::Stack::Engine(podgpu_agent::engines::catalog::EngineKind::Vllm),
        ..TenantSpec::new("engine-0", "engine")
    };
    let args = ["--tick-ms", "100", "--engine-interval-ms", "200"].map(String::from);
    let scene = Scene::start(&ns, &[tenant, engine], GpuSetup::SimPerTenant, &args).expect("scene");
    let mut client = integration::http::Client::connect(scene.tenant("scraped-0").addr).await.unwrap();
    for _ in 0..5 {
        assert_eq!(client.request("/", b"x").await.unwrap().status, 200);
    }
    let engine_addr = scene.tenant("engine-0").addr;
    integration::engine_standin::set(engine_addr, 2, 1, 0.4).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    integration::engine_standin::observe(engine_addr, 0.2, 10).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let metrics = get(scene.agent.http, "/metrics").await.unwrap().body;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    promtool.stdin.take().unwrap().write_all(&metrics).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let prometheus = Prometheus::start(scene.agent.http);
    let query = |promql: String| {
        let addr = prometheus.addr;
        async move {
            let reply = get(addr, &format!("/api/v1/query?query={}", encode(&promql))).await.ok()?;
            let body: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
            body["data"]["result"][0]["value"][1].as_str()?.parse::<f64>().ok()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let gpu = loop {
        // `gpu`: the simulated GPU the pod's processes run on (no kubelet here).
        let series = format!("podgpu_pod_gpu_sm_util{{namespace=\"{ns}\",pod=\"scraped-0\",gpu=\"{SIM_GPU}\"}}");
        if let Some(value) = query(series).await {
            break value;
        }
        assert!(Instant::now() < deadline, "Prometheus never returned the pod's series");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!((gpu - 37.0).abs() < 1.0, "gpu_sm_util over PromQL: {gpu}");
    let completed =
        query(format!("podgpu_pod_requests_total{{namespace=\"{ns}\",pod=\"scraped-0\",outcome=\"completed\"}}"))
            .await
            .expect("request counter series");
    assert_eq!(completed, 5.0);
    let up = query("up{job=\"podgpu\"}".to_string()).await.expect("up series");
    assert_eq!(up, 1.0);
    let scrape_s = query("podgpu_agent_scrape_duration_seconds".to_string()).await.expect("scrape cost series");
    assert!(scrape_s > 0.0 && scrape_s < 1.0, "scrape cost {scrape_s} s");

    // Every expression of the Grafana dashboard returns data from this
    // Prometheus (its variables set to this test's namespace).
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../chart/dashboards/podgpu.json")).unwrap(),
    )
    .unwrap();
    let expressions: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| target["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(expressions.len() >= 15, "{expressions:?}");
    let series = |promql: String| {
        let addr = prometheus.addr;
        async move {
            let reply = get(addr, &format!("/api/v1/query?query={}", encode(&promql))).await.ok()?;
            let body: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
            (body["status"] == "success").then(|| body["data"]["result"].as_array().map_or(0, Vec::len))
        }
    };
    for expression in expressions {
        let promql = expression
            .replace("$namespace", &ns)
            .replace("$pod", ".*")
            .replace("$job", "podgpu")
            .replace("$__rate_interval", "30s");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match series(promql.clone()).await {
                Some(found) if found > 0 => break,
                outcome => assert!(Instant::now() < deadline, "no data for dashboard query {promql}: {outcome:?}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A Deployment-wide p90 TTFT from the pods' histograms, as a platform
/// team's dashboard computes it (`histogram_quantile` over the summed
/// bucket rates), agrees with what KEDA gets for the same pods and window
/// within the bucket's width. Two pods of one app answer streams with
/// different first-byte delays (60 ms and 240 ms, about a quarter of the
/// requests on the slow one), so the p90 is the slow pod's: an average
/// of the two pods' own p90s (150 ms) would be wrong, which is why the
/// buckets are exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deployment_p90_from_the_histograms_matches_keda() {
    require_root();
    let ns = format!("promh-{}", std::process::id());
    let specs = [TenantSpec::new("served-0", "served"), TenantSpec::new("served-1", "served")];
    let scene = Scene::start(&ns, &specs, GpuSetup::Arg("none".into()), &["--tick-ms", "100"].map(String::from))
        .expect("scene");
    let prometheus = Prometheus::start(scene.agent.http);
    let (fast, slow) = (scene.tenant("served-0").addr, scene.tenant("served-1").addr);
    let load = Duration::from_secs(14);
    let fast_load = tokio::spawn(integration::http::drive_streams(
        fast,
        integration::http::StreamSpec { first_ms: 60, chunks: 2, chunk_ms: 10 },
        2,
        load,
    ));
    let slow_load = tokio::spawn(integration::http::drive_streams(
        slow,
        integration::http::StreamSpec { first_ms: 240, chunks: 2, chunk_ms: 10 },
        2,
        load,
    ));
    // Asked near the end of the load, over the same 10 s window.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let mut keda = integration::keda::KedaClient::connect(scene.agent.keda).await.unwrap();
    let trigger = integration::keda::scaled_object(
        &ns,
        "served",
        &[("metric", "ttft_ms_p90"), ("target", "100"), ("podSelector", "app=served"), ("window", "10s")],
    );
    // Percentiles come back times the pod count (AverageValue semantics).
    let keda_p90_s = keda.poll(&trigger, "ttft").await.expect("ttft_ms_p90").value / 2.0 / 1000.0;
    let promql = format!(
        "histogram_quantile(0.9, sum by (le) (rate(podgpu_pod_ttft_seconds_bucket{{namespace=\"{ns}\"}}[10s])))"
    );
    let reply = get(prometheus.addr, &format!("/api/v1/query?query={}", encode(&promql))).await.expect("query");
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let prometheus_p90_s: f64 =
        body["data"]["result"][0]["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    let (fast_streams, slow_streams) = (fast_load.await.unwrap(), slow_load.await.unwrap());
    println!("KEDA p90 {keda_p90_s:.3} s, Prometheus p90 {prometheus_p90_s:.3} s ({fast_streams} fast, {slow_streams} slow streams)");
    assert!((0.2..=0.3).contains(&keda_p90_s), "KEDA's p90 is the slow pod's first byte: {keda_p90_s}");
    // 0.24 s lies in the (0.2, 0.3] bucket; histogram_quantile interpolates in it.
    assert!((0.2..=0.3).contains(&prometheus_p90_s), "{body}");
    assert!(
        (prometheus_p90_s - keda_p90_s).abs() <= 0.1,
        "within the bucket's width: {prometheus_p90_s} vs {keda_p90_s}"
    );
}
