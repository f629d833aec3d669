//! Pod metadata from the Kubernetes API (a fake API server speaking the
//! list/watch protocol kube-rs uses) and GPU devices from kubelet
//! pod-resources (a fake kubelet on a unix socket), joined onto a real
//! cgroup pod watched by the real agent: labels, owner workload, container
//! ids and GPU UUIDs reach /pods, /metrics and KEDA's selectors; kubelet
//! restarts and API updates/deletes are followed; the API server gone and
//! back degrades the source, keeps answers, and catches up; 10,000 API pod
//! churn cycles leave no stale entries.
use integration::require_root;
use std::time::{Duration, Instant};

use integration::fake_apiserver::{api_pod, FakeApiServer};
use integration::fake_kubelet::{FakeKubelet, PodAssignment};
use integration::http::get;
use integration::keda::{scaled_object, KedaClient};
use integration::pod::new_uid;
use integration::scene::{GpuSetup, Scene, TenantSpec};
use serde_json::Value;

const NODE: &str = "gpu-node-7";
const CONTAINER_ID: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

async fn json(scene: &Scene, path: &str) -> Value {
    serde_json::from_slice(&get(scene.agent.http, path).await.expect("agent answers").body).expect("JSON")
}

/// Polls `path` until `check` holds (returns the last body either way).
async fn eventually(scene: &Scene, path: &str, within: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let body = json(scene, path).await;
        if check(&body) || Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pod_row<'a>(pods: &'a Value, uid: &str) -> &'a Value {
    pods["pods"].as_array().and_then(|rows| rows.iter().find(|p| p["uid"] == uid)).unwrap_or(&Value::Null)
}

