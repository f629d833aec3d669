//! The scrape loop: every interval, GET each pod's engine endpoint with
//! a deadline and a body limit, a bounded number at a time, and publish
//! what each engine said (or why it could not be read). Pods whose engine
//! is not found yet are looked for again every `rediscover` period; a
//! found endpoint that keeps failing is looked for again too (an engine
//! restarted on another port).
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::catalog::EngineKind;
use super::discovery::{self, Candidate, Plan, PodFacts};
use super::exposition::EngineReading;
use super::fetch::{scrape, Connection, Scraped};
use crate::pods::PodMeta;
use crate::signals::engine_ttft::TtftHistory;
use crate::status::SourceStatus;

/// How the scraper runs.
#[derive(Clone, Debug)]
pub struct ScraperConfig {
    /// Time between scrapes of one engine.
    pub interval: Duration,
    /// Deadline of one scrape, connect to last byte.
    pub timeout: Duration,
    /// Largest body read; a longer one is an error.
    pub body_limit: usize,
    /// Scrapes in flight at most.
    pub concurrency: usize,
    /// How often pods without an engine are looked at again.
    pub rediscover: Duration,
    /// How much TTFT history is kept (the longest trigger window and a
    /// little more).
    pub retention: Duration,
    /// cgroup v2 root, for the pods' processes.
    pub cgroup_root: PathBuf,
    /// procfs, for command lines and listening sockets.
    pub proc: crate::proc::ProcFs,
}

/// Shortest scrape interval accepted.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Failed scrapes in a row after which a found endpoint is looked for again.
const FAILURES_BEFORE_REDISCOVERY: u32 = 3;

/// What the scraper knows of one pod's engine.
#[derive(Clone, Debug, Default)]
pub struct PodEngine {
    /// The engine, once named or recognised.
    pub engine: Option<EngineKind>,
    /// How discovery named it, or why it did not.
    pub named_by: String,
    /// The endpoint being scraped (`addr` + path), once found.
    pub endpoint: Option<String>,
    /// What the last discovery tried and what each answered.
    pub tried: Vec<String>,
    /// The latest good reading and when it was taken.
    pub reading: Option<(Instant, EngineReading)>,
    /// Why the latest scrape failed (`None` after a good one).
    pub error: Option<String>,
    /// Failed scrapes in a row.
    pub failures: u32,
    /// The engine's cumulative TTFT histograms, for windows.
    pub ttft: TtftHistory,
}

impl PodEngine {
    /// Why this pod's engine signals cannot be given now, if they cannot:
    /// nothing found, the endpoint failing, or the reading older than
    /// `stale_after`.
    pub fn unavailable(&self, now: Instant, stale_after: Duration) -> Option<String> {
        match (&self.endpoint, &self.reading, &self.error) {
            (None, _, _) if self.tried.is_empty() => Some(format!("no inference engine found ({})", self.named_by)),
            (None, _, _) => {
                Some(format!("no inference engine found ({}); tried {}", self.named_by, self.tried.join("; ")))
            }
            (Some(endpoint), _, Some(error)) => Some(format!("engine endpoint {endpoint}: {error}")),
            (Some(endpoint), None, None) => Some(format!("engine endpoint {endpoint}: not scraped yet")),
            (Some(endpoint), Some((at, _)), None) if now.duration_since(*at) > stale_after => Some(format!(
                "engine endpoint {endpoint}: last read {:.1} s ago",
                now.duration_since(*at).as_secs_f64()
            )),
            _ => None,
        }
    }
}

/// What the scraper publishes.
#[derive(Clone, Debug)]
pub struct EngineSnapshot {
    /// Whether the scraper runs.
    pub status: SourceStatus,
    /// Per pod UID.
    pub pods: HashMap<String, PodEngine>,
    /// Scrapes done and failed since start.
    pub scrapes: u64,
    /// Scrapes that failed.
    pub failures: u64,
    /// A reading older than this is stale.
    pub stale_after: Duration,
}

impl EngineSnapshot {
    /// The snapshot of a scraper that is not running.
    pub fn disabled(status: SourceStatus) -> Self {
        Self { status, pods: HashMap::new(), scrapes: 0, failures: 0, stale_after: Duration::from_secs(5) }
    }
}

