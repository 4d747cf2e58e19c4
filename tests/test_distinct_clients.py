"""Distinct clients per key (`ops/distinct.py`): the HyperLogLog against exact counts, its merge and its window,
the sketches of several workers merged at scrape time, and `tang_key_clients` on a real server."""

from __future__ import annotations

import os
import random
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tang_server.keys.keyset import load_keyset
from tang_server.ops import distinct
from tang_server.ops.distinct import HOUR, STANDARD_ERROR, Hasher, Sketch, Window

from .support import our_server
from .test_key_usage import scrape, status
from .test_ledger import DEADLINE, FAST_FLUSH, eventually, exchange_kid, recover

#: Fixed secrets: each estimate below is one reproducible draw, and several secrets are several draws.
SECRETS = [bytes([n]) * distinct.SECRET_BYTES for n in (1, 2, 3)]
NOW = 1_800_000_000.0  # a fixed instant: time is injected, never waited for


def addresses(count: int, seed: int = 0) -> list[str]:
    """`count` distinct IPv4 and IPv6 addresses, in a random order."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test input, not secrets
    found: set[str] = set()
    while len(found) < count:
        if rng.random() < 0.5:
            found.add(".".join(str(rng.randrange(256)) for _ in range(4)))
        else:
            found.add("2001:db8::" + ":".join(f"{rng.randrange(65536):x}" for _ in range(3)))
    listed = sorted(found)
    rng.shuffle(listed)
    return listed


def sketch_of(items: list[str], secret: bytes = SECRETS[0]) -> Sketch:
    hashed = Hasher(secret)
    sketch = Sketch()
    for item in items:
        sketch.add(hashed(item))
    return sketch


@pytest.mark.parametrize("count", [0, 1, 10, 1000, 50_000])
@pytest.mark.parametrize("secret", SECRETS)
def test_estimate_within_three_standard_errors_of_the_exact_count(count: int, secret: bytes) -> None:
    seen = addresses(count, seed=count)
    exact = len(set(seen))  # the oracle: an exact count, nothing shared with the sketch
    estimate = sketch_of(seen, secret).estimate()
    assert abs(estimate - exact) <= 3 * STANDARD_ERROR * exact, (estimate, exact)


def test_duplicates_do_not_count() -> None:
    seen = addresses(500)
    once = sketch_of(seen)
    repeated = sketch_of(seen * 3 + random.Random(1).sample(seen, 200))  # noqa: S311 - test input
    assert repeated.registers == once.registers
    assert repeated.estimate() == once.estimate()


def test_merge_is_exactly_the_sketch_of_the_union() -> None:
    left, right = addresses(3000, seed=1), addresses(2000, seed=2)
    overlap = left[:700]
    merged = sketch_of(left)
    merged.merge(sketch_of(right + overlap))
    assert merged.registers == sketch_of(left + right).registers
    # Symmetric and idempotent.
    other = sketch_of(right + overlap)
    other.merge(sketch_of(left))
    assert other.registers == merged.registers
    again = merged.copy()
    again.merge(merged)
    assert again.registers == merged.registers


def test_the_secret_changes_the_registers() -> None:
    seen = addresses(100)
    assert sketch_of(seen, SECRETS[0]).registers != sketch_of(seen, SECRETS[1]).registers


def test_the_window_drops_hours_that_left_it() -> None:
    hashed = Hasher(SECRETS[0])
    window = Window()
    early, late = addresses(40, seed=3), addresses(60, seed=4)
    window.add("k", map(hashed, early), NOW)
    window.add("k", map(hashed, late), NOW + 20 * HOUR)
    both = window.estimates(NOW + 20 * HOUR)["k"]
    assert abs(both - len(set(early + late))) <= 3 * STANDARD_ERROR * 100
    # The early hour counts until it is `HOURS` hours old.
    start = NOW - NOW % HOUR
    assert window.estimates(start + (distinct.HOURS - 1) * HOUR + HOUR - 1)["k"] == pytest.approx(both)
    only_late = window.estimates(start + distinct.HOURS * HOUR)["k"]
    assert only_late == pytest.approx(sketch_of(late).estimate())
    assert window.estimates(NOW + 20 * HOUR + distinct.HOURS * HOUR) == {}


def test_workers_files_merge_and_a_dead_workers_file_counts_within_the_window(tmp_path: Path) -> None:
    directory = str(tmp_path)
    secret = distinct.shared_secret(directory)
    assert distinct.shared_secret(directory) == secret  # every worker gets the same
    hashed = Hasher(secret)
    first, second = addresses(300, seed=5), addresses(200, seed=6)
    for pid, seen, when in ((101, first, NOW), (102, second + first[:50], NOW + 2 * HOUR)):
        window = Window()
        window.add("k", map(hashed, seen), when)
        distinct.save(directory, pid, window, when)
    alive = {101, 102}
    cache: distinct.Cache = {}
    merged = distinct.gather(directory, NOW + 2 * HOUR, lambda pid: pid in alive, cache)
    assert merged["k"].registers == sketch_of(first + second, secret).registers
    # Worker 101 dies: its clients still count, until its hour leaves the window.
    alive.discard(101)
    still = distinct.gather(directory, NOW + 2 * HOUR, lambda pid: pid in alive, cache)
    assert still["k"].registers == merged["k"].registers
    later = NOW + (distinct.HOURS + 1) * HOUR
    after = distinct.gather(directory, later, lambda pid: pid in alive, cache)
    assert after["k"].registers == sketch_of(second + first[:50], secret).registers
    assert not (tmp_path / distinct.file_name(101)).exists()
    assert (tmp_path / distinct.file_name(102)).exists()
    # A new worker with a dead worker's pid takes its hours over.
    adopted = Window()
    distinct.adopt(directory, 102, adopted)
    assert adopted.estimates(NOW + 2 * HOUR)["k"] == pytest.approx(sketch_of(second + first[:50], secret).estimate())


def test_a_damaged_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / distinct.file_name(7)).write_bytes(b"TANGHLL1" + os.urandom(50))
    assert distinct.gather(str(tmp_path), NOW, lambda pid: True, {}) == {}


def test_single_process_counts_known_addresses_only(keys: Path) -> None:
    """Without a multiprocess directory the worker's own window is exposed; unknown addresses are not counted."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        pytest.skip("this process's metrics live in files")
    from tang_server.ops.metrics import Metrics
    from tang_server.ops.usage import Usage

    keyset = load_keyset(keys)
    exchange = next(key for key in keyset.visible if key.kind.value == "exchange")
    metrics = Metrics()
    assert metrics.directory is None
    metrics.keyset_loaded(keyset)
    usage = Usage(lambda: keyset, metrics, None, clients=0, flush_seconds=3600)
    try:
        for unknown in ("-", "", "-"):
            usage.recovered(exchange, unknown)
        usage.flush()
        assert clients_series(metrics.exposition([]).body.decode()) == {}
        seen = addresses(50, seed=8)
        for address in [*seen, *seen, "-"]:
            usage.recovered(exchange, address)
        usage.flush()
        text = metrics.exposition([]).body.decode()
    finally:
        usage.close()
    found = clients_series(text)
    assert set(found) == {exchange.kid}
    assert abs(found[exchange.kid] - len(seen)) <= 3 * STANDARD_ERROR * len(seen)


