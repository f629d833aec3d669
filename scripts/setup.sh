#!/usr/bin/env bash
# Installs everything podgpu needs to build and test, idempotently, on
# Debian 12 as root: apt packages (buildah for the image, runc, Prometheus,
# the server stacks), and the eBPF toolchain (install-ebpf-toolchain.sh).
# Safe to run again: each step checks first and says what it does.
set -euo pipefail

. "$(dirname "$0")/lib.sh"

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root (it installs packages and the tests load eBPF programs)" >&2
  exit 1
fi

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

step "base packages"
need_apt build-essential pkg-config ca-certificates curl git wrk nghttp2-client prometheus runc umoci buildah libfuse3-dev python3 tmux
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

"$(dirname "$0")/install-ebpf-toolchain.sh"

step "cargo-fuzz (scripts/fuzz.sh; test.sh runs every target briefly)"
if cargo fuzz --version 2>/dev/null | grep -q "0.13.2"; then
  note "already installed"
else
  cargo install --locked cargo-fuzz --version 0.13.2 >/dev/null 2>&1 || cargo install --locked cargo-fuzz --version 0.13.2
  note "installed $(cargo fuzz --version)"
fi

step "setup done"
