"""A buffer's flush, run on the event loop at most once per interval (the access log, the held metrics)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class FlushTimer:
    """Runs `flush` `seconds` after the first `due()` since it last ran: one timer per batch, not per entry."""

    __slots__ = ("_flush", "_scheduled", "_seconds")

    def __init__(self, seconds: float, flush: Callable[[], None]) -> None:
        self._seconds = seconds
        self._flush = flush
        self._scheduled = False

    def due(self) -> None:
        """Something was buffered: flush it within `seconds` (called on the event loop's thread)."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self._seconds, self._run)

    def _run(self) -> None:
        self._scheduled = False
        self._flush()
