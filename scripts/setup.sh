#!/usr/bin/env bash
# Installs everything podgpu needs to build and test, idempotently, on
# Debian 12 as root: apt packages, Rust (stable + nightly with rust-src),
# bpf-linker built against the LLVM that matches nightly rustc.
# Safe to run again: each step checks first and says what it does.
set -euo pipefail

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }

# The nightly the eBPF build uses when the machine has none: pinned, because
# bpf-linker must match rustc's LLVM major (never `rustup update`).
PINNED_NIGHTLY="nightly-2026-05-19"
BPF_LINKER_VERSION="0.13.0"

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root (it installs packages and the tests load eBPF programs)" >&2
  exit 1
fi

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

apt_missing=()
need_apt() { for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || apt_missing+=("$pkg"); done; }
install_apt() {
  if [ ${#apt_missing[@]} -gt 0 ]; then
    step "apt: installing ${apt_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
    apt_missing=()
  fi
}

step "base packages"
need_apt build-essential pkg-config ca-certificates curl git wrk nghttp2-client prometheus runc umoci libfuse3-dev python3 tmux
install_apt
note "ok"

step "server stacks the request probe is tested against"
if ! command -v node >/dev/null 2>&1; then
  need_apt nodejs
  install_apt
fi
note "node $(node --version) (built-in http and http2 modules)"
"$(dirname "$0")/install-python-stacks.sh"

step "helm (pinned; the chart is linted and rendered by the tests)"
"$(dirname "$0")/install-helm.sh"

step "Rust toolchains"
if ! command -v rustup >/dev/null 2>&1; then
  note "rustup not found: installing stable with rustup"
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable >/dev/null
fi
rustup component add clippy rustfmt >/dev/null 2>&1 || true
EBPF_TOOLCHAIN="nightly"
if ! rustup run nightly rustc -vV >/dev/null 2>&1; then
  note "no nightly toolchain: installing the pinned $PINNED_NIGHTLY"
  rustup toolchain install "$PINNED_NIGHTLY" --profile minimal >/dev/null
  EBPF_TOOLCHAIN="$PINNED_NIGHTLY"
fi
rustup component add rust-src --toolchain "$EBPF_TOOLCHAIN" >/dev/null
LLVM_MAJOR="$(rustup run "$EBPF_TOOLCHAIN" rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
if [ -z "$LLVM_MAJOR" ]; then
  echo "could not read the LLVM version of $EBPF_TOOLCHAIN rustc" >&2
  exit 1
fi
note "stable: $(rustc --version)"
note "eBPF toolchain: $EBPF_TOOLCHAIN ($(rustup run "$EBPF_TOOLCHAIN" rustc --version)), LLVM $LLVM_MAJOR"

step "bpf-linker $BPF_LINKER_VERSION for LLVM $LLVM_MAJOR"
marker="${CARGO_HOME:-$HOME/.cargo}/.podgpu-bpf-linker-llvm-$LLVM_MAJOR"
if command -v bpf-linker >/dev/null 2>&1 \
  && bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION" \
  && { [ -f "$marker" ] || bpf-linker --version 2>/dev/null | grep -qi "llvm.*$LLVM_MAJOR"; }; then
  note "already installed"
else
  need_apt "llvm-$LLVM_MAJOR-dev" "libpolly-$LLVM_MAJOR-dev" zlib1g-dev libzstd-dev
  install_apt
  note "building bpf-linker (about a minute)"
  LLVM_PREFIX="/usr/lib/llvm-$LLVM_MAJOR" cargo install --locked --force bpf-linker \
    --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-$LLVM_MAJOR" >/dev/null 2>&1 \
    || LLVM_PREFIX="/usr/lib/llvm-$LLVM_MAJOR" cargo install --locked --force bpf-linker \
      --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-$LLVM_MAJOR"
  touch "$marker"
  note "installed $(bpf-linker --version)"
fi

step "cargo-fuzz (scripts/fuzz.sh; test.sh runs every target briefly)"
if cargo fuzz --version 2>/dev/null | grep -q "0.13.2"; then
  note "already installed"
else
  cargo install --locked cargo-fuzz --version 0.13.2 >/dev/null 2>&1 || cargo install --locked cargo-fuzz --version 0.13.2
  note "installed $(cargo fuzz --version)"
fi

# Later steps (test.sh, demo.sh) build with the toolchain chosen here.
if [ "$EBPF_TOOLCHAIN" != "nightly" ]; then
  echo "export PODGPU_EBPF_TOOLCHAIN=$EBPF_TOOLCHAIN" > "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env"
else
  rm -f "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env"
fi
step "setup done"
