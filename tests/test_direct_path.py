"""The direct path (`direct.py`) answers exactly as the general ASGI path does, in order, and counts the same.

The same request goes one way or the other depending on its framing: a body with a declared length takes the
direct path, the same body chunked takes the general path; `Expect: 100-continue` also sends `/adv` the general
way. The answers must be the same bytes (apart from the date), and a connection mixing both must get its answers
in request order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .support import client_key, load_keys, our_server, raw_request, request, statuses, thumbprint

DATE = re.compile(rb"date: [^\r]*\r\n")


def _without_date(response: bytes) -> bytes:
    return DATE.sub(b"date: -\r\n", response)


def _recovery(kid: str, body: bytes, *, chunked: bool, close: bool = True) -> bytes:
    framing = (
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        if chunked
        else b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    connection = b"Connection: close\r\n" if close else b""
    return f"POST /rec/{kid} HTTP/1.1\r\nHost: t\r\n".encode() + connection + framing


def test_recovery_answers_are_the_same_bytes_on_both_paths(keys: Path, tmp_path: Path) -> None:
    _, exchange = load_keys(keys)
    kid = thumbprint(exchange)
    with our_server(keys, tmp_path / "log") as server:
        bodies = [json.dumps(client_key()).encode(), b"{}", b"not json", json.dumps(client_key(private=True)).encode()]
        for body in bodies:
            direct = raw_request(server.port, _recovery(kid, body, chunked=False))
            general = raw_request(server.port, _recovery(kid, body, chunked=True))
            assert _without_date(direct) == _without_date(general)
        for kid_used in ("unknown", f"{kid}%00"):
            direct = raw_request(server.port, _recovery(kid_used, bodies[0], chunked=False))
            general = raw_request(server.port, _recovery(kid_used, bodies[0], chunked=True))
            assert _without_date(direct) == _without_date(general)


def test_advertisement_answers_are_the_same_bytes_on_both_paths(keys: Path, tmp_path: Path) -> None:
    # One worker: each worker signs the advertisement itself, and ECDSA signatures differ every time.
    with our_server(keys, tmp_path / "log") as server:
        for version, target in (("1.1", "/adv"), ("1.0", "/adv/"), ("1.1", "/adv/unknown")):
            head = f"GET {target} HTTP/{version}\r\nHost: t\r\nConnection: close\r\n"
            direct = raw_request(server.port, (head + "\r\n").encode())
            general = raw_request(server.port, (head + "Expect: 100-continue\r\n\r\n").encode())
            assert direct.startswith(b"HTTP/1.1 ")
            assert _without_date(direct) == _without_date(general)


def test_pipelined_mix_of_paths_is_answered_in_order(keys: Path, tmp_path: Path) -> None:
    _, exchange = load_keys(keys)
    kid = thumbprint(exchange)
    body = json.dumps(client_key()).encode()
    requests = [
        b"GET /adv HTTP/1.1\r\nHost: t\r\n\r\n",  # direct
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",  # general
        _recovery(kid, body, chunked=False, close=False),  # direct
        _recovery(kid, b"{}", chunked=True, close=False),  # general, 400
        _recovery("unknown", body, chunked=False, close=False),  # direct, 404
        b"GET /status HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",  # general
    ]
    with our_server(keys, tmp_path / "log") as server:
        data = raw_request(server.port, b"".join(requests))
    assert statuses(data) == [b"200", b"200", b"200", b"400", b"404", b"200"]
    types = re.findall(rb"content-type: ([^\r]*)\r\n", data)
    assert types == [b"application/jose+json", b"application/json", b"application/jwk+json", b"application/json"]


def test_direct_answers_are_counted_and_logged(keys: Path, tmp_path: Path) -> None:
    _, exchange = load_keys(keys)
    kid = thumbprint(exchange)
    with our_server(keys, tmp_path / "log") as server:
        for _ in range(3):
            assert request(server.port, "POST", f"/rec/{kid}", json.dumps(client_key()).encode()).status == 200
            assert request(server.port, "GET", "/adv").status == 200
        metrics = request(server.port, "GET", "/metrics").body.decode()
    log = server.log_text()  # complete once the server has stopped (access log lines are batched)
    assert 'tang_http_requests_total{method="POST",route="/rec/{thp}",status="200"} 3.0' in metrics
    assert 'tang_http_requests_total{method="GET",route="/adv",status="200"} 3.0' in metrics
    assert "tang_recovery_exchange_duration_seconds_count 3.0" in metrics
    assert log.count(f'"POST /rec/{kid} HTTP/1.1" 200') == 3
    assert log.count('"GET /adv HTTP/1.1" 200') == 3


def test_several_forwarded_for_headers_are_one_list_on_both_paths(keys: Path, tmp_path: Path) -> None:
    """Through a trusted proxy the client is the right-most untrusted hop of all X-Forwarded-For headers."""
    policy = ["--trusted-proxy", "127.0.0.0/8", "--allow-advertisement", "10.0.0.0/8"]
    with our_server(keys, tmp_path / "log", *policy) as server:
        for first, last, expected in (("192.0.2.1", "10.1.2.3", b"200"), ("10.1.2.3", "192.0.2.1", b"403")):
            head = f"GET /adv HTTP/1.1\r\nX-Forwarded-For: {first}\r\nX-Forwarded-For: {last}\r\nConnection: close\r\n"
            direct = raw_request(server.port, (head + "\r\n").encode())
            general = raw_request(server.port, (head + "Expect: 100-continue\r\n\r\n").encode())
            assert direct.startswith(b"HTTP/1.1 " + expected)
            assert general.startswith(b"HTTP/1.1 " + expected)
