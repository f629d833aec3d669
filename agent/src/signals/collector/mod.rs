//! The one task that owns per-pod state. It multiplexes probe reads (every
//! tick), cgroup rescans (every few seconds) and GPU updates (from the
//! poller thread) in one `select!` loop, so the core state needs no locks,
//! and publishes an immutable `NodeView` after every tick.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

mod gpu;
mod pods;

use super::history::{History, Point};

/// The maps the per-request path looks up: keys are the node's own cgroup
/// ids and pod UIDs, so a fast hasher is enough.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use super::request_state::{PortState, RequestState};
use super::view::{EngineView, Health, NodeView, PodView, PortView, ReaderCounters, RequestCounts, SourceStatus};
use crate::engines::scraper::EngineSnapshot;
use crate::gpu::poller::{GpuUpdate, PodGpu};
use crate::gpu::DeviceSample;
use crate::pods::cgroup_tree::PodCgroup;
use crate::pods::directory::Directory;
use crate::pods::occupancy::Occupancy;
use crate::pods::PodMeta;
use crate::probes::driver::{DriverSnapshot, PodDriver};
use crate::probes::launches::LaunchSnapshot;
use crate::probes::requests::{ProbeUpdate, ReaderStats, RequestEvent, RequestProbe, RequestProbeStats};

/// Collector schedule and inputs.
#[derive(Clone, Debug)]
pub struct CollectorConfig {
    /// Time between probe reads and publications.
    pub tick: Duration,
    /// Time between cgroup tree walks.
    pub rescan: Duration,
    /// Longest window any query can ask for.
    pub retention: Duration,
    /// cgroup v2 root.
    pub cgroup_root: PathBuf,
    /// GPU data older than this is stale: GPU signals turn unavailable.
    pub gpu_stale_after: Duration,
    /// procfs, for finding connections that predate the agent.
    pub proc: crate::proc::ProcFs,
    /// How long an emptied pod cgroup still counts as a pod.
    pub empty_pod_grace: Duration,
}

/// The eBPF request probe the collector drives, and its status.
pub struct Probes {
    /// The probe (absent when it could not load).
    pub requests: Option<RequestProbe>,
    /// Why it is or is not serving.
    pub status: SourceStatus,
    /// Counters of its reader task.
    pub reader: Arc<ReaderStats>,
    /// What the launch reader publishes (launches per pod, per process).
    pub launches: Arc<std::sync::Mutex<LaunchSnapshot>>,
    /// Whether the launch probe serves.
    pub launch_status: SourceStatus,
    /// What the driver reader publishes (contexts, driver memory, calls).
    pub driver: Arc<std::sync::Mutex<DriverSnapshot>>,
    /// Whether the driver path serves.
    pub driver_status: SourceStatus,
    /// Set when the driver path starts reading a pod's own libcuda (the
    /// driver reader then looks for the processes it missed).
    pub driver_adopt_now: Arc<std::sync::atomic::AtomicBool>,
}

impl Probes {
    /// No probes at all (tests, benchmarks of the collector alone).
    pub fn disabled() -> Self {
        Self {
            requests: None,
            status: SourceStatus::Disabled,
            reader: Arc::default(),
            launches: Arc::default(),
            launch_status: SourceStatus::Disabled,
            driver: Arc::default(),
            driver_status: SourceStatus::Disabled,
            driver_adopt_now: Arc::default(),
        }
    }
}

/// How long a pod found without metadata holds answers back while the
/// Kubernetes API watch catches up; after it the pod is taken as one the
/// API does not know (it matches no selector).
const METADATA_WAIT: Duration = Duration::from_secs(30);

/// The state of one pod between ticks.
struct PodState {
    meta: PodMeta,
    first_seen: Instant,
    history: History,
    gpu_sm_util_integral: f64,
    gpu_sm_util_nvml_integral: f64,
    gpu_mem_bw_util_integral: f64,
    gpu_known_s: f64,
    gpu_confidence_integral: f64,
    gpu_confidence_known_s: f64,
    gpu: PodGpu,
    /// Kernel launches since the agent started (exited processes included).
    launches: u64,
    /// Driver state (calls and blocked time kept monotonic).
    driver: PodDriver,
    /// Request state per (server port, probe traffic) (port 0: connections
    /// whose port could not be named); pod totals are the sums of the
    /// application entries, so each outcome is recorded once.
    ports: BTreeMap<(u16, bool), PortState>,
}

