"""The access log: one line per request, cheap enough for a boot storm.

uvicorn's access log goes through the logging module and one unbuffered write per request, which measured at
about 45 microseconds per request: as much as the whole HTTP layer. Here a line is formatted with a timestamp
cached per second, appended to a buffer, and the buffer is written at most every `flush_seconds` (and when it
fills), in chunks of at most PIPE_BUF bytes cut at line ends, so that the lines of several worker processes
sharing one pipe never interleave. Lines still buffered when a worker is killed with SIGKILL are lost; a normal
exit flushes them.

Lines carry the timestamp (UTC, milliseconds), client address, method, request target, HTTP version, status and
duration, never a body or a header, so never key material: key ids in paths are public thumbprints.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import re
import select
import time

FORMATS = ("plain", "json")

# Anything outside printable ASCII, quotes and backslashes is escaped, so a line is always one parseable line.
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


class AccessLog:
    def __init__(self, fd: int = 2, *, fmt: str = "plain", flush_seconds: float = 0.2) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {FORMATS}")
        self._fd = fd
        self._json = fmt == "json"
        self._flush_seconds = flush_seconds
        self._lines: list[str] = []
        self._size = 0
        self._flush_scheduled = False
        self._second = -1
        self._second_text = ""
        atexit.register(self.flush)

    def record(self, client: str, method: str, target: str, version: str, status: int, seconds: float) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        stamp = f"{self._second_text}.{int((now - second) * 1000):03d}Z"
        if _UNSAFE.search(target):
            target = json.dumps(target)[1:-1]
        if self._json:
            line = (
                f'{{"time":"{stamp}","client":"{client}","method":"{method}","target":"{target}",'
                f'"http_version":"{version}","status":{status},"duration_ms":{seconds * 1000:.3f}}}\n'
            )
        else:
            line = f'{stamp} {client} "{method} {target} HTTP/{version}" {status} {seconds * 1000:.3f}ms\n'
        self._lines.append(line)
        self._size += len(line)
        if self._size >= 16 * select.PIPE_BUF:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(self._flush_seconds, self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        lines, self._lines, self._size = self._lines, [], 0
        chunk: list[str] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) > select.PIPE_BUF:
                self._write("".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write("".join(chunk))

    def _write(self, text: str) -> None:
        data = text.encode("ascii", "backslashreplace")
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            pass  # a closed or full log must never take the server down
