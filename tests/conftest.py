from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tang_server.keys import keyfiles

from .support import Server, our_server, reference_keygen


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A directory with one fresh pair made by our keygen."""
    directory = tmp_path / "keys"
    keyfiles.generate_keys(directory)
    return directory


@pytest.fixture(scope="session")
def reference_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a pair made by the reference's tangd-keygen."""
    directory = tmp_path_factory.mktemp("reference") / "keys"
    reference_keygen(directory)
    return directory


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One live server (two workers) over a fixed pair plus a hidden pair, for read-only protocol tests."""
    base = tmp_path_factory.mktemp("shared")
    directory = base / "keys"
    keyfiles.generate_keys(directory)
    hidden = base / "hidden"
    for path in keyfiles.generate_keys(hidden):
        (directory / f".{path.name}").write_bytes(path.read_bytes())
    with our_server(directory, base / "server.log", workers=2) as server:
        yield server
