#!/usr/bin/env bash
# Stages the podgpu-agent image's whole root filesystem in a folder: the
# binary at /podgpu-agent, the C runtime it links against (found with ldd:
# glibc's loader, libc, libm, libgcc_s; glibc also serves the dlopen of the
# host's libnvidia-ml, mounted by the chart), and the few files the runtime
# reads (/etc/nsswitch.conf; /etc/passwd and /etc/group for the scaler's
# non-root user 65532). Nothing else: no shell, no package manager.
# The Containerfile copies the folder into the image, from its builder stage
# or, with BINARY_FROM=context, from a folder staged here (what CI does).
#
#   scripts/image-root.sh BINARY OUT_DIR
set -euo pipefail
binary="${1:?usage: image-root.sh BINARY OUT_DIR}"
out="${2:?usage: image-root.sh BINARY OUT_DIR}"
[ -x "$binary" ] || { echo "image-root.sh: $binary is not an executable" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out/etc" "$out/tmp" "$out/proc" "$out/sys" "$out/dev"
chmod 1777 "$out/tmp"
install -m 0755 "$binary" "$out/podgpu-agent"
ldd "$binary" | awk '/=>/ { print $3 } /^\t\// { print $1 }' | grep '^/' | while read -r library; do
  # At the path the loader was found at and searches (no links of our own:
  # a distroless base's /lib may be a link into /usr, and COPY follows it).
  path="${library#/}"
  mkdir -p "$out/$(dirname "$path")"
  install -m 0755 "$(readlink -f "$library")" "$out/$path"
done
printf 'hosts: files dns\n' > "$out/etc/nsswitch.conf"
printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532::/:/sbin/nologin\n' > "$out/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$out/etc/group"
chmod 0644 "$out/etc/nsswitch.conf" "$out/etc/passwd" "$out/etc/group"
