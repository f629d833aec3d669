#!/usr/bin/env python3
"""Real-GPU validation of podgpu's NVML path (issue 3).

Runs duty_worker.py tenants with known GPU load, each in its own cgroup "pod",
runs podgpu-agent against real NVML, and prints per tenant:
  true GPU busy % (the worker's own record) | podgpu gpu_sm_util (NVML-only) | error
  GPU memory: podgpu per pod vs NVML per pid (nvidia-smi's source) -> must be exact.

On the GPU machine (no Rust there: build here, carry the binary):
  cargo build --release -p podgpu-agent && mkdir -p .gpu-carry && cp target/release/podgpu-agent .gpu-carry/
  run: python3 integration/gpu/validate_nvml.py --agent .gpu-carry/podgpu-agent          (carry: [".gpu-carry"])
--agent-cgroupns runs the agent as the DaemonSet does on cgroup v2: in its
own kubelet-shaped cgroup and its own cgroup namespace, where other
processes' cgroups read relative (0::/../../kubepods-...); memory per pod
matching NVML per pid then proves pod identity works from inside.
Without a GPU, --fake-workers replaces the CUDA workers by idle processes and
the agent's simulator by a scenario with the same duties, which checks the
plumbing (cgroups, agent, /pods, truth arithmetic, table) but not NVML.
"""
import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

# The CUDA tenant with a known load, kept beside the validators so it travels
# to the GPU machine with the working tree.
DUTY_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "duty_worker.py")

NS = "gpuval"


def v2_root():
    with open("/proc/self/mountinfo") as f:
        mounts = [l.split(" - ")[0].split()[4] for l in f if " - cgroup2 " in l]
    if "/sys/fs/cgroup" in mounts:
        return "/sys/fs/cgroup"
    if not mounts:
        sys.exit("no cgroup v2 mount")
    return mounts[0]


class Pod:
    """A kubelet-shaped cgroup with one process in it."""

    def __init__(self, root, index):
        self.uid = f"6a1d0000-0000-4000-8000-{index:012x}"
        self.slice = f"kubepods.slice/kubepods-pod{self.uid.replace('-', '_')}.slice"
        self.dir = os.path.join(root, self.slice, f"cri-containerd-{'%064x' % (index + 1)}.scope")
        os.makedirs(self.dir, exist_ok=True)
        self.proc = None

    def start(self, argv):
        self.proc = subprocess.Popen(argv, start_new_session=True)
        with open(os.path.join(self.dir, "cgroup.procs"), "w") as f:
            f.write(str(self.proc.pid))

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for d in (self.dir, os.path.dirname(self.dir)):
            try:
                os.rmdir(d)
            except OSError:
                pass


CLONE_NEWCGROUP = 0x02000000


def enter_agent_pod(cgroup_dir):
    """preexec_fn: move into the agent's own pod cgroup, then unshare the
    cgroup namespace (as runc does for a container)."""
    def enter():
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWCGROUP) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWCGROUP)")
    return enter


def write_pods_yaml(path, pods, name):
    """Static pod metadata for the agent: pod i is NS/{name}-i, app={name}-i."""
    with open(path, "w") as f:
        f.write("pods:\n")
        for i, pod in enumerate(pods):
            f.write(f"  - {{uid: {pod.uid}, namespace: {NS}, name: {name}-{i}, labels: {{app: {name}-{i}}}}}\n")


def get_json(http, path):
    with urllib.request.urlopen(f"http://{http}{path}", timeout=5) as r:
        return json.load(r)


