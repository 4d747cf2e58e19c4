"""The vendor's rotation procedures against a live server: exactly the operator's new pair, every time.

The documented procedure hides every key, then generates a pair: `cd DIR; for key in *.jwk; do mv -- "$key"
".$key"; done; /usr/libexec/tangd-keygen DIR`, and Debian's `tangd-rotate-keys -d DIR` does the same. Between the
two steps the directory has no visible key. Like the reference, the server generates a pair only when a *request*
finds none, never because the directory changed, so with no request in between the directory ends with the old
pair hidden and the operator's pair visible, and the very next `/adv` advertises exactly that pair.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tang_server.keys import b64

from .support import (
    BIN,
    REFERENCE_KEYGEN,
    Server,
    free_port,
    reference_keygen,
    request,
    require_tools,
    running,
    serve_command,
    thumbprint,
)

ROTATIONS = 50

PROCEDURES = {
    "mv loop + tangd-keygen": 'cd "$1" && for key in *.jwk; do mv -- "$key" ".$key"; done && "$2" "$1"',
    "tangd-rotate-keys": '"$3" -d "$1"',
}
ROTATE_KEYS = "/usr/libexec/tangd-rotate-keys"


def _start(kind: str, keys: Path, log: Path) -> Iterator[Server]:
    port = free_port()
    if kind == "tangd -l":
        command = [str(BIN / "tangd"), "-l", "-p", str(port), str(keys)]
    else:
        command = serve_command(keys, port, workers=2)
    with running(command, port, log) as server:
        yield server
        os.killpg(server.process.pid, signal.SIGKILL)  # its graceful stop is tested elsewhere; spare the drain


@pytest.fixture(params=["tangd -l", "serve --workers 2"])
def live(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    keys = tmp_path / "keys"
    reference_keygen(keys)
    for server in _start(request.param, keys, tmp_path / "log"):
        yield server, keys


def _listing(keys: Path) -> tuple[set[str], set[str]]:
    names = {path.name for path in keys.iterdir() if path.name.endswith(".jwk")}
    return {n for n in names if not n.startswith(".")}, {n for n in names if n.startswith(".")}


def _show_keys(port: int) -> list[str]:
    """The reference's `tang-show-keys`: one request, GET /adv, and the S256 thumbprint of each verify key."""
    result = subprocess.run(["tang-show-keys", str(port)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def _advertised(port: int) -> set[str]:
    response = request(port, "GET", "/adv")
    assert response.status == 200, response.status
    payload = json.loads(b64.decode(json.loads(response.body)["payload"]))
    return {thumbprint(key) for key in payload["keys"]}


def _thumbprints(keys: Path, names: set[str]) -> dict[str, str]:
    """S256 thumbprint -> "signing" or "exchange", for the named key files."""
    kinds = {}
    for name in names:
        key = json.loads((keys / name).read_text())
        kinds[thumbprint(key)] = "exchange" if "deriveKey" in key["key_ops"] else "signing"
    return kinds


@pytest.mark.parametrize("procedure", PROCEDURES)
def test_vendor_procedure_ends_with_exactly_the_operators_pair(live: tuple[Server, Path], procedure: str) -> None:
    require_tools("jose", "curl", "tang-show-keys", ROTATE_KEYS, str(REFERENCE_KEYGEN))
    server, keys = live
    assert len(_advertised(server.port)) == 2
    for rotation in range(ROTATIONS):
        visible, hidden = _listing(keys)
        assert len(visible) == 2, (rotation, visible)
        script = ["sh", "-c", PROCEDURES[procedure], "rotate", str(keys), str(REFERENCE_KEYGEN), ROTATE_KEYS]
        subprocess.run(script, check=True, capture_output=True, timeout=60)  # no request in between
        now_visible, now_hidden = _listing(keys)
        assert now_hidden == hidden | {f".{name}" for name in visible}, rotation  # exactly the old pair hidden
        assert len(now_visible) == 2 and not now_visible & visible, (rotation, now_visible)
        new = _thumbprints(keys, now_visible)
        assert sorted(new.values()) == ["exchange", "signing"]
        signing = next(thp for thp, kind in new.items() if kind == "signing")
        assert _show_keys(server.port) == [signing], rotation  # the very next request
        assert _advertised(server.port) == set(new)
        assert _listing(keys) == (now_visible, now_hidden), rotation  # and nothing generated since
