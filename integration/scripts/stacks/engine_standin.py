#!/usr/bin/env python3
"""Stand-in inference engines for the engine-signal tests: each serves its
engine's /metrics exactly as the engine writes it (family names, types,
labels, histogram buckets; prometheus_client where the engine uses it, the
engine's own hand-written text where it does not), under the engine's own
command line (the Rust harness starts it as `python3 .../vllm serve ...`,
`python3 -m sglang.launch_server ...`, and so on).

usage (through a launcher): main(ENGINE)
  ENGINE: vllm sglang tgi triton trtllm-serve llama-cpp lmdeploy dynamo
  env PODGPU_STANDIN_RANKS=N     vLLM data-parallel ranks (engine="0".."N-1")
  env PODGPU_STANDIN_VLLM_OLD=1  vLLM before 0.9 (vllm:gpu_cache_usage_perc)

Binds 127.0.0.1:0 and prints {"listening": "127.0.0.1:PORT"}. Besides the
engine's metrics path it answers:
  GET /standin/set?waiting=W&running=R&kv=F      set the gauges (kv 0-1)
  GET /standin/observe?ttft=SECONDS&count=N       record N first tokens
  GET /standin/fault?mode=none|401|garbage|huge|slow
                                                  how the metrics path answers
"""
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MODEL = "standin/model-0.5b"
VLLM_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
SGLANG_TTFT_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400]
TRITON_FIRST_RESPONSE_MS = [100, 500, 2000, 5000]


