#!/usr/bin/env python3
"""gRPC C-core (grpcio) client for the request probe's stack tests: makes
the calls it is given over ONE channel (one HTTP/2 connection) from
CONCURRENCY threads, and prints what it measured, as a test's truth.

usage: grpcio_client.py ADDR CONCURRENCY < calls.json
calls.json: [{"first_ms": N, "messages": M, "interval_ms": I}, ...];
messages 0 makes a unary GetMetrics call answered after first_ms.
Prints [{"ttft_ms": T, "latency_ms": L}, ...] (in completion order).
"""
import json
import sys
import threading
import time

import grpc

SERVICE = "/externalscaler.ExternalScaler/"


def field(number, payload):
    return bytes([number << 3 | 2, len(payload)]) + payload


def scaled_object(pairs):
    """A ScaledObjectRef with `pairs` in scalerMetadata (field 3)."""
    entries = b"".join(field(3, field(1, k.encode()) + field(2, str(v).encode())) for k, v in pairs)
    return field(1, b"t") + field(2, b"t") + entries


def main():
    addr, concurrency = sys.argv[1], int(sys.argv[2])
    calls = json.load(sys.stdin)
    channel = grpc.insecure_channel(addr)
    grpc.channel_ready_future(channel).result(timeout=10)
    unary = channel.unary_unary(SERVICE + "GetMetrics")
    streaming = channel.unary_stream(SERVICE + "StreamIsActive")
    results, lock, failures = [], threading.Lock(), []

    def worker():
        while True:
            with lock:
                if not calls:
                    return
                call = calls.pop(0)
            try:
                started = time.monotonic()
                if call["messages"] == 0:
                    # GetMetricsRequest: scaledObjectRef (field 1), metricName (field 2).
                    request = field(1, scaled_object([("delay_ms", call["first_ms"])])) + field(2, b"m")
                    unary(request, timeout=30)
                    ttft = latency = time.monotonic() - started
                else:
                    request = scaled_object(
                        [("first_ms", call["first_ms"]), ("interval_ms", call["interval_ms"]), ("messages", call["messages"])]
                    )
                    ttft = None
                    for _ in streaming(request, timeout=30):
                        if ttft is None:
                            ttft = time.monotonic() - started
                    latency = time.monotonic() - started
                with lock:
                    results.append({"ttft_ms": ttft * 1e3, "latency_ms": latency * 1e3})
            except Exception as err:  # reported, and the test fails on it
                with lock:
                    failures.append(repr(err))
                return

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        sys.exit("grpcio client: %d calls failed: %s" % (len(failures), failures[0]))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
