//! The node's cost catalog: what one launch of each known kernel costs on
//! each GPU model, learned by the estimators and kept in a file so that it
//! survives agent restarts (`--cost-catalog`, on the host path the chart
//! mounts). A kernel whose cost was pinned once, in any process, is then
//! known for every later process and every later agent: replicas started
//! together after a restart are split by their launches at once.
//!
//! Keyed by (GPU model, kernel identity, launch size class). Only costs
//! the filter pinned (relative σ under a quarter) are kept. The file is
//! written atomically (a temporary file in the same folder, synced, then
//! renamed over the old one) and bounded: at most `MAX_MODELS` GPU models
//! and `MAX_KERNELS` kernels per model, the least recently seen going
//! first. A file that cannot be read is moved aside (`.bad`), never
//! overwritten, and the agent starts with an empty catalog.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Kernels kept per GPU model.
pub const MAX_KERNELS: usize = 4096;
/// GPU models kept.
pub const MAX_MODELS: usize = 16;

/// One learned kernel cost.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LearnedCost {
    /// Kernel identity (`LaunchCount::kernel`).
    pub kernel: u64,
    /// Launch size class (bits of threads per launch).
    pub size_class: u8,
    /// GPU %·s per launch.
    pub cost: f64,
    /// Variance of `cost`.
    pub variance: f64,
    /// Unix time it was last learned or used.
    pub seen_unix: f64,
}

impl LearnedCost {
    fn is_sane(&self) -> bool {
        self.cost.is_finite() && self.cost >= 0.0 && self.variance.is_finite() && self.variance >= 0.0
    }
}

/// Why the catalog could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Reading, writing or renaming failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a catalog.
    #[error("{path}: not a cost catalog: {reason}")]
    Format {
        /// File.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// The catalog as stored: costs by GPU model.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CostCatalog {
    /// Format version (1).
    pub version: u32,
    /// Costs per GPU model (product name).
    pub models: BTreeMap<String, Vec<LearnedCost>>,
}

