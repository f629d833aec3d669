//! Server stacks people deploy, run as tenants, and clients that measure
//! their requests from the outside (the ground truth the probe's numbers
//! are held to).
//!
//! - `Stack`: which server a tenant runs: the Rust test tenants, or a real
//!   stack from PyPI (grpcio's C-core, uvicorn + FastAPI, hypercorn) or
//!   Node.js's built-in `http` / `http2` (nghttp2). The Python packages
//!   come from `scripts/setup.sh` (pinned in
//!   `integration/scripts/stacks/requirements.txt`).
//! - `Protocol` + `Caller`: one streamed call the way each protocol's
//!   client makes it, timed like the probe times it.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use podgpu_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use podgpu_proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use tonic::transport::Channel;

use crate::http::{Client, Measured, StreamSpec};
use crate::workspace_binary;

/// Where `scripts/setup.sh` installs the Python server stacks
/// (`PODGPU_PYTHON_STACKS` overrides).
pub fn python_stacks_dir() -> PathBuf {
    std::env::var_os("PODGPU_PYTHON_STACKS").map_or_else(|| PathBuf::from("/opt/podgpu/python-stacks"), PathBuf::from)
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stacks").join(name)
}

/// A server a tenant runs; each prints `{"listening": ADDR}` when ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// The Rust HTTP/1.1 tenant (`tenant` binary).
    Tenant,
    /// The Rust gRPC tenant (tonic, hyper's HTTP/2).
    Tonic,
    /// gRPC C-core through grpcio (Triton's gRPC front end is C-core).
    Grpcio,
    /// uvicorn + FastAPI, HTTP/1.1 with server-sent events (vLLM's stack).
    Uvicorn,
    /// hypercorn + FastAPI over HTTP/2 cleartext (the Python `h2` stack).
    Hypercorn,
    /// Node.js `http`.
    NodeHttp,
    /// Node.js `http2` (nghttp2).
    NodeHttp2,
    /// An inference engine's stand-in under the engine's command line,
    /// serving its `/metrics` (`engine_standin`).
    Engine(podgpu_agent::engines::catalog::EngineKind),
    /// The same under a program name of no engine (`python3 .../NAME`).
    EngineUnnamed(podgpu_agent::engines::catalog::EngineKind, &'static str),
}

impl Stack {
    /// The protocol its clients speak.
    pub fn protocol(self) -> Protocol {
        match self {
            Stack::Tenant | Stack::Uvicorn | Stack::NodeHttp | Stack::Engine(_) | Stack::EngineUnnamed(..) => {
                Protocol::Http1
            }
            Stack::Tonic | Stack::Grpcio => Protocol::Grpc,
            Stack::Hypercorn | Stack::NodeHttp2 => Protocol::Http2,
        }
    }

    /// The command that starts it on 127.0.0.1 with an ephemeral port.
    pub fn command(self, body_bytes: usize, second_port: bool) -> Command {
        let python = |args: &[&str]| {
            let mut command = Command::new("python3");
            command.args(args).env("PYTHONPATH", python_stacks_dir()).env("PYTHONUNBUFFERED", "1");
            command
        };
        let asgi = script("asgi_server.py").display().to_string();
        match self {
            Stack::Tenant => {
                let mut command = Command::new(workspace_binary("tenant"));
                command.args(["127.0.0.1:0".to_string(), body_bytes.to_string()]);
                if second_port {
                    command.args(["0", "127.0.0.1:0"]);
                }
                command
            }
            Stack::Tonic => {
                let mut command = Command::new(workspace_binary("grpc-tenant"));
                command.arg("127.0.0.1:0");
                command
            }
            Stack::Grpcio => python(&[&script("grpcio_server.py").display().to_string()]),
            Stack::Uvicorn => python(&[&asgi, "uvicorn"]),
            Stack::Hypercorn => python(&[&asgi, "hypercorn"]),
            Stack::NodeHttp | Stack::NodeHttp2 => {
                let mut command = Command::new("node");
                command.arg(script("node_server.js"));
                command.arg(if self == Stack::NodeHttp { "http" } else { "http2" });
                command
            }
            Stack::Engine(engine) => crate::engine_standin::command(engine).expect("writing the engine launchers"),
            Stack::EngineUnnamed(engine, program) => {
                crate::engine_standin::command_unnamed(engine, program).expect("writing the engine launcher")
            }
        }
    }
}

