"""`/readyz`: 503 when only the exchange key is missing or invalid, and its `digest` and `directory_error` fields.

The digest is checked against one computed from `jose` thumbprints; recoveries go on for the keys present.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tang_server.keys import b64, keyfiles

from .oracles import digest, jose_thumbprint, key_files
from .support import client_key, load_keys, our_server, request, require_tools


def _ready(port: int) -> tuple[int, dict[str, Any]]:
    response = request(port, "GET", "/readyz")
    assert response.headers["content-type"] == "application/json"
    return response.status, json.loads(response.body)


def test_ready_with_both_keys_and_the_digest_is_the_key_sets(keys: Path, tmp_path: Path) -> None:
    require_tools("jose")
    with our_server(keys, tmp_path / "log", "--no-auto-keygen") as server:
        status, body = _ready(server.port)
    assert status == 200
    assert body["ready"] is True and body["problems"] == [] and body["directory_error"] is None
    assert body["digest"] == digest(keys)


def test_only_the_exchange_key_missing_is_not_ready(keys: Path, tmp_path: Path) -> None:
    require_tools("jose")
    _, exchange = load_keys(keys)
    for path in keys.glob("*.jwk"):
        if "deriveKey" in path.read_text():
            path.unlink()
    with our_server(keys, tmp_path / "log", "--no-auto-keygen") as server:
        status, body = _ready(server.port)
        assert request(server.port, "GET", "/adv").status == 200  # the signing key still advertises
    assert status == 503
    assert body["ready"] is False
    assert body["problems"] == ["no visible exchange key: clients cannot bind"]
    assert body["digest"] == digest(keys)
    assert body["directory_error"] is None
    assert jose_thumbprint(exchange) not in json.dumps(body)


def _invalid(exchange: dict[str, Any]) -> dict[str, Any]:
    """The exchange key with a private scalar that does not match its public point (another key's)."""
    other = keyfiles.generate_pair()[1]
    return {**exchange, "d": other["d"]}


def test_only_the_exchange_key_invalid_is_not_ready_and_hidden_keys_still_recover(keys: Path, tmp_path: Path) -> None:
    require_tools("jose")
    hidden = tmp_path / "hidden"
    for path in keyfiles.generate_keys(hidden):
        shutil.copy(path, keys / f".{path.name}")
    _, hidden_exchange = load_keys(hidden)
    for path in keys.glob("[!.]*.jwk"):
        key = json.loads(path.read_text())
        if "deriveKey" in key["key_ops"]:
            os.chmod(path, 0o640)
            path.write_text(json.dumps(_invalid(key)))
    secrets = {str(key["d"]) for key in key_files(keys).values()}
    with our_server(keys, tmp_path / "log", "--no-auto-keygen") as server:
        status, body = _ready(server.port)
        recovered = request(server.port, "POST", f"/rec/{jose_thumbprint(hidden_exchange)}",
                            json.dumps(client_key()).encode())  # fmt: skip
        log = server.log_text()
    assert status == 503
    assert body["problems"] == ["no visible exchange key: clients cannot bind"]
    assert recovered.status == 200  # the hidden pair keeps answering
    assert "invalid exchange key" in log
    assert not [secret for secret in secrets if secret[:16] in log or b64.decode(secret).hex()[:32] in log]


def test_directory_error_is_shown_while_the_last_set_serves(keys: Path, tmp_path: Path) -> None:
    away = tmp_path / "away"
    with our_server(keys, tmp_path / "log", "--no-auto-keygen") as server:
        status, body = _ready(server.port)
        assert status == 200 and body["directory_error"] is None
        before = body["digest"]
        keys.rename(away)
        status, body = _ready(server.port)
        assert status == 200  # the last set keeps serving
        assert body["digest"] == before
        assert body["directory_error"] is not None
        assert "cannot read key directory" in body["directory_error"] and str(keys) in body["directory_error"]
        away.rename(keys)
        status, body = _ready(server.port)
        assert status == 200 and body["directory_error"] is None
