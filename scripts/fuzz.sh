#!/usr/bin/env bash
# Fuzzes podgpu's parsers and state machines with cargo-fuzz (libFuzzer,
# AddressSanitizer): trigger metadata, cgroup paths and /proc cgroup files,
# label selectors, the HTTP/1.1 parser and the HTTP/2 stream tracker fed
# arbitrary event sequences, the driver-path ioctl decoder, both ends of
# the node API (a node decoding a scaler's selection, the scaler decoding
# and answering from a node's snapshot), and the attribution trace reader
# with replay over what it accepts.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 20 (what scripts/test.sh runs); run longer
# on demand, e.g. `scripts/fuzz.sh 3600 http2_frames`. A crash leaves its
# input in fuzz/artifacts/TARGET/ and fails the run; reproduce it with
# `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...`, fix it,
# and add the input as a regression test beside the code it broke.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
[ -f "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env" ] && . "${CARGO_HOME:-$HOME/.cargo}/.podgpu-env"
toolchain="${PODGPU_EBPF_TOOLCHAIN:-nightly}"
seconds="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cd fuzz && cargo "+$toolchain" fuzz list)
fi
mkdir -p fuzz/target
# One build for every target (both cores), then the targets run side by side,
# one libFuzzer process per core: the same time per target in less wall time.
printf '    building %s fuzz targets (AddressSanitizer)\n' "${#targets[@]}"
if ! (cd fuzz && cargo "+$toolchain" fuzz build --sanitizer address) >fuzz/target/fuzz-build.log 2>&1; then
  tail -40 fuzz/target/fuzz-build.log >&2
  echo "fuzz: the build failed (full log: fuzz/target/fuzz-build.log)" >&2
  exit 1
fi
jobs="${PODGPU_FUZZ_JOBS:-$(nproc)}"
run_one() {
  local target="$1" log="fuzz/target/fuzz-$1.log"
  mkdir -p "fuzz/corpus/$target"
  # 2 GiB of RSS and 256 MiB per allocation at most: an input that makes
  # the code allocate without bound is a finding, like a panic.
  (cd fuzz && cargo "+$toolchain" fuzz run --sanitizer address "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=256 -max_len=4096 -print_final_stats=1) \
    >"$log" 2>&1
}
failed=()
pids=()
names=()
report() {
  local i="$1" target="${names[$1]}"
  printf '    %s (%s s)\n' "$target" "$seconds"
  if ! wait "${pids[$i]}"; then failed+=("$target"); fi
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|panicked|SUMMARY|Test unit written' \
    "fuzz/target/fuzz-$target.log" | sed 's/^/      /' || true
}
for target in "${targets[@]}"; do
  run_one "$target" &
  pids+=("$!")
  names+=("$target")
  if [ $(( ${#pids[@]} % jobs )) -eq 0 ]; then
    for i in $(seq $(( ${#pids[@]} - jobs )) $(( ${#pids[@]} - 1 ))); do report "$i"; done
  fi
done
for i in $(seq $(( ${#pids[@]} - ${#pids[@]} % jobs )) $(( ${#pids[@]} - 1 ))); do report "$i"; done
if [ ${#failed[@]} -gt 0 ]; then
  for target in "${failed[@]}"; do
    tail -40 "fuzz/target/fuzz-$target.log" >&2
    echo "fuzz: $target failed (a failing input in fuzz/artifacts/$target; full log: fuzz/target/fuzz-$target.log)" >&2
  done
  exit 1
fi
echo "    fuzzing: no failing input in ${#targets[@]} targets"
