//! The command line: each role lists and accepts the flags it uses and no
//! others (the scaler has no probes, GPU or pods of its own).
use std::process::Command;

use integration::workspace_binary;

const NODE_ONLY: [&str; 8] = [
    "--gpu",
    "--cgroup-root",
    "--require-ebpf",
    "--tick-ms",
    "--proc-root",
    "--pod-metadata",
    "--launch-accounting",
    "--kubelet-socket",
];

fn help(role: &str) -> String {
    let output = Command::new(workspace_binary("podgpu-agent")).args([role, "--help"]).output().expect("runs");
    assert!(output.status.success(), "{role} --help");
    String::from_utf8(output.stdout).unwrap()
}

/// Whether `help` lists `flag` as an option of its own.
fn lists(help: &str, flag: &str) -> bool {
    help.lines().any(|line| line.split_whitespace().next().map(|first| first.trim_end_matches(',')) == Some(flag))
}

#[test]
fn each_role_takes_only_its_own_flags() {
    let scaler = help("scaler");
    for flag in NODE_ONLY {
        assert!(!lists(&scaler, flag), "scaler --help lists {flag}:\n{scaler}");
    }
    assert!(["--nodes", "--tls-cert", "--keda-listen"].iter().all(|flag| lists(&scaler, flag)), "{scaler}");
    for role in ["node", "standalone"] {
        let node = help(role);
        for flag in NODE_ONLY {
            assert!(lists(&node, flag), "{role} --help lacks {flag}");
        }
        assert!(!lists(&node, "--nodes"), "{role} --help lists --nodes");
    }
    // A node-only flag given to the scaler is an error naming it, not
    // silently ignored.
    let output = Command::new(workspace_binary("podgpu-agent"))
        .args(["scaler", "--nodes", "127.0.0.1:1", "--gpu", "none"])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--gpu"));
}

/// `--log-format json` writes one JSON object per log line on stderr;
/// the default is text.
#[test]
fn logs_can_be_json() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("empty.json");
    std::fs::write(&trace, r#"{"scenario": "empty", "device_util": []}"#).unwrap();
    std::fs::write(dir.path().join("empty-launch.jsonl"), "").unwrap();
    let run = |extra: &[&str]| {
        let output = Command::new(workspace_binary("podgpu-agent"))
            .arg("replay")
            .arg(&trace)
            .args(extra)
            .env("RUST_LOG", "info")
            .output()
            .expect("runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stderr).unwrap()
    };
    let json = run(&["--log-format", "json"]);
    let lines: Vec<serde_json::Value> =
        json.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"))).collect();
    assert!(lines.iter().any(|l| l["level"] == "INFO" && l["fields"]["message"].as_str().is_some()), "{json}");
    let text = run(&[]);
    assert!(!text.is_empty() && !text.trim_start().starts_with('{'), "{text}");
}
