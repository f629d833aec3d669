//! The node API's `Selection`, decoded: which pods, with which metrics, a
//! caller wants, and the limits on a request. Both sides use it: the node
//! agent's server (`serve::node_api`) to answer, and the scaler's client
//! (`cluster`) to ask, so it sits below both.
use podgpu_proto::node::Selection;

use crate::pods::selector::LabelSelector;
use crate::signals::metric::Metric;

/// Most windows one request may ask for.
pub const MAX_WINDOWS: usize = 8;
/// Most pod queries one selection may carry (every live ScaledObject's
/// selector and upstream, cluster-wide).
pub const MAX_QUERIES: usize = 4096;
/// Longest namespace or selector text in a query.
const MAX_QUERY_TEXT: usize = 1024;

/// One decoded query of a `Selection`.
#[derive(Clone, Debug)]
struct Query {
    namespace: String,
    selector: LabelSelector,
    metrics: Vec<Metric>,
    ports: bool,
}

impl Query {
    fn wants(&self, metric: Metric) -> bool {
        self.metrics.iter().any(|wanted| match (wanted, metric) {
            (Metric::TtftMs(_), Metric::TtftMs(_))
            | (Metric::LatencyMs(_), Metric::LatencyMs(_))
            | (Metric::EngineTtftMs(_), Metric::EngineTtftMs(_)) => true,
            _ => *wanted == metric,
        })
    }
}

/// A decoded `Selection`: which pods, with which metrics, a caller wants.
#[derive(Clone, Debug, Default)]
pub struct PodSelection {
    queries: Vec<Query>,
}

/// What a selection sends of one pod: the queries that select it.
#[derive(Clone, Debug, Default)]
pub struct PodPick {
    /// Indexes of the queries that select the pod.
    pub selected_by: Vec<u32>,
    /// A pod of unknown labels: sent without values.
    pub pending: bool,
}

impl PodSelection {
    /// Checks and parses a selection; the error names the bad field.
    pub fn decode(selection: Selection) -> Result<Self, String> {
        if selection.queries.len() > MAX_QUERIES {
            return Err(format!("selection.queries: at most {MAX_QUERIES}"));
        }
        let queries = selection
            .queries
            .into_iter()
            .enumerate()
            .map(|(index, query)| {
                let field = format!("selection.queries[{index}]");
                if query.namespace.len() > MAX_QUERY_TEXT || query.label_selector.len() > MAX_QUERY_TEXT {
                    return Err(format!("{field}: longer than {MAX_QUERY_TEXT} bytes"));
                }
                let selector =
                    LabelSelector::parse(&query.label_selector).map_err(|e| format!("{field}.label_selector: {e}"))?;
                if query.metrics.len() > Metric::ALL.len() {
                    return Err(format!("{field}.metrics: at most {}", Metric::ALL.len()));
                }
                let metrics = query
                    .metrics
                    .iter()
                    .map(|name| {
                        Metric::from_name(name).ok_or_else(|| format!("{field}.metrics: unknown metric {name:?}"))
                    })
                    .collect::<Result<_, String>>()?;
                Ok(Query { namespace: query.namespace, selector, metrics, ports: query.ports })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { queries })
    }

    /// Whether a pod is sent, and why: the queries that select it, or its
    /// labels are not known yet (it may be selected, and the scaler must
    /// see that). `None`: not sent.
    pub fn pick(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
        pending: bool,
    ) -> Option<PodPick> {
        if pending {
            return Some(PodPick { selected_by: Vec::new(), pending: true });
        }
        let selected_by: Vec<u32> = (0u32..)
            .zip(&self.queries)
            .filter(|(_, query)| query.namespace == namespace && query.selector.matches(labels))
            .map(|(index, _)| index)
            .collect();
        (!selected_by.is_empty()).then_some(PodPick { selected_by, pending: false })
    }

    /// Whether a picked pod is sent with values of `metric` (a percentile
    /// asks for its histogram, so any quantile of it).
    pub fn wants(&self, pick: &PodPick, metric: Metric) -> bool {
        pick.selected_by.iter().any(|&index| self.queries.get(index as usize).is_some_and(|q| q.wants(metric)))
    }

    /// Whether a picked pod is sent with per-port values.
    pub fn ports(&self, pick: &PodPick) -> bool {
        pick.selected_by.iter().any(|&index| self.queries.get(index as usize).is_some_and(|q| q.ports))
    }

    /// The index of the query for exactly this namespace and selector that
    /// carries `metric` (and per-port values when `ports`), if any.
    pub fn query_index(&self, namespace: &str, selector: &LabelSelector, metric: Metric, ports: bool) -> Option<u32> {
        (0u32..).zip(&self.queries).find_map(|(index, q)| {
            (q.namespace == namespace && q.selector == *selector && q.wants(metric) && (q.ports || !ports))
                .then_some(index)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use podgpu_proto::node::PodQuery;

    use super::*;

    /// A selection of `queries` (namespace, selector), each asking for
    /// `metrics` (and per-port values when `ports`).
    pub(crate) fn selection(queries: &[(&str, &str)], metrics: &[&str], ports: bool) -> Selection {
        Selection {
            queries: queries
                .iter()
                .map(|(ns, selector)| PodQuery {
                    namespace: ns.to_string(),
                    label_selector: selector.to_string(),
                    metrics: metrics.iter().map(|m| m.to_string()).collect(),
                    ports,
                })
                .collect(),
        }
    }

    /// A bad selection is refused with the field that is wrong.
    #[test]
    fn bad_selections_name_the_field() {
        let cases = [
            (selection(&[("ns", "app in (x")], &[], false), "selection.queries[0].label_selector"),
            (selection(&[("ns", "")], &["gpu_fun"], false), "selection.queries[0].metrics: unknown metric"),
            (selection(&[("ns", &"a".repeat(MAX_QUERY_TEXT + 1))], &[], false), "selection.queries[0]"),
        ];
        for (bad, field) in cases {
            let error = PodSelection::decode(bad).unwrap_err();
            assert!(error.starts_with(field), "{error}");
        }
        let too_many = Selection { queries: vec![PodQuery::default(); MAX_QUERIES + 1] };
        assert!(PodSelection::decode(too_many).unwrap_err().starts_with("selection.queries: at most"));
    }
}
