"""Hostile input against a live server with several workers: each case's expected outcome, then a health check.

An outcome is a set of acceptable first statuses, or CLOSED: the server closed the connection without answering.
After the table the server must still answer correctly, and its workers' memory must not have grown.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import (
    Server,
    client_key,
    load_keys,
    our_server,
    parse_response,
    raw_request,
    request,
    thumbprint,
    worker_rss,
)

CLOSED = frozenset({0})
HEADER_TIMEOUT = 2
MAX_HEADER_BYTES = 8192


def _rec(kid: str, body: bytes, extra: str = "") -> bytes:
    return f"POST /rec/{kid} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def cases(kid: str) -> list[tuple[str, bytes, frozenset[int]]]:
    good = json.dumps(client_key()).encode()
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("no host header", b"GET /adv HTTP/1.1\r\n\r\n", frozenset({200})),
        ("http/1.0 no host", b"GET /adv HTTP/1.0\r\n\r\n", frozenset({200})),
        ("garbage line", b"hello\r\n\r\n", frozenset({400})),
        ("method only", b"GET\r\n\r\n", frozenset({400})),
        ("bad version", b"GET /adv HTTP/9.9\r\n\r\n", frozenset({400, 505})),
        ("nul in target", b"GET /a\x00dv HTTP/1.1\r\n\r\n", frozenset({400})),
        ("lowercase method", b"get /adv HTTP/1.1\r\n\r\n", frozenset({400, 405})),
        ("unknown method", b"FOO /adv HTTP/1.1\r\n\r\n", frozenset({400, 405})),
        ("long method", b"G" * 5000 + b" /adv HTTP/1.1\r\n\r\n", frozenset({400})),
        ("delete on rec", b"DELETE /rec/abc HTTP/1.1\r\n\r\n", frozenset({405})),
        ("header without colon", b"GET /adv HTTP/1.1\r\nNoColon\r\n\r\n", frozenset({400})),
        ("space in header name", b"GET /adv HTTP/1.1\r\nBad Name: x\r\n\r\n", frozenset({400})),
        ("control char in header", b"GET /adv HTTP/1.1\r\nX: a\x01b\r\n\r\n", frozenset({400})),
        ("huge header", b"GET /adv HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", frozenset({431})),
        ("many headers", b"GET /adv HTTP/1.1\r\n" + b"X-A: bbbbbbbbbbbbbbbb\r\n" * 2000 + b"\r\n", frozenset({431})),
        ("obs-fold", b"GET /adv HTTP/1.1\r\nX: a\r\n b\r\n\r\n", frozenset({200, 400})),
        ("negative length", b"POST /rec/abc HTTP/1.1\r\nContent-Length: -1\r\n\r\n", frozenset({400})),
        ("text length", b"POST /rec/abc HTTP/1.1\r\nContent-Length: ten\r\n\r\n", frozenset({400})),
        ("two lengths", b"POST /rec/a HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", frozenset({400})),
        (
            "length and chunked",
            b"POST /rec/a HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            frozenset({400}),
        ),
        (
            "bad chunk size",
            b"POST /rec/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            frozenset({400}),
        ),
        (
            "huge chunk size",
            b"POST /rec/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            frozenset({400, 413}) | CLOSED,
        ),
        (
            "chunked over limit",
            b"POST /rec/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"8000\r\n"
            + b" " * 0x8000
            + b"\r\n"
            + b"8000\r\n"
            + b" " * 0x8000
            + b"\r\n0\r\n\r\n",
            frozenset({413}),
        ),
        (
            "gzip then chunked",
            b"POST /rec/a HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            frozenset({400, 501}),
        ),
        ("body at limit", _rec(kid, b" " * 65536), frozenset({413})),
        ("body under limit", _rec(kid, b" " * 65535), frozenset({400})),
        (
            "body never finishes",
            f"POST /rec/{kid} HTTP/1.1\r\nContent-Length: 100\r\n\r\n{{}}".encode(),
            frozenset({408}),
        ),
        ("target at limit", b"GET /" + b"a" * 4095 + b" HTTP/1.1\r\n\r\n", frozenset({414})),
        ("target far over limit", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n", frozenset({414})),
        ("absolute form", b"GET http://h/adv HTTP/1.1\r\n\r\n", frozenset({404})),
        ("connect", b"CONNECT h:443 HTTP/1.1\r\n\r\n", frozenset({400, 404, 405})),
        ("options star", b"OPTIONS * HTTP/1.1\r\n\r\n", frozenset({400, 404})),
        ("percent-encoded route", b"GET /%61dv HTTP/1.1\r\n\r\n", frozenset({404})),
        (
            "encoded nul in kid",
            f"POST /rec/{kid}%00 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{{}}".encode(),
            frozenset({404}),
        ),
        ("host-like path", b"GET //evil.example/adv HTTP/1.1\r\n\r\n", frozenset({404})),
        (
            "websocket upgrade",
            b"GET /adv HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            frozenset({200, 400, 404}),
        ),
        ("expect continue", _rec(kid, good, "Expect: 100-continue\r\n"), frozenset({100, 200})),
        ("deeply nested json", _rec(kid, deep[:65000]), frozenset({400})),
        ("huge number", _rec(kid, b'{"kty":1e999999}'), frozenset({400})),
        ("invalid utf-8 body", _rec(kid, b'{"kty":"\xff\xfe"}'), frozenset({400})),
        ("utf-16 body", _rec(kid, '{"kty":"EC"}'.encode("utf-16")), frozenset({400})),
        ("json with nul", _rec(kid, b'{"kty":"EC\x00"}'), frozenset({400})),
        ("empty body", _rec(kid, b""), frozenset({400})),
        ("private d", _rec(kid, json.dumps(client_key(private=True)).encode()), frozenset({200})),
        ("headers never finish", b"GET /adv HTTP/1.1\r\nX: y\r\n", frozenset({408})),
        ("nothing sent", b"", frozenset({408}) | CLOSED),
    ]


def outcome(port: int, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 8) as conn:
        if data:
            # The server may have answered and closed already (a too-large request).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                chunks.append(chunk)
                if _complete(b"".join(chunks)):
                    break
    response = b"".join(chunks)
    return parse_response(response).status if response else 0


def _complete(data: bytes) -> bool:
    """A whole response (head and Content-Length body) has arrived; no need to wait for the close."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    if head.startswith(b"HTTP/1.1 100"):
        return True
    response = parse_response(data)
    return len(body) >= int(response.headers.get("content-length", "0"))


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    from tang_server import keyfiles

    base = tmp_path_factory.mktemp("hostile")
    keyfiles.generate_keys(base / "keys")
    _, exchange = load_keys(base / "keys")
    limits = ["--request-timeout", str(HEADER_TIMEOUT), "--max-header-bytes", str(MAX_HEADER_BYTES)]
    with our_server(base / "keys", base / "log", *limits, workers=2) as server:
        yield server, thumbprint(exchange)


