"""What freshness costs: the per-request check, and the time from a file change to the new set serving."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tang_server.keys import keyfiles
from tang_server.keys.keystore import KeyStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    keyfiles.generate_keys(tmp_path)
    store = KeyStore(tmp_path, auto_keygen=False)
    yield store
    store.close()


def test_per_request_freshness_check(benchmark: BenchmarkFixture, store: KeyStore) -> None:
    """The check every request makes when nothing changed: one poll(0) and one lock test."""
    assert benchmark(store.is_fresh)


def _toggle(directory: Path) -> None:
    """Hide the visible signing key, or un-hide it: one deliberate rename."""
    for path in directory.iterdir():
        if "sign" in path.read_text():
            hidden = path.name.startswith(".")
            os.rename(path, directory / (path.name[1:] if hidden else f".{path.name}"))
            return


def test_change_to_next_request(benchmark: BenchmarkFixture, store: KeyStore) -> None:
    """A rename, then the next request's wait for the key set (rebuilt by the watcher or for the request)."""
    loop = asyncio.new_event_loop()

    def next_request() -> str:
        return loop.run_until_complete(store.current()).digest

    digests = set()
    benchmark.pedantic(next_request, setup=lambda: _toggle(store.directory), rounds=40)
    digests.add(store.keyset.digest)
    loop.close()
    assert digests


def test_change_to_watcher_swap(benchmark: BenchmarkFixture, store: KeyStore) -> None:
    """With no request arriving, how soon the watcher thread has the new set swapped in."""

    def wait_for_swap() -> None:
        before = store.keyset.digest
        _toggle(store.directory)
        deadline = time.monotonic() + 5
        while store.keyset.digest == before:
            assert time.monotonic() < deadline
            time.sleep(0.0002)

    benchmark.pedantic(wait_for_swap, rounds=40)
