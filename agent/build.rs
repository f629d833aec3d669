//! Builds the eBPF programs of `agent-ebpf` for the BPF target (nightly +
//! bpf-linker, see scripts/setup.sh) so the agent can embed them.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("agent-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("agent-ebpf manifest has no parent directory"))?;
    // The kernel structs live in podgpu-common: a change there must rebuild
    // the eBPF object too (aya-build watches only the eBPF crate itself).
    let workspace_root = metadata.workspace_root.as_str();
    println!("cargo:rerun-if-changed={workspace_root}/common/src");
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}
