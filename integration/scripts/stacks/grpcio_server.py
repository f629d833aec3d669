#!/usr/bin/env python3
"""gRPC C-core (grpcio) server for the request probe's stack tests.

Serves the method paths of KEDA's ExternalScaler with raw-bytes handlers
(no generated code), so the tests' tonic client can call it:
- GetMetrics (unary): answers after `delay_ms`;
- StreamIsActive (server streaming): `messages` replies, the first after
  `first_ms`, then every `interval_ms`.
The parameters are read from the request's `scalerMetadata` map entries
(protobuf map entry: key, then field 2 = the value string). Replies are
empty messages, valid for any proto3 type.

Prints {"listening": "127.0.0.1:PORT"} once serving.
"""
import json
import re
import sys
import time
from concurrent import futures

import grpc

SERVICE = "externalscaler.ExternalScaler"


def param(request, name, default=0):
    found = re.search(re.escape(name.encode()) + rb"\x12.(\d+)", request, re.DOTALL)
    return int(found.group(1)) if found else default


def get_metrics(request, context):
    time.sleep(param(request, "delay_ms") / 1000)
    return b""


def stream_is_active(request, context):
    first, interval, messages = param(request, "first_ms"), param(request, "interval_ms"), param(request, "messages", 1)
    time.sleep(first / 1000)
    for index in range(messages):
        if index > 0:
            time.sleep(interval / 1000)
        yield b""


def main():
    handlers = {
        "GetMetrics": grpc.unary_unary_rpc_method_handler(get_metrics),
        "StreamIsActive": grpc.unary_stream_rpc_method_handler(stream_is_active),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256), maximum_concurrent_rpcs=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"listening": "127.0.0.1:%d" % port}), flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
