//! The estimator on synthetic traces with known costs, and on single
//! windows whose answer is known exactly.
use super::replay::replay;
use super::synthetic::Scenario;
use super::*;
use crate::gpu::Sharing;

fn count(pid: u32, function: u64, launches: f64) -> LaunchCount {
    LaunchCount { pid, function, threads_per_launch: 50_688, launches, kernel: None }
}

fn window(util: f64, launches: Vec<LaunchCount>) -> Window {
    Window { duration_s: 0.5, device_util: Some(util), launches: Some(launches), ..Window::default() }
}

/// Scenarios where steady tenants start together: nothing separates
/// their costs.
const UNSEPARABLE: [&str; 2] = ["steady", "co-started"];

/// Every built-in scenario but the unseparable ones is attributed within
/// 5 points per tenant per 2 s bin, and better than NVML's per-process
/// samples and the launch-share split.
#[test]
fn synthetic_scenarios_meet_the_target() {
    for name in Scenario::BUILTIN.iter().filter(|name| !UNSEPARABLE.contains(name)) {
        let (trace, launches) = Scenario::builtin(name).unwrap().generate();
        let result = replay(&trace, &launches, EstimatorConfig::default());
        assert!(!result.tenants.is_empty(), "{name}: nothing scored");
        for tenant in &result.tenants {
            assert!(tenant.bins >= 5, "{name}: {tenant:?}");
            assert!(tenant.podgpu_mae <= 5.0, "{name}: {tenant:?}");
            assert!(tenant.podgpu_mae < tenant.nvml_mae.min(tenant.launch_share_mae), "{name}: {tenant:?}");
        }
    }
}

/// Steady loads with nothing varying cannot be split by any estimator:
/// podgpu says so (low confidence, prior basis), splits them evenly, and
/// still beats NVML and the launch-share split. In the co-started
/// scenario (shaped like issue 23's held-out trace) the tenant switching
/// on and off is measured; the three steady ones started within 1.4 s of
/// each other are not, and their split does not depend on the order in
/// which they steadied.
#[test]
fn steady_loads_are_reported_as_unseparable() {
    for name in UNSEPARABLE {
        let (trace, launches) = Scenario::builtin(name).unwrap().generate();
        let result = replay(&trace, &launches, EstimatorConfig::default());
        let last = result.windows.iter().rev().find_map(|w| w.attribution.as_ref()).unwrap();
        let steady: Vec<&ProcessShare> = last.processes.iter().filter(|p| p.basis == Basis::Prior).collect();
        assert!(steady.len() >= 3, "{name}: {last:?}");
        let (low, high) =
            steady.iter().fold((f64::MAX, 0.0f64), |(l, h), p| (l.min(p.util_percent), h.max(p.util_percent)));
        assert!(high - low < 2.0, "{name}: the unseparable split is even: {last:?}");
        for tenant in &result.tenants {
            let unseparable = steady.iter().any(|p| p.pid == tenant.pid);
            if unseparable {
                assert!(tenant.confidence < 0.5, "{name}: {tenant:?}");
            } else {
                assert!(tenant.podgpu_mae <= 5.0, "{name}: the varying tenant is measured: {tenant:?}");
            }
            assert!(
                tenant.podgpu_mae < tenant.nvml_mae && tenant.podgpu_mae < tenant.launch_share_mae,
                "{name}: {tenant:?}"
            );
        }
    }
}

/// A process running alone gets the whole device utilization (less no
/// overhead) with high confidence once its rate is steady.
#[test]
fn a_solo_process_is_measured() {
    let mut estimator = Estimator::new(EstimatorConfig::default(), Sharing::TimeSliced);
    let mut last = None;
    for _ in 0..10 {
        last = estimator.observe(&window(42.0, vec![count(7, 1, 100.0)]));
    }
    let attribution = last.unwrap();
    assert!((attribution.share_of(7) - 42.0).abs() < 0.5, "{attribution:?}");
    assert_eq!(attribution.processes[0].basis, Basis::Measured);
    // Within 2 points after ten windows of 3-point reading noise.
    assert!(attribution.confidence > 0.6, "{attribution:?}");
}

