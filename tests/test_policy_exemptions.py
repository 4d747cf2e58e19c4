"""The recovery access policy covers `/rec` and `/adv` only: health, readiness and metrics answer everybody."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .support import client_key, load_keys, our_server, request, thumbprint


def test_health_readiness_and_metrics_are_not_subject_to_the_policy(keys: Path, tmp_path: Path) -> None:
    _, exchange = load_keys(keys)
    policy = ["--allow-recovery", "10.0.0.0/8", "--allow-advertisement", "10.0.0.0/8"]
    with our_server(keys, tmp_path / "log", *policy, workers=2) as server:
        # The peer, 127.0.0.1, is outside the policy: the Tang routes refuse it...
        assert request(server.port, "GET", "/adv").status == 403
        rec = request(server.port, "POST", f"/rec/{thumbprint(exchange)}", json.dumps(client_key()).encode())
        assert rec.status == 403
        # ... and the operational endpoints do not.
        assert request(server.port, "GET", "/healthz").status == 200
        ready = request(server.port, "GET", "/readyz")
        assert ready.status == 200 and json.loads(ready.body)["ready"] is True
        metrics = request(server.port, "GET", "/metrics")
        assert metrics.status == 200
        assert b"tang_keyset_info" in metrics.body
        # The refusals above, counted: by the other worker within a second (`ops/held.py`). The deadline only
        # bounds a hang.
        deadline = time.monotonic() + 30
        while b'status="403"' not in metrics.body:
            assert time.monotonic() < deadline, "the refusals were never counted"
            time.sleep(0.1)
            metrics = request(server.port, "GET", "/metrics")
            assert metrics.status == 200