class PrometheusClientEngine:
    """An engine that exports through prometheus_client: gauges and a TTFT
    histogram per label set (one set per data-parallel rank)."""

    path = "/metrics"

    def __init__(self, names, label_sets, ttft_buckets):
        self.registry = CollectorRegistry()
        label_names = sorted(label_sets[0].keys())
        self.label_sets = label_sets
        waiting, running, kv, ttft = names
        self.waiting = Gauge(waiting, "Number of requests waiting to be processed.", label_names, registry=self.registry)
        self.running = Gauge(running, "Number of requests in model execution batches.", label_names,
                             registry=self.registry)
        self.kv = kv and Gauge(kv, "KV-cache usage. 1 means 100 percent usage.", label_names, registry=self.registry)
        self.ttft = ttft and Histogram(ttft, "Histogram of time to first token in seconds.", label_names,
                                       buckets=ttft_buckets, registry=self.registry)
        # A counter, as every engine has, so counters are in the body too.
        self.prompt_tokens = Counter(waiting.split(":")[0].split("_")[0] + ":prompt_tokens",
                                     "Number of prefill tokens processed.", label_names, registry=self.registry) \
            if ":" in waiting else None
        self.observed = 0
        self.set(0, 0, 0.0)

    def set(self, waiting, running, kv):
        ranks = len(self.label_sets)
        for index, labels in enumerate(self.label_sets):
            # Split the totals over the ranks; the first rank holds the
            # fullest KV cache, the others half of it.
            self.waiting.labels(**labels).set(waiting // ranks + (1 if index < waiting % ranks else 0))
            self.running.labels(**labels).set(running // ranks + (1 if index < running % ranks else 0))
            if self.kv:
                self.kv.labels(**labels).set(kv if index == 0 else kv / 2)

    def observe(self, seconds, count):
        for _ in range(count):
            labels = self.label_sets[self.observed % len(self.label_sets)]
            self.observed += 1
            if self.ttft:
                self.ttft.labels(**labels).observe(seconds)
            if self.prompt_tokens:
                self.prompt_tokens.labels(**labels).inc(17)

    def render(self):
        return generate_latest(self.registry), "text/plain; version=0.0.4; charset=utf-8"


class TextEngine:
    """An engine that writes its metrics text by hand (llama.cpp's server,
    TGI's metrics-exporter-prometheus, Triton's prometheus-cpp)."""

    def __init__(self, render_body, path="/metrics"):
        self.render_body = render_body
        self.path = path
        self.values = {"waiting": 0, "running": 0, "kv": 0.0}
        self.ttfts = []

    def set(self, waiting, running, kv):
        self.values = {"waiting": waiting, "running": running, "kv": kv}

    def observe(self, seconds, count):
        self.ttfts.extend([seconds] * count)

    def render(self):
        return self.render_body(self.values, self.ttfts).encode(), "text/plain; version=0.0.4"


def llama_cpp_body(values, ttfts):
    # tools/server/server.cpp writes each family as HELP, TYPE, value.
    families = [
        ("counter", "prompt_tokens_total", "Number of prompt tokens processed.", 17 * len(ttfts)),
        ("counter", "prompt_seconds_total", "Prompt process time", sum(ttfts)),
        ("counter", "tokens_predicted_total", "Number of generation tokens processed.", 0),
        ("counter", "n_decode_total", "Total number of llama_decode() calls", 0),
        ("gauge", "prompt_tokens_seconds", "Average prompt throughput in tokens/s.", 0),
        ("gauge", "predicted_tokens_seconds", "Average generation throughput in tokens/s.", 0),
        ("gauge", "requests_processing", "Number of requests processing.", values["running"]),
        ("gauge", "requests_deferred", "Number of requests deferred.", values["waiting"]),
    ]
    return "".join("# HELP llamacpp:%s %s\n# TYPE llamacpp:%s %s\nllamacpp:%s %s\n" % (name, help_, name, kind, name, value)
                   for kind, name, help_, value in families)


def tgi_body(values, _ttfts):
    # metrics-exporter-prometheus: TYPE lines, no HELP, unlabelled gauges.
    return ("# TYPE tgi_queue_size gauge\ntgi_queue_size %d\n\n"
            "# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size %d\n\n"
            "# TYPE tgi_batch_current_max_tokens gauge\ntgi_batch_current_max_tokens 0\n\n"
            "# TYPE tgi_request_count counter\ntgi_request_count %d\n" % (values["waiting"], values["running"], len(_ttfts)))


def triton_body(values, ttfts):
    # prometheus-cpp: HELP and TYPE, every series per model and version;
    # the TensorRT-LLM backend adds its request and KV-block families.
    labels = 'model="tensorrt_llm",version="1"'
    lines = [
        "# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.",
        "# TYPE nv_inference_pending_request_count gauge",
        "nv_inference_pending_request_count{%s} %d" % (labels, values["waiting"]),
        "# HELP nv_trt_llm_request_metrics TRT LLM request metrics",
        "# TYPE nv_trt_llm_request_metrics gauge",
    ]
    for request_type, value in [("context", 0), ("scheduled", values["running"]), ("max", 64),
                                ("active", values["running"]), ("waiting", values["waiting"])]:
        lines.append('nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="%s",version="1"} %d'
                     % (request_type, value))
    lines += ["# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics",
              "# TYPE nv_trt_llm_kv_cache_block_metrics gauge"]
    for block_type, value in [("tokens_per", 64), ("used", int(values["kv"] * 1000)), ("free", 1000 - int(values["kv"] * 1000)),
                              ("max", 1000), ("fraction", values["kv"])]:
        lines.append('nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="%s",model="tensorrt_llm",version="1"} %s'
                     % (block_type, value))
    lines += ["# HELP nv_inference_first_response_histogram_ms Duration from request to first response in milliseconds",
              "# TYPE nv_inference_first_response_histogram_ms histogram"]
    for bound in TRITON_FIRST_RESPONSE_MS:
        lines.append('nv_inference_first_response_histogram_ms_bucket{%s,le="%s"} %d'
                     % (labels, bound, sum(1 for t in ttfts if t * 1000 <= bound)))
    lines.append('nv_inference_first_response_histogram_ms_bucket{%s,le="+Inf"} %d' % (labels, len(ttfts)))
    lines.append("nv_inference_first_response_histogram_ms_sum{%s} %s" % (labels, sum(ttfts) * 1000))
    lines.append("nv_inference_first_response_histogram_ms_count{%s} %d" % (labels, len(ttfts)))
    return "\n".join(lines) + "\n"


def make_engine(name):
    ranks = int(os.environ.get("PODGPU_STANDIN_RANKS", "1"))
    if name == "vllm":
        kv = "vllm:gpu_cache_usage_perc" if os.environ.get("PODGPU_STANDIN_VLLM_OLD") else "vllm:kv_cache_usage_perc"
        return PrometheusClientEngine(
            ("vllm:num_requests_waiting", "vllm:num_requests_running", kv, "vllm:time_to_first_token_seconds"),
            [{"model_name": MODEL, "engine": str(rank)} for rank in range(ranks)], VLLM_TTFT_BUCKETS)
    if name == "sglang":
        return PrometheusClientEngine(
            ("sglang:num_queue_reqs", "sglang:num_running_reqs", "sglang:token_usage", "sglang:time_to_first_token_seconds"),
            [{"model_name": MODEL, "engine_type": "unified", "tp_rank": "0", "pp_rank": "0"}], SGLANG_TTFT_BUCKETS)
    if name == "lmdeploy":
        return PrometheusClientEngine(
            ("lmdeploy:num_requests_waiting", "lmdeploy:num_requests_running", "lmdeploy:gpu_cache_usage_perc",
             "lmdeploy:time_to_first_token_seconds"),
            [{"model_name": MODEL}], VLLM_TTFT_BUCKETS)
    if name == "trtllm-serve":
        engine = PrometheusClientEngine(
            ("trtllm_num_requests_waiting", "trtllm_num_requests_running", "trtllm_kv_cache_utilization",
             "trtllm_time_to_first_token_seconds"),
            [{"model_name": MODEL, "engine_type": "trtllm"}], VLLM_TTFT_BUCKETS)
        engine.path = "/prometheus/metrics"
        return engine
    if name == "dynamo":
        # The frontend: queue and in-flight counts and TTFT; KV is a
        # worker's figure, not the frontend's.
        return PrometheusClientEngine(
            ("dynamo_frontend_queued_requests", "dynamo_frontend_inflight_requests", None,
             "dynamo_frontend_time_to_first_token_seconds"),
            [{"model": MODEL}], VLLM_TTFT_BUCKETS)
    if name == "llama-cpp":
        return TextEngine(llama_cpp_body)
    if name == "tgi":
        return TextEngine(tgi_body)
    if name == "triton":
        return TextEngine(triton_body)
    raise SystemExit("unknown engine %r" % name)


def main(name):
    engine = make_engine(name)
    lock = threading.Lock()
    state = {"fault": "none"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args):
            pass

        def answer(self, status, body, content_type="text/plain"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urlparse(self.path)
            query = {key: values[0] for key, values in parse_qs(url.query).items()}
            if url.path == "/standin/set":
                with lock:
                    engine.set(int(query.get("waiting", 0)), int(query.get("running", 0)), float(query.get("kv", 0)))
                return self.answer(200, b"ok\n")
            if url.path == "/standin/observe":
                with lock:
                    engine.observe(float(query["ttft"]), int(query.get("count", 1)))
                return self.answer(200, b"ok\n")
            if url.path == "/standin/fault":
                state["fault"] = query.get("mode", "none")
                return self.answer(200, b"ok\n")
            if url.path == "/metrics" and engine.path != "/metrics":
                # trtllm-serve's /metrics is JSON iteration statistics.
                return self.answer(200, b'[{"gpuMemUsage": 0, "numActiveRequests": 0}]', "application/json")
            if url.path != engine.path:
                return self.answer(404, b"not found\n")
            fault = state["fault"]
            if fault == "401":
                return self.answer(401, b'{"error": "Unauthorized"}', "application/json")
            if fault == "garbage":
                return self.answer(200, b"<html><body>502 Bad Gateway {{{</body></html>\n", "text/html")
            if fault == "huge":
                # 50 MB of comment lines: valid text, too large to read.
                line = b"# " + b"x" * 1022 + b"\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(line) * 50 * 1024))
                self.end_headers()
                try:
                    for _ in range(50 * 1024):
                        self.wfile.write(line)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                return None
            if fault == "slow":
                time.sleep(3)
            with lock:
                body, content_type = engine.render()
            return self.answer(200, body, content_type)

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket = listener
    server.daemon_threads = True
    print(json.dumps({"listening": "127.0.0.1:%d" % listener.getsockname()[1]}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1])
