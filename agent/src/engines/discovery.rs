//! Which engine a pod runs and where its metrics are, with no
//! configuration: what people already set on the pod (labels and
//! annotations) first, then the pod's process command lines, then the
//! ports its processes listen on. The result is a list of candidate
//! endpoints, each with the reason it was tried; the scraper GETs them in
//! order and keeps the first whose body an engine wrote.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::catalog::{EngineKind, ENGINES};

/// Labels or annotations that name the engine, most specific first.
pub const ENGINE_KEYS: [&str; 4] =
    ["podgpu.io/engine", "inference.networking.k8s.io/engine-type", "llm-d.ai/engine-type", "model.aibrix.ai/engine"];
/// Labels or annotations that name the metrics port.
pub const PORT_KEYS: [&str; 3] = ["podgpu.io/metrics-port", "model.aibrix.ai/metric-port", "prometheus.kserve.io/port"];
/// Labels or annotations that name the metrics path.
pub const PATH_KEYS: [&str; 2] = ["podgpu.io/metrics-path", "prometheus.kserve.io/path"];

/// Whether a label or annotation key is one discovery reads (the
/// metadata sources keep only those annotations).
pub fn is_hint_key(key: &str) -> bool {
    ENGINE_KEYS.contains(&key) || PORT_KEYS.contains(&key) || PATH_KEYS.contains(&key)
}

/// Ports tried per pod at most, so a pod listening on hundreds of ports
/// costs a bounded number of GETs per discovery round.
pub const MAX_CANDIDATES: usize = 8;

/// What discovery knows of one pod.
#[derive(Clone, Debug, Default)]
pub struct PodFacts {
    /// Labels and annotations (annotations win where both set a key).
    pub hints: BTreeMap<String, String>,
    /// Command lines of the pod's processes, argument by argument.
    pub commands: Vec<Vec<String>>,
    /// TCP sockets the pod's processes listen on.
    pub listeners: Vec<SocketAddr>,
    /// The pod's IP where it has its own network namespace and a
    /// metadata source knows it; `None`: reach the listener's address.
    pub pod_ip: Option<IpAddr>,
    /// Server ports on which the request probe has seen HTTP requests:
    /// where nothing names an engine, only these are asked for metrics,
    /// so a database's or a gRPC-only port never gets a GET.
    pub http_ports: Vec<u16>,
}

/// One endpoint to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The path to GET.
    pub path: String,
    /// Why this endpoint was tried.
    pub reason: String,
}

/// What discovery decided for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The engine, where something named it (a body names it otherwise).
    pub engine: Option<EngineKind>,
    /// How the engine was named (`label llm-d.ai/engine-type`,
    /// `command vllm`), or why nothing was.
    pub named_by: String,
    /// Endpoints to try, in order.
    pub candidates: Vec<Candidate>,
}

