"""Micro benchmarks of the request path pieces (pytest-benchmark). `make bench` runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tang_server.keys import b64, keyfiles
from tang_server.keys.keyset import build_keyset, load_keyset, read_key_files
from tang_server.keys.recovery import recover


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bench")
    keyfiles.generate_keys(directory)
    return directory


@pytest.fixture(scope="module")
def client_body() -> bytes:
    _, exchange = keyfiles.generate_pair()
    return json.dumps({k: exchange[k] for k in ("alg", "crv", "kty", "x", "y")}).encode()


def test_rust_exchange(benchmark: BenchmarkFixture, keys: Path, client_body: bytes) -> None:
    keyset = load_keyset(keys)
    key = next(k for k in keyset.keys if k.exchange is not None)
    client = json.loads(client_body)
    x, y = b64.decode(client["x"]), b64.decode(client["y"])
    assert key.exchange is not None
    benchmark(key.exchange.exchange, x, y)


def test_recovery_path(benchmark: BenchmarkFixture, keys: Path, client_body: bytes) -> None:
    keyset = load_keyset(keys)
    kid = next(k for k in keyset.keys if k.exchange is not None).kid
    status, _ = benchmark(recover, keyset, kid, client_body)
    assert status == 200


@pytest.mark.parametrize("pairs", [1, 10, 100])
def test_keyset_build(benchmark: BenchmarkFixture, tmp_path: Path, pairs: int) -> None:
    for _ in range(pairs):
        keyfiles.generate_keys(tmp_path)
    files = read_key_files(tmp_path)
    keyset = benchmark(build_keyset, files)
    assert len(keyset.keys) == 2 * pairs
