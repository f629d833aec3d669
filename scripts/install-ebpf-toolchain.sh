#!/usr/bin/env bash
# Installs what building podgpu-agent needs, idempotently, as root on
# Debian 12: Rust stable (rustup), a nightly with rust-src for the eBPF
# crate, and bpf-linker built against the LLVM major of that nightly (the
# two must match). Used by setup.sh and by the Containerfile's builder.
# Where Debian has no llvm-N-dev for that major, LLVM's own apt repository
# (apt.llvm.org) is added for it.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

# The nightly the eBPF build uses when the machine has none: pinned, because
# bpf-linker must match rustc's LLVM major (never `rustup update`).
PINNED_NIGHTLY="nightly-2026-05-19"
BPF_LINKER_VERSION="0.13.0"

if [ "$(id -u)" -ne 0 ]; then
  echo "install-ebpf-toolchain.sh must run as root (it installs packages)" >&2
  exit 1
fi
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

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
  need_apt build-essential ca-certificates curl
  install_apt
  if ! dpkg -s "llvm-$LLVM_MAJOR-dev" >/dev/null 2>&1 \
    && ! apt-cache show "llvm-$LLVM_MAJOR-dev" >/dev/null 2>&1; then
    codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
    note "Debian has no llvm-$LLVM_MAJOR-dev: adding apt.llvm.org (llvm-toolchain-$codename-$LLVM_MAJOR)"
    curl -fsSL https://apt.llvm.org/llvm-snapshot.gpg.key > /etc/apt/trusted.gpg.d/apt.llvm.org.asc
    echo "deb http://apt.llvm.org/$codename/ llvm-toolchain-$codename-$LLVM_MAJOR main" \
      > /etc/apt/sources.list.d/llvm-$LLVM_MAJOR.list
  fi
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


# Later steps (test.sh, demo.sh) build with the toolchain chosen here.
if [ "$EBPF_TOOLCHAIN" != "nightly" ]; then
  echo "export PODGPU_EBPF_TOOLCHAIN=$EBPF_TOOLCHAIN" > "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env"
else
  rm -f "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env"
fi