/// Decides where to look for `facts`' engine.
pub fn plan(facts: &PodFacts) -> Plan {
    let hint = |keys: &[&'static str]| -> Option<(&'static str, &str)> {
        keys.iter().find_map(|key| Some((*key, facts.hints.get(*key)?.trim())))
    };
    let (engine, named_by) = match hint(&ENGINE_KEYS).map(|(key, value)| (key, value, EngineKind::from_hint(value))) {
        Some((key, _, Some(engine))) => (Some(engine), format!("{key}={}", engine.name())),
        Some((key, value, None)) => (None, format!("{key}={value} names no engine podgpu reads")),
        None => match engines_of_commands(&facts.commands).as_slice() {
            [] => (None, "no label, annotation or command names an engine".to_string()),
            [(engine, word)] => (Some(*engine), format!("command {word}")),
            // Which one a trigger means cannot be guessed; reading either
            // would give a number for half the pod.
            several => {
                let names: Vec<&str> = several.iter().map(|(engine, _)| engine.name()).collect();
                let named_by = format!(
                    "the pod runs {} engines ({}); set the podgpu.io/engine annotation to the one to read",
                    names.len(),
                    names.join(", ")
                );
                return Plan { engine: None, named_by, candidates: Vec::new() };
            }
        },
    };
    let named_port = hint(&PORT_KEYS).and_then(|(key, value)| Some((key, value.parse::<u16>().ok()?)));
    let named_path = hint(&PATH_KEYS).map(|(key, value)| (key, value.to_string()));
    let mut candidates = Vec::new();
    let mut push = |port: u16, path: &str, reason: String| {
        let addr = SocketAddr::new(address_for(facts, port), port);
        if candidates.len() < MAX_CANDIDATES && !candidates.iter().any(|c: &Candidate| c.addr == addr && c.path == path)
        {
            candidates.push(Candidate { addr, path: path.to_string(), reason });
        }
    };
    let default_path = |engine: Option<EngineKind>| engine.map_or("/metrics", |e| e.spec().endpoints[0].1);
    if let Some((key, port)) = named_port {
        let (path, why) = match &named_path {
            Some((path_key, path)) => (path.clone(), format!("{key} and {path_key}")),
            None => (default_path(engine).to_string(), key.to_string()),
        };
        push(port, &path, why);
        return Plan { engine, named_by, candidates };
    }
    let listening: Vec<u16> = facts.listeners.iter().map(SocketAddr::port).collect();
    match engine {
        Some(engine) => {
            for (port, path) in engine.spec().endpoints {
                let path = named_path.as_ref().map_or(*path, |(_, p)| p.as_str());
                match port {
                    Some(port) if listening.contains(port) || listening.is_empty() => {
                        push(*port, path, format!("{engine}'s default port"));
                    }
                    Some(_) => {}
                    None => {
                        for port in &listening {
                            push(*port, path, format!("a port {engine} listens on"));
                        }
                    }
                }
            }
        }
        // Nothing names an engine: a body written by one still does, on a
        // port known to speak HTTP.
        None => {
            for port in listening.iter().filter(|port| facts.http_ports.contains(port)) {
                let path = named_path.as_ref().map_or("/metrics", |(_, p)| p.as_str());
                push(*port, path, "a port serving HTTP (no engine named)".to_string());
            }
        }
    }
    Plan { engine, named_by, candidates }
}

