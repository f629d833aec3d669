//! HTTP/1.1 request tracking from the server's side of a connection, fed
//! with what the probe saw of each read and write: bytes moved, the first
//! bytes (prefix) and the last bytes (suffix). Bytes beyond the prefix are
//! unseen, so framing is followed by lengths, not by content.
//!
//! Per request it finds: start (first byte of the request line), last
//! request byte, first response byte (status line), first response BODY
//! byte (TTFT: servers like uvicorn send headers before generating) and
//! response end (Content-Length consumed, chunked terminator in the suffix,
//! or close for close-delimited bodies). Pipelined requests are queued
//! FIFO. A connection joined mid-stream stays silent until the next request
//! line; garbage never leaves a request open forever (EOF/close abort it).
use std::collections::VecDeque;

/// What one syscall on the connection did.
#[derive(Clone, Copy, Debug)]
pub enum Io<'a> {
    /// The server read `bytes`, of which `prefix` are the first ones seen.
    Read {
        /// Bytes moved.
        bytes: u64,
        /// First bytes (all of them when `prefix.len() == bytes`).
        prefix: &'a [u8],
    },
    /// The server wrote `bytes`.
    Write {
        /// Bytes moved.
        bytes: u64,
        /// First bytes.
        prefix: &'a [u8],
        /// Last bytes.
        suffix: &'a [u8],
    },
    /// Read returned end of stream: the client closed its side.
    Eof,
    /// A write failed (EPIPE, ECONNRESET): the client is gone.
    WriteError,
    /// The server closed the connection.
    Close,
}

/// A finished (or given up) request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A request line was seen.
    Started {
        /// Kernel time of its first byte.
        at_ns: u64,
    },
    /// The response ended.
    Completed(Timing),
    /// The client went away (or the server closed) before the response ended.
    Aborted {
        /// When the request started.
        started_ns: u64,
        /// When it was given up.
        at_ns: u64,
    },
}

/// Kernel timestamps of one request's milestones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// First request byte read.
    pub started_ns: u64,
    /// Last request byte read.
    pub request_end_ns: u64,
    /// First response byte written (status line).
    pub first_byte_ns: u64,
    /// First response body byte written; `None` for bodiless responses.
    pub first_body_ns: Option<u64>,
    /// Last response byte written.
    pub end_ns: u64,
}

impl Timing {
    /// Time to first body byte after the request was fully received.
    pub fn ttft_ns(&self) -> Option<u64> {
        self.first_body_ns.map(|first| first.saturating_sub(self.request_end_ns))
    }

    /// First request byte to last response byte.
    pub fn latency_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.started_ns)
    }
}

const METHODS: [&[u8]; 9] =
    [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];
/// Heads longer than this are not HTTP we can follow.
const MAX_HEAD: usize = 16 * 1024;
const CHUNKED_END: &[u8] = b"0\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked,
    /// Response only: ends when the connection closes.
    UntilClose,
}

#[derive(Debug)]
struct Request {
    started_ns: u64,
    /// Set once the whole request has been read.
    end_ns: Option<u64>,
    head_only_response: bool,
}

#[derive(Debug)]
enum Reading {
    /// Between requests: the next byte should start a request line.
    Idle,
    /// Inside a request head; `head` holds the bytes seen so far.
    Head { head: Vec<u8> },
    /// Inside a request body.
    Body(Body),
}

#[derive(Debug)]
struct Response {
    first_byte_ns: u64,
    /// Head bytes seen so far while the head is incomplete.
    head: Option<Vec<u8>>,
    body: Body,
    first_body_ns: Option<u64>,
}

/// One connection's HTTP/1.1 state.
#[derive(Debug)]
pub struct Http1Connection {
    reading: Reading,
    /// Requests whose responses have not ended, oldest first.
    requests: VecDeque<Request>,
    response: Option<Response>,
}

impl Default for Http1Connection {
    fn default() -> Self {
        Self { reading: Reading::Idle, requests: VecDeque::new(), response: None }
    }
}