/// A newcomer whose costs are unknown takes what the known process does
/// not explain, at once.
#[test]
fn a_newcomer_takes_the_residual() {
    let mut estimator = Estimator::new(EstimatorConfig::default(), Sharing::Mps);
    for _ in 0..10 {
        estimator.observe(&window(30.0, vec![count(1, 1, 100.0)]));
    }
    let attribution = estimator.observe(&window(55.0, vec![count(1, 1, 100.0), count(2, 9, 40.0)])).unwrap();
    assert!((attribution.share_of(1) - 30.0).abs() < 2.0, "{attribution:?}");
    assert!((attribution.share_of(2) - 25.0).abs() < 2.0, "{attribution:?}");
    let newcomer = attribution.processes.iter().find(|p| p.pid == 2).unwrap();
    assert_eq!(newcomer.basis, Basis::Residual);
}

/// A process NVML saw busy but whose launches are unseen is not read as
/// idle: it holds what the launching processes do not explain, and NVML's
/// values split that part between such processes.
#[test]
fn busy_processes_without_launch_counts_hold_the_rest() {
    let mut estimator = Estimator::new(EstimatorConfig::default(), Sharing::TimeSliced);
    let unseen = Window {
        duration_s: 1.0,
        device_util: Some(50.0),
        launches: Some(Vec::new()),
        nvml: vec![(9, 40.0), (10, 0.0), (11, 10.0)],
        spans: Vec::new(),
    };
    let attribution = estimator.observe(&unseen).unwrap();
    assert!((attribution.share_of(9) - 40.0).abs() < 1e-6, "{attribution:?}");
    assert!((attribution.share_of(11) - 10.0).abs() < 1e-6, "{attribution:?}");
    assert_eq!(attribution.share_of(10), 0.0, "an idle process got a share");
    assert_eq!(attribution.processes.iter().find(|p| p.pid == 9).unwrap().basis, Basis::Residual);

    // Under MPS the busy process NVML names is the server: it gets nothing.
    let mut mps = Estimator::new(EstimatorConfig::default(), Sharing::Mps);
    let server = Window { nvml: vec![(1, 35.0)], ..unseen };
    assert!(mps.observe(&server).unwrap().processes.is_empty());
}

/// Shares never sum above the device utilization, whatever the counts.
#[test]
fn shares_never_exceed_the_device() {
    let mut estimator = Estimator::new(EstimatorConfig::default(), Sharing::TimeSliced);
    for step in 0..40 {
        let util = if step % 7 == 0 { 5.0 } else { 80.0 };
        let attribution = estimator
            .observe(&window(util, vec![count(1, 1, 100.0 + step as f64 * 10.0), count(2, 2, 300.0)]))
            .unwrap();
        let total: f64 = attribution.processes.iter().map(|p| p.util_percent).sum();
        assert!(total + attribution.sharing_overhead_percent <= util + 1e-9, "{attribution:?}");
        assert!(attribution.processes.iter().all(|p| p.util_percent >= 0.0));
    }
}

/// No device utilization, no attribution; no launch counts, NVML's
/// samples scaled under the device, with zero confidence.
#[test]
fn missing_inputs_degrade_honestly() {
    let mut estimator = Estimator::new(EstimatorConfig::default(), Sharing::TimeSliced);
    let blind = Window { device_util: None, launches: Some(vec![count(1, 1, 5.0)]), ..window(0.0, Vec::new()) };
    assert!(estimator.observe(&blind).is_none());
    let nvml_only =
        Window { device_util: Some(50.0), launches: None, nvml: vec![(1, 60.0), (2, 40.0)], ..window(0.0, Vec::new()) };
    let attribution = estimator.observe(&nvml_only).unwrap();
    assert!((attribution.share_of(1) - 30.0).abs() < 1e-9 && (attribution.share_of(2) - 20.0).abs() < 1e-9);
    assert!(attribution.processes.iter().all(|p| p.basis == Basis::Nvml && p.confidence == 0.0));
}

/// Keys of a process that stopped launching are forgotten after the TTL,
/// with their filter states.
#[test]
fn idle_keys_are_forgotten() {
    let config = EstimatorConfig { key_ttl_s: 2.0, ..EstimatorConfig::default() };
    let mut estimator = Estimator::new(config, Sharing::Mps);
    for _ in 0..4 {
        estimator.observe(&window(40.0, vec![count(1, 1, 100.0), count(2, 2, 50.0)]));
    }
    assert_eq!(estimator.learned_keys(), 2);
    for _ in 0..6 {
        estimator.observe(&window(20.0, vec![count(1, 1, 100.0)]));
    }
    assert_eq!(estimator.learned_keys(), 1);
}

