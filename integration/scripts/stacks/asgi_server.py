#!/usr/bin/env python3
"""A FastAPI app served by uvicorn (HTTP/1.1, vLLM's stack) or hypercorn
(HTTP/2 cleartext, prior knowledge), for the request probe's stack tests.

usage: asgi_server.py uvicorn|hypercorn
- GET /stream/FIRST_MS/CHUNKS/CHUNK_MS: a server-sent-events stream, the
  first event after FIRST_MS, then one every CHUNK_MS (as an LLM streams
  tokens; the paths match the Rust test tenant's).
Binds 127.0.0.1:0 itself and prints {"listening": "127.0.0.1:PORT"} before
handing the socket to the server.
"""
import asyncio
import json
import socket
import sys

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

app = FastAPI()


@app.get("/stream/{first_ms}/{chunks}/{chunk_ms}")
async def stream(first_ms: int, chunks: int, chunk_ms: int):
    async def events():
        await asyncio.sleep(first_ms / 1000)
        for index in range(chunks):
            if index > 0:
                await asyncio.sleep(chunk_ms / 1000)
            yield "data: token %d\n\n" % index

    return StreamingResponse(events(), media_type="text/event-stream")


def main():
    server_kind = sys.argv[1]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    print(json.dumps({"listening": "127.0.0.1:%d" % listener.getsockname()[1]}), flush=True)
    if server_kind == "uvicorn":
        import uvicorn

        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        server.run(sockets=[listener])
    elif server_kind == "hypercorn":
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = ["fd://%d" % listener.fileno()]
        config.loglevel = "WARNING"
        asyncio.run(serve(app, config))
    else:
        sys.exit("usage: asgi_server.py uvicorn|hypercorn")


if __name__ == "__main__":
    main()
