//! Feeds the estimators on a live node: after every GPU poll, pairs the
//! launch reader's newest snapshot with the device utilization polled
//! since the previous one, and runs one `Estimator` per GPU.
//!
//! Launch snapshots come from another thread on their own schedule (every
//! second, or up to four when launch accounting samples); a window is the
//! interval between two snapshots, so counts and utilization cover the
//! same time. Between snapshots the last attribution holds. Without launch
//! counts (accounting off, not yet read, or stale) each poll is a window
//! of its own and the estimate falls back to NVML's samples, with zero
//! confidence.
use crate::probes::launches::parse_hex;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::catalog::CostCatalog;
use super::{Attribution, Estimator, EstimatorConfig, LaunchCount, ProcessSpan, Window};
use crate::gpu::{GpuPoll, Sharing};
use crate::probes::launches::{threads_per_launch_of, LaunchSnapshot};

/// Launch counts older than this are not used: the reader is stuck.
const LAUNCHES_STALE_AFTER: Duration = Duration::from_secs(10);

/// A launch row's identity (process, function, launch shape).
type RowKey = (u32, String, [u32; 3], [u32; 3]);

/// How often learned kernel costs are written to the node's catalog.
const CATALOG_SAVE_EVERY: Duration = Duration::from_secs(30);

/// The node's cost catalog and where it is kept.
struct Catalog {
    path: std::path::PathBuf,
    costs: CostCatalog,
    saved: Instant,
    /// Whether the last save failed (warned once until one succeeds).
    failing: bool,
}

/// The estimators of one node and what they need between polls.
pub struct LiveAttribution {
    launches: Arc<Mutex<LaunchSnapshot>>,
    catalog: Option<Catalog>,
    /// GPU product name per UUID (the catalog's key).
    models: HashMap<String, String>,
    estimators: HashMap<String, (Sharing, Estimator)>,
    /// Cumulative launches per row at the last snapshot used.
    last_counts: HashMap<RowKey, u64>,
    last_published: Option<Instant>,
    /// Device utilization since the last window, per GPU UUID: the
    /// integral of the readings (percent x seconds) and the seconds they
    /// cover.
    util_since: HashMap<String, (f64, f64)>,
    last_poll: Option<Instant>,
    latest: HashMap<String, Attribution>,
    /// Cumulative completion spans at the last snapshot used, and the
    /// span events lost by then.
    last_spans: (Vec<(u32, f64, f64, u64)>, u64),
}

impl LiveAttribution {
    /// Estimators fed from `launches` (the launch reader's snapshot),
    /// keeping learned kernel costs in the catalog at `catalog` (read now,
    /// written every 30 s) when given.
    pub fn new(launches: Arc<Mutex<LaunchSnapshot>>, catalog: Option<std::path::PathBuf>) -> Self {
        let catalog = catalog.map(|path| Catalog {
            costs: CostCatalog::load_or_empty(&path),
            path,
            saved: Instant::now(),
            failing: false,
        });
        Self {
            launches,
            catalog,
            models: HashMap::new(),
            estimators: HashMap::new(),
            last_counts: HashMap::new(),
            last_published: None,
            util_since: HashMap::new(),
            last_poll: None,
            latest: HashMap::new(),
            last_spans: (Vec::new(), 0),
        }
    }