impl PodState {
    /// The state of `port`, created on first use with a zero point at the
    /// last tick, so its first requests count in its rates (they happened
    /// after that point).
    fn port(&mut self, key: (u16, bool), config: &CollectorConfig, last_tick_s: f64) -> &mut RequestState {
        let retention_s = config.retention.as_secs_f64();
        &mut self
            .ports
            .entry(key)
            .or_insert_with(|| {
                let mut history = History::for_interval(retention_s, config.tick.as_secs_f64());
                history.push(Point { at_s: last_tick_s, ..Point::default() });
                PortState { requests: RequestState::new(retention_s), history }
            })
            .requests
    }
}

/// Owns the probes and all per-pod state.
pub struct Collector {
    config: CollectorConfig,
    directory: Directory,
    probes: Probes,
    request_probe_stats: RequestProbeStats,
    bpf_programs: Vec<crate::probes::BpfProgramStats>,
    /// The launch programs' costs, as of the launch reader's last read.
    launch_programs: Vec<crate::probes::BpfProgramStats>,
    /// Looked up for every request event: a fast hasher, not SipHash.
    cgroups: FastMap<u64, PodCgroup>,
    /// Which pod cgroups hold processes: leftovers are not pods.
    occupancy: Occupancy,
    /// Cgroups the request probe refused (its map was full): retried every
    /// rescan; their pods have no request metrics until then.
    unwatched: HashSet<u64>,
    pods: FastMap<String, PodState>,
    gpu_status: SourceStatus,
    gpu_devices: Vec<DeviceSample>,
    /// Per GPU at the latest poll: NVML's per-process samples and the split.
    gpu_attribution: Arc<Vec<crate::gpu::poller::GpuAttributionView>>,
    gpu_errors: BTreeMap<&'static str, u64>,
    /// Per-pod GPU use at the latest poll, so a pod found between two polls
    /// starts from real values rather than zeros.
    gpu_latest: HashMap<String, PodGpu>,
    gpu_polled_at: Option<Instant>,
    gpu_updates_dropped: Arc<AtomicU64>,
    started: Instant,
    last_tick_s: f64,
    last_rescan: Option<Instant>,
    /// The launch and driver sources' status as served: the probe's,
    /// unless its reader has stopped publishing.
    launch_health: SourceStatus,
    driver_health: SourceStatus,
    /// The launch snapshot's rows and (libraries, duty, hit cost) as of
    /// the last tick, served with the per-pod counts of the same snapshot.
    launch_rows: Arc<Vec<crate::probes::launches::LaunchRow>>,
    launch_spans: Arc<crate::probes::spans::SpanTotals>,
    /// When the launch reader read those rows (and that as Unix time).
    launch_read_at: Option<(Instant, f64)>,
    launch_sampling: (usize, f64, u64),
    /// libcuda files of the launch probe already offered to the driver path.
    libraries_offered: usize,
    /// The driver snapshot's rows and counters as of the last tick: the
    /// view serves them with the per-pod values of the same snapshot.
    driver_rows: Arc<Vec<crate::probes::driver::DriverRow>>,
    driver_reader: crate::probes::driver::DriverReaderStats,
    /// What the engine scraper publishes (`None`: scraping is off).
    engines: Option<watch::Receiver<Arc<EngineSnapshot>>>,
}

/// Driver state older than this is stale: its reader publishes five times
/// a second, so five seconds mean it is stuck.
const READER_STALE_AFTER: Duration = Duration::from_secs(5);
/// Launch counts are read at least every `MAX_INTERVAL` (sampling
/// stretches the interval): older than twice that, the reader is stuck.
const LAUNCHES_STALE_AFTER: Duration =
    Duration::from_secs(2 * crate::probes::launch_reader::MAX_INTERVAL.as_secs() + 1);

