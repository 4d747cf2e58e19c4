"""A target that resolves to several addresses (a Kubernetes headless Service) counts as one replica per address.

Two real replicas listen on the same port at 127.0.0.1 and 127.0.0.2; the name `tang-headless` resolves to both
through a stub at the `socket.getaddrinfo` boundary (no /etc/hosts change), as a cluster's DNS would answer.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tang_server.keys import keyfiles
from tang_server.ops import fleet

from .listening import PortTaken, launched
from .oracles import digest
from .support import Server, serve_command

NAME = "tang-headless"
ADDRESSES = ("127.0.0.1", "127.0.0.2")


@contextmanager
def two_replicas(first: Path, second: Path, log: Path) -> Iterator[tuple[Server, Server]]:
    """Our server on `first` at 127.0.0.1:P and on `second` at 127.0.0.2:P; P chosen again on a collision."""
    for _ in range(5):
        with ExitStack() as stack:

            def command(port: int) -> list[str]:
                return serve_command(first, port, "--host", ADDRESSES[0], "--no-auto-keygen", workers=2)

            one = stack.enter_context(launched(command, log.with_suffix(".a")))

            def same_port(port: int) -> list[str]:
                return serve_command(second, port, "--host", ADDRESSES[1], "--no-auto-keygen", workers=2)

            try:
                two = stack.enter_context(launched(same_port, log.with_suffix(".b"), host=ADDRESSES[1], port=one.port))
            except PortTaken:
                continue
            yield one, two
            return
    raise RuntimeError("five port collisions in a row")


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def headless(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host != NAME:
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port))) for address in ADDRESSES]

    monkeypatch.setattr(socket, "getaddrinfo", headless)


@pytest.mark.usefixtures("resolver")
def test_one_name_is_one_replica_per_address(keys: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(keys, copy)
    with two_replicas(keys, copy, tmp_path / "log") as (one, two):
        target = f"http://{NAME}:{one.port}"
        deadline = time.monotonic() + 30
        replicas = fleet.survey([target])
        while not all(len(replica.workers) == 2 for replica in replicas):
            assert time.monotonic() < deadline, fleet.report(replicas)  # bounds a hang: workers still starting
            time.sleep(0.2)
            replicas = fleet.survey([target])
        assert [replica.url for replica in replicas] == [f"http://{address}:{one.port}" for address in ADDRESSES]
        assert all(replica.error is None and len(replica.workers) == 2 for replica in replicas)
        assert fleet.agreed_digest(replicas) == digest(keys)
        assert fleet.wait([target], digest(keys), timeout=10, say=lambda line: None)

        keyfiles.rotate(copy)  # the second replica moves ahead: the name's view must show the divergence
        # /metrics shows what each worker's watcher last loaded: wait until the second replica's workers show the
        # rotation (the timeout bounds a hang), so that the name's view is asked after that reload.
        second = f"http://{ADDRESSES[1]}:{one.port}"
        assert fleet.wait([second], digest(copy), timeout=30, interval=0.05, say=lambda line: None)
        assert not fleet.wait([target], digest(keys), timeout=1, interval=0.2, say=lambda line: None)
        assert fleet.wait([target], digest(copy), timeout=1, interval=0.2, say=lambda line: None) is False
        shutil.rmtree(keys)
        shutil.copytree(copy, keys)
        assert fleet.wait([target], digest(copy), timeout=30, interval=0.2, say=lambda line: None)
        assert two.port == one.port
