//! Types shared by the kernel side (`agent-ebpf`) and user space (`agent`).
//!
//! One definition per struct that crosses the kernel boundary: both sides
//! compile this file, so a field added here can never be out of step. Every
//! struct is `#[repr(C)]` with fixed-width fields and no implicit padding, so
//! it can be read from a map as plain bytes (`aya::Pod` with the `user`
//! feature).
#![no_std]
#![deny(missing_docs)]

/// Capacity of the per-cgroup socket counter map. A node rarely runs more
/// than a few hundred containers; the headroom absorbs churn between two
/// user-space garbage collections.
pub const MAX_TRACKED_CGROUPS: u32 = 4096;

/// Capacity of the set of cgroups user space asks the probes to watch.
pub const MAX_WATCHED_CGROUPS: u32 = 4096;

/// Value stored in the watched-cgroup set: which kinds of traffic to count.
/// Only bit 0 (TCP sockets) is defined today.
pub const WATCH_TCP: u32 = 1;

/// Cumulative TCP socket activity of one cgroup, summed per CPU by user space.
///
/// Keyed by the cgroup v2 id (`bpf_get_current_cgroup_id`, the inode of the
/// cgroup directory). Counts only successful calls that moved bytes, and
/// never `MSG_PEEK` reads, which would count the same bytes twice.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketCounters {
    /// Bytes returned by `recvmsg`-family calls on TCP sockets.
    pub recv_bytes: u64,
    /// Number of such calls that returned at least one byte.
    pub recv_calls: u64,
    /// Bytes accepted by `sendmsg`-family calls on TCP sockets.
    pub send_bytes: u64,
    /// Number of such calls that sent at least one byte.
    pub send_calls: u64,
}

impl SocketCounters {
    /// Adds another CPU's (or cgroup's) counters to these.
    pub fn accumulate(&mut self, other: &SocketCounters) {
        self.recv_bytes = self.recv_bytes.wrapping_add(other.recv_bytes);
        self.recv_calls = self.recv_calls.wrapping_add(other.recv_calls);
        self.send_bytes = self.send_bytes.wrapping_add(other.send_bytes);
        self.send_calls = self.send_calls.wrapping_add(other.send_calls);
    }
}

/// Counters the probes keep about themselves (index into the `PROBE_STATS`
/// per-CPU array).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeStat {
    /// Events from watched cgroups that were counted.
    Counted = 0,
    /// Events from watched cgroups lost because the counter map was full.
    MapFull = 1,
}

/// Number of entries in the `PROBE_STATS` array.
pub const PROBE_STAT_COUNT: u32 = 2;

#[cfg(feature = "user")]
// SAFETY: repr(C), four u64 fields, no padding, every bit pattern valid.
unsafe impl aya::Pod for SocketCounters {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The struct has no padding: its size is exactly the sum of its fields,
    /// which is what makes reading it from kernel memory sound.
    #[test]
    fn socket_counters_have_no_padding() {
        assert_eq!(core::mem::size_of::<SocketCounters>(), 4 * 8);
    }

    /// Accumulating wraps like the kernel's u64 counters instead of panicking.
    #[test]
    fn accumulate_adds_fields_and_wraps() {
        let mut a = SocketCounters { recv_bytes: u64::MAX, recv_calls: 1, send_bytes: 2, send_calls: 3 };
        a.accumulate(&SocketCounters { recv_bytes: 2, recv_calls: 1, send_bytes: 5, send_calls: 0 });
        assert_eq!(a, SocketCounters { recv_bytes: 1, recv_calls: 2, send_bytes: 7, send_calls: 3 });
    }
}