impl Collector {
    /// A collector over `probes`.
    pub fn new(
        config: CollectorConfig,
        directory: Directory,
        probes: Probes,
        gpu_updates_dropped: Arc<AtomicU64>,
    ) -> Self {
        let launch_health = probes.launch_status.clone();
        let driver_health = probes.driver_status.clone();
        let occupancy = Occupancy::new(config.empty_pod_grace);
        Self {
            config,
            directory,
            probes,
            request_probe_stats: RequestProbeStats::default(),
            bpf_programs: Vec::new(),
            launch_programs: Vec::new(),
            cgroups: FastMap::default(),
            occupancy,
            unwatched: HashSet::new(),
            pods: FastMap::default(),
            gpu_status: SourceStatus::Degraded { reason: "waiting for the first GPU poll".to_string() },
            gpu_devices: Vec::new(),
            gpu_attribution: Arc::default(),
            gpu_errors: BTreeMap::new(),
            gpu_latest: HashMap::new(),
            gpu_polled_at: None,
            gpu_updates_dropped,
            launch_health,
            driver_health,
            driver_rows: Arc::default(),
            launch_rows: Arc::default(),
            launch_spans: Arc::default(),
            launch_read_at: None,
            launch_sampling: (0, 0.0, 0),
            libraries_offered: 0,
            driver_reader: Default::default(),
            started: Instant::now(),
            last_tick_s: 0.0,
            last_rescan: None,
            engines: None,
        }
    }

    /// Reads the engine scraper's publications into every view.
    pub fn with_engines(mut self, engines: watch::Receiver<Arc<EngineSnapshot>>) -> Self {
        self.engines = Some(engines);
        self
    }

    /// Each pod's engine view at this tick, and the scraper's health.
    fn engine_views(&self) -> (HashMap<String, EngineView>, SourceStatus, u64, u64) {
        let Some(engines) = &self.engines else {
            return (HashMap::new(), SourceStatus::Disabled, 0, 0);
        };
        let snapshot = engines.borrow().clone();
        let now = Instant::now();
        let views = snapshot
            .pods
            .iter()
            .map(|(uid, scrape)| {
                let unavailable = scrape.unavailable(now, snapshot.stale_after);
                (uid.clone(), EngineView { scrape: scrape.clone(), unavailable })
            })
            .collect();
        (views, snapshot.status.clone(), snapshot.scrapes, snapshot.failures)
    }

