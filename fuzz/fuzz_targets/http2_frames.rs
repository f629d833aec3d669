//! The HTTP/2 stream tracker fed any frame sequence the kernel walker can
//! report (any types, flags, stream ids and lengths, in any order),
//! interleaved with lost-boundary notices, expiry sweeps and the end of
//! the connection. It must not panic, its open streams stay bounded, and
//! after the connection ends nothing is left in flight.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use podgpu_agent::probes::requests::http1::Outcome;
use podgpu_agent::probes::requests::http2::{Http2Connection, LOST_SYNC_GRACE_NS};
use podgpu_common::H2Frame;

#[derive(Arbitrary, Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream_id: u32,
    length: u32,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read(Vec<Frame>),
    Write(Vec<Frame>),
    LostSync,
    Sweep { seconds: u8 },
}

fn frames(frames: &[Frame]) -> Vec<H2Frame> {
    frames
        .iter()
        .map(|f| H2Frame {
            length: f.length & 0x00ff_ffff,
            stream_id: f.stream_id & 0x7fff_ffff,
            kind: f.kind,
            flags: f.flags,
            _pad: [0; 2],
        })
        .collect()
}

fuzz_target!(|ops: Vec<Op>| {
    let mut connection = Http2Connection::default();
    let mut out = Vec::new();
    let mut now_ns = 1_000u64;
    for op in &ops {
        now_ns += 1_000_000;
        match op {
            Op::Read(list) => connection.on_read(now_ns, &frames(list), &mut out),
            Op::Write(list) => connection.on_write(now_ns, &frames(list), &mut out),
            Op::LostSync => connection.lost_sync(now_ns),
            Op::Sweep { seconds } => {
                now_ns += u64::from(*seconds) * 1_000_000_000;
                connection.expire_unconfirmed(now_ns, &mut out);
            }
        }
        assert!(connection.in_flight() <= 1024, "open streams are bounded");
    }
    let open = connection.in_flight();
    let before = out.len();
    connection.close(now_ns + LOST_SYNC_GRACE_NS, &mut out);
    assert_eq!(connection.in_flight(), 0);
    assert_eq!(out.len() - before, open, "every open stream is aborted at close");
    let started = out.iter().filter(|o| matches!(o, Outcome::Started { .. })).count();
    assert_eq!(started, out.len() - started, "each stream started once and ended once");
});
