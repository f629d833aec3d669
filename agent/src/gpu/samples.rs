//! Folding NVML process-utilization samples into one value per process per
//! poll.
//!
//! NVML keeps a ring of samples per device (about one per process every
//! 1/6 s) and returns those newer than a timestamp the caller passes; some
//! drivers return the whole ring regardless. A `SampleCursor` per device
//! remembers the newest timestamp seen, drops anything not newer, drops
//! duplicates of the same (pid, timestamp), and averages what is left per
//! process. Both the NVML backend and the simulator go through it, so the
//! simulator exercises the real folding code.
use std::collections::{HashMap, HashSet};

/// One sample as NVML reports it (`nvmlProcessUtilizationSample_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawSample {
    /// Host pid.
    pub pid: u32,
    /// CPU timestamp in microseconds.
    pub timestamp_us: u64,
    /// SM utilization, percent.
    pub sm: u32,
    /// Memory (bandwidth) utilization, percent.
    pub mem: u32,
    /// Encoder utilization, percent.
    pub enc: u32,
    /// Decoder utilization, percent.
    pub dec: u32,
}

/// A process's mean utilization over one poll interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessUtil {
    /// SM (compute) percent.
    pub sm_percent: f64,
    /// Memory-bandwidth percent.
    pub mem_bw_percent: f64,
    /// Encoder percent.
    pub enc_percent: f64,
    /// Decoder percent.
    pub dec_percent: f64,
    /// Distinct samples folded into the means.
    pub samples: u32,
}

/// The newest sample timestamp consumed from one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleCursor {
    last_seen_us: Option<u64>,
}

impl SampleCursor {
    /// The timestamp to pass to NVML: only newer samples are wanted.
    pub fn last_seen_us(&self) -> Option<u64> {
        self.last_seen_us
    }

    /// Forgets the position (after a driver reload timestamps may restart).
    pub fn reset(&mut self) {
        self.last_seen_us = None;
    }

    /// Folds a batch into per-process means and advances past it. Samples
    /// at or before the cursor and duplicates are ignored, so feeding the
    /// same buffer twice yields nothing the second time.
    pub fn fold(&mut self, batch: &[RawSample]) -> HashMap<u32, ProcessUtil> {
        let mut seen: HashSet<(u32, u64)> = HashSet::with_capacity(batch.len());
        let mut sums: HashMap<u32, ProcessUtil> = HashMap::new();
        let mut newest = self.last_seen_us;
        for sample in batch {
            if self.last_seen_us.is_some_and(|cursor| sample.timestamp_us <= cursor) {
                continue;
            }
            if !seen.insert((sample.pid, sample.timestamp_us)) {
                continue;
            }
            let entry = sums.entry(sample.pid).or_default();
            entry.sm_percent += f64::from(sample.sm);
            entry.mem_bw_percent += f64::from(sample.mem);
            entry.enc_percent += f64::from(sample.enc);
            entry.dec_percent += f64::from(sample.dec);
            entry.samples += 1;
            newest = Some(newest.map_or(sample.timestamp_us, |n| n.max(sample.timestamp_us)));
        }
        self.last_seen_us = newest;
        for util in sums.values_mut() {
            let n = f64::from(util.samples);
            util.sm_percent /= n;
            util.mem_bw_percent /= n;
            util.enc_percent /= n;
            util.dec_percent /= n;
        }
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pid: u32, timestamp_us: u64, sm: u32) -> RawSample {
        RawSample { pid, timestamp_us, sm, mem: sm / 2, enc: 0, dec: 1 }
    }

    /// New samples are averaged per process and the cursor advances to the
    /// newest timestamp.
    #[test]
    fn averages_per_process() {
        let mut cursor = SampleCursor::default();
        let folded = cursor.fold(&[sample(1, 100, 20), sample(1, 200, 40), sample(2, 150, 10)]);
        assert_eq!(folded[&1].sm_percent, 30.0);
        assert_eq!(folded[&1].mem_bw_percent, 15.0);
        assert_eq!(folded[&1].dec_percent, 1.0);
        assert_eq!(folded[&1].samples, 2);
        assert_eq!(folded[&2].sm_percent, 10.0);
        assert_eq!(cursor.last_seen_us(), Some(200));
    }

    /// A driver that returns its whole ring every time contributes each
    /// sample once: old ones are skipped, duplicates inside a batch too.
    #[test]
    fn whole_buffer_and_duplicates_are_consumed_once() {
        let mut cursor = SampleCursor::default();
        let ring = [sample(1, 100, 50), sample(1, 100, 50), sample(1, 200, 70)];
        let first = cursor.fold(&ring);
        assert_eq!(first[&1].samples, 2);
        assert_eq!(first[&1].sm_percent, 60.0);
        assert!(cursor.fold(&ring).is_empty(), "the same ring was consumed twice");
        let grown = [&ring[..], &[sample(1, 300, 10)]].concat();
        let second = cursor.fold(&grown);
        assert_eq!(second[&1].samples, 1);
        assert_eq!(second[&1].sm_percent, 10.0);
    }

    /// An empty batch (NVML's NotFound) leaves the cursor where it was;
    /// reset starts over.
    #[test]
    fn empty_batch_and_reset() {
        let mut cursor = SampleCursor::default();
        cursor.fold(&[sample(1, 500, 1)]);
        assert!(cursor.fold(&[]).is_empty());
        assert_eq!(cursor.last_seen_us(), Some(500));
        cursor.reset();
        assert_eq!(cursor.fold(&[sample(1, 5, 9)])[&1].sm_percent, 9.0);
    }
}
