//! The repository stands alone: no file of the project names a path
//! outside it, and the data the tests and the GPU scripts read is in it.
//! (`.ci/run` also runs the whole suite from a clone with nothing beside
//! it; this test says which file broke the rule, before anything is built.)
use std::path::{Path, PathBuf};

/// Folders that are outputs, caches or other repositories, not the project.
const NOT_THE_PROJECT: &[&str] = &["target", ".git", ".gpu-carry", "corpus", "artifacts", "coverage", "__pycache__"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("integration/ has a parent").to_path_buf()
}

fn project_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display())) {
        let entry = entry.unwrap();
        let path = entry.path();
        let name = entry.file_name();
        if entry.file_type().unwrap().is_dir() {
            if !NOT_THE_PROJECT.iter().any(|skip| name == *skip) {
                project_files(&path, files);
            }
        } else {
            files.push(path);
        }
    }
}

/// The relative paths a line names: tokens that start by climbing (`../`).
/// Paths inside another path (`0::/../..`, a cgroup file's relative
/// root) start with something else and are not references to files.
fn climbing_paths(line: &str) -> impl Iterator<Item = &str> {
    line.split(|c: char| !(c.is_ascii_alphanumeric() || "._-/".contains(c))).filter(|token| token.starts_with("../"))
}

/// Where `reference`, named in a file in `dir`, lands: from the file's
/// directory, or from its crate's (code joins paths to
/// `CARGO_MANIFEST_DIR`). Inside the repository only when some resolution
/// stays in it and reaches a top-level entry the repository has.
fn lands_inside(root: &Path, dir: &Path, reference: &str) -> bool {
    let crate_dir = dir.ancestors().find(|d| d.join("Cargo.toml").is_file()).unwrap_or(root);
    [dir, crate_dir].into_iter().any(|base| {
        let mut path = base.to_path_buf();
        for part in reference.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if !path.pop() || !path.starts_with(root) {
                        return false;
                    }
                }
                name => path.push(name),
            }
        }
        let Ok(inside) = path.strip_prefix(root) else { return false };
        inside.components().next().is_some_and(|top| root.join(top).exists())
    })
}

/// No source, script, chart, doc or fixture names a path outside the
/// repository: every relative path that climbs (`../x`) lands inside it,
/// on something the repository has, and no file names the absolute path
/// of a workspace on the machines it was built on.
#[test]
fn no_file_names_a_path_outside_the_repository() {
    let root = workspace();
    let mut files = Vec::new();
    project_files(&root, &mut files);
    assert!(files.len() > 100, "walked only {} files under {}", files.len(), root.display());
    let mut offenders = Vec::new();
    // This file's own made-up examples of what the rule refuses excepted.
    for file in files.iter().filter(|file| !file.ends_with("integration/tests/self_contained.rs")) {
        let Ok(text) = std::fs::read_to_string(file) else { continue }; // binary files name nothing
        let dir = file.parent().expect("a file has a directory");
        for (number, line) in text.lines().enumerate() {
            let at = || format!("{}:{}", file.strip_prefix(&root).unwrap().display(), number + 1);
            for reference in climbing_paths(line).filter(|reference| !lands_inside(&root, dir, reference)) {
                offenders.push(format!("{}: names {reference}", at()));
            }
            if line.contains("/work/") {
                offenders.push(format!("{}: names a workspace's absolute path", at()));
            }
        }
    }
    assert!(offenders.is_empty(), "paths outside the repository:\n{}", offenders.join("\n"));
}

/// The rule above on made-up references: climbing to a sibling of the
/// checkout, or to a top-level folder the repository does not have, is
/// outside; the chart and the build output from a crate are inside.
#[test]
fn climbing_references_are_resolved_against_the_repository() {
    let root = workspace();
    let tests = root.join("integration/tests");
    assert!(lands_inside(&root, &tests, "../../chart/values.yaml"));
    assert!(lands_inside(&root, &tests, "../target/podgpu-agent-oci.tar"), "from the crate, as code joins it");
    assert!(!lands_inside(&root, &tests, "../../../reference/gpu/traces"), "beside the checkout");
    assert!(!lands_inside(&root, &root.join("docs"), "../no-such-folder/x"));
    let tokens: Vec<&str> = climbing_paths("see `../docs/a.md` and 0::/../../kubepods").collect();
    assert_eq!(tokens, vec!["../docs/a.md"]);
}

/// What the replay test, the GPU scripts and the docs read is tracked in
/// the repository: the recorded traces with their README, each with its
/// launch counts, and the CUDA tenant the GPU scripts run.
#[test]
fn recorded_data_and_gpu_tenant_are_in_the_repository() {
    let root = workspace();
    let traces = root.join("integration/data/gpu/traces");
    assert!(traces.join("README.md").is_file(), "{}: no README", traces.display());
    let scenarios: Vec<PathBuf> = std::fs::read_dir(&traces)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    assert!(scenarios.len() >= 4, "{} traces in {}", scenarios.len(), traces.display());
    for scenario in scenarios {
        let stem = scenario.file_stem().unwrap().to_str().unwrap();
        assert!(traces.join(format!("{stem}-launch.jsonl")).is_file(), "{stem}: launch counts missing");
    }
    let worker = root.join("integration/gpu/duty_worker.py");
    let text = std::fs::read_to_string(&worker).unwrap_or_else(|err| panic!("{}: {err}", worker.display()));
    assert!(text.contains("calibrate") && text.contains("def "), "{} is not the CUDA tenant", worker.display());
}