fn shared(pid: u32, function: u64, launches: f64, kernel: u64) -> LaunchCount {
    LaunchCount { kernel: Some(kernel), ..count(pid, function, launches) }
}

/// Two replicas of one model started together, one twice as busy: with
/// the kernel's identity they share one cost and are split by their
/// launches, surer than without it but not sure: the same kernel at the
/// same geometry may do more work per launch in one of them (a larger
/// batch), which steady loads never show. Without the identity only
/// their sum is known, and the split is the prior's (even), at lower
/// confidence.
#[test]
fn replicas_of_one_kernel_are_split_by_their_launches() {
    let run = |identified: bool| {
        let mut estimator = Estimator::new(EstimatorConfig::default(), Sharing::Mps);
        let launches = |pid: u32, function: u64, n: f64| {
            if identified {
                shared(pid, function, n, 0xfeed)
            } else {
                count(pid, function, n)
            }
        };
        let mut last = None;
        for _ in 0..20 {
            last = estimator.observe(&window(45.0, vec![launches(1, 0x10, 200.0), launches(2, 0x77, 100.0)]));
        }
        last.unwrap()
    };
    let known = run(true);
    assert!((known.share_of(1) - 30.0).abs() < 1.0 && (known.share_of(2) - 15.0).abs() < 1.0, "{known:?}");
    assert!(known.processes.iter().all(|p| p.confidence < 0.5), "their costs may differ: {known:?}");
    let unknown = run(false);
    assert!((unknown.share_of(1) - unknown.share_of(2)).abs() < 5.0, "the prior splits evenly: {unknown:?}");
    assert!(known.confidence > unknown.confidence + 0.2, "known {known:?} unknown {unknown:?}");
}

/// Replicas that start before the reading shows them open their shared
/// cost at about nothing (the prior's part of an empty reading): the
/// second's difference from it is scaled by the cost's σ then, not by
/// that mean, so it is not pinned to its sibling's cost per launch before
/// any data.
#[test]
fn replicas_started_before_the_reading_shows_them_are_not_pinned() {
    let mut estimator = Estimator::new(EstimatorConfig::default(), Sharing::Mps);
    let replicas = || vec![shared(1, 0x10, 200.0, 0xfeed), shared(2, 0x77, 100.0, 0xfeed)];
    for _ in 0..2 {
        estimator.observe(&window(0.0, replicas()));
    }
    let mut last = None;
    for _ in 0..20 {
        last = estimator.observe(&window(45.0, replicas()));
    }
    let after = last.unwrap();
    assert!((after.share_of(1) + after.share_of(2) - 45.0).abs() < 1.0, "{after:?}");
    assert!(after.processes.iter().all(|p| p.confidence < 0.5), "their costs may differ: {after:?}");
}

/// The same kernel need not cost the same in two processes: one replica's
/// batch grows 4x at the same launch geometry (4x the cost per launch, a
/// quarter of the launches, the same load). On one shared cost, its
/// neighbour would be given what it no longer launches (40 / 5 for a
/// truth of 30 / 15). The jump loosens the difference the replica keeps
/// from the shared cost instead, and both keep their shares.
#[test]
fn a_replica_whose_batch_grows_keeps_its_neighbours_share() {
    let mut estimator = Estimator::new(EstimatorConfig::default(), Sharing::Mps);
    for _ in 0..20 {
        estimator.observe(&window(45.0, vec![shared(1, 0x10, 200.0, 0xfeed), shared(2, 0x77, 100.0, 0xfeed)]));
    }
    let mut last = None;
    for _ in 0..10 {
        last = estimator.observe(&window(45.0, vec![shared(1, 0x10, 200.0, 0xfeed), shared(2, 0x77, 25.0, 0xfeed)]));
    }
    let after = last.unwrap();
    assert!((after.share_of(1) - 30.0).abs() < 2.0 && (after.share_of(2) - 15.0).abs() < 2.0, "{after:?}");
}

