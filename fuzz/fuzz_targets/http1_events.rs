//! The HTTP/1.1 connection parser fed any sequence of what the kernel
//! reports (reads and writes with arbitrary captured bytes, split
//! anywhere; end of stream, failed writes, close), as a lossy ring can
//! deliver it. It must not panic, must keep its open requests bounded by
//! what it was told, and every completed request's times must be ordered.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use podgpu_agent::probes::requests::http1::{Http1Connection, Io, Outcome};
use podgpu_common::{CAPTURE_PREFIX, CAPTURE_SUFFIX};

#[derive(Arbitrary, Debug)]
enum Op {
    Read { extra: u16, bytes: Vec<u8> },
    Write { extra: u16, bytes: Vec<u8>, suffix: Vec<u8> },
    Eof,
    WriteError,
    Close,
    Pause { micros: u16 },
}

fuzz_target!(|ops: Vec<Op>| {
    let mut connection = Http1Connection::default();
    let mut out = Vec::new();
    let mut now_ns = 1_000u64;
    let mut reads = 0usize;
    for op in &ops {
        now_ns += 1_000;
        // As the kernel captures: at most the first 512 and last 8 bytes of
        // a syscall that moved at least that many.
        let io = match op {
            Op::Read { extra, bytes } => {
                reads += 1;
                let prefix = &bytes[..bytes.len().min(CAPTURE_PREFIX)];
                Io::Read { bytes: (prefix.len() + usize::from(*extra)) as u64, prefix }
            }
            Op::Write { extra, bytes, suffix } => {
                let prefix = &bytes[..bytes.len().min(CAPTURE_PREFIX)];
                let suffix = &suffix[..suffix.len().min(CAPTURE_SUFFIX)];
                Io::Write { bytes: (prefix.len().max(suffix.len()) + usize::from(*extra)) as u64, prefix, suffix }
            }
            Op::Eof => Io::Eof,
            Op::WriteError => Io::WriteError,
            Op::Close => Io::Close,
            Op::Pause { micros } => {
                now_ns += u64::from(*micros) * 1_000;
                continue;
            }
        };
        connection.observe(now_ns, io, &mut out);
        // Pipelined requests start at most one per request line, and
        // every request line arrives in some read.
        assert!(connection.in_flight() <= 64 * reads.max(1), "open requests grew without reads");
    }
    for outcome in &out {
        if let Outcome::Completed(timing) = outcome {
            assert!(timing.started_ns <= timing.end_ns, "{timing:?}");
            assert!(timing.first_byte_ns <= timing.end_ns, "{timing:?}");
        }
    }
});
