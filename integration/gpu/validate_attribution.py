#!/usr/bin/env python3
"""Real-GPU validation of podgpu's per-pod attribution (issue 13, item 5).

duty_worker.py tenants with known load, each in its own cgroup pod, on one
GPU; the agent runs on real NVML with launch accounting on. Per scenario it
prints, per tenant: the truth (the worker's own record), NVML-only
(`gpu_sm_util_nvml`), podgpu (`gpu_sm_util`, the estimator), their errors
(run means after warm-up), and the per-2 s-bin mean absolute errors of
`podgpu-agent replay` on the trace `podgpu-agent record` wrote of the run
(the CI metric). Traces land in --out (one per scenario).

Scenarios: 0.25x4096 + 0.5x4096; 0.1x4096 + 0.3x4096 + 0.6x4096;
0.3x8192 + 0.3x4096 + 0.2x6144 held steady; a mix that fools a
launch-count estimator (equal duty, ~9x fewer launches for one tenant,
staggered starts); the steady mix under MPS (skipped, saying so, when
nvidia-cuda-mps-control is absent); and two identical kernels started
together at duties 0.3 and 0.15. Each replay is also scored with the
trace's completion spans dropped (`replay --without-spans`), beside each
tenant's busy span time (duty_worker waits with torch.cuda.synchronize,
which reaches cuCtxSynchronize).

On the GPU machine (no Rust there: build here, carry the binary):
  cargo build --release -p podgpu-agent && mkdir -p .gpu-carry && cp target/release/podgpu-agent .gpu-carry/
  python3 integration/gpu/validate_attribution.py --agent .gpu-carry/podgpu-agent --out $OUT/traces
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from validate_nvml import DUTY_WORKER, Pod, v2_root, get_json, write_pods_yaml  # noqa: E402
from validate_launches import start_agent, stop  # noqa: E402

# (name, [(duty, n, start_delay_s)], mps)
SCENARIOS = [
    ("three-4096", [(0.1, 4096, 0), (0.3, 4096, 0), (0.6, 4096, 0)], False),
    ("two-4096", [(0.25, 4096, 0), (0.5, 4096, 0)], False),
    # Same duty, but 4096 matmuls launch ~9x more often than 8192 ones:
    # launch share gives the small tenant nearly everything.
    ("fool-launch-count", [(0.3, 8192, 0), (0.3, 4096, 4)], False),
    ("mps-staggered", [(0.3, 8192, 0), (0.2, 4096, 3), (0.25, 6144, 6)], True),
    ("steady-mixed", [(0.3, 8192, 0), (0.3, 4096, 0), (0.2, 6144, 0)], False),
    # Identical kernels started together at different duties: launch
    # counts and kernel identity cannot split them; completion spans can.
    ("two-identical", [(0.3, 4096, 0), (0.15, 4096, 0)], False),
]


def span_fractions(trace):
    """Each process's busy span time over the recorded run, as a fraction
    of it (the launch file's first and last lines with spans)."""
    path = trace[:-len(".json")] + "-launch.jsonl"
    with open(path) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    lines = [l for l in lines if l.get("spans")]
    if len(lines) < 2:
        return {}
    first = {row[0]: row for row in lines[0]["spans"]}
    elapsed = lines[-1]["t"] - lines[0]["t"]
    return {row[0]: (row[1] - first[row[0]][1]) / elapsed
            for row in lines[-1]["spans"] if row[0] in first and elapsed > 0}



def truth_of(path, since, until):
    with open(path) as f:
        periods = json.load(f)["periods"]
    inside = [p for p in periods if since <= p[0] <= until] or periods
    return 100.0 * sum(p[1] for p in inside) / sum(p[2] for p in inside)


def run_scenario(args, root, kernel_s, name, tenants, mps, out_dir):
    work = tempfile.mkdtemp(prefix=f"podgpu-attr-{name}-")
    pods = [Pod(root, 40 + i) for i in range(len(tenants))]
    pods_yaml = os.path.join(work, "pods.yaml")
    write_pods_yaml(pods_yaml, pods, "t")
    env = {}
    mps_dir = None
    if mps:
        if not shutil.which("nvidia-cuda-mps-control"):
            print(f"\n== {name}: skipped, nvidia-cuda-mps-control not found")
            return
        mps_dir = tempfile.mkdtemp(prefix="podgpu-mps-")
        env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(mps_dir, "pipe"), "CUDA_MPS_LOG_DIRECTORY": os.path.join(mps_dir, "log")}
        for d in env.values():
            os.makedirs(d)
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=dict(os.environ, **env), check=True)
    agent, http = start_agent(args.agent, work, pods_yaml, gpu_interval_ms=250)
    outs = [os.path.join(work, f"{pod.uid}.json") for pod in pods]
    trace = os.path.join(out_dir, f"{name}.json")
    longest = max(delay for _, _, delay in tenants) + args.seconds
    record = subprocess.Popen([args.agent, "record", "--agent", http, "--seconds", str(longest + 6), "--scenario", name,
                               "--out", trace, "--truth", ",".join(outs), "--truth-wait-s", "40"],
                              env=dict(os.environ, RUST_LOG="warn"))
    try:
        started = time.time()
        pending = list(enumerate(tenants))
        live = {pod.uid: [] for pod in pods}
        while pending or any(pod.proc is None or pod.proc.poll() is None for pod in pods):
            now = time.time() - started
            for i, (duty, n, delay) in list(pending):
                if now >= delay:
                    pods[i].start([sys.executable, args.worker, "run", str(duty), str(args.seconds), outs[i], str(n),
                                   str(kernel_s[n])] if not mps else
                                  ["env"] + [f"{k}={v}" for k, v in env.items()] +
                                  [sys.executable, args.worker, "run", str(duty), str(args.seconds), outs[i], str(n), str(kernel_s[n])])
                    pending.remove((i, (duty, n, delay)))
            view = get_json(http, "/pods?window=2")
            with open(os.path.join(out_dir, f"{name}-attribution.jsonl"), "a") as dump:
                dump.write(json.dumps({"t": time.time(), "attribution": get_json(http, "/attribution"),
                                       "launches": get_json(http, "/launches"), "pods": view["pods"]}) + "\n")
            for row in view["pods"]:
                if row["uid"] in live:
                    live[row["uid"]].append((time.time(), row["values"].get("gpu_sm_util"),
                                             row["values"].get("gpu_sm_util_nvml"), row.get("gpu_attribution_confidence")))
            time.sleep(1.0)
            if time.time() - started > longest + 60:
                break
        health = get_json(http, "/healthz")
        print(f"launch accounting: duty {health.get('launch_duty')}, calibrated cost "
              f"{health.get('launch_hit_cost_ns')} ns per probed launch")
        record.wait(timeout=120)
        replay = subprocess.run([args.agent, "replay", trace], capture_output=True, text=True)
        scores = {json.loads(l)["pid"]: json.loads(l) for l in replay.stdout.splitlines() if l.strip()}
        if replay.returncode != 0:
            print(replay.stderr)
        # The same trace with its completion spans dropped: what they add.
        bare = subprocess.run([args.agent, "replay", trace, "--without-spans"], capture_output=True, text=True)
        bare_scores = {json.loads(l)["pid"]: json.loads(l) for l in bare.stdout.splitlines() if l.strip()}
        spans = span_fractions(trace)
        if not spans:
            print("completion spans: none recorded (the wait probes saw no process wait twice)")
        print(f"\n== {name}{' (MPS)' if mps else ''}: {args.seconds:.0f} s; live means over each tenant's run after 6 s of warm-up")
        print(f"{'tenant':<14} {'truth':>6} {'NVML':>6} {'podgpu':>7} {'|NVML-truth|':>12} {'|podgpu-truth|':>14} {'conf':>5}"
              f"   replay MAE/2s bin: podgpu  NVML  launch-share  podgpu-without-spans  busy-span")
        for i, (pod, (duty, n, delay)) in enumerate(zip(pods, tenants)):
            with open(outs[i]) as f:
                pid = json.load(f)["pid"]
            begin = started + delay + 6
            end = started + delay + args.seconds
            samples = [s for s in live[pod.uid] if begin <= s[0] <= end and s[1] is not None]
            truth = truth_of(outs[i], begin, end)
            mean = lambda k: sum(s[k] or 0 for s in samples) / max(len(samples), 1)  # noqa: E731
            podgpu, nvml, conf = mean(1), mean(2), mean(3)
            score = scores.get(pid, {})
            print(f"{duty:.2f}x{n:<9} {truth:>6.1f} {nvml:>6.1f} {podgpu:>7.1f} {abs(nvml - truth):>12.1f} {abs(podgpu - truth):>14.1f} {conf:>5.2f}"
                  f"   {score.get('podgpu_mae', float('nan')):>24.1f} {score.get('nvml_mae', float('nan')):>5.1f} "
                  f"{score.get('launch_share_mae', float('nan')):>6.1f} "
                  f"{bare_scores.get(pid, {}).get('podgpu_mae', float('nan')):>21.1f} "
                  f"{100 * spans.get(pid, float('nan')):>9.1f}%")
    finally:
        stop(agent)
        if record.poll() is None:
            record.kill()
        for pod in pods:
            pod.stop()
        if mps_dir:
            subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=dict(os.environ, **env))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--worker", default=DUTY_WORKER, help="the CUDA tenant (default: duty_worker.py beside this script)")
    ap.add_argument("--seconds", type=float, default=16.0)
    ap.add_argument("--out", required=True, help="directory for the recorded traces")
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    root = v2_root()
    try:
        import pynvml
        pynvml.nvmlInit()
        print(f"GPU: {pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))}, driver {pynvml.nvmlSystemGetDriverVersion()}")
    except Exception as err:  # noqa: BLE001
        print(f"GPU: unknown ({err})")
    chosen = [s for s in SCENARIOS if not args.only or s[0] in args.only.split(",")]
    sizes = sorted({n for _, tenants, _ in chosen for _, n, _ in tenants})
    kernel_s = {}
    for n in sizes:
        out = subprocess.run([sys.executable, args.worker, "calibrate", str(n)], check=True, capture_output=True, text=True)
        kernel_s[n] = json.loads(out.stdout)["kernel_s"]
    print("solo kernel seconds:", {n: round(s * 1e3, 3) for n, s in kernel_s.items()}, "ms")
    for name, tenants, mps in chosen:
        run_scenario(args, root, kernel_s, name, tenants, mps, args.out)


if __name__ == "__main__":
    main()
