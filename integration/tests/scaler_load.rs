//! The scaler under KEDA-shaped load over 100 node agents (stand-ins in
//! their own process, 20 pods each): 1,000 concurrent KEDA connections
//! polling GetMetrics + IsActive, and StreamIsActive streams held open.
//! Asserts no error, every stream alive to the end, and the scaler's
//! memory and file descriptors flat. `cargo xtask bench-scaler` runs the
//! same harness at full size and prints the figures (docs/reliability.md).
use std::time::Duration;

use integration::agent::AgentProcess;
use integration::http::get;
use integration::scale::{run_load, KedaLoad, NodeStandIns, ProcessSample};
use integration::workspace_binary;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_keda_clients_over_a_hundred_nodes() {
    let standins = NodeStandIns::start(100, 20, 200).expect("node stand-ins start");
    let args = ["--nodes", &standins.addresses.join(","), "--poll-ms", "500"].map(String::from);
    let scaler = AgentProcess::start_role(&workspace_binary("podgpu-agent"), "scaler", &args).expect("scaler starts");
    let covered = integration::eventually(Duration::from_secs(30), async || {
        let body = get(scaler.http, "/healthz").await.map(|r| r.body).unwrap_or_default();
        serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|v| v["nodes_covered"] == 100)
    })
    .await;
    assert!(covered, "the scaler covers the 100 stand-ins");

    let mut load = KedaLoad {
        clients: 1000,
        scaled_objects: 50,
        interval: Duration::from_secs(2),
        streams: 50,
        duration: Duration::from_secs(4),
    };
    // Warm-up: every trigger asked once; the first calls may wait for a poll.
    let warm = run_load(scaler.keda, &load).await.expect("warm-up load");
    assert_eq!(warm.errors, 0, "warm-up: {:?}", warm.first_error);
    let before = ProcessSample::of(scaler.pid()).unwrap();
    load.duration = Duration::from_secs(20);
    let report = run_load(scaler.keda, &load).await.expect("load runs");
    let cores = ProcessSample::of(scaler.pid()).unwrap().cores_since(&before);
    // The clients' connections close with the load; give the scaler a
    // moment to see them go before counting its descriptors.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = ProcessSample::of(scaler.pid()).unwrap();

    println!(
        "1,000 clients, 100 nodes: {} answers, {} errors, p50 {:.2} ms, p99 {:.2} ms; scaler {:.2} cores, \
         RSS {} -> {} KiB, fds {} -> {}; {} stream messages",
        report.answered,
        report.errors,
        report.latency_ms(0.5),
        report.latency_ms(0.99),
        cores,
        before.rss_kib,
        after.rss_kib,
        before.fds,
        after.fds,
        report.stream_messages
    );
    assert_eq!(report.errors, 0, "first error: {:?}", report.first_error);
    // Each client polls every 2 s for 20 s: about 10 polls of 2 calls. A
    // client whose answer is late skips a beat, so a busy 2-core machine
    // answers fewer; two thirds of the polls means the scaler kept up
    // (`bench-scaler` prints the figures).
    assert!(report.answered >= 1000 * 2 * 6, "{} answers", report.answered);
    assert_eq!(report.streams_broken, 0, "StreamIsActive streams end only with the load");
    assert!(report.stream_messages >= 50, "every stream got its first answer: {}", report.stream_messages);
    // The scaler timed every answer it gave, and nothing else.
    let timed: f64 = integration::http::metric_samples(scaler.http, "podgpu_scaler_answer_seconds_count")
        .await
        .unwrap()
        .iter()
        .map(|(_, value)| value)
        .sum();
    assert_eq!(timed, (warm.answered + report.answered) as f64, "answers timed inside the scaler");
    // Flat: connections were all open before the measurement.
    assert!(after.fds <= before.fds + 8, "fds {} -> {}", before.fds, after.fds);
    assert!(after.rss_kib <= before.rss_kib + 32 * 1024, "RSS {} -> {} KiB", before.rss_kib, after.rss_kib);
}
