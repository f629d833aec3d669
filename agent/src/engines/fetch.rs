//! One scrape of an engine's metrics over HTTP/1.1: a kept-alive
//! connection, a deadline, a body limit (refused on Content-Length, cut
//! when chunked), and the reading of the families podgpu uses, reused
//! when their lines did not change.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};

use super::catalog::EngineKind;
use super::exposition::{EngineReading, Exposition, ExpositionError};

/// Why one scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// No TCP connection.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The deadline passed.
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// 401 or 403: the endpoint wants credentials podgpu does not have.
    #[error("HTTP {0}: the metrics endpoint requires authorization")]
    Unauthorized(u16),
    /// Another status than 2xx.
    #[error("HTTP {0}")]
    Status(u16),
    /// The body passed the limit.
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// HTTP framing failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// The body could not be read as an engine's metrics.
    #[error(transparent)]
    Exposition(#[from] ExpositionError),
}

/// One scrape's result: the lines of the read families and what they say.
#[derive(Debug)]
pub struct Scraped {
    /// The lines `exposition::read_lines` kept.
    pub lines: String,
    /// What they say.
    pub reading: EngineReading,
}

/// GETs `path` from `addr` and reads it as `engine`'s metrics (any
/// engine's when `None`). Where the read families' lines are what
/// `previous` had, its reading is reused: an idle engine's gauges and
/// histograms do not change between scrapes, and parsing is most of a
/// scrape's cost.
pub async fn scrape(
    addr: SocketAddr,
    path: &str,
    engine: Option<EngineKind>,
    limits: (Duration, usize),
    previous: Option<Arc<Scraped>>,
    connection: &mut Option<Connection>,
) -> Result<Arc<Scraped>, ScrapeError> {
    let (timeout, body_limit) = limits;
    let (body, openmetrics) = tokio::time::timeout(timeout, get(addr, path, body_limit, connection))
        .await
        .map_err(|_| ScrapeError::Timeout(timeout))??;
    let lines = super::exposition::read_lines(&body)?;
    if let Some(previous) = previous.filter(|p| p.lines == lines && engine.is_none_or(|e| p.reading.engine == e)) {
        return Ok(previous);
    }
    let reading = Exposition::parse_read_lines(&lines, openmetrics)?.read(engine)?;
    Ok(Arc::new(Scraped { lines, reading }))
}

/// A kept-alive HTTP/1.1 connection to one endpoint: a scrape every
/// 100 ms would otherwise cost a connect and an accept each, on both
/// sides, and a connection for the request probe to follow.
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Connection {
    async fn open(addr: SocketAddr) -> Result<Self, ScrapeError> {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(ScrapeError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|err| ScrapeError::Http(err.to_string()))?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { sender, task })
    }
}

/// GETs `path` over `kept` (or a new connection), keeping the connection
/// for the next scrape when the answer was read whole. A kept connection
/// the server has closed meanwhile is replaced once, not reported.
async fn get(
    addr: SocketAddr,
    path: &str,
    body_limit: usize,
    kept: &mut Option<Connection>,
) -> Result<(String, bool), ScrapeError> {
    let reused = kept.take().filter(|connection| connection.sender.is_ready());
    let fresh_if_needed = reused.is_some();
    let mut connection = match reused {
        Some(connection) => connection,
        None => Connection::open(addr).await?,
    };
    let response = match connection.sender.send_request(request(addr, path)?).await {
        Ok(response) => response,
        Err(_) if fresh_if_needed => {
            connection = Connection::open(addr).await?;
            connection
                .sender
                .send_request(request(addr, path)?)
                .await
                .map_err(|err| ScrapeError::Http(err.to_string()))?
        }
        Err(err) => return Err(ScrapeError::Http(err.to_string())),
    };
    let status = response.status().as_u16();
    match status {
        401 | 403 => return Err(ScrapeError::Unauthorized(status)),
        200..=299 => {}
        _ => return Err(ScrapeError::Status(status)),
    }
    let openmetrics = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/openmetrics-text"));
    if response
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|length| length > body_limit)
    {
        return Err(ScrapeError::TooLarge(body_limit));
    }
    let body = Limited::new(response.into_body(), body_limit).collect().await.map_err(|err| {
        if err.is::<http_body_util::LengthLimitError>() {
            ScrapeError::TooLarge(body_limit)
        } else {
            ScrapeError::Http(err.to_string())
        }
    })?;
    let text = String::from_utf8(body.to_bytes().to_vec())
        .map_err(|_| ScrapeError::Exposition(ExpositionError::Malformed("the body is not UTF-8".to_string())))?;
    *kept = Some(connection);
    Ok((text, openmetrics))
}

fn request(addr: SocketAddr, path: &str) -> Result<hyper::Request<Empty<Bytes>>, ScrapeError> {
    hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::ACCEPT, "text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5")
        .header(hyper::header::USER_AGENT, concat!("podgpu-agent/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|err| ScrapeError::Http(err.to_string()))
}