/// Where to reach `port`: the pod IP where it has one, else the address
/// the socket listens on (a wildcard means loopback).
fn address_for(facts: &PodFacts, port: u16) -> IpAddr {
    if let Some(ip) = facts.pod_ip {
        return ip;
    }
    match facts.listeners.iter().find(|l| l.port() == port).map(SocketAddr::ip) {
        Some(ip) if !ip.is_unspecified() => ip,
        Some(IpAddr::V6(_)) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

/// The engines the pod's command lines run, each once: an argument whose
/// file name is one of an engine's command words (`/usr/local/bin/vllm
/// serve`, `python3 -m sglang.launch_server`, `tritonserver`).
fn engines_of_commands(commands: &[Vec<String>]) -> Vec<(EngineKind, &'static str)> {
    let mut found: Vec<(EngineKind, &'static str)> = Vec::new();
    for args in commands {
        // The program and the first few arguments: a model path later on
        // the line may contain any word.
        let engine = args.iter().take(4).find_map(|arg| {
            let file = arg.rsplit('/').next().unwrap_or(arg);
            ENGINES
                .iter()
                .find_map(|spec| spec.commands.iter().find(|word| **word == file).map(|word| (spec.kind, *word)))
        });
        if let Some(engine) = engine.filter(|(kind, _)| !found.iter().any(|(known, _)| known == kind)) {
            found.push(engine);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_string).collect()
    }

    fn facts(commands: &[&str], listeners: &[&str]) -> PodFacts {
        PodFacts {
            commands: commands.iter().map(|c| args(c)).collect(),
            listeners: listeners.iter().map(|l| l.parse().unwrap()).collect(),
            ..PodFacts::default()
        }
    }

    /// A command names the engine; its listening port comes first, then
    /// its default port where something listens there.
    #[test]
    fn commands_name_engines() {
        let vllm =
            plan(&facts(&["/pause", "/usr/bin/python3 /usr/local/bin/vllm serve m --port 8100"], &["0.0.0.0:8100"]));
        assert_eq!(vllm.engine, Some(EngineKind::Vllm));
        assert_eq!(vllm.named_by, "command vllm");
        assert_eq!(vllm.candidates[0].addr, "127.0.0.1:8100".parse().unwrap());
        assert_eq!(vllm.candidates.len(), 1, "8000 is not listening, so it is not tried");

        let triton =
            plan(&facts(&["tritonserver --model-repository=/m"], &["0.0.0.0:8000", "0.0.0.0:8001", "0.0.0.0:8002"]));
        assert_eq!(triton.engine, Some(EngineKind::Triton));
        assert_eq!(triton.candidates[0].addr.port(), 8002, "Triton's metrics port first");

        let sglang = plan(&facts(&["python3 -m sglang.launch_server --model /models/vllm-tuned"], &["[::]:30000"]));
        assert_eq!(sglang.engine, Some(EngineKind::Sglang));
        assert_eq!(sglang.candidates[0].addr, "[::1]:30000".parse().unwrap());

        let trt = plan(&facts(&["trtllm-serve m"], &["10.0.0.5:8000"]));
        assert_eq!(trt.candidates[0].path, "/prometheus/metrics");
        assert_eq!(trt.candidates[0].addr, "10.0.0.5:8000".parse().unwrap());
    }

    /// Labels and annotations override the command line; a port hint
    /// makes that port the only candidate; the pod IP is used where known.
    #[test]
    fn hints_override_discovery() {
        let mut pod = facts(&["python serve.py"], &["0.0.0.0:5000", "0.0.0.0:9400"]);
        pod.hints.insert("llm-d.ai/engine-type".into(), "vllm".into());
        pod.hints.insert("podgpu.io/metrics-port".into(), "9400".into());
        pod.hints.insert("podgpu.io/metrics-path".into(), "/stats".into());
        pod.pod_ip = Some("10.1.2.3".parse().unwrap());
        let hinted = plan(&pod);
        assert_eq!(hinted.engine, Some(EngineKind::Vllm));
        assert_eq!(hinted.named_by, "llm-d.ai/engine-type=vllm");
        assert_eq!(
            hinted.candidates,
            vec![Candidate {
                addr: "10.1.2.3:9400".parse().unwrap(),
                path: "/stats".into(),
                reason: "podgpu.io/metrics-port and podgpu.io/metrics-path".into()
            }]
        );
    }

    /// Nothing named: the listening ports that served HTTP are tried on
    /// /metrics, bounded; others are left alone; an unknown engine name
    /// says so.
    #[test]
    fn unnamed_pods_try_their_http_ports() {
        let listeners: Vec<String> = (0..20).map(|i| format!("0.0.0.0:{}", 7000 + i)).collect();
        let listeners: Vec<&str> = listeners.iter().map(String::as_str).collect();
        let mut unnamed = facts(&["python app.py"], &listeners);
        assert!(plan(&unnamed).candidates.is_empty(), "no port served HTTP yet");
        unnamed.http_ports = (7000..7020).collect();
        let unnamed = plan(&unnamed);
        assert_eq!(unnamed.engine, None);
        assert_eq!(unnamed.candidates.len(), MAX_CANDIDATES);
        let mut pod = facts(&["ollama serve"], &["0.0.0.0:11434"]);
        pod.hints.insert("model.aibrix.ai/engine".into(), "ollama".into());
        assert_eq!(plan(&pod).named_by, "model.aibrix.ai/engine=ollama names no engine podgpu reads");
        assert!(plan(&facts(&["sleep 100"], &[])).candidates.is_empty());
    }

    /// Two engines in one pod: nothing is scraped until an annotation
    /// picks one; the same engine in several processes is one engine.
    #[test]
    fn two_engines_need_a_choice() {
        let two =
            plan(&facts(&["vllm serve a", "python3 -m sglang.launch_server"], &["0.0.0.0:8000", "0.0.0.0:30000"]));
        assert_eq!(two.engine, None);
        assert!(two.candidates.is_empty());
        assert!(two.named_by.contains("2 engines (vllm, sglang)"), "{}", two.named_by);
        let mut chosen =
            facts(&["vllm serve a", "python3 -m sglang.launch_server"], &["0.0.0.0:8000", "0.0.0.0:30000"]);
        chosen.hints.insert("podgpu.io/engine".into(), "sglang".into());
        assert_eq!(plan(&chosen).engine, Some(EngineKind::Sglang));
        let workers = plan(&facts(&["vllm serve a", "/usr/bin/vllm serve a --headless"], &["0.0.0.0:8000"]));
        assert_eq!(workers.engine, Some(EngineKind::Vllm));
    }
}
