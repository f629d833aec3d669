//! A minimal HTTP/1.1 GET client for the agent's own JSON endpoints on
//! loopback (`record`, `top`): one request per connection, Content-Length
//! or chunked bodies.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// GET `path` from the agent over HTTP/1.1 on loopback, as JSON.
pub fn get_json(agent: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    let mut stream = TcpStream::connect_timeout(&agent, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {agent}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|e| e.to_string())?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| "no header end".to_string())?;
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(head.lines().next().unwrap_or_default().to_string());
    }
    let mut body = response[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body).ok_or_else(|| "malformed chunked body".to_string())?;
    }
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunked bodies are reassembled; a truncated one is refused.
    #[test]
    fn chunked_bodies() {
        assert_eq!(dechunk(b"3\r\n{\"a\r\n5\r\n\": 1}\r\n0\r\n\r\n").unwrap(), b"{\"a\": 1}");
        assert!(dechunk(b"9\r\n{}").is_none());
    }
}
