//! What kind of traffic a connection carries, decided from what the probe
//! saw of it, so that signals count only inference requests:
//! - **probe traffic**: health checks and metrics scrapes (kubelet probes,
//!   Prometheus) on the serving port, recognised by their request path;
//!   counted apart, and included only by triggers that ask for it;
//! - **intra-pod hops**: a connection accepted from a loopback peer inside
//!   a pod's own network namespace comes from another container of the same
//!   pod (a service-mesh sidecar proxying to the app). The request was
//!   already counted where it entered the pod, so it is not counted again.

/// Request paths counted as probe traffic by default: the health and
/// metrics endpoints of vLLM, TGI, Triton (HTTP), trtllm-serve and common
/// frameworks.
pub const DEFAULT_PROBE_PATHS: &str =
    "/health,/healthz,/ready,/readyz,/live,/livez,/ping,/metrics,/prometheus/metrics,/v2/health";

/// Path prefixes that mark a request as probe traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbePaths {
    paths: Vec<Vec<u8>>,
}

impl ProbePaths {
    /// From a comma-separated list (`""`: nothing is probe traffic).
    /// Every entry must start with `/`.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut paths = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
            if !entry.starts_with('/') {
                return Err(format!("probe path {entry:?} does not start with '/'"));
            }
            paths.push(entry.trim_end_matches('/').as_bytes().to_vec());
        }
        Ok(Self { paths })
    }

    /// Whether the request line at the start of `prefix` asks for a probe
    /// path: the path equals an entry or continues it with `/` or `?`.
    pub fn matches_request(&self, prefix: &[u8]) -> bool {
        if self.paths.is_empty() {
            return false;
        }
        let Some(path) = request_path(prefix) else { return false };
        self.paths
            .iter()
            .any(|probe| path.starts_with(probe) && matches!(path.get(probe.len()), None | Some(b'/' | b'?')))
    }
}

/// The path of the request line at the start of `prefix`
/// (`GET /health HTTP/1.1` -> `/health`).
fn request_path(prefix: &[u8]) -> Option<&[u8]> {
    let after_method = &prefix[prefix.iter().position(|&b| b == b' ')? + 1..];
    let end = after_method.iter().position(|&b| b == b' ' || b == b'\r' || b == b'\n').unwrap_or(after_method.len());
    Some(&after_method[..end])
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// What the `sockaddr` the probe reports at accept says about the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// 127.0.0.0/8, ::1 or ::ffff:127.0.0.0/104.
    Loopback,
    /// Any other address.
    Remote,
    /// No address (an IPv6 peer the kernel side could not read, or none
    /// captured): ask procfs.
    Unknown,
}

/// Classifies the peer `sockaddr` of an `Accept` event.
pub fn peer_of(sockaddr: &[u8]) -> Peer {
    let Some(family) = sockaddr.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]])) else { return Peer::Unknown };
    let loopback = match family {
        AF_INET => sockaddr.get(4) == Some(&127),
        AF_INET6 => match sockaddr.get(8..24) {
            Some(addr) if addr.iter().all(|&b| b == 0) => return Peer::Unknown,
            Some(addr) => {
                let v4_mapped = addr[..10].iter().all(|&b| b == 0) && addr[10..12] == [0xff, 0xff] && addr[12] == 127;
                let ipv6_loopback = addr[..15].iter().all(|&b| b == 0) && addr[15] == 1;
                v4_mapped || ipv6_loopback
            }
            None => return Peer::Unknown,
        },
        _ => return Peer::Unknown,
    };
    if loopback {
        Peer::Loopback
    } else {
        Peer::Remote
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Health and metrics paths match with or without query strings and
    /// sub-paths; look-alikes and application paths do not.
    #[test]
    fn probe_paths() {
        let paths = ProbePaths::parse(DEFAULT_PROBE_PATHS).unwrap();
        for yes in [
            &b"GET /health HTTP/1.1\r\n"[..],
            b"GET /metrics?x=1 HTTP/1.1",
            b"GET /v2/health/ready HTTP/1.1",
            b"HEAD /healthz HTTP/1.1",
        ] {
            assert!(paths.matches_request(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [&b"POST /v1/completions HTTP/1.1"[..], b"GET /healthcheck-data HTTP/1.1", b"GET", b""] {
            assert!(!paths.matches_request(no), "{}", String::from_utf8_lossy(no));
        }
        assert!(!ProbePaths::parse("").unwrap().matches_request(b"GET /health HTTP/1.1"));
        assert!(ProbePaths::parse("health").is_err());
    }

    /// IPv4 and IPv6 loopback peers are recognised, others are not, and
    /// an IPv6 peer with no address (the kernel side could not read it) or
    /// no sockaddr at all is unknown, not remote.
    #[test]
    fn loopback_peers() {
        let mut v4 = [0u8; 16];
        v4[..2].copy_from_slice(&AF_INET.to_ne_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 6]);
        assert_eq!(peer_of(&v4), Peer::Loopback);
        v4[4..8].copy_from_slice(&[10, 0, 0, 6]);
        assert_eq!(peer_of(&v4), Peer::Remote);
        let mut v6 = [0u8; 28];
        v6[..2].copy_from_slice(&AF_INET6.to_ne_bytes());
        assert_eq!(peer_of(&v6), Peer::Unknown);
        v6[23] = 1;
        assert_eq!(peer_of(&v6), Peer::Loopback);
        v6[18..24].copy_from_slice(&[0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!(peer_of(&v6), Peer::Loopback);
        v6[20] = 10;
        assert_eq!(peer_of(&v6), Peer::Remote);
        assert_eq!(peer_of(&[]), Peer::Unknown);
    }
}