    /// Folds one poll in; returns each GPU's latest attribution (GPUs
    /// without device utilization, such as MIG-enabled ones, have none).
    pub fn update(&mut self, poll: &GpuPoll) -> &HashMap<String, Attribution> {
        let now = Instant::now();
        let since_poll = self.last_poll.map_or(Duration::from_secs(1), |at| now.duration_since(at));
        self.last_poll = Some(now);
        self.latest.retain(|uuid, _| poll.devices.iter().any(|d| &d.uuid == uuid));
        let (rows, spans, published) = {
            let snapshot = self.launches.lock().expect("launch snapshot poisoned");
            let fresh = snapshot.published.filter(|at| now.duration_since(*at) <= LAUNCHES_STALE_AFTER);
            let spans: Vec<(u32, f64, f64, u64)> =
                snapshot.spans.rows.iter().map(|row| (row.pid, row.busy_s, row.fair_s, row.closed)).collect();
            (fresh.map(|_| snapshot.rows.clone()), (spans, snapshot.spans.lost), fresh)
        };
        let new_window = published.is_none() || published != self.last_published;
        // A reading covers the time since the previous poll. When launch
        // counts were read inside that time, only the part before the read
        // belongs to the window the counts close; the rest opens the next.
        // Without this split every window's utilization would run up to a
        // poll past its counts, and a process starting or stopping just
        // after the read would be booked to its neighbours.
        let poll_s = since_poll.as_secs_f64().min(LAUNCHES_STALE_AFTER.as_secs_f64());
        let after_read_s = match published {
            Some(at) if new_window && self.last_published.is_some() => now.duration_since(at).as_secs_f64().min(poll_s),
            _ => 0.0,
        };
        let mut carried: Vec<(String, f64, f64)> = Vec::new();
        for device in &poll.devices {
            if let Some(util) = device.util_percent.filter(|u| u.is_finite()) {
                let entry = self.util_since.entry(device.uuid.clone()).or_default();
                let before_read_s = (poll_s - after_read_s).max(0.0);
                entry.0 += util * before_read_s;
                entry.1 += before_read_s;
                if entry.1 <= 0.0 {
                    // The whole reading is after the read: the window still
                    // needs one, so it gets this one.
                    *entry = (util, 1.0);
                }
                if after_read_s > 0.0 {
                    carried.push((device.uuid.clone(), util * after_read_s, after_read_s));
                }
            }
        }
        if !new_window {
            // Nothing new since the last window: the last split holds.
            return &self.latest;
        }
        let windows = match (rows, published) {
            (Some(rows), Some(published)) => {
                let previous = self.last_published.replace(published);
                let counts = self.deltas(&rows);
                let before = std::mem::replace(&mut self.last_spans, spans);
                let spans = super::spans::between((&before.0, before.1), (&self.last_spans.0, self.last_spans.1));
                // The first snapshot is only a baseline for the next.
                let Some(previous) = previous else {
                    self.util_since.clear();
                    return &self.latest;
                };
                let duration = published.duration_since(previous).as_secs_f64();
                self.windows(poll, duration, Some(counts), spans)
            }
            _ => {
                self.last_published = None;
                self.last_counts.clear();
                self.last_spans = (Vec::new(), 0);
                self.windows(poll, since_poll.as_secs_f64(), None, Vec::new())
            }
        };
        for (uuid, integral, seconds) in carried {
            self.util_since.insert(uuid, (integral, seconds));
        }
        for device in &poll.devices {
            self.models.insert(device.uuid.clone(), device.name.clone());
        }
        for (uuid, sharing, window) in windows {
            let model = self.models.get(&uuid).map_or("", String::as_str);
            let seeded = |sharing: Sharing| {
                let mut estimator = Estimator::new(EstimatorConfig::default(), sharing);
                if let Some(catalog) = &self.catalog {
                    estimator.seed(catalog.costs.costs_for(model));
                }
                estimator
            };
            let (kind, estimator) = self.estimators.entry(uuid.clone()).or_insert_with(|| (sharing, seeded(sharing)));
            if *kind != sharing {
                // MPS turned on or off: what was learned no longer holds.
                *kind = sharing;
                *estimator = seeded(sharing);
            }
            match estimator.observe(&window) {
                Some(attribution) => self.latest.insert(uuid, attribution),
                None => self.latest.remove(&uuid),
            };
        }
        self.estimators.retain(|uuid, _| poll.devices.iter().any(|d| &d.uuid == uuid));
        self.save_catalog(now, false);
        &self.latest
    }

    /// Records what the estimators pinned in the catalog and writes it,
    /// at most every `CATALOG_SAVE_EVERY` unless `now_anyway`.
    pub fn save_catalog(&mut self, now: Instant, now_anyway: bool) {
        let Some(catalog) = &mut self.catalog else { return };
        if !now_anyway && now.duration_since(catalog.saved) < CATALOG_SAVE_EVERY {
            return;
        }
        catalog.saved = now;
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let mut learned = false;
        for (uuid, (_, estimator)) in &self.estimators {
            let costs = estimator.learned_costs(unix);
            if !costs.is_empty() {
                let model = self.models.get(uuid).map_or("", String::as_str);
                catalog.costs.record(model, &costs);
                learned = true;
            }
        }
        if !learned {
            tracing::debug!(estimators = self.estimators.len(), "no pinned kernel costs to keep");
            return;
        }
        match catalog.costs.save(&catalog.path) {
            Ok(()) => {
                catalog.failing = false;
                let kernels: usize = catalog.costs.models.values().map(Vec::len).sum();
                tracing::debug!(path = %catalog.path.display(), kernels, "cost catalog written");
            }
            Err(err) => {
                if !catalog.failing {
                    tracing::warn!(error = %err, "writing the cost catalog; learned kernel costs will not survive a restart");
                }
                catalog.failing = true;
            }
        }
    }

