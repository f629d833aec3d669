#!/usr/bin/env bash
# Writes the podgpu-agent container image as an OCI archive (an OCI image
# layout in a tar), from scratch: no registry, no base image, no container
# engine. The image holds the agent binary, the C runtime it links against
# (found with ldd: glibc's loader, libc, libm, libgcc_s; glibc also serves
# the dlopen of the host's libnvidia-ml, mounted by the chart), and the few
# files the runtime reads (/etc/nsswitch.conf, /etc/passwd for the
# scaler's non-root user). Nothing the agent does not use.
#
#   scripts/build-image.sh [BINARY] [OUT.tar] [TAG]
#
# BINARY defaults to target/release/podgpu-agent (built if missing); the
# archive defaults to target/podgpu-agent-oci.tar. Push it with, e.g.,
#   skopeo copy oci-archive:target/podgpu-agent-oci.tar docker://REGISTRY/podgpu-agent:TAG
# or load it with `podman load -i` / `ctr images import`.
set -euo pipefail
cd "$(dirname "$0")/.."
binary="${1:-target/release/podgpu-agent}"
out="${2:-target/podgpu-agent-oci.tar}"
tag="${3:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}"
if [ ! -x "$binary" ]; then
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  [ -f "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env" ] && . "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env"
  cargo build --locked --release -p podgpu-agent
fi
libraries="$(ldd "$binary" | awk '/=>/ { print $3 } /^\t\// { print $1 }' | grep '^/')"
python3 integration/image/oci_archive.py "$binary" "$out" "$tag" $libraries
echo "image: $out (tag $tag)"
