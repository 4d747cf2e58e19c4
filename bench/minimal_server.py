"""How close can Python get to the multiplication? The leanest HTTP/1.1 server on httptools and uvloop.

    taskset -c 1 python bench/minimal_server.py KEYS_DIR PORT
    WRK_BODY_FILE=client.json taskset -c 0 wrk -t1 -c16 -d5s -s bench/wrk_report.lua http://127.0.0.1:PORT/rec/KID

Not a server to run: it answers every request as a `/rec` with the same `recover()` as ours, and does nothing
else (no routing, limits, deadlines, metrics, logs or error handling). Its rate against the pure multiplication
rate is the ceiling of any Python HTTP layer on the machine: on the development machine 0.83, below the issue's
0.85 target for ours.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httptools
import uvloop

from tang_server.keys.keyset import load_keyset
from tang_server.keys.recovery import recover


class MinimalProtocol(asyncio.Protocol):
    def __init__(self, keyset: object) -> None:
        self.keyset = keyset
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        thumbprint = self.url.rsplit(b"/", 1)[-1].decode()
        status, answer = recover(self.keyset, thumbprint, b"".join(self.body))  # type: ignore[arg-type]
        self.url, self.body = b"", []
        head = b"HTTP/1.1 %d OK\r\ncontent-length: %d\r\ncontent-type: application/jwk+json\r\n\r\n"
        self.transport.write(head % (status, len(answer)) + answer)  # type: ignore[attr-defined]


async def serve(keys: Path, port: int) -> None:
    keyset = load_keyset(keys)
    server = await asyncio.get_running_loop().create_server(lambda: MinimalProtocol(keyset), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(Path(sys.argv[1]), int(sys.argv[2])))