    /// Launches per row since the last snapshot used (a row that shrank
    /// belongs to a new process that reused the pid: counted from zero).
    fn deltas(&mut self, rows: &[crate::probes::launches::LaunchRow]) -> Vec<LaunchCount> {
        let mut counts = Vec::with_capacity(rows.len());
        let mut current = HashMap::with_capacity(rows.len());
        for row in rows {
            let key: RowKey = (row.pid, row.function.clone(), row.grid, row.block);
            let before = self.last_counts.get(&key).copied().unwrap_or(0);
            let launched = if row.launches >= before { row.launches - before } else { row.launches };
            if launched > 0 {
                counts.push(LaunchCount {
                    pid: row.pid,
                    function: parse_hex(&row.function).unwrap_or(0),
                    threads_per_launch: threads_per_launch_of(row.grid, row.block),
                    launches: launched as f64,
                    kernel: row.kernel.as_deref().and_then(parse_hex),
                });
            }
            current.insert(key, row.launches);
        }
        self.last_counts = current;
        counts
    }

    /// One window per GPU with a utilization reading. A process's launches
    /// go to the GPU NVML lists it on; on a one-GPU node every process is
    /// on that GPU (MPS clients are not listed by NVML).
    fn windows(
        &mut self,
        poll: &GpuPoll,
        duration_s: f64,
        launches: Option<Vec<LaunchCount>>,
        spans: Vec<ProcessSpan>,
    ) -> Vec<(String, Sharing, Window)> {
        let device_of: HashMap<u32, &str> = poll
            .processes
            .iter()
            .filter_map(|p| {
                let parent = poll
                    .devices
                    .iter()
                    .find(|d| d.uuid == p.gpu_uuid || d.mig_devices.iter().any(|mig| mig.uuid == p.gpu_uuid))?;
                Some((p.pid, parent.uuid.as_str()))
            })
            .collect();
        let only = (poll.devices.len() == 1).then(|| poll.devices[0].uuid.as_str());
        poll.devices
            .iter()
            .map(|device| {
                let (integral, seconds) = self.util_since.remove(&device.uuid).unwrap_or_default();
                let device_util = (seconds > 0.0).then(|| integral / seconds);
                let on_device = |pid: u32| device_of.get(&pid).copied().or(only) == Some(device.uuid.as_str());
                let nvml = poll
                    .processes
                    .iter()
                    .filter(|p| on_device(p.pid))
                    .filter_map(|p| Some((p.pid, p.util?.sm_percent)))
                    .collect();
                let launches = launches.as_ref().map(|all| all.iter().filter(|c| on_device(c.pid)).copied().collect());
                let spans = spans.iter().filter(|span| on_device(span.pid)).copied().collect();
                (device.uuid.clone(), device.sharing, Window { duration_s, device_util, launches, nvml, spans })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{DeviceSample, ProcessSample, ProcessUtil};
    use crate::probes::launches::LaunchRow;

    fn poll(util: f64) -> GpuPoll {
        GpuPoll {
            devices: vec![DeviceSample { uuid: "GPU-a".into(), util_percent: Some(util), ..Default::default() }],
            processes: vec![ProcessSample {
                pid: 7,
                gpu_uuid: "GPU-a".into(),
                util: Some(ProcessUtil { sm_percent: 90.0, samples: 3, ..Default::default() }),
                memory_used_bytes: 1,
                sharing: Sharing::TimeSliced,
            }],
        }
    }

    fn publish(snapshot: &Arc<Mutex<LaunchSnapshot>>, launches: u64) {
        let mut snapshot = snapshot.lock().unwrap();
        snapshot.rows = vec![LaunchRow {
            pid: 7,
            pod_uid: None,
            entry: "kernel_ex",
            function: "0x1f".into(),
            kernel: Some("0xfeed".into()),
            kernel_from: Some("name"),
            grid: [132, 1, 1],
            block: [384, 1, 1],
            launches,
            threads: launches * 50_688,
        }];
        snapshot.published = Some(Instant::now());
    }

    /// Without launch counts the poll's NVML samples are scaled under the
    /// device; with them, windows run from one snapshot to the next and a
    /// lone process is measured at the device's utilization.
    #[test]
    fn windows_follow_the_launch_snapshots() {
        let snapshot = Arc::new(Mutex::new(LaunchSnapshot::default()));
        let mut live = LiveAttribution::new(snapshot.clone(), None);
        let nvml_only = live.update(&poll(40.0))["GPU-a"].clone();
        assert_eq!(nvml_only.share_of(7), 40.0);
        assert_eq!(nvml_only.processes[0].basis, super::super::Basis::Nvml);
        let mut total = 0;
        for _ in 0..6 {
            total += 100;
            publish(&snapshot, total);
            std::thread::sleep(Duration::from_millis(20));
            live.update(&poll(40.0));
        }
        let attribution = live.update(&poll(40.0))["GPU-a"].clone();
        assert!((attribution.share_of(7) - 40.0).abs() < 1.0, "{attribution:?}");
        assert_ne!(attribution.processes[0].basis, super::super::Basis::Nvml);
    }

    /// A reading that straddles a launch read is split at the read: the
    /// part after it belongs to the next window. A process that starts
    /// just after the read (utilization 90 from then on) does not show in
    /// the window its counts closed, and does show in the next.
    #[test]
    fn a_reading_after_the_read_opens_the_next_window() {
        let snapshot = Arc::new(Mutex::new(LaunchSnapshot::default()));
        let mut live = LiveAttribution::new(snapshot.clone(), None);
        publish(&snapshot, 100);
        live.update(&poll(10.0));
        let mut total = 100;
        let mut windows = Vec::new();
        for util_after_read in [90.0, 90.0] {
            std::thread::sleep(Duration::from_millis(30));
            live.update(&poll(if windows.is_empty() { 10.0 } else { 90.0 }));
            total += 100;
            publish(&snapshot, total);
            std::thread::sleep(Duration::from_millis(40));
            windows.push(live.update(&poll(util_after_read))["GPU-a"].device_util);
        }
        assert!(windows[0] < 20.0, "the window the read closed ran at 10: {windows:?}");
        assert!(windows[1] > 80.0, "the next one ran at 90: {windows:?}");
    }

    /// The reader's completion spans reach the estimator with the counts:
    /// two processes launching alike cannot be told apart by their
    /// launches (the even split would give each 30 of 60), but one had
    /// work outstanding a tenth of the time and so gets at most 10.
    #[test]
    fn spans_bound_the_shares_they_cover() {
        use crate::probes::spans::{SpanRow, SpanTotals};
        let snapshot = Arc::new(Mutex::new(LaunchSnapshot::default()));
        let mut live = LiveAttribution::new(snapshot.clone(), None);
        let mut last = Instant::now();
        let (mut launches, mut busy) = (0, [0.0, 0.0]);
        for round in 0..8 {
            std::thread::sleep(Duration::from_millis(20));
            let now = Instant::now();
            let elapsed = now.duration_since(last).as_secs_f64();
            last = now;
            launches += 100;
            busy[0] += 0.9 * elapsed;
            busy[1] += 0.1 * elapsed;
            let row = |pid: u32| LaunchRow {
                pid,
                pod_uid: None,
                entry: "kernel",
                function: format!("{:#x}", 0x10 + pid),
                kernel: None,
                kernel_from: None,
                grid: [132, 1, 1],
                block: [384, 1, 1],
                launches,
                threads: launches * 50_688,
            };
            let span = |pid: u32, busy_s: f64| SpanRow { pid, busy_s, fair_s: busy_s * 0.8, closed: round * 10 };
            {
                let mut snapshot = snapshot.lock().unwrap();
                snapshot.rows = vec![row(7), row(8)];
                snapshot.spans = SpanTotals { rows: vec![span(7, busy[0]), span(8, busy[1])], ..SpanTotals::default() };
                snapshot.published = Some(now);
            }
            live.update(&poll(60.0));
        }
        let attribution = live.update(&poll(60.0))["GPU-a"].clone();
        assert!(attribution.share_of(8) <= 10.5, "{attribution:?}");
        assert!(attribution.share_of(7) >= 45.0, "{attribution:?}");
    }

    /// A launch reader that stops publishing does not leave its last
    /// counts in charge: past the staleness limit the split falls back to
    /// NVML's samples (confidence 0) instead of holding old shares.
    #[test]
    fn stale_launch_counts_fall_back_to_nvml() {
        let snapshot = Arc::new(Mutex::new(LaunchSnapshot::default()));
        let mut live = LiveAttribution::new(snapshot.clone(), None);
        let mut total = 0;
        for _ in 0..6 {
            total += 100;
            publish(&snapshot, total);
            std::thread::sleep(Duration::from_millis(20));
            live.update(&poll(40.0));
        }
        assert_ne!(live.update(&poll(40.0))["GPU-a"].processes[0].basis, super::super::Basis::Nvml);
        snapshot.lock().unwrap().published = Some(Instant::now() - LAUNCHES_STALE_AFTER - Duration::from_secs(1));
        let stale = live.update(&poll(30.0))["GPU-a"].clone();
        assert_eq!(stale.processes[0].basis, super::super::Basis::Nvml, "{stale:?}");
        // NVML's 90 % scaled under the utilization averaged since the last window.
        assert_eq!(stale.share_of(7), stale.device_util);
        assert_eq!(stale.confidence, 0.0);
    }
}
