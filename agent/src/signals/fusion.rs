//! Where the engine's own view of a pod and the socket probe's disagree.
//! Both count the same requests from different places: the engine from
//! its scheduler (queued + running), the probe from the server's sockets
//! (request seen, answer not finished). The differences say where time or
//! requests go that one of them cannot see (docs/engines.md, "Fusion").
use serde::Serialize;

use super::metric::{Metric, Quantile};
use super::traffic_filter::TrafficFilter;
use super::view::PodView;

/// One pod's engine and socket figures side by side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Fusion {
    /// Engine requests waiting + running (latest scrape).
    pub engine_requests: Option<f64>,
    /// Socket-side requests in flight (now).
    pub socket_requests_in_flight: Option<f64>,
    /// `engine_requests - socket_requests_in_flight`.
    pub requests_gap: Option<f64>,
    /// Engine p50 TTFT over the window, ms.
    pub engine_ttft_ms_p50: Option<f64>,
    /// Socket p50 TTFT over the window, ms.
    pub socket_ttft_ms_p50: Option<f64>,
    /// `socket_ttft_ms_p50 - engine_ttft_ms_p50`: time before the engine's
    /// clock starts (front end, tokenizer, API-server queue) when positive.
    pub ttft_gap_ms_p50: Option<f64>,
}

/// The figures of `pod` over `window_s`; a side with no value leaves its
/// gap unknown.
pub fn fusion(pod: &PodView, window_s: f64) -> Fusion {
    let value = |metric| pod.value(metric, window_s, &TrafficFilter::default());
    let engine_requests = match (value(Metric::EngineRequestsWaiting), value(Metric::EngineRequestsRunning)) {
        (Some(waiting), Some(running)) => Some(waiting + running),
        _ => None,
    };
    let socket_requests_in_flight = value(Metric::RequestsInFlight);
    let engine_ttft_ms_p50 = value(Metric::EngineTtftMs(Quantile::P50));
    let socket_ttft_ms_p50 = value(Metric::TtftMs(Quantile::P50));
    let gap = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
    Fusion {
        engine_requests,
        socket_requests_in_flight,
        requests_gap: gap(engine_requests, socket_requests_in_flight),
        engine_ttft_ms_p50,
        socket_ttft_ms_p50,
        ttft_gap_ms_p50: gap(socket_ttft_ms_p50, engine_ttft_ms_p50),
    }
}