/// How a client reaches a stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1, one request at a time per connection, chunked SSE answers.
    Http1,
    /// HTTP/2 cleartext (prior knowledge), many streams per connection.
    Http2,
    /// gRPC (ExternalScaler's method paths): server streams and unary calls.
    Grpc,
}

/// One call to make.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    /// Time to the first message or event.
    pub first_ms: u64,
    /// Messages or events in the answer (a gRPC unary call when 0).
    pub messages: u64,
    /// Time between messages.
    pub interval_ms: u64,
}

impl Call {
    /// The HTTP path the test servers stream this call's answer for.
    fn path(&self) -> String {
        let chunks = u32::try_from(self.messages.max(1)).unwrap_or(u32::MAX);
        StreamSpec { first_ms: self.first_ms, chunks, chunk_ms: self.interval_ms }.path()
    }
}

/// A client connection of one protocol. HTTP/2 and gRPC callers are
/// cheap to clone and share one connection; HTTP/1.1 callers own theirs.
#[derive(Clone)]
pub enum Caller {
    /// One HTTP/1.1 connection per caller (opened per call when cloned).
    Http1(SocketAddr),
    /// A shared HTTP/2 connection.
    Http2(h2::client::SendRequest<Bytes>, SocketAddr),
    /// A shared gRPC channel (one HTTP/2 connection).
    Grpc(ExternalScalerClient<Channel>),
    /// gRPC through grpcio's C-core client (`grpcio_client.py`), one
    /// channel per batch of calls: C-core writes frames as its own
    /// iovecs, so it exercises the server's reads as a C-core peer does.
    GrpcioProcess(SocketAddr),
}

fn io_error(err: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(err.to_string())
}

impl Caller {
    /// Connects to `addr` speaking `protocol`.
    pub async fn connect(protocol: Protocol, addr: SocketAddr) -> std::io::Result<Self> {
        match protocol {
            Protocol::Http1 => Ok(Caller::Http1(addr)),
            Protocol::Http2 => {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let (send, connection) = h2::client::handshake(tcp).await.map_err(io_error)?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok(Caller::Http2(send, addr))
            }
            Protocol::Grpc => {
                let client = ExternalScalerClient::connect(format!("http://{addr}")).await.map_err(io_error)?;
                Ok(Caller::Grpc(client))
            }
        }
    }

    /// Makes one call and times it: TTFT from the request sent to the
    /// first body byte or message, latency from the call's start to the
    /// answer's end.
    pub async fn call(&mut self, call: Call) -> std::io::Result<Measured> {
        match self {
            Caller::GrpcioProcess(addr) => {
                let mut measured = grpcio_calls(*addr, &[call], 1).await?;
                measured.pop().ok_or_else(|| io_error("the grpcio client measured nothing"))
            }
            Caller::Http1(addr) => Client::connect(*addr).await?.stream(&call.path()).await,
            Caller::Http2(send, addr) => {
                let mut send = send.clone().ready().await.map_err(io_error)?;
                let request = h2_request(*addr, &call.path());
                let started = Instant::now();
                let (response, _) = send.send_request(request, true).map_err(io_error)?;
                let sent = Instant::now();
                let mut body = response.await.map_err(io_error)?.into_body();
                let mut first_body = None;
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.map_err(io_error)?;
                    if !chunk.is_empty() {
                        first_body.get_or_insert_with(Instant::now);
                    }
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                let ended = Instant::now();
                Ok(Measured { ttft: first_body.unwrap_or(ended) - sent, latency: ended - started })
            }
            Caller::Grpc(client) => {
                let started = Instant::now();
                if call.messages == 0 {
                    let request = GetMetricsRequest {
                        scaled_object_ref: Some(parameters(&[("delay_ms", call.first_ms)])),
                        metric_name: "m".into(),
                    };
                    client.get_metrics(request).await.map_err(io_error)?;
                    let latency = started.elapsed();
                    return Ok(Measured { ttft: latency, latency });
                }
                let request = parameters(&[
                    ("first_ms", call.first_ms),
                    ("interval_ms", call.interval_ms),
                    ("messages", call.messages),
                ]);
                let mut stream = client.stream_is_active(request).await.map_err(io_error)?.into_inner();
                stream.message().await.map_err(io_error)?.ok_or_else(|| io_error("stream ended without a message"))?;
                let ttft = started.elapsed();
                while stream.message().await.map_err(io_error)?.is_some() {}
                Ok(Measured { ttft, latency: started.elapsed() })
            }
        }
    }
}

