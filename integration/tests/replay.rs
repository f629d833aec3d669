//! Attribution replay in CI: every recorded trace in `integration/data/gpu/traces`
//! (or `$PODGPU_TRACES`) goes through `podgpu-agent replay`, the same
//! estimator the live agent runs, and is scored against its tenants' truth.
//!
//! The bar, per tenant per 2 s bin: never worse than NVML's per-process
//! samples or the launch-share split; within 5 points wherever the
//! estimator says it measured the split (confidence ≥ 0.5); where it says
//! it could not (steady loads that nothing separates), within 8 points and
//! flagged as such (confidence < 0.5).
use std::path::PathBuf;
use std::process::Command;

use integration::workspace_binary;

fn traces_dir() -> PathBuf {
    std::env::var_os("PODGPU_TRACES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/gpu/traces"))
}

fn replay(args: &[&std::ffi::OsStr]) -> Vec<serde_json::Value> {
    let output = Command::new(workspace_binary("podgpu-agent")).arg("replay").args(args).output().expect("runs");
    assert!(output.status.success(), "replay {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

fn number(value: &serde_json::Value, field: &str) -> f64 {
    value[field].as_f64().unwrap_or_else(|| panic!("{field} missing in {value}"))
}

/// Every recorded trace meets the bar above for every tenant.
#[test]
fn recorded_traces_meet_the_attribution_target() {
    let dir = traces_dir();
    let mut traces: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| {
            panic!("{}: {err} (the recorded traces live in integration/data/gpu/traces)", dir.display())
        })
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    traces.sort();
    assert!(traces.len() >= 4, "expected the recorded traces in {}", dir.display());
    for trace in traces {
        let tenants = replay(&[trace.as_os_str()]);
        assert!(!tenants.is_empty(), "{}: no tenant scored", trace.display());
        for tenant in tenants {
            let (podgpu, nvml, share) =
                (number(&tenant, "podgpu_mae"), number(&tenant, "nvml_mae"), number(&tenant, "launch_share_mae"));
            let confidence = number(&tenant, "confidence");
            println!("{}: {tenant}", trace.display());
            assert!(number(&tenant, "bins") >= 10.0, "{}: {tenant}", trace.display());
            assert!(podgpu <= nvml && podgpu <= share, "{}: worse than a peer: {tenant}", trace.display());
            if confidence >= 0.5 {
                assert!(podgpu <= 5.0, "{}: measured but off: {tenant}", trace.display());
            } else {
                assert!(podgpu <= 8.0, "{}: {tenant}", trace.display());
            }
        }
    }
}

/// The command line replays a built-in synthetic scenario, writes it in
/// the trace format, and reads the written trace back to the same scores.
#[test]
fn synthetic_traces_round_trip_through_the_trace_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("staggered.json");
    let generated = replay(&["--synthetic".as_ref(), "staggered".as_ref(), "--write".as_ref(), path.as_os_str()]);
    assert!(dir.path().join("staggered-launch.jsonl").is_file());
    let reread = replay(&[path.as_os_str()]);
    assert_eq!(generated, reread);
    assert_eq!(generated.len(), 3);
    for tenant in &generated {
        assert!(number(tenant, "podgpu_mae") < 2.0, "{tenant}");
        assert!(number(tenant, "nvml_mae") > 10.0, "{tenant}");
    }
}

/// A trace that is not one is refused with the file and line named.
#[test]
fn a_malformed_trace_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    std::fs::write(&path, "{\"scenario\": \"x\", \"device_util\": [[1.0, \"high\"]]}").unwrap();
    std::fs::write(dir.path().join("bad-launch.jsonl"), "").unwrap();
    let output = Command::new(workspace_binary("podgpu-agent")).arg("replay").arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.json") && stderr.contains("line 1"), "{stderr}");
}