fn devices(namespace: &str, name: &str, ids: &[&str]) -> Vec<PodAssignment> {
    vec![(
        namespace.to_string(),
        name.to_string(),
        vec![
            ("vllm".to_string(), "nvidia.com/gpu".to_string(), ids.iter().map(|s| s.to_string()).collect()),
            // Not a GPU: must not show up as one.
            ("vllm".to_string(), "example.com/nic".to_string(), vec!["nic-0".to_string()]),
        ],
    )]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_and_kubelet_metadata_reach_every_signal() {
    require_root();
    let ns = format!("meta-{}", std::process::id());
    let uid = new_uid();
    let files = tempfile::tempdir().unwrap();
    let mut api = FakeApiServer::start().await.expect("fake API server");
    let labels = [("app", "llm-api"), ("team", "ml"), ("pod-template-hash", "5d8f")];
    api.apply(api_pod(&uid, &ns, "llm-0", NODE, &labels, &[("vllm", Some(CONTAINER_ID))]));
    // Another node's pod: the agent's field selector must keep it out.
    api.apply(api_pod(&new_uid(), &ns, "elsewhere", "other-node", &[("app", "llm-api")], &[]));
    let socket = files.path().join("kubelet.sock");
    let mut kubelet = FakeKubelet::start(&socket, devices(&ns, "llm-0", &["GPU-aaaa::1"]), true).expect("fake kubelet");

    let mut tenant = TenantSpec::new("llm-0", "llm-static");
    tenant.uid = Some(uid.clone());
    let args: Vec<String> = [
        "--kube-api",
        &format!("kubeconfig:{}", api.kubeconfig(files.path()).unwrap().display()),
        "--kubelet-socket",
        &socket.display().to_string(),
        "--kubelet-interval-s",
        "1",
        "--node-name",
        NODE,
        "--tick-ms",
        "100",
    ]
    .map(String::from)
    .to_vec();
    let scene = Scene::start(&ns, &[tenant], GpuSetup::Arg("none".into()), &args).expect("scene starts");

    let pods = eventually(&scene, "/pods", Duration::from_secs(10), |pods| {
        let row = pod_row(pods, &uid);
        row["labels"]["app"] == "llm-api" && row["containers"][0]["devices"][0] == "GPU-aaaa::1"
    })
    .await;
    let row = pod_row(&pods, &uid);
    assert_eq!(row["labels"]["team"], "ml", "API labels replace static ones: {row}");
    assert_eq!(row["owner"]["kind"], "Deployment", "{row}");
    assert_eq!(row["owner"]["name"], "llm-api", "{row}");
    assert_eq!(row["containers"][0]["name"], "vllm", "{row}");
    assert_eq!(row["containers"][0]["id"], CONTAINER_ID, "{row}");
    assert_eq!(row["containers"][0]["devices"], serde_json::json!(["GPU-aaaa::1"]), "only GPU resources: {row}");
    let queries = api.queries();
    assert!(!queries.is_empty());
    assert!(
        queries.iter().all(|q| q.get("fieldSelector").map(String::as_str) == Some(&*format!("spec.nodeName={NODE}"))),
        "every API query must select this node's pods: {queries:?}"
    );
    assert_eq!(json(&scene, "/healthz").await["api_pods"], 1, "the other node's pod leaked in");
    let (lists, gets) = kubelet.calls();
    // The devices above came from the kubelet: by the List at start, or by
    // a Get when the pod's cgroup was seen before that List answered (a
    // race between the two; either path is correct).
    assert!(lists >= 1, "List at start: {lists} lists, {gets} gets");

    let metrics = String::from_utf8(get(scene.agent.http, "/metrics").await.unwrap().body).unwrap();
    let expected = format!("namespace=\"{ns}\",pod=\"llm-0\",container=\"vllm\",pod_uid=\"{uid}\",gpu=\"GPU-aaaa\"");
    assert!(metrics.contains(&expected), "per-pod series lack container/gpu labels:\n{metrics}");

    // KEDA selects by the API's labels.
    let mut keda = KedaClient::connect(scene.agent.keda).await.unwrap();
    let trigger =
        scaled_object(&ns, "llm", &[("metric", "requests_in_flight"), ("target", "4"), ("podSelector", "team=ml")]);
    keda.poll(&trigger, "podgpu-requests-in-flight").await.expect("API labels select the pod");

    // Kubelet restarts with a new assignment: degraded while away, then
    // reconnected on the new socket.
    kubelet.stop();
    let health = eventually(&scene, "/healthz", Duration::from_secs(10), |h| h["kubelet"]["state"] == "degraded").await;
    assert_eq!(health["kubelet"]["state"], "degraded", "{health}");
    assert_eq!(
        pod_row(&json(&scene, "/pods").await, &uid)["containers"][0]["devices"][0],
        "GPU-aaaa::1",
        "last known devices kept"
    );
    kubelet.set_pods(devices(&ns, "llm-0", &["GPU-bbbb"]));
    kubelet.restart().expect("kubelet back");
    let pods = eventually(&scene, "/pods", Duration::from_secs(15), |pods| {
        pod_row(pods, &uid)["containers"][0]["devices"][0] == "GPU-bbbb"
    })
    .await;
    assert_eq!(pod_row(&pods, &uid)["containers"][0]["devices"][0], "GPU-bbbb", "no reconnect after kubelet restart");
    assert_eq!(json(&scene, "/healthz").await["kubelet"]["state"], "ok");

    // API updates and deletes are followed; a deleted API pod falls back
    // to the static file's metadata.
    api.apply(api_pod(&uid, &ns, "llm-0", NODE, &[("app", "llm-v2")], &[("vllm", Some(CONTAINER_ID))]));
    let pods =
        eventually(&scene, "/pods", Duration::from_secs(5), |p| pod_row(p, &uid)["labels"]["app"] == "llm-v2").await;
    assert_eq!(pod_row(&pods, &uid)["labels"]["app"], "llm-v2");
    api.delete(&uid);
    let pods =
        eventually(&scene, "/pods", Duration::from_secs(5), |p| pod_row(p, &uid)["labels"]["app"] == "llm-static")
            .await;
    assert_eq!(pod_row(&pods, &uid)["labels"]["app"], "llm-static");

    // The API server goes away: known pods keep their metadata, KEDA keeps
    // answering, and the source says it is degraded. What changed while it
    // was away arrives once it is back.
    api.stop();
    let health =
        eventually(&scene, "/healthz", Duration::from_secs(15), |h| h["kube_api"]["state"] == "degraded").await;
    assert_eq!(health["kube_api"]["state"], "degraded", "API server gone: {health}");
    let by_static = scaled_object(
        &ns,
        "llm",
        &[("metric", "requests_in_flight"), ("target", "4"), ("podSelector", "app=llm-static")],
    );
    keda.poll(&by_static, "podgpu-requests-in-flight").await.expect("answers while the API server is away");
    api.apply(api_pod(&uid, &ns, "llm-0", NODE, &[("app", "llm-v3")], &[("vllm", Some(CONTAINER_ID))]));
    api.restart().await.expect("API server back");
    let pods =
        eventually(&scene, "/pods", Duration::from_secs(40), |p| pod_row(p, &uid)["labels"]["app"] == "llm-v3").await;
    assert_eq!(pod_row(&pods, &uid)["labels"]["app"], "llm-v3", "a change made while the API server was away");
    let health = eventually(&scene, "/healthz", Duration::from_secs(10), |h| h["kube_api"]["state"] == "ok").await;
    assert_eq!(health["kube_api"]["state"], "ok", "{health}");
    api.delete(&uid);

    // Churn: 10,000 pods created and deleted through the watch leave the
    // agent holding none of them.
    let started = Instant::now();
    for cycle in 0..10_000 {
        let churn_uid = format!("00000000-0000-4000-8000-{cycle:012}");
        api.apply(api_pod(&churn_uid, &ns, &format!("churn-{cycle}"), NODE, &[("app", "churn")], &[]));
        api.delete(&churn_uid);
    }
    // Events arrive in order: once a sentinel added after the churn is
    // visible, every churn event has been applied.
    let sentinel = new_uid();
    api.apply(api_pod(&sentinel, &ns, "sentinel", NODE, &[("app", "sentinel")], &[]));
    let health = eventually(&scene, "/healthz", Duration::from_secs(30), |h| h["api_pods"] == 1).await;
    assert_eq!(health["api_pods"], 1, "stale API pods after churn (only the sentinel may remain): {health}");
    assert_eq!(health["kube_api"]["state"], "ok", "{health}");
    eprintln!("10,000 API pod create/delete cycles absorbed in {:?}", started.elapsed());
}