/// Whether `bytes` could be the start of a request line.
pub fn looks_like_request(bytes: &[u8]) -> bool {
    METHODS.iter().any(|method| {
        let n = bytes.len().min(method.len());
        n > 0 && bytes[..n] == method[..n]
    })
}

/// Where a head ends in `bytes`: the index just past its blank line.
fn head_end(bytes: &[u8]) -> Option<usize> {
    // Built once: a searcher built per call cost more than the search.
    static BLANK_LINE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
    BLANK_LINE.find(bytes).map(|at| at + 4)
}

/// Body framing from a head's header lines. Works on bytes: this runs for
/// every response, and header names are ASCII.
fn body_of(head: &[u8]) -> Option<Body> {
    let mut length = None;
    // Line starts found by memchr (vectorised), not a byte-wise split.
    for start in memchr::memchr_iter(b'\n', head).map(|at| at + 1) {
        let rest = &head[start..];
        // Only two header names matter: skip the others on their first byte.
        if !matches!(rest.first(), Some(b't' | b'T' | b'c' | b'C')) {
            continue;
        }
        let line = &rest[..memchr::memchr(b'\n', rest).unwrap_or(rest.len())];
        let Some(colon) = memchr::memchr(b':', line) else { continue };
        let (name, value) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            && value.windows(7).any(|word| word.eq_ignore_ascii_case(b"chunked"))
        {
            return Some(Body::Chunked);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            length = std::str::from_utf8(value).ok().and_then(|digits| digits.parse::<u64>().ok());
        }
    }
    length.map(Body::Length)
}

fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\r').next()?;
    let code = line.split(|&b| b == b' ').nth(1)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

impl Http1Connection {
    /// Requests started and not yet completed or aborted.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Feeds one syscall observed at `at_ns`, appending what it finished.
    pub fn observe(&mut self, at_ns: u64, io: Io<'_>, out: &mut Vec<Outcome>) {
        match io {
            Io::Read { bytes, prefix } => self.on_read(at_ns, bytes, prefix, out),
            Io::Write { bytes, prefix, suffix } => self.on_write(at_ns, bytes, prefix, suffix, out),
            Io::Eof | Io::WriteError => self.abort_all(at_ns, out),
            Io::Close => {
                // A close-delimited body ends here; anything else in flight
                // never got its response.
                if matches!(self.response, Some(Response { body: Body::UntilClose, head: None, .. })) {
                    self.complete(at_ns, out);
                }
                self.abort_all(at_ns, out);
            }
        }
    }

    fn abort_all(&mut self, at_ns: u64, out: &mut Vec<Outcome>) {
        for request in self.requests.drain(..) {
            out.push(Outcome::Aborted { started_ns: request.started_ns, at_ns });
        }
        self.response = None;
        self.reading = Reading::Idle;
    }

