"""Request counts and durations held by a worker and written to prometheus-client's shared files in batches.

In multiprocess mode prometheus-client writes every update to a memory-mapped file under a lock: a request's
counter and histogram cost about 2 us, a tenth of an `/adv`. A worker instead appends each request's duration to a
list and writes the lists at most FLUSH_SECONDS later, one update per series and bucket touched. A scrape writes
the scraping worker's own first, so it shows that worker's requests at once and the other workers' at most
FLUSH_SECONDS late; a worker that exits normally writes what it holds, one killed with SIGKILL loses it.

Writing a batch into a histogram uses prometheus-client's internals (`_sum`, `_buckets`, `_upper_bounds`, unchanged
from 0.20 to 0.26): the declared range stops before the next version, and `tests/test_held_metrics.py` checks that
a batch gives exactly what `observe()` of each value gives.
"""

from __future__ import annotations

import atexit
import bisect
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tang_server.ops.flushtimer import FlushTimer

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

#: The longest a request waits in its worker before other workers' scrapes count it.
FLUSH_SECONDS = 1.0


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """What `histogram.observe(value)` for each of `values` does, with one write per bucket touched."""
    if not values:
        return
    bounds: Sequence[float] = histogram._upper_bounds
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1  # the first bound >= value, as observe() finds it
    histogram._sum.inc(sum(values))
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


class HeldRequests:
    """Answered requests by series, and exchange durations, until `flush` writes them.

    `answered` runs on the event loop thread only and starts the flush timer; `exchanged` also runs on exchange
    threads, hence its lock, and needs no timer of its own: every exchange is followed by its request's `answered`.
    """

    def __init__(self, series: Callable[[str, str, int], tuple[Counter, Histogram]], exchange: Histogram) -> None:
        self._series = series
        self._exchange = exchange
        self._answered: dict[tuple[str, str, int], list[float]] = {}
        self._exchanges: list[float] = []
        self._exchanges_lock = threading.Lock()
        self._timer = FlushTimer(FLUSH_SECONDS, self.flush)
        atexit.register(self.flush)

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        held = self._answered.get((route, method, status))
        if held is None:
            held = self._answered[route, method, status] = []
        held.append(seconds)
        self._timer.due()

    def exchanged(self, seconds: float) -> None:
        with self._exchanges_lock:
            self._exchanges.append(seconds)

    def flush(self) -> None:
        answered, self._answered = self._answered, {}
        with self._exchanges_lock:
            exchanges, self._exchanges = self._exchanges, []
        for (route, method, status), durations in answered.items():
            counter, histogram = self._series(route, method, status)
            counter.inc(len(durations))
            observe_all(histogram, durations)
        observe_all(self._exchange, exchanges)