/// Runs the scrape loop until `shutdown`, taking the pods from the
/// collector's published view (the pods it found and their metadata) and
/// publishing into `publish`, which the collector reads every tick.
pub async fn run(
    config: ScraperConfig,
    mut view: watch::Receiver<Arc<crate::signals::view::NodeView>>,
    publish: watch::Sender<Arc<EngineSnapshot>>,
    shutdown: CancellationToken,
) {
    let stale_after = config.interval * 3 + config.timeout;
    let mut state: HashMap<String, PodState> = HashMap::new();
    let (mut scrapes, mut failures) = (0u64, 0u64);
    let limit = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Jobs outlive a tick: an engine slower than the interval (up to the
    // deadline) delays only itself, and the others' readings are
    // published at the next tick at the latest.
    let mut jobs: tokio::task::JoinSet<(String, Outcome)> = tokio::task::JoinSet::new();
    let publish_now = |state: &HashMap<String, PodState>, scrapes: u64, failures: u64| {
        let snapshot = EngineSnapshot {
            status: SourceStatus::Ok { detail: format!("scraping every {:?}", config.interval) },
            pods: state.iter().map(|(uid, pod)| (uid.clone(), pod.published.clone())).collect(),
            scrapes,
            failures,
            stale_after,
        };
        publish.send_replace(Arc::new(snapshot));
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                if let Ok((uid, outcome)) = done {
                    scrapes += outcome.scrapes;
                    failures += outcome.failures;
                    if let Some(pod) = state.get_mut(&uid) {
                        pod.in_flight = false;
                        pod.apply(outcome, Instant::now(), config.retention);
                    }
                }
                // A whole round read: publish it now, not at the next tick.
                if jobs.is_empty() {
                    publish_now(&state, scrapes, failures);
                }
                continue;
            }
            _ = ticker.tick() => {}
        }
        let metas: Vec<(PodMeta, Vec<u16>)> = view
            .borrow_and_update()
            .pods
            .iter()
            .map(|pod| {
                let http_ports = pod.ports.iter().filter(|p| p.port != 0 && p.requests.started > 0).map(|p| p.port);
                (pod.meta.clone(), http_ports.collect())
            })
            .collect();
        state.retain(|uid, _| metas.iter().any(|(meta, _)| &meta.uid == uid));
        let now = Instant::now();
        let due: Vec<(PodMeta, Vec<u16>)> = metas
            .iter()
            .filter(|(meta, _)| {
                state.get(&meta.uid).is_none_or(|pod| !pod.in_flight && pod.discovery_due(now, config.rediscover))
            })
            .cloned()
            .collect();
        if !due.is_empty() {
            let (cgroup_root, proc) = (config.cgroup_root.clone(), config.proc.clone());
            let facts = tokio::task::spawn_blocking(move || gather_facts(&cgroup_root, &proc, &due)).await;
            for (uid, plan) in facts.unwrap_or_default() {
                let pod = state.entry(uid).or_default();
                pod.discovered_at = Some(now);
                pod.plan = Some(plan);
                pod.plan_untried = true;
                // What was read before belongs to an endpoint that kept
                // failing: nothing of it carries over to the new plan.
                pod.found = None;
                pod.last = None;
                pod.connection = None;
                pod.published.engine = None;
                pod.published.endpoint = None;
                pod.published.error = None;
                pod.published.tried.clear();
                pod.published.failures = 0;
            }
        }
        for (uid, pod) in state.iter_mut().filter(|(_, pod)| !pod.in_flight) {
            let job = match (&pod.found, &pod.plan) {
                (Some(found), _) => {
                    Job::Scrape(found.clone(), pod.published.engine, pod.last.clone(), pod.connection.take())
                }
                (None, Some(plan)) if pod.plan_untried => Job::Discover(plan.clone()),
                _ => continue,
            };
            pod.in_flight = true;
            let (uid, limit, config) = (uid.clone(), limit.clone(), config.clone());
            jobs.spawn(async move {
                let _permit = limit.acquire_owned().await;
                (uid, job.run(&config).await)
            });
        }
        publish_now(&state, scrapes, failures);
    }
}

