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
