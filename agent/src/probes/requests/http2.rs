//! HTTP/2 (and gRPC) request tracking from the server's side, fed with the
//! frame headers the kernel walked in each read and write.
//!
//! A stream starts with the client's HEADERS. The request ends with the
//! client's END_STREAM. The first response byte is the server's HEADERS,
//! and TTFT ends at its first DATA frame with payload (the first gRPC
//! message). The response ends with the server's END_STREAM (trailers for
//! gRPC). RST_STREAM from either side aborts the stream; end of connection
//! aborts every open stream.
//!
//! When the kernel loses the frame boundary, the bytes it could not walk
//! may have held the END_STREAM of any open stream. Those streams become
//! unconfirmed until a frame of theirs is seen again; one still
//! unconfirmed after `LOST_SYNC_GRACE_NS` is ended as aborted, so a lost
//! ending on a long-lived gRPC connection heals instead of staying in
//! flight for the connection's life.
use std::collections::HashMap;

use podgpu_common::H2Frame;

use super::http1::{Outcome, Timing};

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const END_STREAM: u8 = 0x1;
/// Bound on open streams per connection (servers default to ~100-250).
const MAX_STREAMS: usize = 1024;

/// How long a stream may stay unconfirmed after a lost frame boundary. A
/// live stream that sends nothing for this long after a loss is ended
/// early (under-counted until it ends); a stream whose END_STREAM was lost
/// leaves in flight after this long instead of never.
pub const LOST_SYNC_GRACE_NS: u64 = 30_000_000_000;

#[derive(Debug, Default)]
struct Stream {
    started_ns: u64,
    request_end_ns: Option<u64>,
    first_byte_ns: Option<u64>,
    first_body_ns: Option<u64>,
    /// Since when its ending may have been in bytes the kernel could not
    /// walk (cleared by any frame of the stream).
    unconfirmed_since_ns: Option<u64>,
}

/// One HTTP/2 connection's open streams.
#[derive(Debug, Default)]
pub struct Http2Connection {
    streams: HashMap<u32, Stream>,
}