def test_hostile_table(hostile_server: tuple[Server, str]) -> None:
    server, kid = hostile_server
    table = cases(kid)
    assert len(table) >= 40
    failures = []

    def run_all() -> None:
        for name, data, expected in table:
            got = outcome(server.port, data)
            if got not in expected:
                failures.append(f"{name}: got {got or 'closed'}, expected {sorted(expected)}")

    run_all()  # warms every path up
    before = worker_rss(server.process.pid)
    for _ in range(2):
        run_all()
    after = worker_rss(server.process.pid)
    assert failures == []
    # Still correct afterwards.
    body = json.dumps(client_key()).encode()
    assert request(server.port, "POST", f"/rec/{kid}", body).status == 200
    assert request(server.port, "GET", "/adv").status == 200
    assert len(before) == 2
    for pid, size in before.items():
        assert after.get(pid, 0) - size < 2048, f"worker {pid} grew from {size} to {after.get(pid)} KiB"


def test_pipelined_requests_all_answered(hostile_server: tuple[Server, str]) -> None:
    server, kid = hostile_server
    data = b"GET /adv HTTP/1.1\r\n\r\n" * 3 + _rec(kid, json.dumps(client_key()).encode(), "Connection: close\r\n")
    response = raw_request(server.port, data)
    assert response.count(b"HTTP/1.1 200") == 4