def clients_series(text: str) -> dict[str, float]:
    return {
        found.group(1): float(found.group(2))
        for found in re.finditer(r'^tang_key_clients\{kid="([^"]*)",visibility="visible"\} (\S+)$', text, re.M)
    }


def workers_with_sketch(directory: Path, kid: str) -> int:
    """How many workers' sketch files hold `kid` (each worker writes its own)."""
    found = 0
    for path in directory.glob("tang_clients_*.hll"):
        try:
            _, unions, _ = distinct.load(str(path))
        except (OSError, ValueError):
            continue
        found += kid in unions
    return found


def test_distinct_clients_across_two_workers(keys: Path, tmp_path: Path) -> None:
    """Each of N addresses recovers at least twice, on separate connections, with both workers answering some:
    /metrics and /status show close to N for the exchange key; a flood of random key ids adds no series."""
    kid = exchange_kid(keys)
    signing = next(key.kid for key in load_keyset(keys).visible if key.kind.value == "signing")
    seen = addresses(300, seed=7)
    metrics = tmp_path / "metrics"
    options = (*FAST_FLUSH, "--trusted-proxy", "127.0.0.1/32", "--metrics-dir", str(metrics))
    with our_server(keys, tmp_path / "server.log", *options, workers=2) as server, ThreadPoolExecutor(4) as pool:
        sent = [*seen, *seen[::-1], ""]  # "": the peer itself (127.0.0.1), one more distinct client
        list(pool.map(lambda address: recover(server, kid, address), sent))
        exact = len(set(seen)) + 1
        # Concurrent connections land on either worker; repeat addresses already seen until both answered some.
        deadline = time.monotonic() + DEADLINE
        while workers_with_sketch(metrics, kid) < 2:
            assert time.monotonic() < deadline, "one worker never answered a recovery"
            again = random.sample(seen, 20)
            list(pool.map(lambda address: recover(server, kid, address), again))
            sent += again
        # Each worker writes its sketch before it adds its counts: once every recovery is counted, every address
        # is in a sketch.
        total = f'tang_recoveries_total{{kid="{kid}",visibility="visible"}} {len(sent)}.0'
        eventually(lambda: total in scrape(server), "every recovery counted")
        estimate = clients_series(scrape(server))[kid]
        assert abs(estimate - exact) <= 3 * STANDARD_ERROR * exact, (estimate, exact)
        rows = {row["kid"]: row for row in status(server)["usage"]["keys"]}
        assert abs(rows[kid]["clients"] - exact) <= 3 * STANDARD_ERROR * exact
        assert rows[signing]["clients"] == 0
        before = clients_series(scrape(server))
        assert set(before) == {kid}
        for _ in range(100):
            recover(server, secrets.token_urlsafe(32), secrets.choice(seen), expect=404)
        eventually(lambda: "tang_recovery_unknown_key_total 100.0" in scrape(server), "the flood counted")
        assert clients_series(scrape(server)) == before