/// A kernel's cost learned while it ran alone pins it for a later
/// process: started beside an unknown newcomer, the process launching the
/// known kernel is measured at once and the newcomer takes the rest. The
/// shared state stays while any process still launches the kernel.
#[test]
fn a_learned_kernel_pins_later_processes() {
    let config = EstimatorConfig { key_ttl_s: 2.0, ..EstimatorConfig::default() };
    let mut estimator = Estimator::new(config, Sharing::Mps);
    // 0.1 %·s per launch, learned in process 1.
    for _ in 0..10 {
        estimator.observe(&window(20.0, vec![shared(1, 0x10, 100.0, 0xbeef)]));
    }
    let attribution = estimator
        .observe(&window(50.0, vec![shared(1, 0x10, 100.0, 0xbeef), shared(2, 0x20, 50.0, 0xbeef), count(3, 9, 7.0)]))
        .unwrap();
    assert!((attribution.share_of(2) - 10.0).abs() < 1.0, "{attribution:?}");
    assert!((attribution.share_of(3) - 20.0).abs() < 2.0, "{attribution:?}");
    assert_eq!(estimator.learned_keys(), 2, "process 2 joined the kernel's state; 3 is not learned yet");
    // Process 1 stops; process 2 keeps the kernel's cost past the TTL.
    for _ in 0..8 {
        estimator.observe(&window(10.0, vec![shared(2, 0x20, 50.0, 0xbeef)]));
    }
    let attribution = estimator.observe(&window(10.0, vec![shared(2, 0x20, 50.0, 0xbeef)])).unwrap();
    assert!((attribution.share_of(2) - 10.0).abs() < 1.0, "{attribution:?}");
    assert_eq!(estimator.learned_keys(), 1);
}

/// A process that joins a learned kernel cost carries a difference of its
/// own; when it goes (a crash, a pod deleted), the difference goes with
/// its keys, the state returns to what it was, and the process still
/// launching the kernel keeps its share; a newcomer on the same kernel
/// then starts from the cost again.
#[test]
fn a_departed_replica_leaves_no_state_behind() {
    let config = EstimatorConfig { key_ttl_s: 2.0, ..EstimatorConfig::default() };
    let mut estimator = Estimator::new(config, Sharing::Mps);
    // 0.1 %·s per launch, learned in process 1 alone.
    for _ in 0..10 {
        estimator.observe(&window(20.0, vec![shared(1, 0x10, 100.0, 0xbeef)]));
    }
    let alone = estimator.state_count();
    for _ in 0..4 {
        estimator.observe(&window(30.0, vec![shared(1, 0x10, 100.0, 0xbeef), shared(2, 0x20, 50.0, 0xbeef)]));
    }
    assert_eq!(estimator.state_count(), alone + 1, "process 2's difference from the shared cost");
    // Process 2 is gone: past the TTL its key and its difference are dropped.
    let mut last = None;
    for _ in 0..6 {
        last = estimator.observe(&window(20.0, vec![shared(1, 0x10, 100.0, 0xbeef)]));
    }
    assert_eq!(estimator.state_count(), alone, "nothing of process 2 is left");
    let attribution = last.unwrap();
    assert!((attribution.share_of(1) - 20.0).abs() < 1.0 && attribution.share_of(2) == 0.0, "{attribution:?}");
    let attribution =
        estimator.observe(&window(30.0, vec![shared(1, 0x10, 100.0, 0xbeef), shared(3, 0x30, 50.0, 0xbeef)])).unwrap();
    assert!((attribution.share_of(1) - 20.0).abs() < 2.0, "{attribution:?}");
    assert!((attribution.share_of(3) - 10.0).abs() < 2.0, "{attribution:?}");
}

