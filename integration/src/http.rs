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
}

/// Serves every connection accepted on `listener` until the process ends.
pub async fn serve(listener: TcpListener, behaviour: ServerBehaviour) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = serve_connection(stream, behaviour).await;
        });
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
        if !behaviour.delay.is_zero() {
            tokio::time::sleep(behaviour.delay).await;
        }
        let response = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n", body.len());
        write.write_all(response.as_bytes()).await?;
        write.write_all(&body).await?;
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
