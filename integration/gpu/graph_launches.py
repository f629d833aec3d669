#!/usr/bin/env python3
"""Do CUDA graph replays reach the launch probe as cuGraphLaunch? (vLLM
decodes with CUDA graphs.) Captures a graph of 20 small kernels with
PyTorch, replays it REPLAYS times in a cgroup pod, and prints what the
agent's launch accounting counted for the pod, by entry point.

usage: graph_launches.py --agent .gpu-carry/podgpu-agent [--replays 5000]
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from validate_nvml import NS, Pod, v2_root, get_json  # noqa: E402

WORKER = r"""
import sys, time, torch
replays = int(sys.argv[1])
x = torch.zeros(1024, device="cuda")
s = torch.cuda.Stream()
with torch.cuda.stream(s):
    for _ in range(3):
        x.add_(1)
torch.cuda.synchronize()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    for _ in range(20):
        x.add_(1)
torch.cuda.synchronize()
time.sleep(3)  # the agent attaches within a second or two of libcuda loading
for _ in range(replays):
    graph.replay()
torch.cuda.synchronize()
print("done", flush=True)
time.sleep(3)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--replays", type=int, default=5000)
    args = ap.parse_args()
    root = v2_root()
    work = tempfile.mkdtemp(prefix="podgpu-graph-")
    pod = Pod(root, 11)
    pods_yaml = os.path.join(work, "pods.yaml")
    with open(pods_yaml, "w") as f:
        f.write(f"pods:\n  - {{uid: {pod.uid}, namespace: {NS}, name: graphs, labels: {{app: graphs}}}}\n")
    agent = subprocess.Popen(
        [args.agent, "standalone", "--gpu", "none", "--pod-metadata", pods_yaml, "--keda-listen", "127.0.0.1:0",
         "--http-listen", "127.0.0.1:0", "--tick-ms", "100", "--launch-accounting", "on"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, RUST_LOG="warn"))
    http = json.loads(agent.stdout.readline())["http"]
    try:
        pod.start([sys.executable, "-c", WORKER, str(args.replays)])
        time.sleep(1)
        rows = []
        while pod.proc.poll() is None:
            rows = [r for r in get_json(http, "/launches")["rows"] if r["pod_uid"] == pod.uid] or rows
            time.sleep(0.5)
        by_entry = {}
        for r in rows:
            by_entry[r["entry"]] = by_entry.get(r["entry"], 0) + r["launches"]
        graphs = sorted({r["function"] for r in rows if r["entry"] == "graph"})
        print(f"{args.replays} replays of a 20-kernel graph; counted by entry point: {json.dumps(by_entry)}")
        print(f"distinct graph handles: {len(graphs)}")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
        pod.stop()


if __name__ == "__main__":
    main()
