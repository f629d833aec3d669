//! What KEDA has asked the scaler for lately, and so what the scaler asks
//! the node agents for: windows, and pod queries (namespace and selector)
//! each with its metrics and whether per-port values matter. Entries
//! nobody asked for in `IDLE_EXPIRY` leave the poll; a node then sends
//! nothing for them.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use podgpu_proto::node::{PodQuery, Selection, SnapshotRequest};

use crate::selection::{PodSelection, MAX_QUERIES, MAX_WINDOWS};
use crate::signals::aggregate::WorkloadQuery;
use crate::signals::metric::Metric;

/// An entry no KEDA call asked for in this long leaves the poll.
pub const IDLE_EXPIRY: Duration = Duration::from_secs(600);

/// What one answer needs from the nodes: the query's namespace, selector,
/// metric and window, and per-port values when its traffic filter is not
/// the whole pod's.
pub type Ask<'a> = WorkloadQuery<'a>;

/// Whether `ask` needs per-port values (it counts some ports only, or adds
/// probe traffic).
fn needs_ports(ask: &Ask<'_>) -> bool {
    !ask.traffic.is_pod_level()
}

/// How much the scaler fetches from each node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FetchMode {
    /// Only the pods and metrics that live triggers ask for.
    #[default]
    Selected,
    /// Every pod with every metric (a cluster-wide `/pods`, at a cost that
    /// grows with every pod of the cluster).
    All,
}

/// What a node snapshot was fetched with: it answers only asks it covers.
#[derive(Debug, Default)]
pub struct Fetched {
    /// Windows carried.
    pub windows: Vec<f64>,
    /// Pods and metrics carried (`None`: all of them).
    pub selection: Option<PodSelection>,
}

impl Fetched {
    /// Whether a snapshot fetched this way holds everything `ask` needs.
    pub fn covers(&self, ask: &Ask<'_>) -> bool {
        self.has_window(ask.window_s) && (self.selection.is_none() || self.query_index(ask).is_some())
    }

    /// The index of the selection's query that carries `ask`.
    pub fn query_index(&self, ask: &Ask<'_>) -> Option<u32> {
        self.selection.as_ref()?.query_index(ask.namespace, ask.selector, ask.metric, needs_ports(ask))
    }

    /// Whether snapshots carry `window_s`.
    pub fn has_window(&self, window_s: f64) -> bool {
        self.windows.iter().any(|w| (w - window_s).abs() < 1e-6)
    }
}

/// One pod query asked for lately, with what was asked of it.
#[derive(Debug)]
struct QueryInterest {
    at: Instant,
    metrics: HashMap<Metric, Instant>,
    ports: Option<Instant>,
}

/// Recent asks, by what they add to the poll.
#[derive(Debug, Default)]
pub struct Interest {
    windows: HashMap<u64, (f64, Instant)>,
    queries: HashMap<(String, String), QueryInterest>,
}

impl Interest {
    /// Records `ask`; true when it adds something the poll did not carry.
    pub fn note(&mut self, ask: &Ask<'_>) -> bool {
        let now = Instant::now();
        let mut new = self.windows.insert(ask.window_s.to_bits(), (ask.window_s, now)).is_none();
        let key = (ask.namespace.to_string(), ask.selector.to_string());
        let query = self.queries.entry(key).or_insert_with(|| {
            new = true;
            QueryInterest { at: now, metrics: HashMap::new(), ports: None }
        });
        query.at = now;
        new |= query.metrics.insert(ask.metric, now).is_none();
        if needs_ports(ask) {
            new |= query.ports.replace(now).is_none();
        }
        new
    }