/// The node's catalog: a kernel cost pinned by one estimator is handed to
/// a fresh one (an agent restarted), where a process launching that
/// kernel beside an unknown newcomer starts from the cost instead of an
/// even split. The cost was learned in another process, whose batches
/// may have been larger or smaller, so the share is not confident until
/// the process's own windows confirm it.
#[test]
fn catalog_costs_pin_kernels_in_a_fresh_estimator() {
    // 0.1 %·s per launch, learned while the kernel ran alone.
    let mut first = Estimator::new(EstimatorConfig::default(), Sharing::Mps);
    for _ in 0..10 {
        first.observe(&window(20.0, vec![shared(1, 0x10, 100.0, 0xbeef)]));
    }
    let learned = first.learned_costs(1_800_000_000.0);
    assert_eq!(learned.len(), 1, "{learned:?}");
    assert_eq!((learned[0].kernel, learned[0].seen_unix), (0xbeef, 1_800_000_000.0));
    assert!((learned[0].cost - 0.1).abs() < 0.01, "{learned:?}");

    let mut fresh = Estimator::new(EstimatorConfig::default(), Sharing::Mps);
    fresh.seed(&learned);
    let together = window(50.0, vec![shared(7, 0x99, 100.0, 0xbeef), count(8, 0x40, 30.0)]);
    let attribution = fresh.observe(&together).unwrap();
    // 200 launches/s at 0.1 = 20 %; the newcomer holds the other 30.
    let mut unseeded = Estimator::new(EstimatorConfig::default(), Sharing::Mps);
    let cold = unseeded.observe(&together).unwrap();
    let error = |a: &Attribution| (a.share_of(7) - 20.0).abs();
    assert!(error(&attribution) < 4.0 && error(&attribution) < error(&cold) - 1.0, "{attribution:?} / {cold:?}");
    assert!(cold.processes.iter().all(|p| p.confidence < 0.5), "without the catalog nothing is known: {cold:?}");
    let known = attribution.processes.iter().find(|p| p.pid == 7).unwrap();
    assert!(known.confidence < 0.5, "a cost from another process is not yet this one's: {known:?}");
    // The newcomer pauses: process 7's own launches now explain the
    // device alone, which confirms its cost.
    for _ in 0..3 {
        fresh.observe(&window(20.0, vec![shared(7, 0x99, 100.0, 0xbeef)]));
    }
    let attribution = fresh.observe(&together).unwrap();
    let known = attribution.processes.iter().find(|p| p.pid == 7).unwrap();
    assert!((known.util_percent - 20.0).abs() < 2.0 && known.confidence > 0.5, "{attribution:?}");
}

/// Hostile windows (zero and huge durations, counts and utilizations,
/// processes appearing and vanishing at random) never panic, every share
/// stays finite, non-negative and within the device utilization, and the
/// estimator recovers once sane windows follow.
#[test]
fn hostile_windows_keep_shares_bounded() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for sharing in [Sharing::TimeSliced, Sharing::Mps] {
        let mut estimator = Estimator::new(EstimatorConfig::default(), sharing);
        for _ in 0..3_000 {
            let pick = |r: u64, options: &[f64]| options[(r % options.len() as u64) as usize];
            let util = pick(next(), &[0.0, 0.5, 37.0, 100.0, 250.0, -5.0, 1e300]);
            let launches = (0..next() % 6)
                .map(|_| LaunchCount {
                    pid: (next() % 5) as u32,
                    function: next() % 3,
                    threads_per_launch: pick(next(), &[0.0, 1.0, 50_688.0, u64::MAX as f64]) as u64,
                    launches: pick(next(), &[0.0, 1.0, 100.0, 1e9, 1e300]),
                    // Shared kernels across hostile processes too.
                    kernel: (next() % 3 != 0).then(|| next() % 4),
                })
                .collect();
            let window = Window {
                duration_s: pick(next(), &[0.0, 1e-9, 0.5, 4.0, 1e9]),
                device_util: (next() % 8 != 0).then_some(util),
                launches: (next() % 6 != 0).then_some(launches),
                nvml: (0..next() % 3).map(|_| ((next() % 5) as u32, pick(next(), &[0.0, 30.0, 1e300]))).collect(),
                spans: (0..next() % 4)
                    .map(|_| ProcessSpan {
                        pid: (next() % 5) as u32,
                        busy_s: pick(next(), &[0.0, 0.3, -1.0, f64::NAN, 1e300]),
                        fair_s: (next() % 4 != 0).then(|| pick(next(), &[0.0, 0.1, f64::INFINITY, -2.0])),
                        closed: next() % 3,
                    })
                    .collect(),
            };
            let Some(attribution) = estimator.observe(&window) else { continue };
            let total: f64 = attribution.processes.iter().map(|p| p.util_percent).sum();
            assert!(attribution.device_util.is_finite() && (0.0..=100.0).contains(&attribution.device_util));
            assert!(
                attribution.processes.iter().all(|p| p.util_percent.is_finite() && p.util_percent >= 0.0),
                "{attribution:?}"
            );
            assert!(total <= attribution.device_util + 1e-6, "{window:?} -> {attribution:?}");
            assert!((0.0..=1.0).contains(&attribution.confidence), "{attribution:?}");
        }
        // And it heals: a sane process running alone afterwards is measured.
        let mut last = None;
        for _ in 0..120 {
            last = estimator.observe(&window(33.0, vec![count(77, 1, 50.0)]));
        }
        let attribution = last.unwrap();
        assert!((attribution.share_of(77) - 33.0).abs() < 1.0, "{sharing:?}: {attribution:?}");
    }
}