/// The scraper's own state of one pod.
#[derive(Default)]
struct PodState {
    plan: Option<Plan>,
    /// Whether the current plan still has to be tried.
    plan_untried: bool,
    discovered_at: Option<Instant>,
    /// The endpoint found: candidate and engine.
    found: Option<Candidate>,
    /// The latest scrape, for reuse while its lines do not change.
    last: Option<Arc<Scraped>>,
    /// The connection to the endpoint, kept between scrapes.
    connection: Option<Connection>,
    /// Discoveries in a row that named no engine and found none.
    unnamed_misses: u32,
    /// A scrape or discovery of this pod is running.
    in_flight: bool,
    published: PodEngine,
}

impl PodState {
    fn discovery_due(&self, now: Instant, rediscover: Duration) -> bool {
        // A pod that no name points at and whose HTTP ports answered no
        // engine's metrics is asked less and less often (up to 16 periods):
        // it is most likely not an engine.
        let period = rediscover * 2u32.pow(self.unnamed_misses.min(4));
        let stale = self.discovered_at.is_none_or(|at| now.duration_since(at) >= period);
        match &self.found {
            Some(_) => self.published.failures >= FAILURES_BEFORE_REDISCOVERY && stale,
            None => stale,
        }
    }

    fn apply(&mut self, outcome: Outcome, now: Instant, retention: Duration) {
        self.connection = outcome.connection;
        match outcome.result {
            Found::Reading(candidate, scraped) => {
                let reading = scraped.reading.clone();
                self.last = Some(scraped);
                self.published.engine = Some(reading.engine);
                self.published.endpoint = Some(format!("{}{}", candidate.addr, candidate.path));
                if let Some(ttft) = &reading.ttft {
                    // A labelled histogram has no series until its first
                    // observation: appearing between two readings, it was
                    // all zeros at the earlier one.
                    if let (true, Some((before, _))) = (self.published.ttft.is_empty(), &self.published.reading) {
                        self.published.ttft.push(*before, ttft.zeroed(), retention);
                    }
                    self.published.ttft.push(now, ttft.clone(), retention);
                }
                self.published.reading = Some((now, reading));
                self.published.error = None;
                self.published.failures = 0;
                self.unnamed_misses = 0;
                self.found = Some(candidate);
            }
            Found::Failed(error) => {
                self.published.error = Some(error);
                self.published.failures += 1;
            }
            Found::Nothing(tried) => {
                let unnamed = self.plan.as_ref().is_some_and(|plan| plan.engine.is_none());
                if unnamed && !tried.is_empty() {
                    self.unnamed_misses += 1;
                }
                self.published.tried = tried;
                self.plan_untried = false;
                self.found = None;
            }
        }
        if let Some(plan) = &self.plan {
            self.published.named_by = plan.named_by.clone();
            if self.published.engine.is_none() {
                self.published.engine = plan.engine;
            }
        }
    }
}

enum Job {
    Scrape(Candidate, Option<EngineKind>, Option<Arc<Scraped>>, Option<Connection>),
    Discover(Plan),
}

enum Found {
    Reading(Candidate, Arc<Scraped>),
    Failed(String),
    Nothing(Vec<String>),
}

struct Outcome {
    result: Found,
    /// The connection to keep for the next scrape.
    connection: Option<Connection>,
    scrapes: u64,
    failures: u64,
}

impl Job {
    async fn run(self, config: &ScraperConfig) -> Outcome {
        match self {
            Job::Scrape(candidate, engine, previous, mut connection) => {
                let limits = (config.timeout, config.body_limit);
                let result =
                    match scrape(candidate.addr, &candidate.path, engine, limits, previous, &mut connection).await {
                        Ok(scraped) => Found::Reading(candidate, scraped),
                        Err(error) => Found::Failed(error.to_string()),
                    };
                let failures = u64::from(matches!(result, Found::Failed(_)));
                Outcome { result, connection, scrapes: 1, failures }
            }
            Job::Discover(plan) => {
                let mut tried = Vec::new();
                for candidate in plan.candidates {
                    let limits = (config.timeout, config.body_limit);
                    let mut connection = None;
                    match scrape(candidate.addr, &candidate.path, plan.engine, limits, None, &mut connection).await {
                        Ok(reading) => {
                            let scrapes = tried.len() as u64 + 1;
                            return Outcome {
                                result: Found::Reading(candidate, reading),
                                connection,
                                scrapes,
                                failures: scrapes - 1,
                            };
                        }
                        Err(error) => {
                            tried.push(format!("{}{} ({}): {error}", candidate.addr, candidate.path, candidate.reason))
                        }
                    }
                }
                let attempts = tried.len() as u64;
                Outcome { result: Found::Nothing(tried), connection: None, scrapes: attempts, failures: attempts }
            }
        }
    }
}