impl CostCatalog {
    /// Reads the catalog at `path`; an absent file is an empty catalog.
    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let text = crate::files::read_if_present(path)
            .map_err(|source| CatalogError::Io { path: path.to_path_buf(), source })?;
        let Some(text) = text else { return Ok(Self::default()) };
        let mut catalog: CostCatalog = serde_json::from_str(&text)
            .map_err(|err| CatalogError::Format { path: path.to_path_buf(), reason: err.to_string() })?;
        if catalog.version != 1 {
            let reason = format!("version {} (this agent writes 1)", catalog.version);
            return Err(CatalogError::Format { path: path.to_path_buf(), reason });
        }
        for costs in catalog.models.values_mut() {
            costs.retain(LearnedCost::is_sane);
        }
        catalog.bound();
        Ok(catalog)
    }

    /// Reads `path`, or starts empty when it cannot be read: a malformed
    /// file is moved aside to `PATH.bad` (kept for a person to look at,
    /// and not overwritten by the next save). Says what happened.
    pub fn load_or_empty(path: &Path) -> Self {
        match Self::load(path) {
            Ok(catalog) => {
                let kernels: usize = catalog.models.values().map(Vec::len).sum();
                tracing::info!(path = %path.display(), kernels, "cost catalog loaded");
                catalog
            }
            Err(err) => {
                crate::files::move_aside(path, "cost catalog", &err);
                Self { version: 1, models: BTreeMap::new() }
            }
        }
    }

    /// The learned costs of `model`.
    pub fn costs_for(&self, model: &str) -> &[LearnedCost] {
        self.models.get(model).map_or(&[], Vec::as_slice)
    }

    /// Merges costs learned on `model`: an entry replaces the stored one
    /// of its kernel and size class (the newest learning wins).
    pub fn record(&mut self, model: &str, learned: &[LearnedCost]) {
        self.version = 1;
        let costs = self.models.entry(model.to_string()).or_default();
        for cost in learned.iter().filter(|c| c.is_sane()) {
            match costs.iter_mut().find(|c| c.kernel == cost.kernel && c.size_class == cost.size_class) {
                Some(stored) => *stored = *cost,
                None => costs.push(*cost),
            }
        }
        self.bound();
    }

    /// Keeps `MAX_KERNELS` per model and `MAX_MODELS` models, the most
    /// recently seen.
    fn bound(&mut self) {
        for costs in self.models.values_mut() {
            costs.sort_by(|a, b| b.seen_unix.total_cmp(&a.seen_unix).then(a.kernel.cmp(&b.kernel)));
            costs.truncate(MAX_KERNELS);
        }
        while self.models.len() > MAX_MODELS {
            let newest = |costs: &Vec<LearnedCost>| costs.iter().map(|c| c.seen_unix).fold(f64::MIN, f64::max);
            let Some(stalest) =
                self.models.iter().min_by(|a, b| newest(a.1).total_cmp(&newest(b.1))).map(|(model, _)| model.clone())
            else {
                break;
            };
            self.models.remove(&stalest);
        }
    }

    /// Writes the catalog to `path` atomically: a reader (or a crash)
    /// sees the old file or the new one, never half of one.
    pub fn save(&self, path: &Path) -> Result<(), CatalogError> {
        let io = |source| CatalogError::Io { path: path.to_path_buf(), source };
        let json = serde_json::to_vec(self).map_err(|err| io(std::io::Error::other(err)))?;
        crate::files::write_atomically(path, &json).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(kernel: u64, seen_unix: f64) -> LearnedCost {
        LearnedCost { kernel, size_class: 16, cost: 0.1, variance: 1e-4, seen_unix }
    }

    /// Saved and loaded back, the catalog is the same; an absent file is
    /// empty; no temporary file is left behind.
    #[test]
    fn round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("costs.json");
        assert_eq!(CostCatalog::load(&path).unwrap(), CostCatalog::default());
        let mut catalog = CostCatalog::default();
        catalog.record("NVIDIA H100 80GB HBM3", &[cost(1, 10.0), cost(2, 11.0)]);
        catalog.save(&path).unwrap();
        assert_eq!(CostCatalog::load(&path).unwrap(), catalog);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the catalog itself");
        assert_eq!(catalog.costs_for("NVIDIA H100 80GB HBM3").len(), 2);
        assert!(catalog.costs_for("NVIDIA H200").is_empty());
    }

    /// A newer learning replaces the stored one; insane costs are left out;
    /// the bounds keep the most recently seen.
    #[test]
    fn merges_and_stays_bounded() {
        let mut catalog = CostCatalog::default();
        catalog.record("m", &[cost(1, 1.0)]);
        catalog
            .record("m", &[LearnedCost { cost: 0.3, ..cost(1, 2.0) }, LearnedCost { cost: f64::NAN, ..cost(9, 3.0) }]);
        assert_eq!(catalog.costs_for("m"), &[LearnedCost { cost: 0.3, ..cost(1, 2.0) }]);
        let many: Vec<LearnedCost> = (0..MAX_KERNELS as u64 + 10).map(|k| cost(k + 100, k as f64)).collect();
        catalog.record("m", &many);
        let kept = catalog.costs_for("m");
        assert_eq!(kept.len(), MAX_KERNELS);
        assert!(kept.iter().all(|c| c.seen_unix >= 10.0), "the least recently seen went first");
        for model in 0..MAX_MODELS + 3 {
            catalog.record(&format!("gpu-{model}"), &[cost(1, 1e6 + model as f64)]);
        }
        assert_eq!(catalog.models.len(), MAX_MODELS);
        assert!(!catalog.models.contains_key("m"), "the stalest model went first");
    }

    /// A file that is not a catalog is an error naming the file; the agent
    /// moves it aside and starts empty, and a wrong version is refused.
    #[test]
    fn a_bad_file_is_moved_aside_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("costs.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = CostCatalog::load(&path).unwrap_err().to_string();
        assert!(err.contains("costs.json") && err.contains("not a cost catalog"), "{err}");
        assert_eq!(CostCatalog::load_or_empty(&path).models.len(), 0);
        assert!(!path.exists() && dir.path().join("costs.bad").exists());
        std::fs::write(&path, r#"{"version": 7, "models": {}}"#).unwrap();
        assert!(CostCatalog::load(&path).unwrap_err().to_string().contains("version 7"));
    }
}
