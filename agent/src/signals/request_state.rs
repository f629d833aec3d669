//! Request-side state the collector keeps per pod and per server port:
//! socket bytes, request outcomes and latency windows, and the history
//! point they contribute each tick.
use super::buckets::ServingBuckets;
use super::history::{History, Point};
use super::latency::LatencyWindow;
use super::view::RequestCounts;
use crate::probes::requests::http1::Outcome;

/// Request-side counters of a pod, or of one server port of a pod.
#[derive(Debug)]
pub struct RequestState {
    /// Bytes the server read, cumulative.
    pub recv_bytes: u64,
    /// Bytes the server wrote, cumulative.
    pub send_bytes: u64,
    /// Request outcomes, cumulative (for rates).
    pub requests: RequestCounts,
    /// Requests open now, as the request tracker counts them (a level set
    /// every tick, never derived from the cumulative counts: a lost ending
    /// must not hold it up).
    pub open: u64,
    /// TTFT distribution.
    pub ttft: LatencyWindow,
    /// Latency distribution.
    pub latency: LatencyWindow,
    /// TTFT since first seen, for Prometheus.
    pub ttft_total: ServingBuckets,
    /// Latency since first seen, for Prometheus.
    pub latency_total: ServingBuckets,
}

impl RequestState {
    pub fn new(retention_s: f64) -> Self {
        Self {
            recv_bytes: 0,
            send_bytes: 0,
            requests: RequestCounts::default(),
            open: 0,
            ttft: LatencyWindow::new(retention_s),
            latency: LatencyWindow::new(retention_s),
            ttft_total: ServingBuckets::default(),
            latency_total: ServingBuckets::default(),
        }
    }

    pub fn add_bytes(&mut self, received: u64, sent: u64) {
        self.recv_bytes += received;
        self.send_bytes += sent;
    }

    pub fn record(&mut self, now_s: f64, outcome: &Outcome) {
        match outcome {
            Outcome::Started { .. } => self.requests.started += 1,
            Outcome::Completed(timing) => {
                self.requests.completed += 1;
                self.latency.record(now_s, timing.latency_ns());
                self.latency_total.record(timing.latency_ns());
                if let Some(ttft) = timing.ttft_ns() {
                    self.ttft.record(now_s, ttft);
                    self.ttft_total.record(ttft);
                }
            }
            Outcome::Aborted { .. } => self.requests.aborted += 1,
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.open
    }

    /// A history point of the request-side counters (GPU fields zero).
    pub fn point(&self, at_s: f64) -> Point {
        Point {
            at_s,
            recv_bytes: self.recv_bytes,
            send_bytes: self.send_bytes,
            requests_started: self.requests.started,
            ..Point::default()
        }
    }
}

/// One server port of a pod: its counters and their history, for
/// triggers that count only some ports.
#[derive(Debug)]
pub struct PortState {
    /// The port's counters.
    pub requests: RequestState,
    /// Their history, for rates over any window.
    pub history: History,
}
