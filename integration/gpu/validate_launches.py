#!/usr/bin/env python3
"""Real-GPU validation of podgpu's launch accounting (issue 12).

Part A: duty_worker.py tenants (PyTorch matmuls through the CUDA runtime and
cuBLAS), each in its own cgroup pod, with the agent on real NVML. Prints per
tenant: launches/s from the libcuda uprobes (by entry point), the pod's
gpu_launch_rate, and the first moment each source saw the pod GPU-active
(launch counts vs NVML memory), measured from the worker's start.

Part B: what the uprobes cost a launch-bound tenant: a loop of tiny
kernels (PyTorch `add_` on a small tensor), timed without the agent and
with it (probes attached), alternated, in one run. Prints launches/s,
the throughput ratio and ns added per launch.

Part C: launch sites on the real CUDA runtime: one duty_worker tenant loads
its kernels before the agent starts (as every process does across an agent
restart), a second runs the same program after. Prints, for the older one,
its launches by identity source (name / site / none), how many of its
site-given identities the younger one has by name (right) and how many it
does not (a wrong site, or a kernel the younger never launched).

On the GPU machine (no Rust there: build here, carry the binary):
  cargo build --release -p podgpu-agent && mkdir -p .gpu-carry && cp target/release/podgpu-agent .gpu-carry/
  python3 integration/gpu/validate_launches.py --agent .gpu-carry/podgpu-agent
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from validate_nvml import DUTY_WORKER, NS, Pod, v2_root, get_json, write_pods_yaml  # noqa: E402

LOOP = r"""
import os, sys, time, torch
n, warm, go = int(sys.argv[1]), sys.argv[2], sys.argv[3]
x = torch.zeros(256, device="cuda")
for _ in range(2000):
    x.add_(1)
torch.cuda.synchronize()
open(warm, "w").close()
# Untimed until told: with the agent, until it counts this process's
# launches (its probes are on the library), so the timed loop is probed
# from its first launch; without, at once.
while not os.path.exists(go):
    for _ in range(100):
        x.add_(1)
    torch.cuda.synchronize()
    time.sleep(0.01)
start = time.perf_counter()
for _ in range(n):
    x.add_(1)