    fn on_read(&mut self, at_ns: u64, bytes: u64, prefix: &[u8], out: &mut Vec<Outcome>) {
        let fully_seen = prefix.len() as u64 == bytes;
        // Offset of the next unparsed byte of this read.
        let mut offset: u64 = 0;
        while offset < bytes {
            let seen = prefix.get(offset as usize..).unwrap_or(&[]);
            match &mut self.reading {
                Reading::Idle => {
                    if seen.is_empty() || !looks_like_request(seen) {
                        // Body bytes we lost track of, or garbage: they
                        // extend the last request if its response has not
                        // begun, and are otherwise ignored.
                        let response_not_begun = self.response.is_none() || self.requests.len() > 1;
                        if let (Some(last), true) = (self.requests.back_mut(), response_not_begun) {
                            last.end_ns = Some(at_ns);
                        }
                        return;
                    }
                    self.requests.push_back(Request {
                        started_ns: at_ns,
                        end_ns: None,
                        head_only_response: seen.starts_with(b"HEAD "),
                    });
                    out.push(Outcome::Started { at_ns });
                    self.reading = Reading::Head { head: Vec::new() };
                }
                Reading::Head { head } => {
                    // Most heads arrive whole in one read: parse them where
                    // they are, and keep bytes only for a head that goes on.
                    let before = head.len();
                    if before > 0 {
                        head.extend_from_slice(seen);
                    }
                    let text: &[u8] = if before > 0 { head } else { seen };
                    if let Some(end) = head_end(text) {
                        let body = body_of(&text[..end]).unwrap_or(Body::Length(0));
                        offset += (end - before) as u64;
                        self.reading = Reading::Body(body);
                        self.finish_request_if_done(at_ns);
                        continue;
                    }
                    if before == 0 {
                        head.extend_from_slice(seen);
                    }
                    if !fully_seen || head.len() > MAX_HEAD {
                        // The head continues beyond what we can see: assume
                        // it ends in this read with no body we can follow.
                        self.reading = Reading::Idle;
                        if let Some(last) = self.requests.back_mut() {
                            last.end_ns = Some(at_ns);
                        }
                    }
                    return;
                }
                Reading::Body(Body::Length(remaining)) => {
                    let take = (*remaining).min(bytes - offset);
                    *remaining -= take;
                    offset += take;
                    self.finish_request_if_done(at_ns);
                }
                Reading::Body(Body::Chunked) => {
                    // Chunked request bodies are rare for inference APIs:
                    // the request ends when a read ends with the terminator.
                    if fully_seen && seen.ends_with(CHUNKED_END) {
                        self.reading = Reading::Body(Body::Length(0));
                        self.finish_request_if_done(at_ns);
                    }
                    return;
                }
                Reading::Body(Body::UntilClose) => return,
            }
        }
    }

    fn finish_request_if_done(&mut self, at_ns: u64) {
        if let Reading::Body(Body::Length(0)) = self.reading {
            if let Some(last) = self.requests.back_mut() {
                last.end_ns = Some(at_ns);
            }
            self.reading = Reading::Idle;
        }
    }

    fn on_write(&mut self, at_ns: u64, bytes: u64, prefix: &[u8], suffix: &[u8], out: &mut Vec<Outcome>) {
        if self.requests.is_empty() {
            // A response to a request we never saw (joined mid-stream).
            return;
        }
        let fully_seen = prefix.len() as u64 == bytes;
        let mut body_bytes = bytes;
        let response = match self.response.as_mut() {
            Some(response) => response,
            None => {
                if !prefix.starts_with(b"HTTP/1.") && !b"HTTP/1.".starts_with(prefix) {
                    return;
                }
                self.response = Some(Response {
                    first_byte_ns: at_ns,
                    head: Some(Vec::new()),
                    body: Body::UntilClose,
                    first_body_ns: None,
                });
                self.response.as_mut().expect("just set")
            }
        };
        if let Some(head) = response.head.as_mut() {
            // As for requests: a head seen whole is parsed in place.
            let before = head.len();
            if before > 0 {
                head.extend_from_slice(prefix);
            }
            let text: &[u8] = if before > 0 { head } else { prefix };
            match head_end(text) {
                Some(end) => {
                    body_bytes = bytes.saturating_sub((end - before) as u64);
                    let status = status_of(text).unwrap_or(200);
                    if (100..200).contains(&status) && status != 101 {
                        // Interim response (100 Continue): the real one follows.
                        self.response = None;
                        return;
                    }
                    let head_only = self.requests.front().is_some_and(|r| r.head_only_response);
                    let body = if head_only || status == 204 || status == 304 {
                        Body::Length(0)
                    } else {
                        body_of(&text[..end]).unwrap_or(Body::UntilClose)
                    };
                    response.body = body;
                    response.head = None;
                }
                None if fully_seen && before + prefix.len() <= MAX_HEAD => {
                    if before == 0 {
                        head.extend_from_slice(prefix);
                    }
                    return;
                }
                None => {
                    // Head larger than what we see: assume it ended in this
                    // write and the body started with it.
                    response.head = None;
                    response.body = Body::UntilClose;
                    body_bytes = 1;
                }
            }
        }
        if body_bytes > 0 && response.first_body_ns.is_none() {
            response.first_body_ns = Some(at_ns);
        }
        let done = match &mut response.body {
            Body::Length(remaining) => {
                *remaining = remaining.saturating_sub(body_bytes);
                *remaining == 0
            }
            Body::Chunked => suffix.ends_with(CHUNKED_END) && body_bytes > 0,
            Body::UntilClose => false,
        };
        if done {
            self.complete(at_ns, out);
        }
    }

