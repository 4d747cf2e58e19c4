"""Metrics as a real Prometheus server sees them, across several workers; and the alert rules, with promtool."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tang_server.keys import keyfiles
from tang_server.keys.keyset import KeyKind, load_keyset

from . import promql
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


@contextlib.contextmanager
def prometheus_scraping(server: Server, work: Path, *, alert_rules: bool = False) -> Iterator[str]:
    """A real Prometheus scraping `server` every second (evaluating the shipped alert rules if asked): its URL."""
    require_tools("prometheus")
    config = work / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        + (f"rule_files: ['{RULES / 'tang-alerts.yml'}']\n" if alert_rules else "")
        + "scrape_configs:\n"
        f"  - job_name: tang\n    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n"
    )
    port = free_port()
    command = [
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={work / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with running(command, port, work / "prometheus.log"):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def scraped(keys: Path, tmp_path: Path) -> Iterator[tuple[Server, str]]:
    require_tools("prometheus")
    metrics = str(tmp_path / "metrics")
    with (
        our_server(keys, tmp_path / "server.log", "--metrics-dir", metrics, workers=3) as server,
        prometheus_scraping(server, tmp_path) as prometheus,
    ):
        yield server, prometheus


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

    # Each request came on a new connection, spread by the kernel across the workers; their samples merge. A
    # worker writes its counts within a second (`ops/held.py`), so the totals are waited for.
    eventually(lambda: total('route="/adv",status="200"') == 30)
    eventually(lambda: total('route="/rec/{thp}",status="200"') == 20)
    eventually(lambda: total('route="/rec/{thp}",status="404"') == 7)
    eventually(lambda: total('route="unmatched",status="404"') == 5)
    eventually(lambda: scalar(prometheus, "sum(tang_recovery_exchange_duration_seconds_count)") == 27)
    eventually(lambda: scalar(prometheus, 'sum(tang_http_request_duration_seconds_count{route="/adv"})') == 30)
    # No key id ever becomes a label value.
    assert not [s for s in query(prometheus, "tang_http_requests_total") if thumbprint(exchange) in str(s)]

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


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    rules = yaml.safe_load((RULES / "tang-alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((RULES / "tang-alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert alerts == fired


def _slow_recovery_rule(rules: str) -> tuple[int, int]:
    start = rules.index("- alert: TangSlowRecovery")
    return start, rules.index("- alert:", start + 1)


@pytest.mark.parametrize(
    ("rule", "old", "new"),
    [
        ("TangKeySetDivergence", "for: 5m", "for: 1m"),  # no grace period for rotations
        ("TangSlowRecovery", "for: 10m", "for: 1m"),  # a short spike would fire
        ("TangSlowRecovery", "> 0.1", "> 0.3"),  # a threshold the slow recoveries stay under
        ("TangSlowRecovery", '{route="/rec/{thp}"}', ""),  # slow /adv would count
        ("TangSlowRecovery", "sum by (job, le)", "sum by (le)"),  # jobs mixed, job label lost
        ("TangSlowRecovery", "0.99", "0.5"),  # the median instead of p99
    ],
)
def test_alert_unit_tests_can_fail(tmp_path: Path, rule: str, old: str, new: str) -> None:
    """Break one rule: its unit tests must notice."""
    require_tools("promtool")
    # Only the unit tests of that rule (the whole file takes a while: some tests span weeks).
    tests = yaml.safe_load((RULES / "tang-alerts.test.yml").read_text())
    tests["tests"] = [t for t in tests["tests"] if any(c["alertname"] == rule for c in t["alert_rule_test"])]
    (tmp_path / "tang-alerts.test.yml").write_text(yaml.safe_dump(tests))
    rules = (RULES / "tang-alerts.yml").read_text()
    start = rules.index(f"- alert: {rule}")
    end = rules.find("- alert:", start + 1) % (len(rules) + 1)
    assert old in rules[start:end]

    def promtool(rules: str) -> int:
        (tmp_path / "tang-alerts.yml").write_text(rules)
        return subprocess.run(["promtool", "test", "rules", "tang-alerts.test.yml"], cwd=tmp_path).returncode

    assert promtool(rules) == 0  # the selected tests pass as they are
    assert promtool(rules[:start] + rules[start:end].replace(old, new, 1) + rules[end:]) != 0


def _expressions() -> dict[str, str]:
    """Every PromQL expression the alerts and the dashboard use, by where it is."""
    found = {}
    for group in yaml.safe_load((RULES / "tang-alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            found[f"alert {rule['alert']}"] = rule["expr"]

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    dashboard = json.loads((RULES / "tang-dashboard.json").read_text())
    for panel in panels(dashboard["panels"]):
        for index, target in enumerate(panel.get("targets", [])):
            found[f"panel {panel['title']!r} target {index}"] = target["expr"]
    return found


#: Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"job", "instance"}


def unexported(expressions: dict[str, str], exported: dict[str, dict[str, set[str]]]) -> list[str]:
    """What the expressions ask for that the scraped server does not export: metric names, label names, and the
    values of exact matchers (`$variables` and regular expressions aside)."""
    problems = []
    for where, text in expressions.items():
        expression = promql.parse(text)
        if not expression.selectors:
            problems.append(f"{where}: uses no metric")
        available = set(TARGET_LABELS)
        for selector in expression.selectors:
            labels = exported.get(selector.metric)
            if labels is None:
                problems.append(f"{where}: {selector.metric} is not exported")
                continue
            available |= set(labels)
            for label, (operator, value) in selector.matchers.items():
                if label in TARGET_LABELS:
                    continue
                if label not in labels:
                    problems.append(f"{where}: {selector.metric} has no label {label}")
                elif operator == "=" and "$" not in value and value not in labels[label]:
                    problems.append(f"{where}: {selector.metric} never has {label}={value!r}")
        problems += [f"{where}: no metric it uses has the label {label}" for label in expression.grouping - available]
    return problems


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, set[str]]]:
    """The series a live server exports after real traffic: sample name -> label -> values seen."""
    base = tmp_path_factory.mktemp("exported")
    keys = base / "keys"
    keyfiles.generate_keys(keys)
    _, old_exchange = load_keys(keys)
    keyfiles.rotate(keys)  # a hidden pair, as after any rotation
    new_exchange = next(key for key in load_keyset(keys).visible if key.kind is KeyKind.EXCHANGE)
    body = json.dumps(client_key()).encode()
    with our_server(keys, base / "server.log", "--usage-flush-seconds", "0.1", workers=2) as server:
        assert request(server.port, "GET", "/adv").status == 200
        for kid in (thumbprint(old_exchange), new_exchange.kid):
            assert request(server.port, "POST", f"/rec/{kid}", body).status == 200
        assert request(server.port, "POST", f"/rec/{thumbprint(client_key())}", body).status == 404
        assert request(server.port, "GET", "/nope").status == 404

        def scrape() -> dict[str, dict[str, set[str]]]:
            response = request(server.port, "GET", "/metrics")
            assert response.status == 200
            samples: dict[str, dict[str, set[str]]] = {}
            for family in text_string_to_metric_families(response.body.decode()):
                for sample in family.samples:
                    labels = samples.setdefault(sample.name, {})
                    for label, value in sample.labels.items():
                        labels.setdefault(label, set()).add(value)
            return samples

        # Recovery counts per key are written in batches: wait until both recoveries are in.
        eventually(lambda: len(scrape().get("tang_recoveries_total", {}).get("kid", ())) == 2)
        return scrape()


def test_alerts_and_dashboard_use_only_exported_series(exported: dict[str, dict[str, set[str]]]) -> None:
    expressions = _expressions()
    assert {f"alert {name}" for name in ("TangSlowRecovery", "TangKeySetDivergence")} <= set(expressions)
    assert unexported(expressions, exported) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("tang_keyset_info", "tang_keyset_infos"),  # a metric name
        ('route="/rec/{thp}"', 'route="/rec/{kid}"'),  # a label value never exported
        ('visibility="hidden"', 'hidden="true"'),  # a label never exported
        ("sum by (kid, visibility)", "sum by (key, visibility)"),  # grouping by a label no metric has
    ],
)
def test_exported_series_check_can_fail(exported: dict[str, dict[str, set[str]]], old: str, new: str) -> None:
    expressions = _expressions()
    broken = {where: text.replace(old, new) for where, text in expressions.items() if old in text}
    assert broken
    problems = unexported(broken, exported)
    assert all(any(problem.startswith(f"{where}: ") for problem in problems) for where in broken), problems
