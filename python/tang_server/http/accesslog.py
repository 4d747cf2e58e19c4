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
#: Escaped targets remembered (forgotten all at once beyond this: a client sending endless distinct targets).
MAX_REMEMBERED_TARGETS = 1024

_THOUSANDTHS = [f".{n:03d}" for n in range(1000)]
_UNDER_A_MILLISECOND = [f"0{thousandths}" for thousandths in _THOUSANDTHS]
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
        self._targets: dict[bytes, str] = {}  # raw target -> as logged
        self._timer = FlushTimer(flush_seconds, self.flush)
        atexit.register(self.flush)

    def record(self, client: str, method: str, target: bytes, version: str, status: int, seconds: float) -> None:
        entries = self._entries
        entries.append((time.time(), client, method, target, version, status, seconds))
        buffered = len(entries)
        if buffered == 1:
            self._timer.due()  # the first since the last flush: the timer writes it (and those after) in time
        elif buffered >= MAX_BUFFERED:
            self.flush()

    def flush(self) -> None:
        entries, self._entries = self._entries, []
        data = "".join(self._lines(entries)).encode("ascii", "backslashreplace")
        start = 0
        while start < len(data):
            # At most PIPE_BUF bytes per write, cut at a line's end (every line is shorter: MAX_TARGET).
            end = len(data)
            if end - start > select.PIPE_BUF:
                end = data.rfind(b"\n", start, start + select.PIPE_BUF) + 1 or end
            self._write(memoryview(data)[start:end])
            start = end

    def _lines(self, entries: list[Entry]) -> list[str]:
        lines = []
        second, second_text, millisecond, stamp = -1, "", -1, ""
        targets = self._targets
        for now, client, method, raw_target, version, status, seconds in entries:
            # Tables and texts kept from the line before instead of number formatting, which is most of a
            # line's cost: under load, tens of requests share a millisecond. One f-string per line.
            now_millisecond = int(now * 1000)
            if now_millisecond != millisecond:
                millisecond = now_millisecond
                if millisecond // 1000 != second:
                    second = millisecond // 1000
                    second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                stamp = second_text + _THOUSANDTHS[millisecond % 1000]
            microseconds = round(seconds * 1e6)
            duration = (
                _UNDER_A_MILLISECOND[microseconds]
                if microseconds < 1000
                else f"{microseconds // 1000}{_THOUSANDTHS[microseconds % 1000]}"
            )
            target = targets.get(raw_target) or self._target(raw_target)
            if self._json:
                lines.append(
                    f'{{"time":"{stamp}Z","client":"{client}","method":"{method}","target":"{target}",'
                    f'"http_version":"{version}","status":{_STATUS[status]},"duration_ms":{duration}}}\n'
                )
            else:
                lines.append(f'{stamp}Z {client} "{method} {target} HTTP/{version}" {_STATUS[status]} {duration}ms\n')
        return lines

    def _target(self, raw_target: bytes) -> str:
        """The request target as logged, remembered: a server sees the same few targets again and again."""
        target = raw_target[:MAX_TARGET].decode("latin-1")
        # Anything outside printable ASCII, quotes and backslashes is escaped: a line is always one line.
        if not (target.isascii() and target.isprintable()) or '"' in target or "\\" in target:
            target = json.dumps(target)[1:-1]
        if len(self._targets) >= MAX_REMEMBERED_TARGETS:
            self._targets.clear()
        self._targets[raw_target] = target
        return target

    def _write(self, data: memoryview) -> None:
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            pass  # a closed or full log must never take the server down
