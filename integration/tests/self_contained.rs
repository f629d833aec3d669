//! The repository stands alone: no file of the project names a path
//! outside it, and the data the tests and the GPU scripts read is in it.
//! (`.ci/run` also runs the whole suite from a clone with nothing beside
//! it; this test says which file broke the rule, before anything is built.)
use std::path::{Path, PathBuf};

/// Folders that are outputs, caches or other repositories, not the project.
const NOT_THE_PROJECT: &[&str] = &["target", ".git", ".gpu-carry", "corpus", "artifacts", "coverage", "__pycache__"];

/// Ways a file names a place beside or above a checkout: a sibling folder
/// reached by climbing out of the repository, or a workspace's absolute path.
const OUTSIDE: &[&str] = &["../shared", "../../shared", "/work/shared", "/work/main"];

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

/// No source, script, chart, doc or fixture names a path outside the
/// repository (this file's own list of such paths excepted).
#[test]
fn no_file_names_a_path_outside_the_repository() {
    let root = workspace();
    let mut files = Vec::new();
    project_files(&root, &mut files);
    assert!(files.len() > 100, "walked only {} files under {}", files.len(), root.display());
    let mut offenders = Vec::new();
    for file in files.iter().filter(|file| !file.ends_with("integration/tests/self_contained.rs")) {
        let Ok(text) = std::fs::read_to_string(file) else { continue }; // binary files name nothing
        for (number, line) in text.lines().enumerate() {
            if let Some(outside) = OUTSIDE.iter().find(|outside| line.contains(*outside)) {
                offenders.push(format!(
                    "{}:{}: names {outside}",
                    file.strip_prefix(&root).unwrap().display(),
                    number + 1
                ));
            }
        }
    }
    assert!(offenders.is_empty(), "paths outside the repository:\n{}", offenders.join("\n"));
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
