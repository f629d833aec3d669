//! Minimal HTTP/1.1 over tokio: a keep-alive server for tenant pods, a
//! client for load and for reading the agent's endpoints. Only what the
//! harness needs (Content-Length bodies), written to be predictable:
//! every byte a test sends or receives is known.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How the tenant server answers.
#[derive(Clone, Copy, Debug)]
pub struct ServerBehaviour {
    /// Response body size in bytes.
    pub body_bytes: usize,
    /// Delay before the response is written.
    pub delay: Duration,
    /// CPU time spent per request before answering (busy, not sleeping):
    /// stands in for the parsing, tokenising and scheduling a real
    /// inference front end does per request.
    pub work: Duration,
}

/// Serves every connection accepted on `listener` until the process ends.
pub async fn serve(listener: TcpListener, behaviour: ServerBehaviour) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        // Small responses must not wait for delayed ACKs (Nagle).
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let _ = serve_connection(stream, behaviour).await;
        });
    }
}

/// `/stream/FIRST_MS/CHUNKS/CHUNK_MS`: an SSE-style chunked response whose
/// headers go out at once and whose first event follows after FIRST_MS (as
/// an LLM server sends headers before the first token), then CHUNKS - 1
/// more events CHUNK_MS apart, each in its own write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamSpec {
    /// Delay before the first body byte.
    pub first_ms: u64,
    /// Number of events.
    pub chunks: u32,
    /// Delay between events.
    pub chunk_ms: u64,
}

impl StreamSpec {
    /// The request path that asks for this stream.
    pub fn path(&self) -> String {
        format!("/stream/{}/{}/{}", self.first_ms, self.chunks, self.chunk_ms)
    }

    /// Under any prefix: `/health/stream/...` is a slow health check.
    fn parse(path: &str) -> Option<Self> {
        let mut parts = path[path.find("/stream/")? + "/stream/".len()..].split('/');
        let first_ms = parts.next()?.parse().ok()?;
        let chunks = parts.next()?.parse().ok()?;
        let chunk_ms = parts.next()?.parse().ok()?;
        Some(Self { first_ms, chunks, chunk_ms })
    }
}

async fn serve_connection(stream: TcpStream, behaviour: ServerBehaviour) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let body = vec![b'x'; behaviour.body_bytes];
    loop {
        let Some(head) = read_head(&mut reader).await? else {
            return Ok(());
        };
        let mut request_body = vec![0; content_length(&head)];
        reader.read_exact(&mut request_body).await?;
        let path = head.split_whitespace().nth(1).unwrap_or("/");
        if path == VANISH_PATH {
            vanish(reader.into_inner(), write);
            return Ok(());
        }
        if let Some(stream) = StreamSpec::parse(path) {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
            write.write_all(head.as_bytes()).await?;
            tokio::time::sleep(Duration::from_millis(stream.first_ms)).await;
            for index in 0..stream.chunks {
                if index > 0 {
                    tokio::time::sleep(Duration::from_millis(stream.chunk_ms)).await;
                }
                let event = format!("data: token {index}\n\n");
                write.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes()).await?;
            }
            write.write_all(b"0\r\n\r\n").await?;
            continue;
        }
        // An engine's metrics, where the tenant stands in for one: the
        // file named by PODGPU_TENANT_METRICS, read at each scrape.
        if path == "/metrics" {
            if let Some(file) = std::env::var_os("PODGPU_TENANT_METRICS") {
                let text = tokio::fs::read(&file).await.unwrap_or_default();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain; version=0.0.4\r\n\r\n",
                    text.len()
                );
                write.write_all(head.as_bytes()).await?;
                write.write_all(&text).await?;
                continue;
            }
        }
        if !behaviour.delay.is_zero() {
            tokio::time::sleep(behaviour.delay).await;
        }
        if !behaviour.work.is_zero() {
            let started = Instant::now();
            while started.elapsed() < behaviour.work {
                std::hint::spin_loop();
            }
        }
        let mut response =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n", body.len())
                .into_bytes();
        response.extend_from_slice(&body);
        write.write_all(&response).await?;
    }
}

/// The path on which the server closes the connection without a packet
/// (TCP repair mode, as a host that drops off the network leaves it):
/// the close must be seen from the socket, not the wire.
pub const VANISH_PATH: &str = "/vanish";

/// Closes the connection in TCP repair mode, so that neither FIN nor
/// RST goes out (as a plain `close`, not tokio's write-half drop, which
/// shuts the write side down first and sends a FIN). Needs
/// `CAP_NET_ADMIN`; without it the connection closes as usual.
fn vanish(read: tokio::net::tcp::OwnedReadHalf, write: tokio::net::tcp::OwnedWriteHalf) {
    use std::os::fd::AsRawFd as _;
    const TCP_REPAIR: libc::c_int = 19;
    let Ok(stream) = read.reunite(write) else { return };
    let Ok(stream) = stream.into_std() else { return };
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and an int option of the right size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_REPAIR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Reads header lines up to the blank line; `None` on a clean EOF.
async fn read_head<R: AsyncBufReadExt + Unpin>(reader: &mut R) -> std::io::Result<Option<String>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed inside a header"))
            };
        }
        if line == "\r\n" || line == "\n" {
            return Ok(Some(head));
        }
        head.push_str(&line);
    }
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

