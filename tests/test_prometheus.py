"""Metrics as a real Prometheus server sees them, across several workers; and the alert rules, with promtool."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tang_server import keyfiles
from tang_server.keyset import load_keyset

from .support import Server, client_key, free_port, load_keys, our_server, request, require_tools, running, thumbprint

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "helm" / "tang-server" / "files"


def query(prometheus: str, expression: str) -> list[dict[str, object]]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback test server
        document = json.loads(response.read())
    assert document["status"] == "success", document
    result: list[dict[str, object]] = document["data"]["result"]
    return result


def scalar(prometheus: str, expression: str) -> float | None:
    result = query(prometheus, expression)
    if not result:
        return None
    value = result[0]["value"]
    assert isinstance(value, list)
    return float(value[1])


def eventually(check: object, timeout: float = 30.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "Prometheus never saw the expected value"
        time.sleep(0.5)


@pytest.fixture
def scraped(keys: Path, tmp_path: Path) -> Iterator[tuple[Server, str]]:
    require_tools("prometheus")
    with our_server(keys, tmp_path / "server.log", "--metrics-dir", str(tmp_path / "metrics"), workers=3) as server:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: tang\n    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
        )
        port = free_port()
        command = [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        with running(command, port, tmp_path / "prometheus.log"):
            yield server, f"http://127.0.0.1:{port}"


def test_counts_add_up_across_workers_and_digests_follow_the_keys(scraped: tuple[Server, str], keys: Path) -> None:
    server, prometheus = scraped
    _, exchange = load_keys(keys)
    body = json.dumps(client_key()).encode()
    for _ in range(30):
        assert request(server.port, "GET", "/adv").status == 200
    for _ in range(20):
        assert request(server.port, "POST", f"/rec/{thumbprint(exchange)}", body).status == 200
    for _ in range(7):
        assert request(server.port, "POST", f"/rec/{thumbprint(client_key())}", body).status == 404
    for _ in range(5):
        assert request(server.port, "GET", "/nope").status == 404

    def total(selector: str) -> float | None:
        return scalar(prometheus, f"sum(tang_http_requests_total{{{selector}}})")

    eventually(lambda: total('route="/adv",status="200"') == 30)
    eventually(lambda: total('route="/rec/{thp}",status="200"') == 20)
    assert total('route="/rec/{thp}",status="404"') == 7
    assert total('route="unmatched",status="404"') == 5
    # No key id ever becomes a label value.
    assert not [s for s in query(prometheus, "tang_http_requests_total") if thumbprint(exchange) in str(s)]
    # Each request came on a new connection, spread by the kernel across the workers; their samples merge.
    assert scalar(prometheus, "sum(tang_recovery_exchange_duration_seconds_count)") == 27
    assert scalar(prometheus, 'sum(tang_http_request_duration_seconds_count{route="/adv"})') == 30

    # Every worker reports the digest of what it serves.
    digest = load_keyset(keys).digest
    eventually(lambda: len(query(prometheus, f'tang_keyset_info{{digest="{digest}"}} == 1')) == 3)
    assert scalar(prometheus, "count(count by (digest) (tang_keyset_info == 1))") == 1

    keyfiles.rotate(keys)
    new_digest = load_keyset(keys).digest
    assert new_digest != digest
    eventually(lambda: len(query(prometheus, f'tang_keyset_info{{digest="{new_digest}"}} == 1')) == 3)
    assert query(prometheus, f'tang_keyset_info{{digest="{digest}"}} == 1') == []
    assert scalar(prometheus, 'sum(tang_keys{visibility="hidden"})') == 6  # 2 hidden keys x 3 workers
    assert scalar(prometheus, "tang_build_info") == 1


def test_alert_rules_check_and_unit_tests() -> None:
    require_tools("promtool")
    subprocess.run(["promtool", "check", "rules", "tang-alerts.yml"], cwd=RULES, check=True, capture_output=True)
    result = subprocess.run(
        ["promtool", "test", "rules", "tang-alerts.test.yml"], cwd=RULES, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_can_fail(tmp_path: Path) -> None:
    """Break the divergence rule's grace period: the unit tests must notice."""
    require_tools("promtool")
    for name in ("tang-alerts.yml", "tang-alerts.test.yml"):
        (tmp_path / name).write_text((RULES / name).read_text())
    rules = tmp_path / "tang-alerts.yml"
    rules.write_text(rules.read_text().replace("for: 5m", "for: 1m", 1))
    result = subprocess.run(["promtool", "test", "rules", "tang-alerts.test.yml"], cwd=tmp_path, capture_output=True)
    assert result.returncode != 0


def test_dashboard_is_valid_json_using_our_metrics() -> None:
    dashboard = json.loads((RULES / "tang-dashboard.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert any("tang_keyset_info" in e for e in expressions)
    assert os.path.getsize(RULES / "tang-dashboard.json") > 1000
