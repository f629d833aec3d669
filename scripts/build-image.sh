#!/usr/bin/env bash
# Builds the podgpu-agent image from the Containerfile with buildah (the
# Debian package; no daemon, no registry), on a binary built on this host,
# and writes it as an OCI archive. The same Containerfile builds from
# source with docker or podman (README, "Image").
#
#   scripts/build-image.sh [BINARY] [OUT.tar] [TAG]
#
# BINARY defaults to target/release/podgpu-agent (built if missing); the
# archive defaults to target/podgpu-agent-oci.tar, its one image named TAG
# (the workspace version by default). Push it with, e.g.,
#   skopeo copy oci-archive:target/podgpu-agent-oci.tar docker://REGISTRY/podgpu-agent:TAG
# or build and push in one go with buildah (see the README).
# buildah keeps its own storage under target/buildah (vfs: no overlay
# mount needed), so nothing is left in the host's container storage.
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
command -v buildah >/dev/null || { echo "build-image.sh: buildah is missing (apt-get install buildah, or scripts/setup.sh)" >&2; exit 1; }

root="target/image-root"
scripts/image-root.sh "$binary" "$root"

revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
source_url="$(git remote get-url origin 2>/dev/null || true)"
case "$source_url" in https://*) ;; *) source_url="https://github.com/podgpu/podgpu" ;; esac
storage=(--storage-driver vfs --root "$PWD/target/buildah/storage" --runroot "$PWD/target/buildah/run")
name="localhost/podgpu-agent:$tag"
buildah "${storage[@]}" bud --quiet --layers=false --build-arg BINARY_FROM=context \
  --build-arg VERSION="$tag" --build-arg REVISION="$revision" --build-arg SOURCE="$source_url" \
  --timestamp 0 -f "$PWD/Containerfile" -t "$name" "$root" >/dev/null
rm -f "$out"
buildah "${storage[@]}" push --quiet "$name" "oci-archive:$out:$tag"
# Only the archive is kept: the next build starts from an empty storage.
buildah "${storage[@]}" rmi --all --force >/dev/null
echo "image: $out (tag $tag, revision $revision)"
