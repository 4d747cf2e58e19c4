"""The optional recovery access policy: /rec (and /adv) only from listed networks, through trusted proxies."""

from __future__ import annotations

import json
from pathlib import Path

from .support import client_key, load_keys, our_server, parse_response, raw_request, request, thumbprint


def _rec(port: int, kid: str, forwarded_for: str | None = None) -> int:
    body = json.dumps(client_key()).encode()
    header = f"X-Forwarded-For: {forwarded_for}\r\n" if forwarded_for else ""
    data = f"POST /rec/{kid} HTTP/1.1\r\nHost: t\r\n{header}Content-Length: {len(body)}\r\n\r\n".encode() + body
    return parse_response(raw_request(port, data)).status


def test_recovery_only_from_listed_networks(keys: Path, tmp_path: Path) -> None:
    _, exchange = load_keys(keys)
    kid = thumbprint(exchange)
    with our_server(keys, tmp_path / "closed", "--allow-recovery", "10.0.0.0/8") as server:
        assert _rec(server.port, kid) == 403  # the peer, 127.0.0.1, is not listed
        assert _rec(server.port, kid, forwarded_for="10.1.2.3") == 403  # the header of an untrusted peer is ignored
        assert request(server.port, "GET", "/adv").status == 200  # /adv stays open unless listed too
    with our_server(
        keys, tmp_path / "open", "--allow-recovery", "127.0.0.0/8", "--allow-recovery", "::1/128"
    ) as server:
        assert _rec(server.port, kid) == 200


def test_client_address_through_a_trusted_proxy(keys: Path, tmp_path: Path) -> None:
    _, exchange = load_keys(keys)
    kid = thumbprint(exchange)
    policy = ["--allow-recovery", "10.0.0.0/8", "--trusted-proxy", "127.0.0.0/8", "--allow-advertisement", "10.0.0.0/8"]
    with our_server(keys, tmp_path / "proxied", *policy) as server:
        assert _rec(server.port, kid, forwarded_for="10.1.2.3") == 200
        assert _rec(server.port, kid, forwarded_for="10.1.2.3, 192.0.2.7") == 403  # the last untrusted hop counts
        assert _rec(server.port, kid) == 403  # no header: the proxy itself is not a client
        assert request(server.port, "GET", "/adv").status == 403
        data = b"GET /adv HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 10.9.9.9\r\nConnection: close\r\n\r\n"
        assert parse_response(raw_request(server.port, data)).status == 200
        assert request(server.port, "GET", "/healthz").status == 200  # health is never subject to the policy