    /// Runs until `shutdown`, publishing a view after every tick.
    pub async fn run(
        mut self,
        mut gpu_updates: mpsc::Receiver<GpuUpdate>,
        mut probe_updates: mpsc::Receiver<Vec<ProbeUpdate>>,
        publish: watch::Sender<Arc<NodeView>>,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(self.config.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {
                    self.tick();
                    publish.send_replace(Arc::new(self.view()));
                }
                Some(update) = gpu_updates.recv() => self.apply_gpu(update),
                Some(batch) = probe_updates.recv() => {
                    // One clock read per batch: the events of a batch were
                    // read out of the ring together.
                    let now_s = self.started.elapsed().as_secs_f64();
                    for update in batch {
                        self.apply_probe_at(update, now_s);
                    }
                }
            }
        }
        tracing::debug!("collector stopped");
    }

    /// One step: rescan if due, read probes, extend every pod's history.
    pub fn tick(&mut self) {
        // A metadata change (a pod added or deleted on this node, kubelet
        // devices) is a hint of churn: rescan now rather than at the next
        // scheduled walk, so new pods are watched sooner.
        let metadata_changed = self.directory.refresh();
        if metadata_changed || self.last_rescan.is_none_or(|at| at.elapsed() >= self.config.rescan) {
            self.rescan();
        }
        if metadata_changed {
            self.refresh_metadata();
        }
        self.read_probes();
        self.check_gpu_staleness();
        let now_s = self.started.elapsed().as_secs_f64();
        let elapsed = (now_s - self.last_tick_s).max(0.0);
        self.last_tick_s = now_s;
        let gpu_known = self.gpu_status.is_ok();
        let (launches, published, found_libraries) = {
            let snapshot = self.probes.launches.lock().expect("launch snapshot poisoned");
            // Converted once per publication, so the same read keeps the
            // same time (`record` tells reads apart by it); the rows and
            // spans are copied then too, not every tick.
            if snapshot.published != self.launch_read_at.map(|(at, _)| at) {
                self.launch_rows = Arc::new(snapshot.rows.clone());
                self.launch_spans = Arc::new(snapshot.spans.clone());
                self.launch_programs.clone_from(&snapshot.programs);
                self.launch_read_at = snapshot.published.map(|at| {
                    let unix_now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64());
                    (at, unix_now - at.elapsed().as_secs_f64())
                });
            }
            self.launch_sampling = (snapshot.libraries, snapshot.duty, snapshot.hit_cost_ns);
            let found = snapshot.library_files.get(self.libraries_offered..).unwrap_or_default().to_vec();
            self.libraries_offered = snapshot.library_files.len();
            (snapshot.per_pod.clone(), snapshot.published, found)
        };
        self.offer_driver_libraries(&found_libraries);
        self.launch_health =
            self.reader_health("launch counts", &self.probes.launch_status, published, LAUNCHES_STALE_AFTER);
        let launches_read_s = self.collector_seconds(published);
        let (driver, published) = {
            let snapshot = self.probes.driver.lock().expect("driver snapshot poisoned");
            self.driver_rows = Arc::new(snapshot.rows.clone());
            self.driver_reader = snapshot.stats;
            (snapshot.per_pod.clone(), snapshot.published)
        };
        self.driver_health =
            self.reader_health("driver state", &self.probes.driver_status, published, READER_STALE_AFTER);
        let driver_read_s = self.collector_seconds(published);
        for (uid, pod) in self.pods.iter_mut() {
            pod.launches = pod.launches.max(launches.get(uid).copied().unwrap_or(0));
            let now = driver.get(uid).cloned().unwrap_or_default();
            pod.driver = PodDriver {
                calls: pod.driver.calls.max(now.calls),
                blocked_ns: pod.driver.blocked_ns.max(now.blocked_ns),
                ..now
            };
            // Sample-and-hold between GPU polls keeps short windows smooth;
            // time without valid GPU data is not integrated at all.
            if gpu_known {
                pod.gpu_sm_util_integral += pod.gpu.sm_util_percent * elapsed;
                pod.gpu_sm_util_nvml_integral += pod.gpu.sm_util_nvml_percent * elapsed;
                pod.gpu_mem_bw_util_integral += pod.gpu.mem_bw_util_percent * elapsed;
                pod.gpu_known_s += elapsed;
                if let Some(confidence) = pod.gpu.attribution_confidence.filter(|c| c.is_finite()) {
                    pod.gpu_confidence_integral += confidence.clamp(0.0, 1.0) * elapsed;
                    pod.gpu_confidence_known_s += elapsed;
                }
            }
            let mut point = Point {
                at_s: now_s,
                gpu_sm_util_integral: pod.gpu_sm_util_integral,
                gpu_sm_util_nvml_integral: pod.gpu_sm_util_nvml_integral,
                gpu_mem_bw_util_integral: pod.gpu_mem_bw_util_integral,
                gpu_known_s: pod.gpu_known_s,
                gpu_confidence_integral: pod.gpu_confidence_integral,
                gpu_confidence_known_s: pod.gpu_confidence_known_s,
                gpu_launches: pod.launches,
                gpu_launches_read_s: launches_read_s,
                gpu_driver_calls: pod.driver.calls,
                gpu_driver_blocked_s: pod.driver.blocked_ns as f64 / 1e9,
                gpu_driver_read_s: driver_read_s,
                ..Point::default()
            };
            for (&(_, probe), port) in pod.ports.iter_mut() {
                let port_point = port.requests.point(now_s);
                if !probe {
                    point.recv_bytes += port_point.recv_bytes;
                    point.send_bytes += port_point.send_bytes;
                    point.requests_started += port_point.requests_started;
                }
                port.history.push(port_point);
            }
            pod.history.push(point);
        }
    }

    /// A reader's publication time on the collector's clock (0 before the
    /// first publication).
    fn collector_seconds(&self, published: Option<Instant>) -> f64 {
        published.map_or(0.0, |at| at.saturating_duration_since(self.started).as_secs_f64())
    }

    /// Hands libcuda files the launch probe found in pods to the driver
    /// path (which probes them too, or adds its syscall hooks), and says
    /// so in its health line.
    fn offer_driver_libraries(&mut self, found: &[crate::probes::launches::LibraryFile]) {
        let Some(probe) = self.probes.requests.as_mut() else { return };
        for library in found {
            if let Some(hooks) = probe.driver_library_found(&library.open, &library.found_at) {
                self.probes.driver_status = SourceStatus::Ok { detail: hooks.describe() };
                // The processes that loaded it called the driver unseen.
                self.probes.driver_adopt_now.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    fn read_probes(&mut self) {
        self.apply_open_requests();
        if let Some(stats) = self.probes.requests.as_ref().and_then(|probe| probe.stats().ok()) {
            self.request_probe_stats = stats;
        }
        self.bpf_programs = self.probes.requests.as_ref().map(|probe| probe.program_stats()).unwrap_or_default();
        self.bpf_programs.extend(self.launch_programs.iter().cloned());
    }

    /// Sets every port's in-flight level from the tracker's open requests.
    fn apply_open_requests(&mut self) {
        let open = self.probes.reader.open_requests.lock().expect("open requests poisoned").clone();
        for pod in self.pods.values_mut() {
            for port in pod.ports.values_mut() {
                port.requests.open = 0;
            }
        }
        for ((cgroup_id, port, probe), count) in open {
            // A cgroup no longer in the tree has no live process: the
            // tracker ends its connections at its next sweep.
            let Some(cgroup) = self.cgroups.get(&cgroup_id) else { continue };
            let Some(pod) = self.pods.get_mut(&cgroup.owner.pod_uid) else { continue };
            pod.port((port, probe), &self.config, self.last_tick_s).open += count;
        }
    }

    /// Applies one update from the request reader.
    pub fn apply_probe(&mut self, update: ProbeUpdate) {
        let now_s = self.started.elapsed().as_secs_f64();
        self.apply_probe_at(update, now_s);
    }

    /// As `apply_probe`, at `now_s` (seconds since the collector started).
    fn apply_probe_at(&mut self, update: ProbeUpdate, now_s: f64) {
        match update {
            ProbeUpdate::Request(event) => self.apply_request(event, now_s),
            ProbeUpdate::Bytes { cgroup_id, port, probe, received, sent } => {
                let Some(cgroup) = self.cgroups.get(&cgroup_id) else { return };
                let Some(pod) = self.pods.get_mut(&cgroup.owner.pod_uid) else { return };
                pod.port((port, probe), &self.config, self.last_tick_s).add_bytes(received, sent);
            }
        }
    }

    fn apply_request(&mut self, event: RequestEvent, now_s: f64) {
        let Some(cgroup) = self.cgroups.get(&event.cgroup_id) else { return };
        let Some(pod) = self.pods.get_mut(&cgroup.owner.pod_uid) else { return };
        pod.port((event.port, event.probe), &self.config, self.last_tick_s).record(now_s, &event.outcome);
    }

    /// A reader-fed source's status given when its reader last published
    /// (before the first publication, the age counts from the start).
    fn reader_health(
        &self,
        what: &str,
        status: &SourceStatus,
        published: Option<Instant>,
        stale_after: Duration,
    ) -> SourceStatus {
        let age = published.unwrap_or(self.started).elapsed();
        match status {
            SourceStatus::Ok { .. } if age > stale_after => {
                SourceStatus::Degraded { reason: format!("{what} are stale: last read {:.1} s ago", age.as_secs_f64()) }
            }
            status => status.clone(),
        }
    }

    /// An immutable snapshot of the current state.
    pub fn view(&mut self) -> NodeView {
        let watches_api = self.directory.watches_api();
        let (mut engine_views, engine_status, engine_scrapes, engine_scrape_failures) = self.engine_views();
        let engine_off = match &engine_status {
            SourceStatus::Disabled => Some("engine scraping is off (--engine-scrape off)".to_string()),
            _ => None,
        };
        let unwatched: HashSet<String> =
            self.unwatched.iter().filter_map(|id| self.cgroups.get(id)).map(|c| c.owner.pod_uid.clone()).collect();
        let mut pods: Vec<PodView> = self
            .pods
            .values_mut()
            .map(|pod| {
                let metadata_pending =
                    watches_api && pod.meta.namespace.is_none() && pod.first_seen.elapsed() < METADATA_WAIT;
                let ports: Vec<PortView> = pod
                    .ports
                    .iter_mut()
                    .map(|(&(port, probe), state)| PortView {
                        port,
                        probe,
                        history: state.history.clone(),
                        requests_in_flight: state.requests.in_flight(),
                        requests: state.requests.requests,
                        ttft: state.requests.ttft.snapshot(),
                        latency: state.requests.latency.snapshot(),
                        ttft_total: state.requests.ttft_total,
                        latency_total: state.requests.latency_total,
                    })
                    .collect();
                let mut requests = RequestCounts::default();
                for port in ports.iter().filter(|p| !p.probe) {
                    requests.started += port.requests.started;
                    requests.completed += port.requests.completed;
                    requests.aborted += port.requests.aborted;
                }
                PodView {
                    meta: pod.meta.clone(),
                    history: pod.history.clone(),
                    gpu: pod.gpu,
                    driver: pod.driver.clone(),
                    requests_in_flight: ports.iter().filter(|p| !p.probe).map(|p| p.requests_in_flight).sum(),
                    requests,
                    ports,
                    metadata_pending,
                    requests_unwatched: unwatched.contains(&pod.meta.uid),
                    engine: engine_views.remove(&pod.meta.uid).unwrap_or_else(|| EngineView {
                        scrape: Default::default(),
                        unavailable: Some(
                            engine_off
                                .clone()
                                .unwrap_or_else(|| "engine discovery has not looked at this pod yet".into()),
                        ),
                    }),
                }
            })
            .collect();
        pods.sort_by(|a, b| {
            (&a.meta.namespace, &a.meta.name, &a.meta.uid).cmp(&(&b.meta.namespace, &b.meta.name, &b.meta.uid))
        });
        let (kube_api_health, kubelet_health) = self.directory.health();
        let launch_rows = self.launch_rows.clone();
        let (launch_libraries, launch_duty, launch_hit_cost_ns) = self.launch_sampling;
        let (driver_rows, driver_reader) = (self.driver_rows.clone(), self.driver_reader);
        NodeView {
            at_s: self.last_tick_s,
            launches: launch_rows,
            launch_spans: self.launch_spans.clone(),
            launches_read_unix: self.launch_read_at.map(|(_, unix)| unix),
            attribution: self.gpu_attribution.clone(),
            driver: driver_rows,
            built: Some(Instant::now()),
            pods,
            devices: self.gpu_devices.clone(),
            health: Health {
                probes: self.probes.status.clone(),
                gpu: self.gpu_status.clone(),
                launches: self.launch_health.clone(),
                launch_libraries,
                launch_duty,
                launch_hit_cost_ns,
                driver: self.driver_health.clone(),
                driver_reader,
                kube_api: kube_api_health,
                kubelet: kubelet_health,
                api_pods: self.directory.api_pods(),
                request_probe: self.request_probe_stats,
                bpf_programs: self.bpf_programs.clone(),
                request_reader: ReaderCounters {
                    events: self.probes.reader.events.load(Ordering::Relaxed),
                    malformed: self.probes.reader.malformed.load(Ordering::Relaxed),
                    dropped: self.probes.reader.dropped.load(Ordering::Relaxed),
                    connections: self.probes.reader.connections.load(Ordering::Relaxed),
                    http2_connections: self.probes.reader.http2_connections.load(Ordering::Relaxed),
                    tracker: *self.probes.reader.tracker.lock().expect("tracker stats poisoned"),
                },
                gpu_errors: self.gpu_errors.clone(),
                engines: engine_status,
                engine_scrapes,
                engine_scrape_failures,
                gpu_sample_age_s: self.gpu_polled_at.map(|at| at.elapsed().as_secs_f64()),
                gpu_updates_dropped: self.gpu_updates_dropped.load(Ordering::Relaxed),
            },
        }
    }
}

#[cfg(test)]
mod tests;
