"""The chart's stop sequence agrees with the server's drain: probes, grace period and the --drain-seconds flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from tang_server.serving.server import stop_bound
from tang_server.settings import Settings

from .test_helm import of_kind, render


@pytest.mark.parametrize("drain", [None, 0, 3, 60])
def test_grace_period_and_readiness_fit_the_drain(drain: int | None) -> None:
    values: dict[str, object] = {"keys": {"existingSecret": "k"}}
    if drain is not None:
        values["drainSeconds"] = drain
    pod = of_kind(render(values), "Deployment")[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    flag = next(arg for arg in container["args"] if arg.startswith("--drain-seconds="))
    seconds = float(flag.partition("=")[2])
    assert drain is None or seconds == drain
    # The kubelet's SIGKILL must never come before the server's own bound (it would cut answers).
    assert pod["terminationGracePeriodSeconds"] > stop_bound(Settings(keys_dir=Path("/k"), drain_seconds=seconds))
    assert "lifecycle" not in container  # no preStop: the server keeps serving while not ready by itself
    if drain is None:  # the defaults: a load balancer probing /readyz sees it fail well within the drain
        probe = container["readinessProbe"]
        assert probe["httpGet"]["path"] == "/readyz"
        removed = probe["periodSeconds"] * probe["failureThreshold"] + probe["timeoutSeconds"]
        assert removed < seconds
