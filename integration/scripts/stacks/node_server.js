// Node.js servers for the request probe's stack tests: the built-in `http`
// module (HTTP/1.1) or `http2` (nghttp2, cleartext with prior knowledge).
//
// usage: node node_server.js http|http2
// GET /stream/FIRST_MS/CHUNKS/CHUNK_MS streams server-sent events: the first
// after FIRST_MS, then one every CHUNK_MS (the Rust test tenant's paths).
// Prints {"listening": "127.0.0.1:PORT"} once listening.
"use strict";
const kind = process.argv[2];

function streamSpec(path) {
  const match = /^\/stream\/(\d+)\/(\d+)\/(\d+)$/.exec(path || "");
  return match ? match.slice(1).map(Number) : null;
}

// Writes the events through `write`, then calls `end`.
function streamEvents([firstMs, chunks, chunkMs], write, end) {
  let index = 0;
  const next = () => {
    if (index === chunks) return end();
    write(`data: token ${index}\n\n`);
    index += 1;
    setTimeout(next, chunkMs);
  };
  setTimeout(next, firstMs);
}

let server;
if (kind === "http") {
  server = require("http").createServer((req, res) => {
    const spec = streamSpec(req.url);
    if (!spec) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": "text/event-stream" });
    res.flushHeaders();
    streamEvents(spec, (chunk) => res.write(chunk), () => res.end());
  });
} else if (kind === "http2") {
  server = require("http2").createServer();
  server.on("stream", (stream, headers) => {
    const spec = streamSpec(headers[":path"]);
    if (!spec) {
      stream.respond({ ":status": 404 }, { endStream: true });
      return;
    }
    stream.respond({ ":status": 200, "content-type": "text/event-stream" });
    streamEvents(spec, (chunk) => stream.write(chunk), () => stream.end());
  });
} else {
  console.error("usage: node node_server.js http|http2");
  process.exit(2);
}
server.listen(0, "127.0.0.1", () => {
  console.log(JSON.stringify({ listening: `127.0.0.1:${server.address().port}` }));
});
