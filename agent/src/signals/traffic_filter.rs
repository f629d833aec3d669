//! Which of a pod's server traffic a query counts: the server ports (all
//! when none are named) and whether probe traffic (health checks, metrics
//! scrapes; see `probes::requests::traffic`) counts too. Pod-level values
//! are computed for the default, application traffic on every port.

/// A query's view of a pod's request traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TrafficFilter<'a> {
    /// Only these server ports (every port when empty).
    pub ports: &'a [u16],
    /// Count health-check and metrics-scrape requests too.
    pub include_probes: bool,
}

impl<'a> TrafficFilter<'a> {
    /// Application traffic on `ports` (every port when empty).
    pub fn ports(ports: &'a [u16]) -> Self {
        Self { ports, include_probes: false }
    }

    /// Application traffic on every port: what pod-level values hold.
    pub fn is_pod_level(&self) -> bool {
        self.ports.is_empty() && !self.include_probes
    }

    /// Whether traffic on `port` of class `probe` counts.
    pub fn admits(&self, port: u16, probe: bool) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && (self.include_probes || !probe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ports and probe traffic filter independently.
    #[test]
    fn admits() {
        let all = TrafficFilter::default();
        assert!(all.is_pod_level() && all.admits(8000, false) && !all.admits(8000, true));
        let with_probes = TrafficFilter { ports: &[8000], include_probes: true };
        assert!(with_probes.admits(8000, true) && with_probes.admits(8000, false) && !with_probes.admits(9000, false));
        assert!(!with_probes.is_pod_level());
    }
}
