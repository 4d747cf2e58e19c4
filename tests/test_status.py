"""`/status`: the worker's digest, the S256 key ids of its visible and hidden keys, when it loaded them, its pid;
public information only (no private member, no private value in any encoding)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tang_server.keys import b64, keyfiles

from .listening import worker_pids
from .oracles import digest, key_files, kids
from .support import our_server, request, require_tools


def _members(document: Any) -> set[str]:
    if isinstance(document, dict):
        return set(document) | set().union(*(_members(value) for value in document.values()))
    if isinstance(document, list):
        return set().union(*(_members(value) for value in document))
    return set()


def test_status_is_the_workers_key_set_and_public_only(keys: Path, tmp_path: Path) -> None:
    require_tools("jose")
    hidden = tmp_path / "hidden"
    for path in keyfiles.generate_keys(hidden):
        (keys / f".{path.name}").write_bytes(path.read_bytes())
    files = key_files(keys)
    expected = kids(keys)
    started = time.time()
    with our_server(keys, tmp_path / "log", "--no-auto-keygen", workers=2) as server:
        workers = worker_pids(server.process.pid)
        answers = [request(server.port, "GET", "/status") for _ in range(8)]
    for answer in answers:
        assert answer.status == 200
        assert answer.headers["content-type"] == "application/json"
        status = json.loads(answer.body)
        assert status["digest"] == digest(keys)
        assert {key["kid"] for key in status["visible"]} == expected["visible"]
        assert {key["kid"] for key in status["hidden"]} == expected["hidden"]
        assert sorted(key["kind"] for key in status["visible"]) == ["exchange", "signing"]
        assert started - 1 <= status["loaded_at"] <= time.time()
        assert status["pid"] in workers
        assert status["ready"] is True
        # Public only: no JWK private member anywhere, no private value in any of the encodings it could take.
        assert not _members(status) & {"d", "p", "q", "dp", "dq", "qi", "k"}
        text = answer.body.decode()
        for key in files.values():
            secret = str(key["d"])
            value = int.from_bytes(b64.decode(secret), "big")
            for form in (secret[:16], f"{value:x}"[:24], str(value)[:24], b64.decode(secret).hex()[:24]):
                assert form not in text
