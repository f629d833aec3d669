#!/usr/bin/env python3
"""A raw HTTP/2 server for the probe's tests: it answers every stream of
one connection in a single write, as a busy server flushing many streams'
frames at once does. Only frame headers matter to the probe, so header
blocks are opaque bytes (no HPACK).

usage: h2_bulk_server.py STREAMS HOLD_S [scatter]
Prints {"listening": "127.0.0.1:PORT"}, accepts one connection, reads the
client preface and STREAMS request HEADERS frames (END_STREAM), holds them
HOLD_S seconds, then writes HEADERS + DATA + trailers for every stream in
one sendall, and keeps the connection open until the client closes it.

With `scatter`, the answer is cut at uneven points (1-23 bytes apart) into
iovecs, and the iovecs into several sendmsg calls, so frame headers
straddle both iovecs and syscalls (as gRPC C-core's writes and any
reader's buffer boundaries do).
"""
import json
import socket
import struct
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def main():
    streams, hold_s = int(sys.argv[1]), float(sys.argv[2])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(json.dumps({"listening": "127.0.0.1:%d" % listener.getsockname()[1]}), flush=True)
    conn, _ = listener.accept()
    data = b""
    seen = set()
    while len(seen) < streams:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
        offset = len(PREFACE) if data.startswith(PREFACE) else 0
        seen.clear()
        while offset + 9 <= len(data):
            length = int.from_bytes(data[offset:offset + 3], "big")
            kind, stream = data[offset + 3], int.from_bytes(data[offset + 5:offset + 9], "big") & 0x7FFFFFFF
            if kind == 1 and stream % 2 == 1:
                seen.add(stream)
            offset += 9 + length
    conn.sendall(frame(4, 0, 0, b""))  # SETTINGS
    time.sleep(hold_s)
    answer = b"".join(
        frame(1, 0x4, s, b"\x88") + frame(0, 0, s, b"token") + frame(1, 0x5, s, b"\x40\x00")
        for s in sorted(seen)
    )
    if len(sys.argv) > 3 and sys.argv[3] == "scatter":
        cuts, offset, step = [], 0, 0
        while offset < len(answer):
            size = 1 + (step * 7) % 23
            cuts.append(answer[offset:offset + size])
            offset, step = offset + size, step + 1
        # 40 iovecs per call: more than one walker step budget's worth of
        # segments in some calls, a few bytes in others.
        for start in range(0, len(cuts), 40):
            batch = cuts[start:start + 40]
            sent = conn.sendmsg(batch)
            rest = b"".join(batch)[sent:]
            if rest:
                conn.sendall(rest)
    else:
        conn.sendall(answer)
    while conn.recv(65536):
        pass


if __name__ == "__main__":
    main()
