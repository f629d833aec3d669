#!/usr/bin/env bash
# Probe overhead benchmark: wrk against a tenant pod with and without the
# agent, in one run; prints throughput/p99 ratios and per-program eBPF cost.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
[ -f "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env" ] && . "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env"
printf '\033[1m==> %s\033[0m\n' "building (release)"
cargo build --locked --release -p podgpu-agent -p integration -p xtask --bins
printf '\033[1m==> %s\033[0m\n' "benchmark (about a minute)"
exec target/release/xtask bench-probes "$@"
