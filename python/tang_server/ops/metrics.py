"""Prometheus metrics, correct across uvicorn's worker processes.

Every worker writes its samples to memory-mapped files in a directory shared by the workers (prometheus-client's
multiprocess mode); `/metrics`, answered by whichever worker the connection reaches, merges them all. The server
creates and empties that directory before the workers start, and the files of workers that died are marked dead
before each scrape, so live gauges never report a worker that no longer exists. Distinct clients per key cannot
be a per-worker gauge (estimates do not add up): each worker writes its HyperLogLog sketches to a file of its own
in the same directory and the scrape merges them (`distinct.py`, `ClientsCollector`). Request counts and durations,
updated on every request, are held by the worker and written in batches (`held.py`).

Import this module only after `PROMETHEUS_MULTIPROC_DIR` is set: prometheus-client decides at import time
whether values live in files.
"""

from __future__ import annotations

import gzip
import os
import re
import threading
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from tang_server import __version__
from tang_server._native import ENGINE
from tang_server.http.responses import Answer
from tang_server.ops import distinct, held
from tang_server.settings import MULTIPROCESS_ENVIRONMENT

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

    from tang_server.keys.keyset import KeySet
    from tang_server.ops.ledger import Batch


#: Sub-millisecond resolution at the bottom (an /adv is tens of microseconds), seconds at the top (overload).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_PID_FILE = re.compile(r".*_(\d+)\.db$")


