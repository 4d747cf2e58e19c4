"""The access log: one line per request, cheap enough for a boot storm.

uvicorn's access log goes through the logging module and one unbuffered write per request, which measured at
about 45 microseconds per request: as much as the whole HTTP layer. Here a request only appends its fields to a
list; lines are formatted together, with a timestamp text per second, when the buffer is written: at most every
`flush_seconds`, and when MAX_BUFFERED requests are waiting. Formatting in one loop costs less than a call per
request, and the batch bounds how long the loop is busy writing. The text goes out in chunks of at most PIPE_BUF
bytes cut at line ends, so that the lines of several worker processes sharing one pipe never interleave. Lines
still buffered when a worker is killed with SIGKILL are lost; a normal exit flushes them.

Lines carry the timestamp (UTC, milliseconds), client address, method, request target, HTTP version, status and
duration, never a body or a header, so never key material: key ids in paths are public thumbprints.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import time

from tang_server.ops.flushtimer import FlushTimer

FORMATS = ("plain", "json")

#: Requests buffered before their lines are written without waiting for the flush timer.
MAX_BUFFERED = 256
#: The longest request target logged, in bytes (a Tang target is at most about 60).
MAX_TARGET = 256

_THOUSANDTHS = [f".{n:03d}" for n in range(1000)]
_STATUS = [str(n) for n in range(600)]

#: One request: wall-clock time, client address, method, target as sent, HTTP version, status, seconds taken.
Entry = tuple[float, str, str, bytes, str, int, float]


class AccessLog:
    def __init__(self, fd: int = 2, *, fmt: str = "plain", flush_seconds: float = 0.2) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format must be one of {FORMATS}")
        self._fd = fd
        self._json = fmt == "json"
        self._entries: list[Entry] = []
        self._timer = FlushTimer(flush_seconds, self.flush)
        atexit.register(self.flush)

    def record(self, client: str, method: str, target: bytes, version: str, status: int, seconds: float) -> None:
        entries = self._entries
        entries.append((time.time(), client, method, target, version, status, seconds))
        if len(entries) >= MAX_BUFFERED:
            self.flush()
        else:
            self._timer.due()

    def flush(self) -> None:
        entries, self._entries = self._entries, []
        chunk: list[str] = []
        size = 0
        for line in self._lines(entries):
            if chunk and size + len(line) > select.PIPE_BUF:
                self._write("".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write("".join(chunk))

    def _lines(self, entries: list[Entry]) -> list[str]:
        lines = []
        second, second_text = -1, ""
        for now, client, method, raw_target, version, status, seconds in entries:
            if int(now) != second:
                second = int(now)
                second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            # Tables instead of number formatting, which is most of a line's cost.
            stamp = second_text + _THOUSANDTHS[int((now - second) * 1000)] + "Z"
            microseconds = round(seconds * 1e6)
            duration = str(microseconds // 1000) + _THOUSANDTHS[microseconds % 1000]
            target = raw_target[:MAX_TARGET].decode("latin-1")
            # Anything outside printable ASCII, quotes and backslashes is escaped: a line is always one line.
            if not (target.isascii() and target.isprintable()) or '"' in target or "\\" in target:
                target = json.dumps(target)[1:-1]
            if self._json:
                lines.append(
                    f'{{"time":"{stamp}","client":"{client}","method":"{method}","target":"{target}",'
                    f'"http_version":"{version}","status":{_STATUS[status]},"duration_ms":{duration}}}\n'
                )
            else:
                lines.append(f'{stamp} {client} "{method} {target} HTTP/{version}" {_STATUS[status]} {duration}ms\n')
        return lines

    def _write(self, text: str) -> None:
        data = text.encode("ascii", "backslashreplace")
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            pass  # a closed or full log must never take the server down
