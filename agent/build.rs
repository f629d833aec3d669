//! Builds the eBPF programs of `agent-ebpf` for the BPF target (nightly +
//! bpf-linker, see scripts/setup.sh) so the agent can embed them. The
//! toolchain is `nightly` unless `PODGPU_EBPF_TOOLCHAIN` names another.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("agent-ebpf package not found in the workspace"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("agent-ebpf manifest has no parent directory"))?;
    // The kernel structs live in podgpu-common: a change there must rebuild
    // the eBPF object too (aya-build watches only the eBPF crate itself).
    let workspace_root = metadata.workspace_root.as_str();
    println!("cargo:rerun-if-changed={workspace_root}/common/src");
    // scripts/setup.sh sets this when it had to install a dated nightly
    // instead of finding `nightly` on the machine.
    println!("cargo:rerun-if-env-changed=PODGPU_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("PODGPU_EBPF_TOOLCHAIN").ok().filter(|t| !t.is_empty());
    aya_build::build_ebpf(
        [Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        toolchain.as_deref().map_or(Toolchain::Nightly, Toolchain::Custom),
    )
}
