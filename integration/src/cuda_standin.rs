//! A stand-in for libcuda, for tests without a GPU: `integration/cuda/`
//! holds a `libcuda.so.1` exporting the launch entry points and the
//! applications that load it with `dlopen` and launch through it, as the
//! CUDA runtime does (`launcher`: a fixed number of launches of each
//! kind; `launch_loop`: a steady loop at a chosen rate; `waiter`: launches
//! and waits in cycles, for the completion spans; `runtime_app`: kernels
//! launched through a CUDA-runtime stand-in, `libcudart.so.12`, whose one
//! call reaches libcuda for every kernel).
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{ChildStdout, Command};
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::agent::AgentProcess;
use crate::pod::CgroupPod;

/// Builds `libcuda.so.1`, `libcudart.so.12`, `launcher`, `launch_loop`,
/// `waiter` and `runtime_app` into `dir`.
pub fn build(dir: &Path) -> anyhow::Result<()> {
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
    let gcc = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("gcc").args(args).current_dir(&sources).status().context("gcc")?;
        if !status.success() {
            bail!("gcc {args:?} failed");
        }
        Ok(())
    };
    let out = |name: &str| dir.join(name).display().to_string();
    gcc(&["-shared", "-fPIC", "-O2", "-o", &out("libcuda.so.1"), "libcuda.c"])?;
    gcc(&["-O2", "-o", &out("launcher"), "launcher.c", "-ldl"])?;
    gcc(&["-O2", "-o", &out("launch_loop"), "launch_loop.c", "-ldl"])?;
    gcc(&["-O2", "-o", &out("waiter"), "waiter.c", "-ldl", "-lpthread"])?;
    gcc(&["-shared", "-fPIC", "-O2", "-o", &out("libcudart.so.12"), "cudart.c", "-ldl"])?;
    gcc(&["-O2", "-o", &out("runtime_app"), "runtime_app.c", "-ldl"])
}

/// `path` of the agent's HTTP API, as JSON (panics when it cannot be read:
/// a test helper).
pub async fn get_json(http: std::net::SocketAddr, path: &str) -> serde_json::Value {
    serde_json::from_slice(&crate::http::get(http, path).await.expect("GET").body).expect("a JSON body")
}

/// Waits until the agent has found and probed the stand-in libcuda, then
/// writes `go`, the file the stand-in applications wait for before they
/// launch (so the probes see every launch).
pub async fn start_once_probed(agent: &AgentProcess, go: &Path) {
    let attached = crate::eventually(Duration::from_secs(5), async || {
        get_json(agent.http, "/healthz").await["launch_libraries"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    assert!(attached, "libcuda found and probed: {}", get_json(agent.http, "/healthz").await);
    std::fs::write(go, b"").unwrap();
}

/// The rows of process `pid` in a `/launches` view.
pub fn rows_of(view: &serde_json::Value, pid: u32) -> Vec<serde_json::Value> {
    view["rows"].as_array().expect("rows").iter().filter(|r| r["pid"] == pid).cloned().collect()
}

/// Starts `command` in `pod` and reads its output up to its `ready` line:
/// its pid and the rest of its output (keep it: the application stops
/// when its stdout closes).
pub fn spawn_until_ready(pod: &mut CgroupPod, command: Command) -> (u32, BufReader<ChildStdout>) {
    let child = pod.spawn(command).expect("the stand-in application runs");
    let pid = child.id();
    let mut output = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut lines = Vec::new();
    while lines.last().is_none_or(|line: &String| line != "ready") {
        let mut line = String::new();
        assert!(output.read_line(&mut line).unwrap() > 0, "the application ended before ready: {lines:?}");
        lines.push(line.trim().to_string());
    }
    (pid, output)
}