fn h2_request(addr: SocketAddr, path: &str) -> http::Request<()> {
    http::Request::get(format!("http://{addr}{path}")).body(()).expect("a GET with a valid URI")
}

/// A `ScaledObjectRef` carrying call parameters in its metadata (what the
/// gRPC tenants read).
pub fn parameters(pairs: &[(&str, u64)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "t".into(),
        namespace: "t".into(),
        scaler_metadata: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

/// Runs `calls` over `concurrency` workers sharing `caller` (each HTTP/1.1
/// worker opens its own connections); every measurement in call order of
/// each worker, or the first error.
pub async fn run_calls(caller: &Caller, calls: Vec<Call>, concurrency: usize) -> std::io::Result<Vec<Measured>> {
    if let Caller::GrpcioProcess(addr) = caller {
        return grpcio_calls(*addr, &calls, concurrency).await;
    }
    let queue = std::sync::Arc::new(std::sync::Mutex::new(calls.into_iter()));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (queue, mut caller) = (queue.clone(), caller.clone());
        workers.push(tokio::spawn(async move {
            let mut measured = Vec::new();
            loop {
                let next = queue.lock().expect("queue lock").next();
                let Some(call) = next else { return Ok::<_, std::io::Error>(measured) };
                measured.push(caller.call(call).await?);
            }
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.map_err(io_error)??);
    }
    Ok(all)
}

/// `count` calls with first-message delays spread over `first_ms` (an
/// LLM's queueing plus prefill), each with `messages` at `interval_ms`.
pub fn spread_calls(count: usize, first_ms: (u64, u64), messages: u64, interval_ms: u64) -> Vec<Call> {
    let span = first_ms.1.saturating_sub(first_ms.0);
    (0..count as u64)
        // A stride coprime with most counts walks the range evenly.
        .map(|index| Call { first_ms: first_ms.0 + (index * 37 % 101) * span / 100, messages, interval_ms })
        .collect()
}

/// Runs `calls` through `grpcio_client.py` on one channel from
/// `concurrency` threads; what it measured.
async fn grpcio_calls(addr: SocketAddr, calls: &[Call], concurrency: usize) -> std::io::Result<Vec<Measured>> {
    use tokio::io::AsyncWriteExt as _;
    let input: Vec<serde_json::Value> = calls
        .iter()
        .map(|c| serde_json::json!({"first_ms": c.first_ms, "messages": c.messages, "interval_ms": c.interval_ms}))
        .collect();
    let mut child = tokio::process::Command::new("python3")
        .arg(script("grpcio_client.py"))
        .args([addr.to_string(), concurrency.to_string()])
        .env("PYTHONPATH", python_stacks_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or_else(|| io_error("no stdin"))?;
    stdin.write_all(serde_json::Value::Array(input).to_string().as_bytes()).await?;
    drop(stdin);
    let output = child.wait_with_output().await?;
    if !output.status.success() {
        return Err(io_error(format!("grpcio_client.py failed: {}", output.status)));
    }
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).map_err(io_error)?;
    let millis = |row: &serde_json::Value, key: &str| Duration::from_secs_f64(row[key].as_f64().unwrap_or(0.0) / 1e3);
    Ok(rows.iter().map(|row| Measured { ttft: millis(row, "ttft_ms"), latency: millis(row, "latency_ms") }).collect())
}