    /// The request for the next poll: the default window first, then the
    /// most recently asked, within the node API's limits.
    pub fn request(&mut self, default_window_s: f64, mode: FetchMode) -> (SnapshotRequest, Fetched) {
        let fresh = |at: &Instant| at.elapsed() < IDLE_EXPIRY;
        self.windows.retain(|_, (_, at)| fresh(at));
        self.queries.retain(|_, query| fresh(&query.at));
        for query in self.queries.values_mut() {
            query.metrics.retain(|_, at| fresh(at));
            query.ports = query.ports.filter(fresh);
        }

        let mut recent: Vec<(f64, Instant)> = self.windows.values().copied().collect();
        recent.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        let mut windows = vec![default_window_s];
        for (window, _) in recent {
            if windows.len() >= MAX_WINDOWS {
                break;
            }
            if !windows.iter().any(|w| (w - window).abs() < 1e-6) {
                windows.push(window);
            }
        }
        let selection = (mode == FetchMode::Selected).then(|| {
            let mut queries: Vec<(&(String, String), &QueryInterest)> = self.queries.iter().collect();
            queries.sort_by_key(|entry| std::cmp::Reverse(entry.1.at));
            queries.truncate(MAX_QUERIES);
            Selection {
                queries: queries
                    .into_iter()
                    .map(|((namespace, selector), query)| {
                        let mut metrics: Vec<String> = query.metrics.keys().map(|m| m.name().to_string()).collect();
                        metrics.sort_unstable();
                        PodQuery {
                            namespace: namespace.clone(),
                            label_selector: selector.clone(),
                            metrics,
                            ports: query.ports.is_some(),
                        }
                    })
                    .collect(),
            }
        });
        let fetched = Fetched {
            windows: windows.clone(),
            // What we built from parsed selectors and known names decodes.
            selection: selection.clone().map(|s| PodSelection::decode(s).expect("the scaler's own selection")),
        };
        (SnapshotRequest { windows_s: windows, selection }, fetched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::selector::LabelSelector;
    use crate::signals::aggregate::Aggregation;
    use crate::signals::traffic_filter::TrafficFilter;

    fn ask<'a>(selector: &'a LabelSelector, metric: Metric, window_s: f64) -> Ask<'a> {
        Ask { namespace: "ns", selector, metric, window_s, aggregation: Aggregation::Sum, traffic: Default::default() }
    }

    const PORT: [u16; 1] = [8000];

    fn on_a_port(ask: Ask<'_>) -> Ask<'_> {
        Ask { traffic: TrafficFilter { ports: &PORT, include_probes: false }, ..ask }
    }

    /// A poll fetched for one ask covers it and its sibling quantiles, and
    /// not another selector, metric, window or the per-port values.
    #[test]
    fn a_poll_covers_what_was_asked() {
        let llm = LabelSelector::parse("app=llm").unwrap();
        let other = LabelSelector::parse("app=other").unwrap();
        let mut interest = Interest::default();
        assert!(interest.note(&ask(&llm, Metric::TtftMs(crate::signals::metric::Quantile::P99), 30.0)));
        assert!(!interest.note(&ask(&llm, Metric::TtftMs(crate::signals::metric::Quantile::P99), 30.0)));
        let (request, fetched) = interest.request(10.0, FetchMode::Selected);
        assert_eq!(request.windows_s, [10.0, 30.0]);
        let selection = request.selection.expect("selected mode sends a selection");
        assert_eq!(selection.queries.len(), 1);
        assert_eq!(selection.queries[0].label_selector, "app=llm");
        assert_eq!(selection.queries[0].metrics, ["ttft_ms_p99"]);
        assert!(fetched.covers(&ask(&llm, Metric::TtftMs(crate::signals::metric::Quantile::P50), 10.0)));
        assert!(!fetched.covers(&ask(&other, Metric::TtftMs(crate::signals::metric::Quantile::P50), 10.0)));
        assert!(!fetched.covers(&ask(&llm, Metric::GpuSmUtil, 10.0)));
        assert!(!fetched.covers(&ask(&llm, Metric::TtftMs(crate::signals::metric::Quantile::P50), 20.0)));
        assert!(!fetched.covers(&on_a_port(ask(&llm, Metric::TtftMs(crate::signals::metric::Quantile::P50), 10.0))));

        let (request, fetched) = interest.request(10.0, FetchMode::All);
        assert!(request.selection.is_none());
        assert!(fetched.covers(&on_a_port(ask(&other, Metric::GpuSmUtil, 30.0))));
    }

    /// However many windows KEDA asks for, a poll stays within what a node
    /// accepts, the most recent first.
    #[test]
    fn windows_stay_within_the_node_limit() {
        let all = LabelSelector::default();
        let mut interest = Interest::default();
        for window in 1..=70 {
            interest.note(&ask(&all, Metric::GpuSmUtil, window as f64));
            std::thread::sleep(Duration::from_micros(50));
        }
        let (request, _) = interest.request(10.0, FetchMode::Selected);
        assert_eq!(request.windows_s[0], 10.0);
        assert_eq!(request.windows_s.len(), MAX_WINDOWS);
        assert!(request.windows_s.contains(&70.0), "the most recent is kept");
    }
}