torch.cuda.synchronize()
print(time.perf_counter() - start)
"""


AGENT_ARGS = []


def start_agent(agent, work, pods_yaml, gpu="nvml", gpu_interval_ms=500, extra=()):
    proc = subprocess.Popen(
        [agent, "standalone", "--gpu", gpu, "--pod-metadata", pods_yaml, "--keda-listen", "127.0.0.1:0",
         "--http-listen", "127.0.0.1:0", "--gpu-interval-ms", str(gpu_interval_ms), "--tick-ms", "100",
         "--launch-accounting", "on"]
        + AGENT_ARGS + list(extra),
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, RUST_LOG="warn"))
    ready = json.loads(proc.stdout.readline())
    return proc, ready["http"]


def stop(proc):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def part_a(args, root, work):
    duties = [0.25, 0.5]
    pods = [Pod(root, i) for i in range(len(duties))]
    pods_yaml = os.path.join(work, "pods.yaml")
    write_pods_yaml(pods_yaml, pods, "tenant")
    agent, http = start_agent(args.agent, work, pods_yaml)
    try:
        out = subprocess.run([sys.executable, args.worker, "calibrate", "4096"], check=True, capture_output=True, text=True)
        kernel_s = json.loads(out.stdout)["kernel_s"]
        started = time.time()
        for pod, duty in zip(pods, duties):
            pod.start([sys.executable, args.worker, "run", str(duty), str(args.seconds), os.path.join(work, pod.uid + ".json"),
                       "4096", str(kernel_s)])
        first = {pod.uid: {} for pod in pods}
        while time.time() - started < args.seconds:
            view = get_json(http, "/pods?window=2")
            for row in view["pods"]:
                seen = first.get(row["uid"])
                if seen is None:
                    continue
                values = row["values"]
                if (values.get("gpu_launch_rate") or 0) > 0 and "launches" not in seen:
                    seen["launches"] = time.time() - started
                if (values.get("gpu_mem_used_bytes") or 0) > 0 and "nvml" not in seen:
                    seen["nvml"] = time.time() - started
            time.sleep(0.1)
        launches = get_json(http, "/launches")
        view = get_json(http, "/pods?window=10")
        print(f"\n== A: launch counting, {args.seconds:.0f} s, duty_worker 4096 matmuls")
        print(f"{'tenant':<9} {'duty':>5} {'launches/s (uprobes, 10 s)':>27} {'by entry point':<40} {'first seen: launches / NVML':>28}")
        for i, pod in enumerate(pods):
            rows = [r for r in launches["rows"] if r["pod_uid"] == pod.uid]
            by_entry = {}
            for r in rows:
                by_entry[r["entry"]] = by_entry.get(r["entry"], 0) + r["launches"]
            rate = next((r["values"].get("gpu_launch_rate") for r in view["pods"] if r["uid"] == pod.uid), None)
            seen = first[pod.uid]
            print(f"tenant-{i:<2} {duties[i]:>5.2f} {rate or 0:>27.0f} {json.dumps(by_entry):<40} "
                  f"{seen.get('launches', float('nan')):>12.2f} s / {seen.get('nvml', float('nan')):.2f} s")
        functions = len({(r["pid"], r["function"], tuple(r["grid"]), tuple(r["block"])) for r in launches["rows"]})
        print(f"distinct (process, function, size) keys: {functions}")
        # Kernel identity on the real libcuda: the share of launches whose
        # handle has one (the name and module-image probes saw it made),
        # and whether the two tenants (one PyTorch program, started after
        # the agent) name their kernels alike.
        identified = sum(r["launches"] for r in launches["rows"] if r.get("kernel"))
        total = sum(r["launches"] for r in launches["rows"]) or 1
        kernels = [{r.get("kernel") for r in launches["rows"] if r["pod_uid"] == pod.uid and r.get("kernel")} for pod in pods]
        shared = kernels[0] & kernels[1] if len(kernels) == 2 else set()
        print(f"launches with a kernel identity: {100 * identified / total:.1f}%; identities per tenant "
              f"{[len(k) for k in kernels]}, shared by both: {len(shared)}")
        # Where the identities came from: the identity probes ("name") or
        # the launch-site book ("site": a handle older than the probes).
        by_source = {}
        for r in launches["rows"]:
            source = r.get("kernel_from", "none")
            by_source[source] = by_source.get(source, 0) + r["launches"]
        print("launches by identity source: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(by_source.items())))
        for pod in pods:
            pod.proc.wait(timeout=args.seconds + 60)
    finally:
        stop(agent)
        for pod in pods:
            pod.stop()


def part_b(args, root, work):
    pod = Pod(root, 7)
    pods_yaml = os.path.join(work, "pods-b.yaml")
    with open(pods_yaml, "w") as f:
        f.write(f"pods:\n  - {{uid: {pod.uid}, namespace: {NS}, name: loop, labels: {{app: loop}}}}\n")
    n = args.launches
    results = {"without": [], "with": []}
    try:
        for round_ in range(args.rounds):
            for mode in ("without", "with"):
                agent = None
                if mode == "with":
                    agent, http = start_agent(args.agent, work, pods_yaml, gpu="none")
                # The loop runs in the pod, so the agent finds its libcuda
                # and counts its launches; timing starts once it does.
                out = os.path.join(work, "loop.out")
                warm, go = os.path.join(work, "warm"), os.path.join(work, "go")
                for path in (warm, go):
                    if os.path.exists(path):
                        os.unlink(path)
                with open(out, "w") as f:
                    p = subprocess.Popen([sys.executable, "-c", LOOP, str(n), warm, go], stdout=f, start_new_session=True)
                with open(os.path.join(pod.dir, "cgroup.procs"), "w") as f:
                    f.write(str(p.pid))
                while not os.path.exists(warm):
                    time.sleep(0.05)
                before = 0
                if agent:
                    waited = time.time()
                    while time.time() - waited < 15:
                        rows = get_json(http, "/pods")["pods"]
                        before = next((r["gpu_launches"] for r in rows if r["uid"] == pod.uid), 0)
                        if before > 0:
                            break
                        time.sleep(0.1)
                    print(f"round {round_}: probes counting {time.time() - waited:.1f} s after warm-up")
                open(go, "w").close()
                p.wait()
                results[mode].append(float(open(out).read()))
                if agent:
                    time.sleep(1.2)
                    counted = next(r["gpu_launches"] for r in get_json(http, "/pods")["pods"] if r["uid"] == pod.uid)
                    print(f"round {round_}: the agent counted {counted - before} launches from the timed loop's start for {n} timed")
                    stop(agent)
        best = {mode: min(times) for mode, times in results.items()}
        print(f"\n== B: launch-bound loop, {n} tiny kernels, {args.rounds} alternated rounds (best of each)")
        for mode in ("without", "with"):
            print(f"{mode:>8} agent: {n / best[mode]:>10.0f} launches/s   runs: {', '.join(f'{t:.3f}' for t in results[mode])} s")
        print(f"throughput with / without: {best['without'] / best['with']:.4f}")
        print(f"added per launch: {(best['with'] - best['without']) / n * 1e9:.0f} ns")
    finally:
        pod.stop()


def part_c(args, root, work):
    pods = [Pod(root, 20), Pod(root, 21)]
    pods_yaml = os.path.join(work, "pods-c.yaml")
    write_pods_yaml(pods_yaml, pods, "sites")
    agent = None
    try:
        out = subprocess.run([sys.executable, args.worker, "calibrate", "4096"], check=True, capture_output=True, text=True)
        kernel_s = json.loads(out.stdout)["kernel_s"]
        def argv(pod):
            return [sys.executable, args.worker, "run", "0.3", str(args.seconds + 20),
                    os.path.join(work, pod.uid + ".json"), "4096", str(kernel_s)]
        pods[0].start(argv(pods[0]))
        time.sleep(8)  # its kernels are loaded and launching before the agent exists
        agent, http = start_agent(args.agent, work, pods_yaml)
        pods[1].start(argv(pods[1]))
        time.sleep(args.seconds)
        launches = get_json(http, "/launches")
        rows = [[r for r in launches["rows"] if r["pod_uid"] == pod.uid] for pod in pods]
        older, younger = rows
        total = sum(r["launches"] for r in older) or 1
        by_source = {}
        for r in older:
            by_source[r.get("kernel_from", "none")] = by_source.get(r.get("kernel_from", "none"), 0) + r["launches"]
        named_younger = {r["kernel"] for r in younger if r.get("kernel_from") == "name"}
        from_sites = {r["kernel"] for r in older if r.get("kernel_from") == "site"}
        print(f"\n== C: launch sites, the older tenant (kernels loaded before the agent), {args.seconds:.0f} s")
        print("older tenant's launches by identity source: "
              + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(by_source.items())))
        print(f"site-given identities: {len(from_sites)}; named alike in the younger tenant: "
              f"{len(from_sites & named_younger)}; not among the younger's names: {len(from_sites - named_younger)}")
        print(f"identity sources over the node: {launches.get('identity_sources')}")
    finally:
        stop(agent)
        for pod in pods:
            pod.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--worker", default=DUTY_WORKER, help="the CUDA tenant (default: duty_worker.py beside this script)")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--launches", type=int, default=500000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--agent-args", default="", help='extra agent flags, e.g. "--launch-overhead-budget 1" (sampled mode)')
    ap.add_argument("--only-overhead", action="store_true", help="part B only")
    args = ap.parse_args()
    AGENT_ARGS.extend(args.agent_args.split())
    root = v2_root()
    work = tempfile.mkdtemp(prefix="podgpu-launchval-")
    try:
        import pynvml
        pynvml.nvmlInit()
        print(f"GPU: {pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))}, driver {pynvml.nvmlSystemGetDriverVersion()}")
    except Exception as err:  # noqa: BLE001
        print(f"GPU: unknown ({err})")
    if not args.only_overhead:
        part_a(args, root, work)
        part_c(args, root, work)
    part_b(args, root, work)


if __name__ == "__main__":
    main()
