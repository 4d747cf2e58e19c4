"""The load harness runs end to end (a short smoke: numbers are reported, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .support import require_tools

ROOT = Path(__file__).resolve().parent.parent


def test_load_harness_smoke(tmp_path: Path) -> None:
    require_tools("wrk", "socat", "taskset", "/usr/libexec/tangd")
    output = tmp_path / "load.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "load.py"),
            "--seconds",
            "1",
            "--connections",
            "4",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    servers = {(m["server"], m["route"], m["connection"]) for m in report["measurements"]}
    assert len(servers) == 10
    assert all(m["errors"] == 0 and m["requests_per_second"] > 0 for m in report["measurements"])
    assert set(report["ratios"]) >= {"rec_vs_reference_kept_alive", "rec_per_worker_vs_pure_multiplication"}


def test_overload_harness_smoke(tmp_path: Path) -> None:
    """Half the saturation rate for a moment: everything answered 200, nothing shed, one row per setting."""
    require_tools("wrk", "taskset")
    output = tmp_path / "overload.md"
    command = [sys.executable, str(ROOT / "bench" / "overload.py"), "--seconds", "0.5", "--factor", "0.5",
               "--queue-ms", "0", "1000", "--connections", "2000", "--output", str(output)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT / "bench")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["max_queue_ms"] for row in rows] == [0, 1000]
    assert all(row["ok_share"] == 1.0 and row["shed_503_share"] == 0.0 for row in rows)
    assert "| off |" in output.read_text()
