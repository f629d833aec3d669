//! Builds the eBPF programs of `agent-ebpf` for the BPF target (nightly +
//! bpf-linker, see scripts/setup.sh) so the agent can embed them. The
//! toolchain is `nightly` unless `PODGPU_EBPF_TOOLCHAIN` names another.
//!
//! aya-build forwards every line the inner cargo prints (its progress
//! lines included) as `cargo:warning=`, which made every build print
//! dozens of `warning:` lines. Its output is captured here: progress lines
//! are dropped, compiler diagnostics and failures are passed on.
use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("agent-ebpf package not found in the workspace"))?;
    // Fuzz builds (cargo-fuzz passes `--cfg fuzzing`) exercise parsers and
    // state machines and never load a probe: they embed empty objects
    // (loading one would fail with aya's parse error) and skip a second
    // eBPF build under the sanitizer's flags.
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out_dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
        for target in ebpf.targets.iter().filter(|target| target.is_kind(cargo_metadata::TargetKind::Bin)) {
            std::fs::write(out_dir.join(&target.name), []).context("writing an empty eBPF object")?;
        }
        return Ok(());
    }
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("agent-ebpf manifest has no parent directory"))?;
    // The kernel structs live in podgpu-common: a change there must rebuild
    // the eBPF object too (aya-build watches only the eBPF crate itself).
    let workspace_root = metadata.workspace_root.as_str();
    println!("cargo:rerun-if-changed={workspace_root}/common/src");
    // scripts/setup.sh sets this when it had to install a dated nightly
    // instead of finding `nightly` on the machine.
    println!("cargo:rerun-if-env-changed=PODGPU_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("PODGPU_EBPF_TOOLCHAIN").ok().filter(|t| !t.is_empty());
    let (result, output) = capture_stdout(|| {
        aya_build::build_ebpf(
            [Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
            toolchain.as_deref().map_or(Toolchain::Nightly, Toolchain::Custom),
        )
    })?;
    for line in output.lines() {
        match line.strip_prefix("cargo:warning=") {
            Some(text) if result.is_ok() && is_progress(text) => {}
            _ => println!("{line}"),
        }
    }
    result
}

/// Cargo's own progress lines (and the blank lines between messages).
fn is_progress(text: &str) -> bool {
    let first = text.split_whitespace().next();
    first.is_none()
        || matches!(
            first,
            Some(
                "Compiling" | "Finished" | "Fresh" | "Blocking" | "Updating" | "Locking" | "Downloading" | "Downloaded"
            )
        )
}

/// Runs `f` with this process's stdout (where aya-build prints its
/// `cargo:` lines) going to a file, and returns what it printed.
fn capture_stdout<T>(f: impl FnOnce() -> T) -> anyhow::Result<(T, String)> {
    let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
    let mut file = std::fs::File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(std::path::Path::new(&out_dir).join("ebpf-build-output.txt"))
        .context("opening the eBPF build's output file")?;
    std::io::stdout().flush()?;
    // SAFETY: plain fd duplication; the saved copy is restored below.
    let saved = unsafe { libc::dup(1) };
    if saved < 0 || unsafe { libc::dup2(file.as_raw_fd(), 1) } < 0 {
        return Err(anyhow!("redirecting stdout: {}", std::io::Error::last_os_error()));
    }
    let result = f();
    std::io::stdout().flush()?;
    // SAFETY: `saved` is the original stdout duplicated above.
    unsafe {
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    let mut output = String::new();
    file.rewind()?;
    file.read_to_string(&mut output)?;
    Ok((result, output))
}
