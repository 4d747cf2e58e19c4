"""Which keys answer recoveries, gathered per worker process and written out off the request path.

On the request path a recovery costs one dictionary update under a lock that only the flusher thread also takes,
for the instant it swaps the batch out. Every `flush_seconds`, and at exit, the flusher thread adds the batch to
the metrics (`tang_recoveries_total{kid,visibility}`, the last recovery time, recoveries for unknown key ids) and,
when there is a ledger, writes it there in one transaction. The client address of each recovery, when known,
is kept only until that flush, which hashes it into the key's sketch of distinct clients (`distinct.py`:
`tang_key_clients{kid,visibility}`, over the last 23 to 24 hours).

Metric labels are only ever the S256 thumbprints of keys the worker has loaded: the key id a client sends
becomes a label only through `KeySet.find`, which answers for loaded keys. A recovery asking for a key id that
matches no key is counted without its id; the id and the client's address are in that request's access-log line.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tang_server.ops import distinct
from tang_server.ops.ledger import Batch, Ledger
from tang_server.ops.ledger import read as read_ledger

if TYPE_CHECKING:
    from tang_server.keys.keyset import Key, KeySet
    from tang_server.ops.metrics import Metrics

logger = logging.getLogger(__name__)

#: With no recovery to write and the same keys, the ledger is written this rarely (to record that keys are still
#: present: `keys.last_seen`), not at every flush.
IDLE_WRITE_SECONDS = 300.0

#: What the access policy says when it does not know the client's address (no peer address, as on a Unix socket).
_UNKNOWN_CLIENTS = frozenset(("", "-"))

#: A key id quoted in a log line is cut to this length (the route allows ids up to the target length limit).
_LOGGED_ID_CHARACTERS = 100


class Usage:
    def __init__(
        self,
        keyset: Callable[[], KeySet],
        metrics: Metrics | None,
        ledger: Ledger | None,
        *,
        clients: int,
        flush_seconds: float,
    ) -> None:
        self._keyset = keyset
        self.metrics = metrics
        self.ledger = ledger
        self.clients = clients if ledger is not None else 0  # addresses are kept only to be written
        self.flush_seconds = flush_seconds
        self.started = time.time()
        self._lock = threading.Lock()
        self._batch: dict[str, Batch] = {}
        self._unknown = 0
        self._unknown_example: tuple[str, str] | None = None
        #: (key id, client address) of the recoveries since the last flush: hashed into `window` by the flusher.
        self._addresses: dict[tuple[str, str], None] = {}
        #: Distinct clients per key, this worker's share (merged with the others' by the metrics).
        self.window = distinct.Window()
        directory = metrics.directory if metrics is not None else None
        self._hash = distinct.Hasher(distinct.shared_secret(directory))
        if directory is not None:
            distinct.adopt(directory, os.getpid(), self.window)
        self._window_hour: int | None = None
        #: Ledger batches that could not be written yet (the file locked too long, a full disk): kept and retried.
        self._unwritten: dict[str, Batch] = {}
        self._written: tuple[list[tuple[str, bool]], float, dict[str, tuple[float | None, float | None]]] = ([], 0, {})
        self._flushing = threading.Lock()
        #: Without a ledger: when this worker first saw each key hidden.
        self._hidden_seen: dict[str, float] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tang-usage", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def recovered(self, key: Key, client: str) -> None:
        """A recovery answered with `key` for `client` (request path: no I/O; a client's address is hashed by the
        flusher, not here)."""
        now = time.time()
        with self._lock:
            entry = self._batch.get(key.kid)
            if entry is None:
                entry = self._batch[key.kid] = Batch(key.hidden, first=now)
            entry.count += 1
            entry.last = now
            entry.hidden = key.hidden
            self._addresses[key.kid, client] = None
            if self.clients:
                kept = entry.clients
                kept.pop(client, None)  # re-inserted last: the dict's order is recency
                kept[client] = now
                if len(kept) > self.clients:
                    del kept[next(iter(kept))]

    def unknown(self, key_id: str, client: str) -> None:
        """A well-formed recovery for a key id that matches no key (request path)."""
        with self._lock:
            self._unknown += 1
            self._unknown_example = (key_id, client)

    def flush(self) -> None:
        with self._flushing:
            with self._lock:
                batch, self._batch = self._batch, {}
                unknown, self._unknown = self._unknown, 0
                example, self._unknown_example = self._unknown_example, None
                addresses, self._addresses = self._addresses, {}
            now = time.time()
            keyset = self._keyset()
            present = [(key.kid, key.hidden) for key in keyset.keys]
            if unknown and example is not None:
                logger.warning(
                    "%d recoveries asked for key ids that match no key, the last %s from %s: a machine bound to a "
                    "deleted key, or to another server, cannot unlock",
                    unknown, example[0][:_LOGGED_ID_CHARACTERS], example[1],
                )  # fmt: skip
            merged = self._write_ledger(present, batch, now)
            if self.metrics is not None:
                self._count_clients(addresses, now)  # before the counts: a scrape never sees a count without it
                self.metrics.usage_flushed(batch, unknown, self._hidden_since(present, merged, now), merged)

    def _count_clients(self, addresses: dict[tuple[str, str], None], now: float) -> None:
        by_key: dict[str, list[int]] = {}
        for kid, client in addresses:
            if client not in _UNKNOWN_CLIENTS:
                by_key.setdefault(kid, []).append(self._hash(client))
        for kid, hashes in by_key.items():
            self.window.add(kid, hashes, now)
        hour = distinct.hour_of(now)
        if (by_key or hour != self._window_hour) and self.metrics is not None:
            self.metrics.clients_flushed(self.window, now)
            self._window_hour = hour

    def _write_ledger(
        self, present: list[tuple[str, bool]], batch: dict[str, Batch], now: float
    ) -> dict[str, tuple[float | None, float | None]]:
        if self.ledger is None:
            return {}
        for kid, entry in batch.items():
            _merge(self._unwritten, kid, entry, self.clients)
        last_present, last_time, last_merged = self._written
        if not self._unwritten and present == last_present and now - last_time < IDLE_WRITE_SECONDS:
            return last_merged  # nothing new: spare the disk a write every few seconds
        try:
            merged = self.ledger.write(present, self._unwritten, now)
        except Exception:
            logger.exception("could not write the recovery ledger %s; retrying at the next flush", self.ledger.path)
            return last_merged
        self._unwritten = {}
        self._written = (present, now, merged)
        return merged

    def _hidden_since(
        self, present: list[tuple[str, bool]], merged: dict[str, tuple[float | None, float | None]], now: float
    ) -> dict[str, float]:
        """Since when each hidden key is hidden: the ledger's record, else when this worker first saw it so."""
        since = {}
        for kid, hidden in present:
            if not hidden:
                self._hidden_seen.pop(kid, None)
                continue
            recorded = merged.get(kid, (None, None))[0]
            since[kid] = recorded if recorded is not None else self._hidden_seen.setdefault(kid, now)
        return since

    def report(self) -> dict[str, Any]:
        """Per-key usage of this replica, public information only (no client addresses): `/status`."""
        keyset = self._keyset()
        visibility = keyset.visibility()
        rows: list[dict[str, Any]] = []
        # Estimated distinct clients of the last 23 to 24 hours (`distinct.py`), every worker merged; None for a key
        # no longer loaded.
        estimated = self.metrics.distinct_clients() if self.metrics is not None else {}
        clients = {kid: estimate for kid, (_, estimate) in estimated.items()}
        if self.ledger is not None:
            for kid, record in read_ledger(self.ledger.path).items():
                rows.append({
                    "kid": kid,
                    "visibility": visibility.get(kid, "absent"),
                    "recoveries": record.recoveries,
                    "first_recovery": record.first_recovery,
                    "last_recovery": record.last_recovery,
                    "since": record.first_seen,
                    "hidden_since": record.hidden_since,
                    "clients": round(clients.get(kid, 0)) if kid in visibility else None,
                })  # fmt: skip
            return {"source": "ledger", "keys": rows}
        totals = self.metrics.recovery_totals() if self.metrics is not None else {}
        for kid in sorted(visibility.keys() | totals.keys()):
            count, last = totals.get(kid, (0, None))
            rows.append({
                "kid": kid,
                "visibility": visibility.get(kid, "absent"),
                "recoveries": count,
                "first_recovery": None,
                "last_recovery": last,
                # No ledger: counted since this worker started at the earliest (its metrics may be older).
                "since": self.started,
                "hidden_since": self._hidden_seen.get(kid),
                "clients": round(clients.get(kid, 0)) if kid in visibility else None,
            })  # fmt: skip
        return {"source": "metrics", "keys": rows}

    def close(self) -> None:
        """Stop the flusher and write what is left (at exit)."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.flush_seconds + 30)
        try:
            self.flush()
        finally:
            if self.ledger is not None:
                self.ledger.close()
                self.ledger = None

    def _run(self) -> None:
        while not self._stopping.wait(self.flush_seconds):
            try:
                self.flush()
            except Exception:
                logger.exception("could not flush the recovery usage")


def _merge(into: dict[str, Batch], kid: str, entry: Batch, clients: int) -> None:
    kept = into.get(kid)
    if kept is None:
        into[kid] = entry
        return
    kept.count += entry.count
    kept.first = min(kept.first, entry.first)
    kept.last = max(kept.last, entry.last)
    kept.hidden = entry.hidden
    for address, when in entry.clients.items():
        kept.clients.pop(address, None)
        kept.clients[address] = when
    while len(kept.clients) > clients:
        del kept.clients[next(iter(kept.clients))]