class Metrics:
    def __init__(self) -> None:
        self.directory = os.environ.get(MULTIPROCESS_ENVIRONMENT)
        # Label lookups cost as much as an update; the label sets are few (routes x methods x statuses).
        self._answered: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        own = CollectorRegistry()
        self.requests = Counter(
            "tang_http_requests",
            "HTTP requests answered, by route template and status.",
            ["route", "method", "status"],
            registry=own,
        )
        self.duration = Histogram(
            "tang_http_request_duration_seconds",
            "Time to answer a request, by route template.",
            ["route"],
            buckets=BUCKETS,
            registry=own,
        )
        self.exchange = Histogram(
            "tang_recovery_exchange_duration_seconds",
            "The /rec work without HTTP: request validation and the P-521 multiplication.",
            buckets=BUCKETS,
            registry=own,
        )
        self.shed = Counter(
            "tang_recovery_shed",
            "Recoveries answered 503 with Retry-After because they had queued longer than --max-queue-ms.",
            registry=own,
        )
        self.in_flight = Gauge(
            "tang_http_requests_in_flight", "Requests being answered.", multiprocess_mode="livesum", registry=own
        )
        self.keys = Gauge(
            "tang_keys",
            "Keys loaded, by visibility and kind, per worker.",
            ["visibility", "kind"],
            multiprocess_mode="liveall",
            registry=own,
        )
        self.keyset_info = Gauge(
            "tang_keyset_info",
            "1 for the key-set digest a worker serves (0 for digests it served before).",
            ["digest"],
            multiprocess_mode="liveall",
            registry=own,
        )
        self.last_reload = Gauge(
            "tang_keyset_last_reload_timestamp_seconds",
            "When the worker last loaded its key directory.",
            multiprocess_mode="liveall",
            registry=own,
        )
        self.ready = Gauge(
            "tang_keyset_ready",
            "1 when the worker's key set can serve clients (visible signing and exchange key).",
            multiprocess_mode="liveall",
            registry=own,
        )
        self.reload_failures = Counter(
            "tang_keyset_reload_failures",
            "Key directory reads that failed (the previous set kept serving).",
            registry=own,
        )
        self.build_info = Gauge(
            "tang_build_info",
            "Version and P-521 engine.",
            ["version", "engine"],
            multiprocess_mode="livemax",
            registry=own,
        )
        self.build_info.labels(__version__, ENGINE).set(1)
        # Usage by key (`usage.py`, added every few seconds). The kid label is only ever the S256 thumbprint of a
        # loaded key: a key id from a request that matches no key is counted in `unknown_key`, without its value.
        self.recoveries = Counter(
            "tang_recoveries",
            "Recoveries answered, by the S256 thumbprint and visibility of the key used.",
            ["kid", "visibility"],
            registry=own,
        )
        self.last_recovery = Gauge(
            "tang_key_last_recovery_timestamp_seconds",
            "When a key last answered a recovery (from the ledger when there is one: survives restarts).",
            ["kid", "visibility"],
            multiprocess_mode="max",
            registry=own,
        )
        self.hidden_since = Gauge(
            "tang_key_hidden_since_timestamp_seconds",
            "Since when a hidden key is hidden: as first recorded in the ledger, else first seen by the worker.",
            ["kid"],
            multiprocess_mode="livemin",
            registry=own,
        )
        self.unknown_key = Counter(
            "tang_recovery_unknown_key",
            "Well-formed recoveries (404) for a key id that matches no key: machines that cannot unlock.",
            registry=own,
        )
        self._held = held.HeldRequests(self._series, self.exchange)
        self._digest: str | None = None
        #: Visibility by key id of the worker's current key set: the only key ids `tang_key_clients` shows.
        self._visibility: dict[str, str] = {}
        #: Without a multiprocess directory: the one worker's window of distinct clients (`usage.Usage`).
        self._window: distinct.Window | None = None
        self._sketch_cache: distinct.Cache = {}
        self._sketch_lock = threading.Lock()
        if self.directory is not None:
            exposition = CollectorRegistry()
            multiprocess.MultiProcessCollector(exposition, path=self.directory)  # type: ignore[no-untyped-call]
        else:
            exposition = own
        exposition.register(ClientsCollector(self))
        self._registry = exposition

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        """Counts one answered request and its duration (written within `held.FLUSH_SECONDS`)."""
        self._held.answered(route, method, status, seconds)

    def exchanged(self, seconds: float) -> None:
        """Times one `/rec` exchange (written within `held.FLUSH_SECONDS`)."""
        self._held.exchanged(seconds)

    def _series(self, route: str, method: str, status: int) -> tuple[Counter, Histogram]:
        key = (route, method, status)
        series = self._answered.get(key)
        if series is None:
            series = self._answered[key] = (self.requests.labels(route, method, status), self.duration.labels(route))
        return series

    def keyset_loaded(self, keyset: KeySet) -> None:
        """Called by the key store each time it swaps a set in."""
        if keyset.digest != self._digest:
            if self._digest is not None:
                # Multiprocess files cannot forget a label set, so the old digest is kept at 0.
                self.keyset_info.labels(self._digest).set(0)
            self.keyset_info.labels(keyset.digest).set(1)
            self._digest = keyset.digest
        for hidden in (False, True):
            for kind in ("signing", "exchange"):
                count = sum(key.hidden == hidden and key.kind.value == kind for key in keyset.keys)
                self.keys.labels("hidden" if hidden else "visible", kind).set(count)
        self.ready.set(1 if keyset.ready else 0)
        self.last_reload.set(time.time())
        self._visibility = keyset.visibility()

    def usage_flushed(
        self,
        batch: Mapping[str, Batch],
        unknown: int,
        hidden_since: Mapping[str, float],
        recorded: Mapping[str, tuple[float | None, float | None]],
    ) -> None:
        """A worker's recoveries since the last flush (`usage.Usage`); `recorded`: the ledger's (hidden since,
        last recovery) by key, empty without a ledger."""
        for kid, entry in batch.items():
            visibility = "hidden" if entry.hidden else "visible"
            self.recoveries.labels(kid, visibility).inc(entry.count)
            self.last_recovery.labels(kid, visibility).set(entry.last)
        for kid, (_, last) in recorded.items():
            if last is not None:
                visibility = "hidden" if kid in hidden_since else "visible"
                self.last_recovery.labels(kid, visibility).set(last)
        for kid, since in hidden_since.items():
            self.hidden_since.labels(kid).set(since)
        if unknown:
            self.unknown_key.inc(unknown)

    def clients_flushed(self, window: distinct.Window, now: float) -> None:
        """A worker's window of distinct clients changed (`usage.Usage`): written for the other workers' scrapes."""
        if self.directory is None:
            self._window = window
        else:
            distinct.save(self.directory, os.getpid(), window, now)

    def distinct_clients(self, now: float | None = None) -> dict[str, tuple[str, float]]:
        """(visibility, estimated distinct client addresses over the window) by key id, every worker merged; key
        ids of the current key set only."""
        now = time.time() if now is None else now
        visibility = self._visibility
        if self.directory is None:
            found = self._window.estimates(now) if self._window is not None else {}
        else:
            with self._sketch_lock:
                sketches = distinct.gather(self.directory, now, _alive, self._sketch_cache)
            found = distinct.estimates(sketches)
        return {kid: (visibility[kid], estimate) for kid, estimate in found.items() if kid in visibility}

    def recovery_totals(self) -> dict[str, tuple[int, float | None]]:
        """(recoveries, last recovery) by key id, over every worker of this server (what `/metrics` shows)."""
        counts: dict[str, int] = {}
        last: dict[str, float] = {}
        for family in self._registry.collect():
            for sample in family.samples:
                kid = sample.labels.get("kid")
                if kid is None:
                    continue
                if sample.name == "tang_recoveries_total":
                    counts[kid] = counts.get(kid, 0) + int(sample.value)
                elif sample.name == "tang_key_last_recovery_timestamp_seconds":
                    last[kid] = max(last.get(kid, 0.0), sample.value)
        return {kid: (counts.get(kid, 0), last.get(kid)) for kid in counts.keys() | last.keys()}

    def reload_failed(self) -> None:
        self.reload_failures.inc()

    def exposition(self, headers: Iterable[tuple[bytes, bytes]]) -> Answer:
        """/metrics in the format the scraper asks for (Accept: OpenMetrics or text), gzipped if it accepts that."""
        self._held.flush()  # this worker's requests at once; the others' within held.FLUSH_SECONDS
        if self.directory is not None:
            self._mark_dead_workers()
        request = {name: value.decode("latin-1") for name, value in headers}
        encoder, content_type = choose_encoder(request.get(b"accept", ""))
        body = encoder(self._registry)
        if "gzip" not in request.get(b"accept-encoding", ""):
            return Answer(200, body, content_type.encode())
        return Answer(200, gzip.compress(body), content_type.encode(), ((b"content-encoding", b"gzip"),))

    def _mark_dead_workers(self) -> None:
        """Workers replaced by uvicorn leave files behind; their live gauges must stop counting."""
        assert self.directory is not None
        pids = set()
        for name in os.listdir(self.directory):
            found = _PID_FILE.match(name)
            if found:
                pids.add(int(found.group(1)))
        for pid in pids:
            if not _alive(pid):
                multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]


class ClientsCollector:
    """`tang_key_clients{kid,visibility}` at scrape time, from every worker's sketches."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        for kid, (visibility, estimate) in sorted(self._metrics.distinct_clients().items()):
            family.add_metric([kid, visibility], round(estimate))
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "tang_key_clients",
            f"Distinct client addresses that recovered with a key during the current clock hour or the "
            f"{distinct.HOURS - 1} before it, estimated (HyperLogLog, relative error about "
            f"{distinct.STANDARD_ERROR:.1%}); clients of unknown address are not counted.",
            labels=["kid", "visibility"],
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
