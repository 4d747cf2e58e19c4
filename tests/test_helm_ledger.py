"""The chart's ledger: off by default; when enabled, a writable volume at the path the server is told."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from tang_server.cli import parser

from .test_helm import CHART, KUBERNETES, of_kind, render


def pod(values: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = of_kind(render(values), "Deployment")[0]["spec"]["template"]["spec"]
    return spec


def test_no_ledger_by_default() -> None:
    spec = pod({"keys": {"existingSecret": "k"}})
    assert not any(arg.startswith("--state-dir") for arg in spec["containers"][0]["args"])
    assert "ledger" not in {volume["name"] for volume in spec["volumes"]}


@pytest.mark.parametrize(
    "volume", [None, {"persistentVolumeClaim": {"claimName": "tang-ledger"}}], ids=["emptyDir", "claim"]
)
def test_ledger_volume_is_where_the_server_writes(volume: dict[str, Any] | None) -> None:
    ledger: dict[str, Any] = {"enabled": True, "clients": 0, "retentionDays": 30}
    if volume is not None:
        ledger["volume"] = volume
    values = {"keys": {"existingSecret": "k"}, "ledger": ledger}
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2], report
    documents = render(values)
    for document in of_kind(documents, "Deployment"):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)
    spec = pod(values)
    container = spec["containers"][0]
    args = parser().parse_args(container["args"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "ledger")
    assert args.state_dir == mount["mountPath"] == "/var/lib/tang-server"
    assert not mount.get("readOnly")
    assert (args.ledger_clients, args.ledger_retention_days) == (0, 30)
    source = next(v for v in spec["volumes"] if v["name"] == "ledger")
    assert source == {"name": "ledger", **(volume or {"emptyDir": {"sizeLimit": "64Mi"}})}