impl Http2Connection {
    /// Streams started and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.streams.len()
    }

    /// Frames the server read (client to server) at `at_ns`.
    pub fn on_read(&mut self, at_ns: u64, frames: &[H2Frame], out: &mut Vec<Outcome>) {
        for frame in frames.iter().filter(|f| f.stream_id != 0) {
            if let Some(stream) = self.streams.get_mut(&frame.stream_id) {
                stream.unconfirmed_since_ns = None;
            }
            let end_stream = frame.flags & END_STREAM != 0;
            match frame.kind {
                HEADERS => {
                    let is_new = !self.streams.contains_key(&frame.stream_id);
                    // Client-initiated streams are odd; trailers on a known
                    // stream are not a new request.
                    if is_new && frame.stream_id % 2 == 1 && self.streams.len() < MAX_STREAMS {
                        self.streams.insert(frame.stream_id, Stream { started_ns: at_ns, ..Stream::default() });
                        out.push(Outcome::Started { at_ns });
                    }
                    if let (true, Some(stream)) = (end_stream, self.streams.get_mut(&frame.stream_id)) {
                        stream.request_end_ns = Some(at_ns);
                    }
                }
                DATA if end_stream => {
                    if let Some(stream) = self.streams.get_mut(&frame.stream_id) {
                        stream.request_end_ns = Some(at_ns);
                    }
                }
                RST_STREAM => self.abort(frame.stream_id, at_ns, out),
                _ => {}
            }
        }
    }

    /// Frames the server wrote (server to client) at `at_ns`.
    pub fn on_write(&mut self, at_ns: u64, frames: &[H2Frame], out: &mut Vec<Outcome>) {
        for frame in frames.iter().filter(|f| f.stream_id != 0) {
            let Some(stream) = self.streams.get_mut(&frame.stream_id) else { continue };
            stream.unconfirmed_since_ns = None;
            match frame.kind {
                HEADERS | DATA => {
                    stream.first_byte_ns.get_or_insert(at_ns);
                    if frame.kind == DATA && frame.length > 0 {
                        stream.first_body_ns.get_or_insert(at_ns);
                    }
                    if frame.flags & END_STREAM != 0 {
                        self.complete(frame.stream_id, at_ns, out);
                    }
                }
                RST_STREAM => self.abort(frame.stream_id, at_ns, out),
                _ => {}
            }
        }
    }

    /// The kernel lost the frame boundary at `at_ns`: every open stream's
    /// ending may have been in the bytes it skipped.
    pub fn lost_sync(&mut self, at_ns: u64) {
        for stream in self.streams.values_mut() {
            stream.unconfirmed_since_ns.get_or_insert(at_ns);
        }
    }

    /// Aborts the streams unconfirmed for longer than `LOST_SYNC_GRACE_NS`
    /// at `now_ns`; how many.
    pub fn expire_unconfirmed(&mut self, now_ns: u64, out: &mut Vec<Outcome>) -> u64 {
        let expired: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| {
                s.unconfirmed_since_ns.is_some_and(|since| now_ns.saturating_sub(since) > LOST_SYNC_GRACE_NS)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.abort(*id, now_ns, out);
        }
        expired.len() as u64
    }

    /// The connection ended: every open stream is aborted.
    pub fn close(&mut self, at_ns: u64, out: &mut Vec<Outcome>) {
        for (_, stream) in self.streams.drain() {
            out.push(Outcome::Aborted { started_ns: stream.started_ns, at_ns });
        }
    }

    fn abort(&mut self, stream_id: u32, at_ns: u64, out: &mut Vec<Outcome>) {
        if let Some(stream) = self.streams.remove(&stream_id) {
            out.push(Outcome::Aborted { started_ns: stream.started_ns, at_ns });
        }
    }

    fn complete(&mut self, stream_id: u32, at_ns: u64, out: &mut Vec<Outcome>) {
        let Some(stream) = self.streams.remove(&stream_id) else { return };
        let first_byte_ns = stream.first_byte_ns.unwrap_or(at_ns);
        out.push(Outcome::Completed(Timing {
            started_ns: stream.started_ns,
            // A server may answer before the client half-closes.
            request_end_ns: stream.request_end_ns.unwrap_or(first_byte_ns).min(first_byte_ns),
            first_byte_ns,
            first_body_ns: stream.first_body_ns,
            end_ns: at_ns,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream_id: u32, flags: u8, length: u32) -> H2Frame {
        H2Frame { length, stream_id, kind, flags, _pad: [0; 2] }
    }

    /// A gRPC unary call: HEADERS + DATA(END_STREAM) in, HEADERS + DATA +
    /// trailers(END_STREAM) out.
    #[test]
    fn unary_call() {
        let mut connection = Http2Connection::default();
        let mut out = Vec::new();
        connection.on_read(10, &[frame(HEADERS, 1, 0x4, 60), frame(DATA, 1, END_STREAM, 20)], &mut out);
        connection.on_write(50, &[frame(HEADERS, 1, 0x4, 10), frame(DATA, 1, 0, 30)], &mut out);
        connection.on_write(52, &[frame(HEADERS, 1, 0x5, 15)], &mut out);
        assert_eq!(out[0], Outcome::Started { at_ns: 10 });
        let Outcome::Completed(timing) = out[1] else { panic!("{out:?}") };
        assert_eq!(
            timing,
            Timing { started_ns: 10, request_end_ns: 10, first_byte_ns: 50, first_body_ns: Some(50), end_ns: 52 }
        );
        assert_eq!(connection.in_flight(), 0);
    }

    /// Server streaming across writes, interleaved streams: TTFT is the
    /// first DATA of each stream.
    #[test]
    fn interleaved_streams() {
        let mut connection = Http2Connection::default();
        let mut out = Vec::new();
        connection.on_read(0, &[frame(HEADERS, 1, 0x5, 40), frame(HEADERS, 3, 0x5, 40)], &mut out);
        connection.on_write(5, &[frame(HEADERS, 1, 0x4, 8), frame(HEADERS, 3, 0x4, 8)], &mut out);
        connection.on_write(100, &[frame(DATA, 3, 0, 12)], &mut out);
        connection.on_write(200, &[frame(DATA, 1, 0, 12), frame(DATA, 3, 0, 12)], &mut out);
        connection.on_write(300, &[frame(HEADERS, 1, 0x5, 4), frame(HEADERS, 3, 0x5, 4)], &mut out);
        let done: Vec<Timing> =
            out.iter().filter_map(|o| if let Outcome::Completed(t) = o { Some(*t) } else { None }).collect();
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].ttft_ns(), Some(200));
        assert_eq!(done[1].ttft_ns(), Some(100));
    }

    /// After a lost boundary, a stream that shows a frame again stays; one
    /// that shows nothing for the grace period is aborted, once.
    #[test]
    fn lost_endings_after_a_lost_boundary_expire() {
        let mut connection = Http2Connection::default();
        let mut out = Vec::new();
        connection.on_read(0, &[frame(HEADERS, 1, 0x5, 40), frame(HEADERS, 3, 0x5, 40)], &mut out);
        connection.lost_sync(1_000);
        // Stream 3 is seen again: its ending was not in the lost bytes.
        connection.on_write(2_000, &[frame(DATA, 3, 0, 12)], &mut out);
        assert_eq!(connection.expire_unconfirmed(LOST_SYNC_GRACE_NS, &mut out), 0, "within the grace period");
        let later = 1_000 + LOST_SYNC_GRACE_NS + 1;
        assert_eq!(connection.expire_unconfirmed(later, &mut out), 1);
        assert_eq!(connection.in_flight(), 1);
        assert_eq!(out.last(), Some(&Outcome::Aborted { started_ns: 0, at_ns: later }));
        assert_eq!(connection.expire_unconfirmed(later * 2, &mut out), 0, "stream 3 was confirmed");
        // A loss while stream 3 is open starts its own grace period.
        connection.lost_sync(later * 2);
        assert_eq!(connection.expire_unconfirmed(later * 2 + LOST_SYNC_GRACE_NS + 1, &mut out), 1);
        assert_eq!(connection.in_flight(), 0);
    }

    /// RST_STREAM aborts; the end of the connection aborts what is left;
    /// server pushes and connection-level frames are ignored.
    #[test]
    fn resets_and_close() {
        let mut connection = Http2Connection::default();
        let mut out = Vec::new();
        connection.on_read(
            0,
            &[frame(HEADERS, 1, 0x5, 40), frame(HEADERS, 3, 0x5, 40), frame(HEADERS, 2, 0x5, 1)],
            &mut out,
        );
        connection.on_read(1, &[frame(RST_STREAM, 1, 0, 4), frame(0x7, 0, 0, 8)], &mut out);
        assert_eq!(out.iter().filter(|o| matches!(o, Outcome::Started { .. })).count(), 2);
        assert_eq!(out.last(), Some(&Outcome::Aborted { started_ns: 0, at_ns: 1 }));
        connection.close(9, &mut out);
        assert_eq!(out.last(), Some(&Outcome::Aborted { started_ns: 0, at_ns: 9 }));
        assert_eq!(connection.in_flight(), 0);
    }
}
