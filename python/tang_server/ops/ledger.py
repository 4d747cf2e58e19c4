"""The recovery ledger: which keys answered recoveries, how often, when, and (optionally) for which clients.

An SQLite database (`ledger.sqlite3` under `--state-dir`) in WAL mode. Nothing here runs on the request path:
each worker gathers its recoveries in memory (`usage.py`) and a background thread writes them in one transaction
every few seconds and at exit. Workers share the file; SQLite's locking serialises their transactions
(`busy_timeout` makes a writer wait for another rather than fail). A process killed with SIGKILL loses at most
the batch it had not committed: a transaction is atomic, so the file is never left half written.

The size is bounded: a row exists only for a key that was in the key set at some flush (random key ids in
requests never reach the ledger), a key absent from the key set for `retention_days` loses its row, and at most
`clients` addresses are kept per key (the most recent; 0 keeps none and erases those kept before).
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

FILE_NAME = "ledger.sqlite3"
SCHEMA_VERSION = 1
#: How long a writer waits for another worker's transaction before giving up (that batch is retried next time).
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    kid TEXT PRIMARY KEY,            -- S256 thumbprint
    hidden INTEGER NOT NULL,         -- as of the last flush that saw the key
    first_seen REAL NOT NULL,        -- first flush that saw the key in the key set: usage is known from here on
    last_seen REAL NOT NULL,         -- last flush that saw it (rows of keys long gone are pruned)
    hidden_since REAL,               -- first flush that saw it hidden; NULL while visible
    recoveries INTEGER NOT NULL DEFAULT 0,
    first_recovery REAL,
    last_recovery REAL
);
CREATE TABLE IF NOT EXISTS clients (
    kid TEXT NOT NULL,
    address TEXT NOT NULL,
    last_recovery REAL NOT NULL,
    PRIMARY KEY (kid, address)
);
"""


@dataclass
class Batch:
    """One key's recoveries gathered in memory since the last flush."""

    hidden: bool
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    #: address -> time of its last recovery, the most recent last (bounded by the caller).
    clients: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class KeyRecord:
    kid: str
    hidden: bool
    first_seen: float
    last_seen: float
    hidden_since: float | None
    recoveries: int
    first_recovery: float | None
    last_recovery: float | None
    #: The most recent client addresses first (empty when none are kept).
    clients: tuple[str, ...] = ()


def path_in(state_dir: Path | str) -> Path:
    return Path(state_dir) / FILE_NAME


class Ledger:
    """One worker's connection to the ledger, used by its flusher thread only (and `read` by anyone)."""

    def __init__(self, state_dir: Path | str, *, clients: int, retention_days: float) -> None:
        directory = Path(state_dir)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / FILE_NAME
        self.clients = clients
        self.retention_seconds = retention_days * 86400
        # Client addresses are personal data: the file is the service user's alone.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = _connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL loses no committed transaction when a process dies, only on power loss.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def write(
        self, present: Iterable[tuple[str, bool]], batch: Mapping[str, Batch], now: float
    ) -> dict[str, tuple[float | None, float | None]]:
        """One transaction: the keys present in the key set (kid, hidden), then the batch's recoveries.

        Returns (hidden since, last recovery) of each key present, as all workers together recorded them."""
        present = list(present)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO keys (kid, hidden, first_seen, last_seen, hidden_since) VALUES (?1, ?2, ?3, ?3, "
                "CASE WHEN ?2 THEN ?3 END) ON CONFLICT (kid) DO UPDATE SET hidden = ?2, "
                "last_seen = max(last_seen, ?3), hidden_since = CASE WHEN ?2 THEN coalesce(hidden_since, ?3) END",
                [(kid, int(hidden), now) for kid, hidden in present],
            )
            # Only rows that exist: a key that was never in a key set gets none.
            db.executemany(
                "UPDATE keys SET recoveries = recoveries + ?2, first_recovery = min(coalesce(first_recovery, ?3), ?3),"
                " last_recovery = max(coalesce(last_recovery, ?4), ?4) WHERE kid = ?1",
                [(kid, entry.count, entry.first, entry.last) for kid, entry in batch.items()],
            )
            if self.clients:
                for kid, entry in batch.items():
                    db.executemany(
                        "INSERT INTO clients (kid, address, last_recovery) SELECT ?1, ?2, ?3 WHERE EXISTS "
                        "(SELECT 1 FROM keys WHERE kid = ?1) ON CONFLICT (kid, address) DO UPDATE SET "
                        "last_recovery = max(last_recovery, ?3)",
                        [(kid, address, when) for address, when in entry.clients.items()],
                    )
                    db.execute(
                        "DELETE FROM clients WHERE kid = ?1 AND address NOT IN (SELECT address FROM clients "
                        "WHERE kid = ?1 ORDER BY last_recovery DESC, address LIMIT ?2)",
                        (kid, self.clients),
                    )
            else:
                db.execute("DELETE FROM clients")
            db.execute("DELETE FROM keys WHERE last_seen < ?", (now - self.retention_seconds,))
            db.execute("DELETE FROM clients WHERE kid NOT IN (SELECT kid FROM keys)")
            merged = {
                kid: (hidden_since, last)
                for kid, hidden_since, last in db.execute("SELECT kid, hidden_since, last_recovery FROM keys")
            }
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return {kid: merged[kid] for kid, _ in present if kid in merged}


def read(path: Path) -> dict[str, KeyRecord]:
    """Every key's record, by key id. Read-only: the CLI may read a ledger it could not write."""
    db = _connect(path, read_only=True)
    try:
        addresses: dict[str, list[str]] = {}
        for kid, address in db.execute("SELECT kid, address FROM clients ORDER BY last_recovery DESC, address"):
            addresses.setdefault(kid, []).append(address)
        rows = db.execute(
            "SELECT kid, hidden, first_seen, last_seen, hidden_since, recoveries, first_recovery, last_recovery "
            "FROM keys ORDER BY kid"
        ).fetchall()
    finally:
        db.close()
    return {
        kid: KeyRecord(
            kid, bool(hidden), first_seen, last_seen, hidden_since, count, first, last, tuple(addresses.get(kid, ()))
        )
        for kid, hidden, first_seen, last_seen, hidden_since, count, first, last in rows
    }


def _connect(path: Path, *, read_only: bool = False, check_same_thread: bool = True) -> sqlite3.Connection:
    uri = f"file:{urllib.parse.quote(str(path))}" + ("?mode=ro" if read_only else "")
    # isolation_level=None: transactions are begun explicitly, IMMEDIATE, so that two writers queue on the lock
    # (busy_timeout) instead of one failing when it upgrades a read transaction.
    db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                         check_same_thread=check_same_thread)  # fmt: skip
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return db
