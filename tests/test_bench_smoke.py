"""The benchmark harnesses run end to end and report: short smokes whose numbers are printed, never asserted (a
shared 2-core machine makes any throughput, latency or error count under load a measurement, not a property)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from .support import require_tools

ROOT = Path(__file__).resolve().parent.parent


def test_load_harness_smoke(tmp_path: Path) -> None:
    require_tools("wrk", "socat", "taskset", "/usr/libexec/tangd")
    output = tmp_path / "load.json"
    # Servers and wrk may use both CPUs: nothing is measured here, and a CPU may be busy with other work.
    command = [sys.executable, str(ROOT / "bench" / "load.py"), "--seconds", "1", "--connections", "4",
               "--server-cpus", "0,1", "--load-cpus", "0,1", "--output", str(output)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    print(result.stdout)
    report = json.loads(output.read_text())
    rows = {(m["server"], m["route"], m["connection"]): m for m in report["measurements"]}
    expected = {(server, route, connection) for server in ("ours", "reference") for route in ("adv", "rec")
                for connection in ("kept-alive", "new")}  # fmt: skip
    expected |= {("constant", "adv", connection) for connection in ("kept-alive", "new")}
    assert set(rows) == expected
    for row in rows.values():
        numbers = [value for name, value in row.items() if name not in ("server", "route", "connection")]
        assert all(isinstance(value, int | float) and math.isfinite(value) and value >= 0 for value in numbers), row
    assert set(report["ratios"]) >= {"rec_vs_reference_kept_alive", "rec_per_worker_vs_pure_multiplication"}
    assert "| ours | rec | kept-alive |" in result.stdout  # the table is printed


def test_overload_harness_smoke(tmp_path: Path) -> None:
    """One row per backpressure setting, in the JSON lines and the Markdown report."""
    require_tools("wrk", "taskset")
    output = tmp_path / "overload.md"
    command = [sys.executable, str(ROOT / "bench" / "overload.py"), "--seconds", "0.5", "--factor", "0.5",
               "--queue-ms", "0", "1000", "--connections", "2000", "--output", str(output)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT / "bench")
    assert result.returncode == 0, result.stderr[-2000:]
    print(result.stdout)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["max_queue_ms"] for row in rows] == [0, 1000]
    for row in rows:
        shares = [row[name] for name in ("ok_share", "shed_503_share", "failed_share", "other_share")]
        assert all(0 <= share <= 1 for share in shares) and math.isclose(sum(shares), 1, abs_tol=1e-6), row
    report = output.read_text()
    assert "| off |" in report and "| 1000 |" in report


@pytest.mark.timeout(1800)  # bounds a hang only: a busy machine takes more passes to gather the samples
def test_profile_harness_attributes_the_access_log_and_the_recovery(tmp_path: Path) -> None:
    """py-spy's samples land in the parts they belong to: the access log has a share of /adv with the log on and
    none with it off; the recovery a share of /rec only. The harness samples until it has 1000 samples per row,
    however busy the machine: the access log, about 4% of /adv kept-alive, then draws none with a chance of about
    e^-40, so the first assertion below is not left to chance (the others are certain either way)."""
    require_tools("wrk", "taskset")
    reports = {}
    for name, serve_args in (("on", ""), ("off", "--no-access-log")):
        output = tmp_path / f"{name}.json"
        command = [sys.executable, str(ROOT / "bench" / "profile.py"), "--seconds", "2", "--rate", "500",
                   "--samples", "1000", "--rows", "adv:kept-alive,rec:kept-alive", "--connections", "4",
                   "--server-cpus", "0,1", "--load-cpus", "0,1", f"--serve-args={serve_args}",
                   "--output", str(output)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=ROOT / "bench")
        assert result.returncode == 0, result.stderr[-2000:]
        print(result.stdout)
        reports[name] = {row["route"]: row for row in json.loads(output.read_text())["profiles"]}
    for rows in reports.values():
        assert set(rows) == {"adv", "rec"}
        for route, row in rows.items():
            assert row["samples"] >= 1000, row
            assert all(0 <= share <= 100 for share in row["groups"].values()), row
            recovery = row["groups"]["recovery: validation and the P-521 multiplication"]
            assert (recovery > 0) == (route == "rec"), row
    assert reports["on"]["adv"]["groups"]["access log"] > 0, reports["on"]["adv"]
    assert all(row["groups"]["access log"] == 0 for row in reports["off"].values()), reports["off"]
