"""The recovery ledger: exact counts across workers and restarts, never corrupt under SIGKILL, bounded in size."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tang_server.ops import ledger
from tang_server.ops.ledger import Batch, Ledger

from .support import Server, client_key, load_keys, our_server, raw_request, thumbprint

#: Bounds a wait for something the server does every fraction of a second; never a measured duration.
DEADLINE = 30.0

FAST_FLUSH = ("--usage-flush-seconds", "0.1")


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def recover(server: Server, kid: str, client: str = "", expect: int = 200) -> None:
    """One real recovery (a fresh client point) for `kid`; `client`: an X-Forwarded-For address."""
    body = json.dumps(client_key()).encode()
    forwarded = f"X-Forwarded-For: {client}\r\n" if client else ""
    head = (f"POST /rec/{kid} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{forwarded}"
            f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
    answer = raw_request(server.port, head.encode() + body)
    assert answer.startswith(f"HTTP/1.1 {expect} ".encode()), answer[:100]


def exchange_kid(keys: Path) -> str:
    return thumbprint(load_keys(keys)[1])


def records(state: Path) -> dict[str, ledger.KeyRecord]:
    return ledger.read(ledger.path_in(state))


def test_counts_exact_across_workers_and_restarts(keys: Path, tmp_path: Path) -> None:
    """Every recovery answered is in the ledger once SIGTERM'd workers have exited, and stays after a restart."""
    state = tmp_path / "state"
    kid = exchange_kid(keys)
    options = ("--state-dir", str(state), "--trusted-proxy", "127.0.0.1/32", "--ledger-clients", "3")
    with our_server(keys, tmp_path / "one.log", *options, workers=2) as server:
        for number in range(20):
            recover(server, kid, f"192.0.2.{number % 4}")
    first = records(state)[kid]
    assert first.recoveries == 20
    assert first.first_recovery is not None and first.last_recovery is not None
    assert first.first_recovery <= first.last_recovery
    # The three most recent distinct clients (19 -> .3, 18 -> .2, 17 -> .1), most recent first.
    assert first.clients == ("192.0.2.3", "192.0.2.2", "192.0.2.1")
    with our_server(keys, tmp_path / "two.log", *options, workers=2) as server:
        for _ in range(5):
            recover(server, kid, "198.51.100.7")
    second = records(state)[kid]
    assert second.recoveries == 25
    assert second.first_recovery == first.first_recovery
    assert second.last_recovery is not None and second.last_recovery > first.last_recovery
    assert second.clients[0] == "198.51.100.7" and len(second.clients) == 3
    assert second.first_seen == first.first_seen  # the ledger has known this key since the first run