def test_slow_clients_do_not_stop_unlocks(hostile_server: tuple[Server, str]) -> None:
    """200 connections sending one header byte per second while normal clients unlock."""
    server, kid = hostile_server
    body = json.dumps(client_key()).encode()

    def unlock_latencies(count: int) -> list[float]:
        latencies = []
        for _ in range(count):
            began = time.perf_counter()
            assert request(server.port, "POST", f"/rec/{kid}", body).status == 200
            latencies.append(time.perf_counter() - began)
        return sorted(latencies)

    baseline = unlock_latencies(20)
    slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
    stop = threading.Event()

    def trickle() -> None:
        line = b"GET /adv HTTP/1.1\r\nX-Slow: " + b"a" * 100
        for index in range(len(line)):
            if stop.wait(1.0):
                return
            for conn in slow:
                with contextlib.suppress(OSError):  # closed by the server at the deadline
                    conn.send(line[index : index + 1])

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        time.sleep(1.5)
        under_attack = unlock_latencies(20)
        time.sleep(HEADER_TIMEOUT + 1)
        closed = 0
        for conn in slow:
            conn.settimeout(0.01)
            try:
                data = conn.recv(1024)
                closed += data.startswith(b"HTTP/1.1 408") or data == b""
            except (TimeoutError, OSError):
                pass
    finally:
        stop.set()
        thread.join()
        for conn in slow:
            conn.close()
    median = under_attack[len(under_attack) // 2]
    assert median < 5 * baseline[len(baseline) // 2] + 0.05, (baseline, under_attack)
    assert closed == 200  # every slow connection was cut off at the header deadline


def test_backpressure_sheds_queued_recoveries_with_retry_after(keys: Path, tmp_path: Path) -> None:
    """A burst larger than one worker can answer within --max-queue-ms: the late ones get 503 + Retry-After at
    once, counted in metrics; with the bound off, everything is eventually answered 200."""
    _, exchange = load_keys(keys)
    body = json.dumps(client_key()).encode()
    request_bytes = _rec(thumbprint(exchange), body)

    def burst(server: Server) -> list[bytes]:
        """60 recoveries that all arrive while the (single-process) server is paused: a queue, deterministically."""
        connections = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(60)]
        time.sleep(0.3)  # all accepted
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            for conn in connections:
                conn.sendall(request_bytes)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        answers = []
        for conn in connections:
            conn.settimeout(30)
            data = b""
            while not _complete(data):
                data += conn.recv(65536)
            answers.append(data)
            conn.close()
        return answers

    with our_server(keys, tmp_path / "shedding", "--max-queue-ms", "2") as server:
        answers = burst(server)
        metrics = request(server.port, "GET", "/metrics").body.decode()
    shed = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert shed and len(shed) < len(answers)
    assert all(parse_response(a).headers["retry-after"] == "1" for a in shed)
    assert f"tang_recovery_shed_total {float(len(shed))}" in metrics
    with our_server(keys, tmp_path / "patient", "--max-queue-ms", "0") as server:
        assert all(a.startswith(b"HTTP/1.1 200") for a in burst(server))


def _closed_within(conn: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Everything the server sends until it closes, and whether it closed within `seconds`."""
    deadline = time.monotonic() + seconds
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while (remaining := deadline - time.monotonic()) > 0:
            conn.settimeout(remaining)
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                return False, received
            if not chunk:
                return True, received
            received += chunk
    return False, received


def test_body_arriving_after_the_answer_does_not_hold_the_connection(hostile_server: tuple[Server, str]) -> None:
    """Found by the raw-socket fuzzer: a 404 is answered before its body arrives; the late body cancelled
    uvicorn's keep-alive timer and the connection stayed open forever."""
    server, _ = hostile_server
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(b"POST /rec/unknown%00 HTTP/1.1\r\nContent-Length: 2\r\n\r\n")
        conn.settimeout(5)
        assert conn.recv(65536).startswith(b"HTTP/1.1 404")
        conn.sendall(b"{}")
        closed, rest = _closed_within(conn, HEADER_TIMEOUT + 3)
    assert closed and rest == b""


def test_body_trickling_after_the_answer_is_cut_off_without_a_second_answer(
    hostile_server: tuple[Server, str],
) -> None:
    server, _ = hostile_server
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(b"POST /rec/unknown%00 HTTP/1.1\r\nContent-Length: 1000\r\n\r\n")
        conn.settimeout(5)
        assert conn.recv(65536).startswith(b"HTTP/1.1 404")
        received = b""
        for _ in range(HEADER_TIMEOUT * 4):
            with contextlib.suppress(OSError):
                conn.send(b"x")
            closed, chunk = _closed_within(conn, 0.5)
            received += chunk
            if closed:
                break
    assert closed and received == b""  # closed quietly: the 404 was the answer


def test_unfinished_body_after_a_kept_alive_answer_is_408(hostile_server: tuple[Server, str]) -> None:
    """The request deadline must not mistake the previous request's finished answer for this one's."""
    server, kid = hostile_server
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        conn.settimeout(5)
        first = b""
        while not _complete(first):
            first += conn.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        conn.sendall(f"POST /rec/{kid} HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{{".encode())
        closed, received = _closed_within(conn, HEADER_TIMEOUT + 3)
    assert closed and received.startswith(b"HTTP/1.1 408")
