"""The access log: one parseable line per request, in both formats, never key material."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tang_server.http.clientaddress import client_address, parse_networks

from .support import (
    assert_no_secrets,
    client_key,
    load_keys,
    our_server,
    parse_response,
    private_members,
    raw_request,
    request,
    thumbprint,
)

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
    log = server.log_text()  # read once the server has exited: every line it buffered is written
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
    """Read as the test above reads its log (after the server exited), where the same requests do show."""
    with our_server(keys, tmp_path / "log", "--no-access-log") as server:
        assert request(server.port, "GET", "/adv").status == 200
    assert "/adv" not in server.log_text()


def test_forwarded_for_believed_only_from_trusted_proxies(keys: Path, tmp_path: Path) -> None:
    headers = "X-Forwarded-For: 203.0.113.9, 198.51.100.7\r\n"
    data = f"GET /adv HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode()
    with our_server(keys, tmp_path / "trusting", "--trusted-proxy", "127.0.0.0/8") as server:
        assert parse_response(raw_request(server.port, data)).status == 200
    trusting = server.log_text()  # once the server has exited, as above
    with our_server(keys, tmp_path / "distrusting") as server:
        assert parse_response(raw_request(server.port, data)).status == 200
    distrusting = server.log_text()
    assert ' 198.51.100.7 "GET /adv' in trusting  # the right-most address not a trusted proxy
    assert "203.0.113.9" not in trusting  # what a client may have written itself
    assert ' 127.0.0.1 "GET /adv' in distrusting


@pytest.mark.parametrize(
    ("peer", "header", "expected"),
    [
        ("10.0.0.2", b"1.2.3.4", "1.2.3.4"),
        ("10.0.0.2", b"1.2.3.4, 10.0.0.3", "1.2.3.4"),  # through two trusted proxies
        ("10.0.0.2", b"spoofed, 5.6.7.8", "5.6.7.8"),
        ("10.0.0.2", b"not-an-address", "10.0.0.2"),
        ("10.0.0.2", b"", "10.0.0.2"),
        ("192.0.2.1", b"1.2.3.4", "192.0.2.1"),  # untrusted peer: header ignored
        ("10.0.0.2", None, "10.0.0.2"),
    ],
)
def test_client_address_rules(peer: str, header: bytes | None, expected: str) -> None:
    trusted = parse_networks(["10.0.0.0/8"])
    assert client_address(peer, header, trusted) == expected


def test_log_secret_check_can_fail(keys: Path) -> None:
    """The check every server log goes through (support.our_server) does catch key material."""
    secrets = private_members(keys)
    assert len(secrets) == 2
    with pytest.raises(AssertionError):
        assert_no_secrets("2026 ... " + next(iter(secrets)), secrets)
    with pytest.raises(AssertionError):
        assert_no_secrets('{"d":"x"}', set())
    assert_no_secrets("nothing to see", secrets)