def test_worker_killed_during_flushes_leaves_a_sound_ledger(keys: Path, tmp_path: Path) -> None:
    """SIGKILL a worker again and again while both flush every 10 ms: the database stays intact, and the
    recoveries counted never exceed those answered."""
    state = tmp_path / "state"
    kid = exchange_kid(keys)
    answered = 0
    with our_server(keys, tmp_path / "server.log", "--state-dir", str(state), "--usage-flush-seconds", "0.01",
                    workers=2) as server:  # fmt: skip
        for _ in range(6):
            for _ in range(10):
                recover(server, kid)
                answered += 1
            status = json.loads(raw_request(server.port, b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n")
                                .partition(b"\r\n\r\n")[2])  # fmt: skip
            os.kill(status["pid"], signal.SIGKILL)  # a worker, replaced by the supervisor
            eventually(lambda: _answers(server), "a worker answers again")
    with sqlite3.connect(ledger.path_in(state)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    counted = records(state)[kid].recoveries
    assert 0 < counted <= answered


def _answers(server: Server) -> bool:
    try:
        return raw_request(server.port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(
            b"HTTP/1.1 200"
        )
    except OSError:
        return False


WRITER = """
import sys
from tang_server.ops.ledger import Batch, Ledger
ledger = Ledger(sys.argv[1], clients=2, retention_days=90)
total = 0
while True:
    batch = {f"k{i}": Batch(False, count=7, first=1.0, last=2.0, clients={f"a{total % 5}": 2.0}) for i in range(50)}
    ledger.write([(f"k{i}", False) for i in range(50)], batch, 3.0)
    total += 7
    print(total, flush=True)
"""


def test_sigkill_mid_transaction_loses_at_most_the_batch(tmp_path: Path) -> None:
    """A writer committing large batches back to back, killed at random moments: every time, the file passes
    `PRAGMA integrity_check` and holds exactly the batches committed, or one more (killed after the commit
    and before it said so)."""
    state = tmp_path / "state"
    rng = random.Random(15)  # noqa: S311 - reproducible kill moments, not secrets
    before = 0
    for _ in range(20):
        with subprocess.Popen([sys.executable, "-c", WRITER, str(state)], stdout=subprocess.PIPE, text=True) as writer:
            assert writer.stdout is not None
            said = 0
            for _ in range(rng.randint(3, 40)):
                said = int(writer.stdout.readline())
            time.sleep(rng.random() / 200)  # somewhere in a later batch
            writer.send_signal(signal.SIGKILL)
            rest = writer.stdout.read().split()  # what it had printed before dying
        said = int(rest[-1]) if rest else said
        with sqlite3.connect(ledger.path_in(state)) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        counts = {record.recoveries for record in records(state).values()}
        # Every row equal: each batch's 50 rows were written whole or not at all.
        assert counts in ({before + said}, {before + said + 7}), (counts, before, said)
        before = counts.pop()


def test_unknown_keys_never_get_a_row(tmp_path: Path) -> None:
    book = Ledger(tmp_path, clients=2, retention_days=90)
    book.write([("present", True)], {"absent": Batch(False, 3, 1.0, 2.0, {"192.0.2.1": 2.0})}, 10.0)
    assert set(records(tmp_path)) == {"present"}
    assert records(tmp_path)["present"].hidden_since == 10.0
    with sqlite3.connect(ledger.path_in(tmp_path)) as db:
        assert db.execute("SELECT count(*) FROM clients").fetchone() == (0,)


def test_clients_kept_are_the_most_recent_and_none_when_off(tmp_path: Path) -> None:
    book = Ledger(tmp_path, clients=2, retention_days=90)
    seen = {"a": 1.0, "b": 3.0, "c": 2.0}
    book.write([("k", False)], {"k": Batch(False, 3, 1.0, 3.0, seen)}, 5.0)
    assert records(tmp_path)["k"].clients == ("b", "c")
    book.write([("k", False)], {"k": Batch(False, 1, 4.0, 4.0, {"a": 4.0})}, 6.0)
    assert records(tmp_path)["k"].clients == ("a", "b")
    book.close()
    off = Ledger(tmp_path, clients=0, retention_days=90)
    off.write([("k", False)], {"k": Batch(False, 1, 7.0, 7.0, {})}, 8.0)
    assert records(tmp_path)["k"].clients == ()  # turning it off erases the addresses kept before
    assert records(tmp_path)["k"].recoveries == 5


def test_keys_absent_past_retention_are_pruned(tmp_path: Path) -> None:
    book = Ledger(tmp_path, clients=2, retention_days=1)
    book.write([("old", True), ("kept", False)], {"old": Batch(True, 1, 1.0, 1.0, {"192.0.2.1": 1.0})}, 10.0)
    book.write([("kept", False)], {}, 10.0 + 0.5 * 86400)
    assert set(records(tmp_path)) == {"old", "kept"}  # gone from the key set, but not for long
    book.write([("kept", False)], {}, 10.0 + 1.5 * 86400)
    assert set(records(tmp_path)) == {"kept"}
    with sqlite3.connect(ledger.path_in(tmp_path)) as db:
        assert db.execute("SELECT count(*) FROM clients").fetchone() == (0,)


def test_visibility_and_hidden_since(tmp_path: Path) -> None:
    book = Ledger(tmp_path, clients=0, retention_days=90)
    book.write([("k", False)], {}, 1.0)
    assert records(tmp_path)["k"].hidden_since is None
    book.write([("k", True)], {}, 2.0)
    book.write([("k", True)], {}, 3.0)
    record = records(tmp_path)["k"]
    assert record.hidden and record.hidden_since == 2.0 and record.first_seen == 1.0 and record.last_seen == 3.0
