//! A Kubernetes API server reduced to what the agent's pod watcher uses:
//! `GET /api/v1/pods` as a list and as a watch (JSON lines), with
//! resource versions and the `spec.nodeName` field selector applied as
//! the real server applies it. Tests add, change and delete pods, read
//! which queries the agent made, and take the server away and back.
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Store {
    resource_version: u64,
    pods: BTreeMap<String, Value>,
    /// (resource version, event type, object): the watch history.
    events: Vec<(u64, &'static str, Value)>,
    queries: Vec<HashMap<String, String>>,
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    live: broadcast::Sender<(u64, &'static str, Value)>,
}

/// A running fake API server.
pub struct FakeApiServer {
    /// Where it listens (plain HTTP on loopback).
    pub addr: SocketAddr,
    shared: Shared,
    stop: CancellationToken,
}

/// A pod object as the API returns it.
pub fn api_pod(
    uid: &str,
    namespace: &str,
    name: &str,
    node: &str,
    labels: &[(&str, &str)],
    containers: &[(&str, Option<&str>)],
) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let hash = labels.get("pod-template-hash").copied().unwrap_or("0");
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "uid": uid, "namespace": namespace, "name": name, "labels": labels,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{}-{hash}", labels.get("app").copied().unwrap_or(name)),
                "uid": "00000000-0000-0000-0000-000000000001", "controller": true
            }]
        },
        "spec": {
            "nodeName": node,
            "containers": containers.iter().map(|(c, _)| json!({"name": c})).collect::<Vec<_>>()
        },
        "status": {
            "containerStatuses": containers.iter().filter_map(|(c, id)| id.map(|id| json!({
                "name": c, "containerID": format!("containerd://{id}"), "image": "img", "imageID": "",
                "ready": true, "restartCount": 0
            }))).collect::<Vec<_>>()
        }
    })
}

fn node_of(pod: &Value) -> &str {
    pod["spec"]["nodeName"].as_str().unwrap_or("")
}

/// `spec.nodeName=X` -> Some("X"); other selectors are not supported.
fn node_selector(query: &HashMap<String, String>) -> Option<String> {
    query.get("fieldSelector").and_then(|s| s.strip_prefix("spec.nodeName=")).map(str::to_string)
}

impl FakeApiServer {
    /// Starts serving on a kernel-chosen loopback port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (live, _) = broadcast::channel(65_536);
        let shared = Shared { store: Arc::default(), live };
        let stop = CancellationToken::new();
        Self::serve(listener, shared.clone(), stop.clone());
        Ok(Self { addr, shared, stop })
    }

    fn serve(listener: tokio::net::TcpListener, shared: Shared, stop: CancellationToken) {
        let app = Router::new().route("/api/v1/pods", get(pods)).with_state((shared, stop.clone()));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
    }

    /// The API server goes away: the listener closes and open watches end.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Serves again on the same address, with everything that changed
    /// while it was away.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop.cancel();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                // The old listener may take a moment to close.
                Err(err) if std::time::Instant::now() > deadline => return Err(err),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        };
        self.stop = CancellationToken::new();
        Self::serve(listener, self.shared.clone(), self.stop.clone());
        Ok(())
    }

    /// A kubeconfig pointing at this server, written into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join("kubeconfig.yaml");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: agent\n  user:\n    token: test-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Creates or updates a pod (ADDED or MODIFIED).
    pub fn apply(&self, mut pod: Value) {
        let mut store = self.shared.store.lock().unwrap();
        store.resource_version += 1;
        let version = store.resource_version;
        pod["metadata"]["resourceVersion"] = json!(version.to_string());
        let uid = pod["metadata"]["uid"].as_str().unwrap_or_default().to_string();
        let kind = if store.pods.insert(uid, pod.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        store.events.push((version, kind, pod.clone()));
        let _ = self.shared.live.send((version, kind, pod));
    }

    /// Deletes a pod (DELETED).
    pub fn delete(&self, uid: &str) {
        let mut store = self.shared.store.lock().unwrap();
        let Some(mut pod) = store.pods.remove(uid) else { return };
        store.resource_version += 1;
        let version = store.resource_version;
        pod["metadata"]["resourceVersion"] = json!(version.to_string());
        store.events.push((version, "DELETED", pod.clone()));
        let _ = self.shared.live.send((version, "DELETED", pod));
    }

    /// Every query string the agent sent, in order.
    pub fn queries(&self) -> Vec<HashMap<String, String>> {
        self.shared.store.lock().unwrap().queries.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn pods(
    State((shared, stop)): State<(Shared, CancellationToken)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let node = node_selector(&query);
    let wanted = move |pod: &Value| node.as_deref().is_none_or(|n| node_of(pod) == n);
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let mut store = shared.store.lock().unwrap();
    store.queries.push(query.clone());
    if !watching {
        let items: Vec<Value> = store.pods.values().filter(|p| wanted(p)).cloned().collect();
        let list = json!({
            "apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": store.resource_version.to_string()},
            "items": items
        });
        return ([("content-type", "application/json")], list.to_string()).into_response();
    }
    let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let backlog: Vec<(u64, &'static str, Value)> =
        store.events.iter().filter(|(version, _, pod)| *version > since && wanted(pod)).cloned().collect();
    let last_backlog = backlog.last().map_or(since, |(version, _, _)| *version);
    let mut live = shared.live.subscribe();
    drop(store);
    let (lines, body) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(1024);
    tokio::spawn(async move {
        let line = |kind: &str, pod: &Value| Ok(Bytes::from(json!({"type": kind, "object": pod}).to_string() + "\n"));
        for (_, kind, pod) in &backlog {
            if lines.send(line(kind, pod)).await.is_err() {
                return;
            }
        }
        loop {
            let (version, kind, pod) = tokio::select! {
                // The server went away: the watch ends with it.
                _ = stop.cancelled() => return,
                event = live.recv() => match event {
                    Ok(event) => event,
                    Err(_) => return,
                },
            };
            if version > last_backlog && wanted(&pod) && lines.send(line(kind, &pod)).await.is_err() {
                return;
            }
        }
    });
    ([("content-type", "application/json")], Body::from_stream(ReceiverStream::new(body))).into_response()
}