/// A keep-alive client connection.
pub struct Client {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    host: String,
}

/// One response: status code and body.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Client {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        Ok(Self { reader: BufReader::new(read), writer, host: addr.to_string() })
    }

    /// Sends one request with `body` (POST when non-empty) and reads the reply.
    pub async fn request(&mut self, path: &str, body: &[u8]) -> std::io::Result<Reply> {
        let method = if body.is_empty() { "GET" } else { "POST" };
        let head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n", self.host, body.len());
        self.writer.write_all(head.as_bytes()).await?;
        self.writer.write_all(body).await?;
        let head = read_head(&mut self.reader)
            .await?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "server closed the connection"))?;
        let status = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad status line in {head:?}"))
        })?;
        let mut body = vec![0; content_length(&head)];
        self.reader.read_exact(&mut body).await?;
        Ok(Reply { status, body })
    }
}

/// What a client measured for one streamed request (its ground truth).
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    /// Request fully written -> first body byte read.
    pub ttft: Duration,
    /// Request write started -> last body byte read.
    pub latency: Duration,
}

impl Client {
    /// Sends a GET for `path` and reads a chunked response to its end,
    /// timing it the way the probe does from the server's side.
    pub async fn stream(&mut self, path: &str) -> std::io::Result<Measured> {
        let head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        let started = Instant::now();
        self.writer.write_all(head.as_bytes()).await?;
        let sent = Instant::now();
        read_head(&mut self.reader)
            .await?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no response head"))?;
        let mut first_body = None;
        loop {
            let mut size_line = String::new();
            self.reader.read_line(&mut size_line).await?;
            first_body.get_or_insert_with(Instant::now);
            let size = usize::from_str_radix(size_line.trim(), 16).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad chunk size {size_line:?}"))
            })?;
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).await?;
            if size == 0 {
                break;
            }
        }
        let ended = Instant::now();
        Ok(Measured { ttft: first_body.unwrap_or(ended) - sent, latency: ended - started })
    }

    /// Sends a GET for `path`, waits for the first body bytes, then drops
    /// the connection mid-stream (a client giving up).
    pub async fn abandon_stream(mut self, path: &str) -> std::io::Result<()> {
        let head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.writer.write_all(head.as_bytes()).await?;
        read_head(&mut self.reader).await?;
        let mut size_line = String::new();
        self.reader.read_line(&mut size_line).await?;
        Ok(())
    }

    /// Writes raw bytes (for malformed-traffic tests).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await
    }
}

/// Streams `spec` back to back on `concurrency` keep-alive connections
/// until `duration` has passed; returns how many streams completed.
pub async fn drive_streams(addr: SocketAddr, spec: StreamSpec, concurrency: usize, duration: Duration) -> u64 {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let Ok(mut client) = Client::connect(addr).await else { return done };
            while Instant::now() < deadline {
                if client.stream(&spec.path()).await.is_err() {
                    break;
                }
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap_or(0);
    }
    total
}

/// One GET on a fresh connection (reading the agent's JSON endpoints).
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
    Client::connect(addr).await?.request(path, b"").await
}

/// A steady load: `connections` keep-alive connections together sending
/// `rate` requests per second of `request_bytes` each, for `duration`.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Requests per second over all connections.
    pub rate: f64,
    /// Request body size.
    pub request_bytes: usize,
    /// Parallel connections.
    pub connections: usize,
    /// How long to send.
    pub duration: Duration,
}

/// What a load run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Requests answered with 200.
    pub ok: u64,
    /// Requests that failed or got another status.
    pub failed: u64,
}

/// Runs `load` against `addr`. Each connection keeps its own schedule, so
/// a slow reply delays that connection only.
pub async fn drive(addr: SocketAddr, load: Load) -> LoadReport {
    let connections = load.connections.max(1);
    let interval = Duration::from_secs_f64(connections as f64 / load.rate.max(0.001));
    let body = vec![b'r'; load.request_bytes];
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut report = LoadReport::default();
            let Ok(mut client) = Client::connect(addr).await else {
                report.failed += 1;
                return report;
            };
            let deadline = Instant::now() + load.duration;
            let mut ticker = tokio::time::interval(interval);
            while Instant::now() < deadline {
                ticker.tick().await;
                match client.request("/", &body).await {
                    Ok(reply) if reply.status == 200 => report.ok += 1,
                    _ => report.failed += 1,
                }
            }
            report
        }));
    }
    let mut total = LoadReport::default();
    for task in tasks {
        if let Ok(report) = task.await {
            total.ok += report.ok;
            total.failed += report.failed;
        }
    }
    total
}

/// The samples of metric `name` in the Prometheus text at `addr`'s
/// `/metrics`: (the label text between the braces, or empty, and the value).
pub async fn metric_samples(addr: SocketAddr, name: &str) -> std::io::Result<Vec<(String, f64)>> {
    let reply = get(addr, "/metrics").await?;
    let text = String::from_utf8_lossy(&reply.body);
    Ok(text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            Some((labels.to_string(), value.trim().parse().ok()?))
        })
        .collect())
}