    fn complete(&mut self, at_ns: u64, out: &mut Vec<Outcome>) {
        let Some(response) = self.response.take() else { return };
        let Some(request) = self.requests.pop_front() else { return };
        out.push(Outcome::Completed(Timing {
            started_ns: request.started_ns,
            // A server may answer before reading the whole body.
            request_end_ns: request.end_ns.unwrap_or(response.first_byte_ns).min(response.first_byte_ns),
            first_byte_ns: response.first_byte_ns,
            first_body_ns: response.first_body_ns,
            end_ns: at_ns,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays (time, io) pairs and returns every outcome.
    fn replay(steps: &[(u64, Io<'_>)]) -> (Vec<Outcome>, Http1Connection) {
        let mut connection = Http1Connection::default();
        let mut out = Vec::new();
        for (at, io) in steps {
            connection.observe(*at, *io, &mut out);
        }
        (out, connection)
    }

    fn read(bytes: &[u8]) -> Io<'_> {
        Io::Read { bytes: bytes.len() as u64, prefix: bytes }
    }

    fn write(bytes: &[u8]) -> Io<'_> {
        let suffix = &bytes[bytes.len().saturating_sub(8)..];
        Io::Write { bytes: bytes.len() as u64, prefix: bytes, suffix }
    }

    fn completed(out: &[Outcome]) -> Vec<Timing> {
        out.iter().filter_map(|o| if let Outcome::Completed(t) = o { Some(*t) } else { None }).collect()
    }

    /// Headers first, body later (uvicorn/vLLM): TTFT is measured to the
    /// first body byte, latency to the end of the Content-Length body.
    #[test]
    fn content_length_with_headers_before_body() {
        let (out, connection) = replay(&[
            (100, read(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd")),
            (150, write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")),
            (400, write(b"0123456789")),
        ]);
        assert_eq!(out[0], Outcome::Started { at_ns: 100 });
        let timing = completed(&out)[0];
        assert_eq!(
            timing,
            Timing { started_ns: 100, request_end_ns: 100, first_byte_ns: 150, first_body_ns: Some(400), end_ns: 400 }
        );
        assert_eq!(timing.ttft_ns(), Some(300));
        assert_eq!(connection.in_flight(), 0);
    }

    /// A request body split across reads: the request ends at the last read.
    #[test]
    fn request_body_across_reads() {
        let (out, _) = replay(&[
            (10, read(b"POST / HTTP/1.1\r\nContent-Length: 6\r\n\r\nab")),
            (20, read(b"cd")),
            (30, read(b"ef")),
            (40, write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")),
        ]);
        let timing = completed(&out)[0];
        assert_eq!((timing.request_end_ns, timing.first_body_ns, timing.end_ns), (30, Some(40), 40));
        assert_eq!(timing.ttft_ns(), Some(10));
    }

    /// SSE over chunked encoding: TTFT at the first chunk, end at the
    /// terminator seen in the suffix of the last write.
    #[test]
    fn chunked_streaming() {
        let (out, _) = replay(&[
            (0, read(b"GET /stream HTTP/1.1\r\n\r\n")),
            (5, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n")),
            (50, write(b"6\r\ndata 1\r\n")),
            (60, write(b"6\r\ndata 2\r\n")),
            (70, write(b"0\r\n\r\n")),
        ]);
        let timing = completed(&out)[0];
        assert_eq!((timing.first_byte_ns, timing.first_body_ns, timing.end_ns), (5, Some(50), 70));
    }

    /// Keep-alive and pipelining: requests complete in order with their own timings.
    #[test]
    fn keep_alive_and_pipelined() {
        let (out, connection) = replay(&[
            (0, read(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")),
            (10, write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")),
            (20, write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")),
            (30, read(b"GET /c HTTP/1.1\r\n\r\n")),
            (35, write(b"HTTP/1.1 204 No Content\r\n\r\n")),
        ]);
        let starts = out.iter().filter(|o| matches!(o, Outcome::Started { .. })).count();
        assert_eq!(starts, 3);
        let done = completed(&out);
        assert_eq!(done.iter().map(|t| t.end_ns).collect::<Vec<_>>(), vec![10, 20, 35]);
        assert_eq!(done[2].first_body_ns, None, "204 has no body");
        assert_eq!(connection.in_flight(), 0);
    }

    /// A request line split across reads still starts one request.
    #[test]
    fn split_request_line() {
        let (out, _) = replay(&[
            (1, read(b"GE")),
            (2, read(b"T / HTTP/1.1\r\nHo")),
            (3, read(b"st: x\r\n\r\n")),
            (4, write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")),
        ]);
        assert_eq!(out[0], Outcome::Started { at_ns: 1 });
        assert_eq!(completed(&out)[0].request_end_ns, 3);
    }

    /// A client that goes away mid-stream aborts the request; so does a
    /// server close before the response ended; a close-delimited body ends
    /// at close.
    #[test]
    fn aborts_and_close_delimited() {
        let (out, connection) = replay(&[
            (0, read(b"GET / HTTP/1.1\r\n\r\n")),
            (5, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")),
            (9, write(b"3\r\nabc\r\n")),
            (10, Io::Eof),
        ]);
        assert_eq!(out.last(), Some(&Outcome::Aborted { started_ns: 0, at_ns: 10 }));
        assert_eq!(connection.in_flight(), 0);

        let (out, _) = replay(&[(0, read(b"GET / HTTP/1.1\r\n\r\n")), (3, Io::WriteError)]);
        assert_eq!(out.last(), Some(&Outcome::Aborted { started_ns: 0, at_ns: 3 }));

        let (out, _) = replay(&[
            (0, read(b"GET / HTTP/1.0\r\n\r\n")),
            (5, write(b"HTTP/1.0 200 OK\r\n\r\nhello")),
            (8, Io::Close),
        ]);
        assert_eq!(completed(&out)[0].end_ns, 8);
    }

    /// Joined mid-stream and garbage: nothing starts until a real request
    /// line, and random bytes never open a request.
    #[test]
    fn garbage_and_mid_stream() {
        let (out, connection) = replay(&[
            (0, write(b"tail of a response we never saw the request of")),
            (1, read(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")),
            (2, read(&[0xff; 64])),
            (3, read(b"POSTAL SERVICE")),
        ]);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(connection.in_flight(), 0);
    }

    /// Only a prefix is visible: a head that does not end inside it is
    /// assumed to end in that syscall; lengths still frame the rest.
    #[test]
    fn truncated_capture() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n";
        let (out, _) = replay(&[
            (0, read(b"GET / HTTP/1.1\r\n\r\n")),
            (10, Io::Write { bytes: 600, prefix: head, suffix: b"xxxxxxxx" }),
            (20, Io::Write { bytes: 5000, prefix: b"more", suffix: b"xxxxxxxx" }),
            (30, Io::Close),
        ]);
        let timing = completed(&out)[0];
        assert_eq!((timing.first_body_ns, timing.end_ns), (Some(10), 30));
        // 100 Continue is interim; HEAD responses have no body.
        let (out, _) = replay(&[
            (0, read(b"HEAD / HTTP/1.1\r\n\r\n")),
            (1, write(b"HTTP/1.1 100 Continue\r\n\r\n")),
            (2, write(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")),
        ]);
        assert_eq!(completed(&out)[0].end_ns, 2);
    }
}