/// A tenant toggling faster than two windows (never steady) beside a
/// steady one, with the reading lagging the counts: the window after each
/// stop still holds 6 points of the stopped tenant. The toggling key joins
/// the filter all the same, the lagging windows teach little, and both
/// costs come out right: 25 / 12 while both run, not the steady tenant's
/// cost inflated by the other's tail.
#[test]
fn a_toggling_tenant_is_learned_and_its_tail_is_not_its_neighbours() {
    let mut estimator = Estimator::new(EstimatorConfig::default(), Sharing::TimeSliced);
    // Per 0.5 s window: A at 1 ms a launch, B 150 launches at 0.4 ms (12 %).
    let cycle = [(125.0, 37.0), (60.0, 24.0), (0.0, 18.0), (0.0, 12.0), (60.0, 24.0)];
    let mut both_running = None;
    for _ in 0..12 {
        for &(a_launches, util) in &cycle {
            let mut launches = vec![count(8, 2, 150.0)];
            if a_launches > 0.0 {
                launches.push(count(7, 1, a_launches));
            }
            let attribution = estimator.observe(&window(util, launches));
            if a_launches == 125.0 {
                both_running = attribution;
            }
        }
    }
    let attribution = both_running.unwrap();
    assert!((attribution.share_of(7) - 25.0).abs() < 2.0, "{attribution:?}");
    assert!((attribution.share_of(8) - 12.0).abs() < 2.0, "{attribution:?}");
}

/// A batch change at a fixed duty: tenant A's launches fall 4x while each
/// costs 4x more (its share holds at 20 %), beside B at 10 %. The cost
/// is loosened by as much as the share-holding change needs, so A keeps
/// its 20 % a few windows on, not a quarter of it.
#[test]
fn a_batch_that_grows_keeps_its_share() {
    // The utilization below is the tenants' work alone, with no switching
    // overhead, and nothing here could tell an overhead from A's constant
    // cost: the estimator is given that prior, as the batch change is
    // what this test is about.
    let config = EstimatorConfig { overhead_mean: 0.0, ..EstimatorConfig::default() };
    let mut estimator = Estimator::new(config, Sharing::TimeSliced);
    // Learn both costs: B's rate moves between 80 and 120 launches a window.
    for step in 0..30 {
        let b_launches = if step % 4 < 2 { 80.0 } else { 120.0 };
        // Per 0.5 s window: A 100 x 1 ms (20 %), B at 0.5 ms (0.1 % a launch).
        let util = 20.0 + b_launches * 0.1;
        estimator.observe(&window(util, vec![count(7, 1, 100.0), count(8, 2, b_launches)]));
    }
    let before = estimator.observe(&window(30.0, vec![count(7, 1, 100.0), count(8, 2, 100.0)])).unwrap();
    assert!((before.share_of(7) - 20.0).abs() < 2.0, "{before:?}");
    let mut after = None;
    for _ in 0..4 {
        after = estimator.observe(&window(30.0, vec![count(7, 1, 25.0), count(8, 2, 100.0)]));
    }
    let after = after.unwrap();
    assert!((after.share_of(7) - 20.0).abs() < 3.0, "{after:?}");
    assert!((after.share_of(8) - 10.0).abs() < 3.0, "{after:?}");
}