/// The generalisation sweep (`replay --sweep`): 200 seeded scenarios and
/// every recorded trace, scored the same way. The same seed prints the
/// same scorecard; every generated and recorded tenant is scored. Of the
/// bars of issue 23, 90% of bins within 2σ is met; no tenant worse than
/// NVML or the launch share, and no confident miss, are not yet: the
/// figures are in docs/attribution.md, and this test holds the line where
/// the estimator stands today, so a change that makes it worse fails.
#[test]
fn the_sweep_scores_generated_and_recorded_tenants() {
    let dir = traces_dir();
    let run = |seed: &str| {
        let output = Command::new(workspace_binary("podgpu-agent"))
            .args(["replay", "--sweep", "200", "--seed", seed, "--json", "--traces"])
            .arg(&dir)
            .output()
            .expect("runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("one JSON scorecard")
    };
    let card = run("1");
    assert_eq!(card, run("1"), "the same seed, the same scorecard");
    let (generated, recorded) = (&card["generated"], &card["recorded"]);
    assert!(number(generated, "tenants") >= 400.0, "200 scenarios of 2-6 tenants: {generated}");
    let recorded_tenants: usize = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .map(|path| replay(&[path.as_os_str()]).len())
        .sum();
    assert_eq!(number(recorded, "tenants") as usize, recorded_tenants, "{recorded}");
    assert_eq!(number(recorded, "worse_than_nvml"), 0.0, "{recorded}");
    assert_eq!(number(recorded, "worse_than_launch_share"), 0.0, "{recorded}");
    println!("generated: {generated}\nrecorded: {recorded}");
    // Where the estimator stands on seed 1 against the scenario space of
    // docs/attribution.md, completion spans included (p90 8.5, 68%
    // within 5, 4% worse than NVML, 23% worse than the launch share, 0.8%
    // of confident bins more than 5 points off (5 of 646; a bin's
    // confidence is its windows' while the split listed the tenant, as
    // the agent averages a pod's), 99% of bins within 2σ, the overhead
    // 2.5 points per extra tenant for 4.3 drawn), with room for noise: a
    // regression beyond these fails. Calibration already meets the
    // issue's bar.
    assert!(number(generated, "mae_p90") <= 10.0, "{generated}");
    assert!(number(generated, "within_5") >= 0.62, "{generated}");
    assert!(number(generated, "worse_than_nvml") <= 0.07, "{generated}");
    assert!(number(generated, "worse_than_launch_share") <= 0.27, "{generated}");
    let confident_misses = number(generated, "confident_bins_over_5") / number(generated, "confident_bins");
    assert!(confident_misses <= 0.03, "{generated}");
    let overhead = &card["overhead"];
    assert!(number(overhead, "scenarios") >= 100.0, "{overhead}");
    assert!(number(overhead, "mean_abs_error") <= 3.0, "{overhead}");
    assert!(number(generated, "bins_within_2_sigma") >= 0.90, "{generated}");
    assert!(number(recorded, "bins_within_2_sigma") >= 0.90, "{recorded}");
}

/// Completion spans are what moved the scorecard: the same 200 scenarios
/// without them (`--without-spans`) score as the estimator did before
/// spans (p90 13.4, 49% within 5, 34% worse than the launch share), and
/// spans must keep a clear lead over that, while calibration holds.
#[test]
fn completion_spans_improve_the_sweep() {
    let card = |extra: &[&str]| {
        let output = Command::new(workspace_binary("podgpu-agent"))
            .args(["replay", "--sweep", "200", "--seed", "1", "--json"])
            .args(extra)
            .output()
            .expect("runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("one JSON scorecard")["generated"].clone()
    };
    let (with, without) = (card(&[]), card(&["--without-spans"]));
    assert_eq!(number(&with, "tenants"), number(&without, "tenants"), "the same scenarios");
    assert!(number(&with, "mae_p90") + 2.0 <= number(&without, "mae_p90"), "{with}\n{without}");
    assert!(number(&with, "within_5") >= number(&without, "within_5") + 0.05, "{with}\n{without}");
    assert!(
        number(&with, "worse_than_launch_share") + 0.03 <= number(&without, "worse_than_launch_share"),
        "{with}\n{without}"
    );
    assert!(number(&with, "bins_within_2_sigma") >= 0.90, "{with}");
}

/// One generated scenario replays on its own (`--generated I --seed S`,
/// the scorecard's `sweep-S-I`) with the same scores the sweep gave it, and
/// writes as a trace like the built-in ones.
#[test]
fn a_generated_scenario_replays_alone() {
    let card = {
        let output = Command::new(workspace_binary("podgpu-agent"))
            .args(["replay", "--sweep", "8", "--seed", "4", "--json"])
            .output()
            .expect("runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let from_sweep: Vec<&serde_json::Value> = card["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["source"] == "sweep-4-5")
        .map(|t| &t["score"])
        .collect();
    assert!(!from_sweep.is_empty(), "{card}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sweep-4-5.json");
    let alone = replay(&[
        "--generated".as_ref(),
        "5".as_ref(),
        "--seed".as_ref(),
        "4".as_ref(),
        "--write".as_ref(),
        path.as_os_str(),
    ]);
    assert_eq!(alone.len(), from_sweep.len());
    for tenant in &alone {
        assert!(from_sweep.contains(&tenant), "{tenant} not in {from_sweep:?}");
    }
    // The trace format writes decimal numbers: the same to 1e-9.
    let reread = replay(&[path.as_os_str()]);
    assert_eq!(reread.len(), alone.len());
    for (a, b) in reread.iter().zip(&alone) {
        for (field, value) in a.as_object().unwrap() {
            let (x, y) = (value.as_f64().unwrap(), b[field].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{field}: {x} vs {y}");
        }
    }
}

/// `--set` changes an estimator setting for one replay (and changes its
/// scores); an unknown setting or a bad value is refused before anything
/// runs, naming the settings there are.
#[test]
fn estimator_settings_are_set_by_name() {
    let trace = traces_dir().join("batch-varying.json");
    let default = replay(&[trace.as_os_str()]);
    let loose = replay(&[trace.as_os_str(), "--set".as_ref(), "util_noise=20".as_ref()]);
    assert_ne!(default, loose, "a setting that matters changes the scores");
    for bad in ["nonsense=1", "util_noise=-1", "util_noise=high", "util_noise"] {
        let output = Command::new(workspace_binary("podgpu-agent"))
            .arg("replay")
            .arg(&trace)
            .args(["--set", bad])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{bad} accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--set"), "{bad}: {stderr}");
    }
    let output = Command::new(workspace_binary("podgpu-agent"))
        .arg("replay")
        .arg(&trace)
        .args(["--set", "nonsense=1"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("prior_share"), "the known settings are listed");
}

/// Leave-one-out over the recorded traces: each is scored with settings
/// chosen on the others. The figures are in docs/attribution.md; this
/// checks every trace is held out once, with every tenant, and that even
/// settings chosen without a trace keep its tenants better than NVML.
#[test]
fn leave_one_out_scores_each_trace_with_settings_chosen_without_it() {
    let dir = traces_dir();
    let held = replay(&["--leave-one-out".as_ref(), "--traces".as_ref(), dir.as_os_str()]);
    let traces = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().path().extension().is_some_and(|e| e == "json"))
        .count();
    assert_eq!(held.len(), traces);
    for trace in &held {
        println!("{trace}");
        let tenants = trace["tenants"].as_array().unwrap();
        assert!(!tenants.is_empty(), "{trace}");
        for tenant in tenants {
            let (chosen, nvml) = (tenant[1].as_f64().unwrap(), tenant[3].as_f64().unwrap());
            assert!(chosen < nvml, "{}: {tenant}", trace["trace"]);
        }
    }
}