/// Each due pod's processes, their command lines and listening sockets,
/// and the plan discovery makes of them.
fn gather_facts(
    cgroup_root: &std::path::Path,
    proc: &crate::proc::ProcFs,
    due: &[(PodMeta, Vec<u16>)],
) -> Vec<(String, Plan)> {
    let mut pids_of: HashMap<&str, Vec<u32>> = HashMap::new();
    let cgroups = crate::pods::cgroup_tree::scan(cgroup_root);
    for cgroup in cgroups.values() {
        let Some((meta, _)) = due.iter().find(|(meta, _)| meta.uid == cgroup.owner.pod_uid) else { continue };
        let procs = std::fs::read_to_string(cgroup_root.join(cgroup.path.trim_start_matches('/')).join("cgroup.procs"))
            .unwrap_or_default();
        pids_of
            .entry(meta.uid.as_str())
            .or_default()
            .extend(procs.lines().filter_map(|line| line.trim().parse::<u32>().ok()));
    }
    due.iter()
        .map(|(meta, http_ports)| {
            let pids = pids_of.get(meta.uid.as_str()).cloned().unwrap_or_default();
            let mut facts = PodFacts {
                hints: meta
                    .labels
                    .iter()
                    .chain(&meta.annotations)
                    .filter(|(key, _)| discovery::is_hint_key(key))
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect(),
                commands: pids.iter().map(|pid| proc.cmdline(*pid)).filter(|args| !args.is_empty()).collect(),
                listeners: proc.listening_sockets(&pids),
                pod_ip: None,
                http_ports: http_ports.clone(),
            };
            // The agent runs in a network namespace of its own in the
            // DaemonSet: only pods that share it (tests, an agent on the
            // host network) are reached on their listening address; the
            // others on their pod IP (a hostNetwork pod's is the node's).
            let shares_network = pids.first().and_then(|pid| proc.shares_network_with_self(*pid)).unwrap_or(false);
            if !shares_network {
                facts.pod_ip = meta.pod_ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok());
                // Loopback inside the pod cannot be reached from here.
                facts.listeners.retain(|l| !l.ip().is_loopback());
            }
            let mut plan = discovery::plan(&facts);
            if !shares_network && facts.pod_ip.is_none() && !pids.is_empty() {
                plan.named_by.push_str("; the pod is in another network namespace and no metadata source gives its IP");
                plan.candidates.clear();
            }
            (meta.uid.clone(), plan)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engines::exposition::Exposition;

    /// A reading the scraper stopped refreshing (a stuck or crashed
    /// scraper, an endpoint that stopped answering before its error came
    /// back) turns into an error once stale, never stays served.
    #[test]
    fn stale_readings_become_errors() {
        let body = "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 4\n";
        let reading = Exposition::parse(body, false).unwrap().read(None).unwrap();
        let read_at = Instant::now();
        let engine = PodEngine {
            engine: Some(EngineKind::Vllm),
            named_by: "command vllm".into(),
            endpoint: Some("127.0.0.1:8000/metrics".into()),
            reading: Some((read_at, reading)),
            ..PodEngine::default()
        };
        let stale_after = Duration::from_secs(2);
        assert_eq!(engine.unavailable(read_at + Duration::from_secs(1), stale_after), None, "fresh");
        let reason = engine.unavailable(read_at + Duration::from_secs(5), stale_after).expect("stale");
        assert!(reason.contains("last read 5.0 s ago"), "{reason}");
        let failing = PodEngine { error: Some("HTTP 503".into()), ..engine.clone() };
        assert!(
            failing.unavailable(read_at, stale_after).unwrap().ends_with("HTTP 503"),
            "an error wins over the last reading"
        );
        let nothing =
            PodEngine { named_by: "no label, annotation or command names an engine".into(), ..Default::default() };
        assert!(nothing.unavailable(read_at, stale_after).unwrap().starts_with("no inference engine found"));
    }
}
