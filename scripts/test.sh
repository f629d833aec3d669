#!/usr/bin/env bash
# Runs every check podgpu has: formatting, clippy, unit tests, the
# root-only integration tests with the real eBPF probes (which must load:
# PODGPU_REQUIRE_EBPF=1 turns a probe that cannot load into a failure), and
# a bounded fuzzing run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

started=$(date +%s)
scripts/setup.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
[ -f "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env" ] && . "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env"
export PODGPU_REQUIRE_EBPF=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings

step "build the agent and the test tenants"
cargo build --locked -p podgpu-agent -p integration --bins

step "build the agent's container image (OCI archive; the DaemonSet test runs it)"
scripts/build-image.sh target/debug/podgpu-agent target/podgpu-agent-oci.tar

# Pods an interrupted earlier run left behind (its processes gone, their
# cgroups not): agents under test would count them as tenants. Only test
# pod UIDs (<pid>-<n>-4000-8000-<clock>, see integration/src/pod.rs), in
# every hierarchy, deepest first; rmdir removes only empty cgroups.
step "remove cgroups of test pods an interrupted run left behind"
find /sys/fs/cgroup -mindepth 2 -maxdepth 8 -depth -type d -regextype posix-extended \
  -regex '.*pod[0-9a-f]{8}[-_][0-9a-f]{4}[-_]4000[-_]8000[-_][0-9a-f]{12}(\.slice)?(/.*)?' \
  -exec rmdir {} \; 2>/dev/null || true

# One test at a time per binary: the timing assertions (TTFT and latency
# within 5%) must not compete with sibling tests for the cores.
step "tests (unit + integration with real eBPF probes, as root)"
cargo test --locked --no-fail-fast -- --test-threads="${PODGPU_TEST_THREADS:-1}"

# Every fuzz target for a bounded time (longer: scripts/fuzz.sh SECONDS).
step "fuzzing (cargo-fuzz, ${PODGPU_FUZZ_SECONDS:-20} s per target)"
scripts/fuzz.sh "${PODGPU_FUZZ_SECONDS:-20}"

step "all checks passed in $(( $(date +%s) - started )) s"
