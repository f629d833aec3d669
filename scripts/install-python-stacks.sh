#!/usr/bin/env bash
# Installs the Python server stacks the request tests run (grpcio's C-core,
# uvicorn + FastAPI, hypercorn), pinned in
# integration/scripts/stacks/requirements.txt, into a directory of their
# own (the tests put it on PYTHONPATH), idempotently: a stamp holds the
# requirements' hash.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REQUIREMENTS="$ROOT/integration/scripts/stacks/requirements.txt"
TARGET="${PODGPU_PYTHON_STACKS:-/opt/podgpu/python-stacks}"
STAMP="$TARGET/.requirements.sha256"
wanted="$(sha256sum < "$REQUIREMENTS" | cut -d' ' -f1)-$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ]; then
  echo "    python stacks already in $TARGET"
  exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
fi
rm -rf "$TARGET"
mkdir -p "$TARGET"
python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --root-user-action=ignore --target "$TARGET" -r "$REQUIREMENTS"
echo "$wanted" > "$STAMP"
echo "    python stacks installed in $TARGET: $(ls "$TARGET" | grep -c dist-info) packages"
