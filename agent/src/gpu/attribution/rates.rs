//! Launch counts as the estimator keys them: the cost key (process,
//! function, launch size class), a window's counts turned into rates per
//! key (a process's rarest keys merged), and rates per process.
use std::collections::HashMap;

use super::LaunchCount;

/// What launches are told apart by: the process, the function (or graph)
/// and the launch size class (log2 of threads per launch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CostKey {
    /// Host pid.
    pub pid: u32,
    /// Function or graph handle (`u64::MAX`: the process's rarer keys).
    pub function: u64,
    /// `bits(threads per launch)`; 0 for graphs and merged keys.
    pub size_class: u8,
}

impl CostKey {
    pub(super) fn of(count: &LaunchCount) -> Self {
        let size_class = (u64::BITS - count.threads_per_launch.leading_zeros()) as u8;
        Self { pid: count.pid, function: count.function, size_class }
    }
}

/// Launch rates per key; a process's keys beyond the most frequent
/// `max_keys_per_process` are merged into one, keys already learned
/// (`learned`) kept apart first.
/// Also the kernel identity of each key whose kernel is known.
pub(super) fn rates(
    launches: &[LaunchCount],
    duration: f64,
    max_keys_per_process: usize,
    learned: impl Fn(&CostKey) -> bool,
) -> (HashMap<CostKey, f64>, HashMap<CostKey, u64>) {
    let mut rates: HashMap<CostKey, f64> = HashMap::new();
    let mut identities: HashMap<CostKey, u64> = HashMap::new();
    // A count no GPU could run in the window (over a billion launches
    // a second) is corrupt, not load.
    let plausible = |c: &&LaunchCount| c.launches > 0.0 && c.launches.is_finite() && c.launches / duration < 1e9;
    for count in launches.iter().filter(plausible) {
        *rates.entry(CostKey::of(count)).or_default() += count.launches / duration;
        if let Some(kernel) = count.kernel {
            identities.insert(CostKey::of(count), kernel);
        }
    }
    let mut per_process: HashMap<u32, Vec<(CostKey, f64)>> = HashMap::new();
    for (key, rate) in &rates {
        per_process.entry(key.pid).or_default().push((*key, *rate));
    }
    for (pid, mut keys) in per_process {
        if keys.len() <= max_keys_per_process {
            continue;
        }
        // Keys already learned stay apart first, then the most frequent.
        keys.sort_by(|a, b| learned(&b.0).cmp(&learned(&a.0)).then(b.1.total_cmp(&a.1)).then(a.0.cmp(&b.0)));
        let merged = CostKey { pid, function: u64::MAX, size_class: 0 };
        for (key, rate) in keys.into_iter().skip(max_keys_per_process - 1) {
            rates.remove(&key);
            identities.remove(&key);
            *rates.entry(merged).or_default() += rate;
        }
    }
    (rates, identities)
}

/// Total launch rate per process.
pub(super) fn per_pid(rates: &HashMap<CostKey, f64>) -> HashMap<u32, f64> {
    let mut totals: HashMap<u32, f64> = HashMap::new();
    for (key, rate) in rates {
        *totals.entry(key.pid).or_default() += rate;
    }
    totals
}
