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
/// same scorecard; every generated and recorded tenant is scored. The bars
/// of issue 23 (no tenant worse than NVML or the launch share, 90% of bins
/// within 2σ, no confident miss) are not met yet: the figures are in
/// docs/attribution.md, and this test holds the line where the estimator
/// stands today, so a change that makes it worse fails.
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
    // Where the estimator stands on seed 1 (p90 16.4, 42% within 5, 8%
    // worse than NVML, 35% worse than the launch share), with room for
    // noise: a regression beyond these fails.
    assert!(number(generated, "mae_p90") <= 18.0, "{generated}");
    assert!(number(generated, "within_5") >= 0.38, "{generated}");
    assert!(number(generated, "worse_than_nvml") <= 0.10, "{generated}");
    assert!(number(generated, "worse_than_launch_share") <= 0.38, "{generated}");
}