/// A batch tenant (launch rate and cost per launch moving opposite ways
/// at a fixed duty) beside moving neighbours: `sweep-1-125`, tenant 1002,
/// whose costs were learned small while the split was unknown. A later
/// rate fall then "proved" its cost near 0, and it read 5 points or more
/// under its truth at confidence 0.5 or more in 5 bins. The floor under a
/// jump's looseness (`jump_share_floor`) keeps such a share loose: no bin
/// of the scenario's tenants is confident and more than 5 points off.
#[test]
fn a_falling_rate_does_not_pin_a_misjudged_share_at_zero() {
    let (trace, launches) = super::generator::draw(1, 125).scenario.generate();
    let confident_misses = |config: EstimatorConfig| -> usize {
        replay(&trace, &launches, config).tenants.iter().map(|tenant| tenant.confident_bins_over_5).sum()
    };
    assert_eq!(confident_misses(EstimatorConfig::default()), 0);
    // The scenario does show the failure the floor is for.
    assert!(confident_misses(EstimatorConfig { jump_share_floor: 0.0, ..EstimatorConfig::default() }) >= 5);
}

/// Two steady tenants started together under MPS (`sweep-2-182`): only
/// their sum is observable. The smaller one (3.6 %) is launch-bound, so
/// its spans bound it loosely (about 12 %). The even split wants it
/// higher, so its costs break the bound every window; fed to the filter
/// as a measurement, that loose bound pinned it at 12-13 % with σ 2-3
/// ("measured", 4 bins at confidence 0.5 or more, every one over 5
/// points off). Held at the bound without growing surer, it is never
/// confident, and no tenant of the scenario is confidently wrong.
#[test]
fn a_loose_span_bound_is_not_a_measurement() {
    let (trace, launches) = super::generator::draw(2, 182).scenario.generate();
    let replayed = replay(&trace, &launches, EstimatorConfig::default());
    let small = replayed.tenants.iter().find(|t| t.pid == 1001).expect("tenant 1001");
    assert!(small.truth < 5.0, "the launch-bound tenant: {small:?}");
    assert_eq!(small.confident_bins, 0, "{small:?}");
    assert_eq!(replayed.tenants.iter().map(|t| t.confident_bins_over_5).sum::<usize>(), 0);
}

/// Steady tenants started together cannot be separated by their
/// launches: the even split misses those whose duties differ. Completion
/// spans say how long each had work outstanding; the split follows them,
/// and every share stays calibrated. Where a tenant is launch-bound (its
/// GPU idles inside its spans, issue 23's held-out shape), the fair split
/// over-counts it: it still beats both baselines, at low confidence.
#[test]
fn completion_spans_split_co_started_tenants() {
    use super::replay::TenantScore;
    use super::synthetic::SpanModel;
    let with_spans = |scenario: &Scenario| Scenario {
        span_models: scenario
            .tenants
            .iter()
            // The launch-bound tenant (0x2048) keeps the GPU busy half the
            // time it has work outstanding.
            .map(|(pid, phases)| SpanModel {
                pid: *pid,
                efficiency: if phases[0].kernel.function == 0x2048 { 0.5 } else { 0.95 },
                waits: true,
            })
            .collect(),
        ..scenario.clone()
    };
    let score = |scenario: &Scenario| {
        let (trace, launches) = scenario.generate();
        replay(&trace, &launches, EstimatorConfig::default()).tenants
    };
    let worst = |tenants: &[TenantScore]| tenants.iter().map(|t| t.podgpu_mae).fold(0.0, f64::max);
    let steady = Scenario::builtin("steady").unwrap();
    let (before, after) = (score(&steady), score(&with_spans(&steady)));
    assert!(worst(&before) > 3.0 && worst(&after) < 2.5, "before {before:#?} after {after:#?}");
    let co_started = score(&with_spans(&Scenario::builtin("co-started").unwrap()));
    for tenant in after.iter().chain(&co_started) {
        assert!(tenant.podgpu_mae < tenant.nvml_mae.min(tenant.launch_share_mae), "{tenant:?}");
        assert_eq!(tenant.confident_bins_over_5, 0, "{tenant:?}");
        assert!(tenant.bins_within_2_sigma * 10 >= tenant.bins * 9, "calibrated: {tenant:?}");
    }
}
