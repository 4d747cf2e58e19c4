"""The access log: one parseable line per request, in both formats, never key material."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from .support import client_key, load_keys, our_server, request, thumbprint

PLAIN = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<client>\S+) "
    r'"(?P<method>[A-Z]+) (?P<target>(?:[^"\\]|\\.)*) '
    r'HTTP/(?P<version>[\d.]+)" (?P<status>\d{3}) (?P<ms>\d+\.\d{3})ms$'
)


def _lines(log: str, marker: str) -> list[str]:
    return [line for line in log.splitlines() if marker in line]


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_access_log_lines_parse_and_hold_no_keys(keys: Path, tmp_path: Path, fmt: str) -> None:
    signing, exchange = load_keys(keys)
    client = client_key(private=True)
    with our_server(keys, tmp_path / "log", "--access-log-format", fmt, workers=2) as server:
        assert request(server.port, "GET", "/adv").status == 200
        assert request(server.port, "POST", f"/rec/{thumbprint(exchange)}", json.dumps(client).encode()).status == 200
        assert request(server.port, "GET", '/adv/"quote\\').status == 404
        assert request(server.port, "GET", "/nope").status == 404
        time.sleep(0.5)  # lines are flushed every 0.2 s
        log = server.log_text()
    lines = _lines(log, "/adv") + _lines(log, "/rec/") + _lines(log, "/nope")
    assert len(lines) == 4
    for line in lines:
        if fmt == "plain":
            found = PLAIN.match(line)
            assert found, line
            fields = found.groupdict()
        else:
            fields = json.loads(line)
            assert set(fields) == {"time", "client", "method", "target", "http_version", "status", "duration_ms"}
        assert fields["client"] == "127.0.0.1"
        assert int(fields["status"]) in (200, 404)
    for secret in (signing["d"], exchange["d"], client["d"]):
        assert secret not in log
        assert secret[:12] not in log
    assert '"d"' not in log


def test_access_log_can_be_turned_off(keys: Path, tmp_path: Path) -> None:
    with our_server(keys, tmp_path / "log", "--no-access-log") as server:
        assert request(server.port, "GET", "/adv").status == 200
        time.sleep(0.5)
        assert "/adv" not in server.log_text()
