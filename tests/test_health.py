"""Liveness and readiness endpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tang_server.keys import keyfiles

from .support import our_server, request


def test_readiness_follows_the_key_set(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    with our_server(keys, tmp_path / "log", "--no-auto-keygen", workers=2) as server:
        assert request(server.port, "GET", "/healthz").status == 200  # liveness does not depend on keys
        not_ready = request(server.port, "GET", "/readyz")
        assert not_ready.status == 503
        assert "no visible signing key" in json.loads(not_ready.body)["problems"][0]
        written = keyfiles.generate_keys(keys)
        ready = request(server.port, "GET", "/readyz")
        assert ready.status == 200
        assert ready.headers["content-type"] == "application/json"
        assert json.loads(ready.body)["ready"] is True
        signing = next(path for path in written if "sign" in path.read_text())
        os.rename(signing, keys / f".{signing.name}")
        assert request(server.port, "GET", "/readyz").status == 503
        assert request(server.port, "GET", "/healthz").status == 200


def test_health_paths_are_configurable_and_never_prefixed(keys: Path, tmp_path: Path) -> None:
    extra = ["--prefix", "tang", "--health-path", "/-/live", "--ready-path", "/-/ready"]
    with our_server(keys, tmp_path / "log", *extra) as server:
        assert request(server.port, "GET", "/-/live").status == 200
        assert request(server.port, "GET", "/-/ready").status == 200
        assert request(server.port, "GET", "/healthz").status == 404
        assert request(server.port, "GET", "/tang/-/live").status == 404
        assert request(server.port, "GET", "/tang/adv").status == 200


def test_health_under_a_prefix_named_like_it(keys: Path, tmp_path: Path) -> None:
    with our_server(keys, tmp_path / "log", "--prefix", "healthz") as server:
        assert request(server.port, "GET", "/healthz").status == 200
        assert request(server.port, "GET", "/healthz/adv").status == 200