def nvml_memory_by_pid():
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    used = {}
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            used[p.pid] = used.get(p.pid, 0) + (p.usedGpuMemory or 0)
    driver = pynvml.nvmlSystemGetDriverVersion()
    name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    return used, driver, name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--worker", default=DUTY_WORKER, help="the CUDA tenant (default: duty_worker.py beside this script; not used with --fake-workers)")
    ap.add_argument("--duties", default="0.25,0.5", help="comma-separated duty per tenant")
    ap.add_argument("--n", type=int, default=4096, help="matmul size (>= 4096 keeps truth honest)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--fake-workers", action="store_true")
    ap.add_argument("--agent-cgroupns", action="store_true", help="agent in its own pod cgroup and cgroup namespace")
    args = ap.parse_args()
    duties = [float(d) for d in args.duties.split(",")]
    root = v2_root()
    work = tempfile.mkdtemp(prefix="podgpu-gpuval-")
    pods = [Pod(root, i) for i in range(len(duties))]
    agent_pod = Pod(root, 0xa9e47) if args.agent_cgroupns else None
    agent = None
    try:
        kernel_s = None
        if not args.fake_workers:
            out = subprocess.run([sys.executable, args.worker, "calibrate", str(args.n)], check=True, capture_output=True, text=True)
            kernel_s = json.loads(out.stdout)["kernel_s"]
            print(f"calibrated: one {args.n}x{args.n} bf16 matmul = {kernel_s * 1e3:.3f} ms solo")
        outs = []
        for pod, duty in zip(pods, duties):
            out_json = os.path.join(work, f"{pod.uid}.json")
            outs.append(out_json)
            if args.fake_workers:
                pod.start(["sleep", str(args.seconds + 30)])
            else:
                pod.start([sys.executable, args.worker, "run", str(duty), str(args.seconds), out_json, str(args.n), str(kernel_s)])
        with open(os.path.join(work, "pods.yaml"), "w") as f:
            f.write("pods:\n")
            for i, pod in enumerate(pods):
                f.write(f"  - {{uid: {pod.uid}, namespace: {NS}, name: tenant-{i}, labels: {{app: tenant-{i}}}}}\n")
        gpu = "nvml"
        if args.fake_workers:
            scenario = os.path.join(work, "scenario.yaml")
            with open(scenario, "w") as f:
                f.write("name: gpuval\ngpus: [{uuid: GPU-fake, name: fake, memory_total_bytes: 85899345920}]\nprocesses:\n")
                for pod, duty in zip(pods, duties):
                    f.write(f"  - {{cgroup: {pod.slice}, gpu: 0, memory_bytes: 1073741824, sm_util: [{{seconds: 1, percent: {duty * 100}}}]}}\n")
            gpu = f"sim:{scenario}"
        agent = subprocess.Popen(
            [args.agent, "standalone", "--gpu", gpu, "--pod-metadata", os.path.join(work, "pods.yaml"),
             "--keda-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--gpu-interval-ms", "500"],
            stdout=subprocess.PIPE, text=True, env=dict(os.environ, RUST_LOG="info" if agent_pod else "warn"),
            preexec_fn=enter_agent_pod(agent_pod.dir) if agent_pod else None)
        ready = json.loads(agent.stdout.readline())
        if agent_pod:
            with open(f"/proc/{agent.pid}/cgroup") as f:
                print(f"agent cgroup (as it sees itself): {f.read().strip()}")
            sample = pods[0].proc.pid
            print(f"pod 0's cgroup as the agent reads it: "
                  + subprocess.run(["nsenter", "-t", str(agent.pid), "-C", "cat", f"/proc/{sample}/cgroup"],
                                   capture_output=True, text=True).stdout.strip())
        http = ready["http"]
        start = time.time()
        # Skip CUDA init, then average the agent's 10 s windows over the run.
        time.sleep(min(8.0, args.seconds / 3))
        window_start = time.time()
        readings = {pod.uid: [] for pod in pods}
        memory = {}
        while time.time() - start < args.seconds - 1:
            view = get_json(http, "/pods?window=10")
            for row in view["pods"]:
                if row["uid"] in readings and row["values"].get("gpu_sm_util") is not None:
                    readings[row["uid"]].append(row["values"]["gpu_sm_util"])
                    memory[row["uid"]] = row["values"].get("gpu_mem_used_bytes")
            time.sleep(1.0)
        window_end = time.time()
        nvml = None if args.fake_workers else nvml_memory_by_pid()
        for pod in pods:
            if not args.fake_workers:
                pod.proc.wait(timeout=args.seconds + 60)
        devices = get_json(http, "/pods?window=10").get("devices", [])
        print(f"\nGPU: {'fake (simulator)' if args.fake_workers else (nvml[2] + ', driver ' + nvml[1]) if nvml else 'unknown'}"
              f"; agent in its own cgroup namespace: {bool(agent_pod)}")
        for d in devices:
            print(f"device {d.get('uuid')}: util {d.get('util_percent')} %, sharing {d.get('sharing')}, mig devices {len(d.get('mig_devices', []))}")
        print(f"{'tenant':<10} {'duty':>5} {'true busy %':>12} {'podgpu (NVML) %':>16} {'error':>7}   memory podgpu / NVML")
        for i, (pod, duty, out_json) in enumerate(zip(pods, duties, outs)):
            if args.fake_workers:
                truth = duty * 100
            else:
                with open(out_json) as f:
                    periods = json.load(f)["periods"]
                # The agent's 10 s windows reach back 10 s before the first reading.
                inside = [p for p in periods if window_start - 10 <= p[0] <= window_end]
                truth = 100 * sum(p[1] for p in inside) / max(1e-9, sum(p[2] for p in inside))
            seen = readings[pod.uid]
            measured = sum(seen) / len(seen) if seen else float("nan")
            mem_agent = memory.get(pod.uid)
            mem_nvml = nvml[0].get(pod.proc.pid) if nvml else None
            print(f"tenant-{i:<3} {duty:>5.2f} {truth:>12.1f} {measured:>16.1f} {measured - truth:>+7.1f}   {mem_agent} / {mem_nvml}")
    finally:
        if agent and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=10)
        for pod in pods + ([agent_pod] if agent_pod else []):
            pod.stop()
        try:
            os.rmdir(os.path.join(root, "kubepods.slice"))
        except OSError:
            pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
