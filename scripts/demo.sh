#!/usr/bin/env bash
# The podgpu demo: two tenant "pods" on this machine, the agent watching them
# with real eBPF probes and a simulated GPU (real NVML when a GPU is
# present), a live per-pod view, and KEDA's answers at the end.
# Options are passed on: scripts/demo.sh --seconds 60
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

scripts/setup.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
[ -f "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env" ] && . "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env"

step "building podgpu (release)"
cargo build --locked --release -p podgpu-agent -p integration -p xtask --bins

step "running the demo"
exec target/release/xtask demo "$@"
