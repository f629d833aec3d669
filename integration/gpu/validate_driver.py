#!/usr/bin/env python3
"""Real-GPU validation of podgpu's driver path (issue 12, item 6).

Two duty_worker.py tenants (PyTorch through the CUDA runtime and cuBLAS),
each in its own cgroup pod, with the agent on real NVML and launch
accounting on. Prints per pod, from the worker's start:
  GPU contexts (driver ioctls) | driver VRAM vs NVML memory | launches/s
  | first moment each source saw the pod GPU-active (driver context,
  NVML memory, launches) | calls by kind | whether the launch uprobes
  fired (by entry point) | the driver version.

It runs once per driver hook (--hooks, default libraries then
tracepoints): the library hooks (uprobes on libcuda's PLT stubs of ioctl
and close) must show the same contexts, VRAM and about the same calls as
the tracepoints, and /healthz must say the library was probed (where
libcuda has no PLT stub, auto falls back and says why).

On the GPU machine (no Rust there: build here, carry the binary):
  cargo build --release -p podgpu-agent && mkdir -p .gpu-carry && cp target/release/podgpu-agent .gpu-carry/
  python3 integration/gpu/validate_driver.py --agent .gpu-carry/podgpu-agent
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from validate_nvml import DUTY_WORKER, Pod, v2_root, get_json, nvml_memory_by_pid, write_pods_yaml  # noqa: E402
from validate_launches import start_agent, stop  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--worker", default=DUTY_WORKER, help="the CUDA tenant (default: duty_worker.py beside this script)")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--duties", default="0.25,0.5")
    ap.add_argument("--hooks", default="libraries,tracepoints", help="driver hooks to run with, in turn")
    args = ap.parse_args()
    for hooks in args.hooks.split(","):
        run(args, hooks)


def run(args, hooks):
    duties = [float(d) for d in args.duties.split(",")]
    root = v2_root()
    work = tempfile.mkdtemp(prefix="podgpu-driverval-")
    pods = [Pod(root, 20 + i) for i in range(len(duties))]
    pods_yaml = os.path.join(work, "pods.yaml")
    write_pods_yaml(pods_yaml, pods, "tenant")
    agent, http = start_agent(args.agent, work, pods_yaml, extra=["--driver-hooks", hooks])
    print(f"== driver hooks: {hooks}: {get_json(http, '/healthz').get('driver')}")
    try:
        out = subprocess.run([sys.executable, args.worker, "calibrate", "4096"], check=True, capture_output=True, text=True)
        kernel_s = json.loads(out.stdout)["kernel_s"]
        started = time.time()
        for pod, duty in zip(pods, duties):
            pod.start([sys.executable, args.worker, "run", str(duty), str(args.seconds),
                       os.path.join(work, pod.uid + ".json"), "4096", str(kernel_s)])
        first = {pod.uid: {} for pod in pods}
        snapshot = None
        while time.time() - started < args.seconds - 1:
            view = get_json(http, "/pods?window=2")
            now = time.time() - started
            for row in view["pods"]:
                seen = first.get(row["uid"])
                if seen is None:
                    continue
                values = row["values"]
                for source, metric in (("driver", "gpu_contexts"), ("nvml", "gpu_mem_used_bytes"),
                                       ("launches", "gpu_launch_rate")):
                    if (values.get(metric) or 0) > 0 and source not in seen:
                        seen[source] = now
            if now > args.seconds / 2 and snapshot is None:
                snapshot = (get_json(http, "/pods?window=5"), get_json(http, "/driver"), get_json(http, "/launches"),
                            nvml_memory_by_pid())
            time.sleep(0.1)
        view, driver, launches, nvml = snapshot
        used, version, name = nvml if nvml else ({}, "unknown", "unknown")
        print(f"GPU: {name}, driver {version}; driver path: {driver['status']}; reader: {json.dumps(driver['reader'])}")
        print(f"{'pod':<9} {'contexts':>8} {'driver VRAM MiB':>15} {'NVML MiB':>9} {'launches/s':>10} "
              f"{'first seen: driver / NVML / launches (s)':>42}")
        for i, pod in enumerate(pods):
            row = next(r for r in view["pods"] if r["uid"] == pod.uid)
            values = row["values"]
            nvml_bytes = sum(used.get(p, 0) for p in (pod.proc.pid,))
            seen = first[pod.uid]
            fmt = lambda key: f"{seen[key]:.2f}" if key in seen else "-"  # noqa: E731
            print(f"tenant-{i:<2} {values.get('gpu_contexts') or 0:>8.0f} "
                  f"{(values.get('gpu_driver_mem_bytes') or 0) / 2**20:>15.0f} {nvml_bytes / 2**20:>9.0f} "
                  f"{values.get('gpu_launch_rate') or 0:>10.0f} "
                  f"{fmt('driver'):>14} / {fmt('nvml')} / {fmt('launches')}")
            for process in (r for r in driver["rows"] if r["pod_uid"] == pod.uid):
                print(f"    pid {process['pid']}: GPUs {process['context_devices']}, {process['calls']} calls, "
                      f"{process['blocked_ms']:.0f} ms blocked, {json.dumps(process['calls_by_kind'])}")
            by_entry = {}
            for r in (r for r in launches["rows"] if r["pod_uid"] == pod.uid):
                by_entry[r["entry"]] = by_entry.get(r["entry"], 0) + r["launches"]
            print(f"    launch uprobes by entry point: {json.dumps(by_entry)}")
        for pod in pods:
            pod.proc.wait(timeout=args.seconds + 60)
    finally:
        stop(agent)
        for pod in pods:
            pod.stop()


if __name__ == "__main__":
    main()
