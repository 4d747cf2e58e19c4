"""Pipelined requests across key changes: every answer includes every change completed before its bytes were sent.

A request pipelined behind a direct-path one makes the protocol answer the first at once (answers leave in
request order), even while that first request's own key-set rebuild is still running in a thread. The directory
holds many hidden pairs so that a rebuild (one signature per signing key) lasts long enough for the next request
to arrive during it, which is when a stale answer could leave.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

from tang_server.keys import b64, keyfiles

from .support import load_keys, our_server, thumbprint

ROUNDS = 30
HIDDEN_PAIRS = 30
ADV = b"GET /adv HTTP/1.1\r\nHost: t\r\n\r\n"
RESPONSE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r]*\r\n(?:[^\r]+\r\n)*?content-length: (\d+)\r\n(?:[^\r]+\r\n)*\r\n")


def _with_hidden_pairs(keys: Path) -> None:
    spare = keys.parent / "spare"
    for _ in range(HIDDEN_PAIRS):
        for path in keyfiles.generate_keys(spare):
            os.rename(path, keys / f".{path.name}")


def _read_answers(conn: socket.socket, count: int) -> list[bytes]:
    """The bodies of the next `count` answers (each must be 200)."""
    data, bodies = b"", list[bytes]()
    while len(bodies) < count:
        found = RESPONSE.match(data)
        if found is not None and len(data) >= found.end() + int(found.group(2)):
            assert found.group(1) == b"200", data[:200]
            end = found.end() + int(found.group(2))
            bodies.append(data[found.end() : end])
            data = data[end:]
            continue
        chunk = conn.recv(65536)
        assert chunk, "connection closed before every answer arrived"
        data += chunk
    return bodies


def _advertised(body: bytes) -> set[str]:
    payload = json.loads(b64.decode(json.loads(body)["payload"]))
    return {thumbprint(key) for key in payload["keys"]}


def test_a_change_before_each_pipelined_request_is_in_its_answer(keys: Path, tmp_path: Path) -> None:
    """Each round: hide (or un-hide) the exchange key, send A, then B without waiting for A's answer. Both arrived
    after the change, so both answers must show it, however long the rebuild A started takes."""
    _with_hidden_pairs(keys)
    _, exchange = load_keys_visible(keys)
    kid = thumbprint(exchange)
    visible, hidden = keys / f"{kid}.jwk", keys / f".{kid}.jwk"
    with (
        our_server(keys, tmp_path / "log", "--no-auto-keygen") as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn,
    ):
        for round_ in range(ROUNDS):
            shown = round_ % 2 == 1
            os.rename(*((hidden, visible) if shown else (visible, hidden)))
            conn.sendall(ADV)
            time.sleep(0.002)  # A is parsed and its rebuild started before B arrives
            conn.sendall(ADV)
            for body in _read_answers(conn, 2):
                assert (kid in _advertised(body)) == shown, f"round {round_}: a stale advertisement"


def test_changes_between_pipelined_requests(keys: Path, tmp_path: Path) -> None:
    """Several requests pipelined on one connection, a hidden signing key made visible before each send: the answer
    to each request advertises every key made visible before it was sent (and may show later ones)."""
    _with_hidden_pairs(keys)
    hidden_signing = sorted(p for p in keys.iterdir() if p.name.startswith(".") and "sign" in p.read_text())
    with (
        our_server(keys, tmp_path / "log", "--no-auto-keygen") as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn,
    ):
        shown: list[str] = []
        for start in range(0, len(hidden_signing) - 3, 4):
            expected = []
            for path in hidden_signing[start : start + 4]:
                os.rename(path, keys / path.name[1:])
                shown.append(path.name[1:].removesuffix(".jwk"))
                conn.sendall(ADV)
                expected.append(set(shown))
                time.sleep(0.002)
            for body, before in zip(_read_answers(conn, len(expected)), expected, strict=True):
                assert before <= _advertised(body), "a key made visible before the request is missing"


def load_keys_visible(keys: Path) -> tuple[dict[str, object], dict[str, object]]:
    """The visible pair of a directory that also holds hidden pairs."""
    visible = keys.parent / "visible-only"
    visible.mkdir()
    for path in keys.iterdir():
        if not path.name.startswith("."):
            (visible / path.name).write_bytes(path.read_bytes())
    return load_keys(visible)
