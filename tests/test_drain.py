"""SIGTERM (or SIGINT) while requests are in flight: everything the server has received is answered, then it exits
with 0.

64 connections hold complete requests (16 pipelined each, on the direct and the general path) when SIGTERM
arrives; others hold a request half sent, completed during the drain window or after the listener closed; others
are idle. With a drain window, readiness must fail while `/rec` is still answered; without one (0), the listener
closes at once and the requests already received must still be answered. Every `/rec` answer is compared byte for
byte with what `jose` computes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tang_server.serving.server import stop_bound
from tang_server.settings import Settings

from .support import (
    Response,
    Server,
    client_key,
    free_port,
    load_keys,
    parse_response,
    request,
    require_tools,
    running,
    serve_command,
    thumbprint,
)

IN_FLIGHT = 64
PIPELINED = 16  # requests per in-flight connection: enough that some are still queued when the listener closes
HALF_SENT = 8
IDLE = 8
REQUEST_TIMEOUT = 5.0
HEAD = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r]*\r\n((?:[^\r]+\r\n)*)\r\n")


@dataclass
class Client:
    """One client connection, what it sent, and what it must get back."""

    conn: socket.socket
    expected: list[bytes | None] = field(default_factory=list)  # a /rec answer's exact body, None for /adv
    rest: bytes = b""  # the part of a half-sent request not sent yet


def _rec(kid: str, body: bytes, *, chunked: bool = False, close: bool = False) -> bytes:
    head = f"POST /rec/{kid} HTTP/1.1\r\nHost: t\r\n" + ("Connection: close\r\n" if close else "")
    if chunked:  # takes the general (ASGI) path
        return head.encode() + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


ADV = b"GET /adv HTTP/1.1\r\nHost: t\r\n\r\n"


def _jose_exchange(server_key: dict[str, object], client: dict[str, object], tmp_path: Path) -> bytes:
    """The reference's answer to `client` (see test_interop)."""
    (tmp_path / "server.jwk").write_text(json.dumps(server_key))
    (tmp_path / "client.jwk").write_text(json.dumps(client))
    command = ["jose", "jwk", "exc", "-i", '{"alg":"ECMR","key_ops":["deriveKey"]}',
               "-l", str(tmp_path / "server.jwk"), "-r", str(tmp_path / "client.jwk")]  # fmt: skip
    return subprocess.run(command, check=True, capture_output=True).stdout


def _connect(port: int, opened: contextlib.ExitStack) -> socket.socket:
    conn = opened.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
    conn.sendall(ADV)  # answered: the server has accepted this connection
    assert _read_one(conn).status == 200
    return conn


def _read_one(conn: socket.socket) -> Response:
    data = b""
    while (found := HEAD.match(data)) is None or len(data) < found.end() + _length(found.group(2)):
        chunk = conn.recv(65536)
        assert chunk, "closed without an answer"
        data += chunk
    return parse_response(data)


def _length(headers: bytes) -> int:
    found = re.search(rb"content-length: (\d+)\r\n", headers)
    return int(found.group(1)) if found else 0


def _read_all(conn: socket.socket) -> tuple[list[Response], str | None]:
    """Every answer until the server closes the connection, and how it ended if not cleanly."""
    data, error = b"", None
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except OSError as exc:
        error = repr(exc)
    answers = []
    while (found := HEAD.match(data)) is not None and len(data) >= found.end() + _length(found.group(2)):
        end = found.end() + _length(found.group(2))
        answers.append(parse_response(data[:end]))
        data = data[end:]
    if data:
        error = f"{error or ''} incomplete answer {data[:80]!r}"
    return answers, error


def _check(client: Client) -> list[str]:
    """What went wrong on one connection: missing, wrong or incomplete answers."""
    answers, error = _read_all(client.conn)
    problems = [f"ended with {error}"] if error else []
    if len(answers) != len(client.expected):
        problems.append(f"{len(answers)} answers to {len(client.expected)} requests")
    for answer, expected in zip(answers, client.expected, strict=False):
        if answer.status != 200:
            problems.append(f"status {answer.status}")
        elif expected is not None and answer.body != expected:
            problems.append("a /rec answer differs from jose's")
        elif expected is None and answer.headers.get("content-type") != "application/jose+json":
            problems.append("not an advertisement")
    return problems


@contextlib.contextmanager
def _server(keys: Path, log: Path, drain: float, workers: int) -> Iterator[Server]:
    port = free_port()
    # Backpressure off: on a busy machine 1,024 pipelined /rec queue past --max-queue-ms and are rightly shed with
    # 503 (tests/test_hostile.py tests that); here every request must get its real answer.
    extra = ["--no-auto-keygen", f"--drain-seconds={drain}", f"--request-timeout={REQUEST_TIMEOUT}", "--max-queue-ms=0"]
    with running(serve_command(keys, port, *extra, workers=workers), port, log) as server:
        yield server


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("workers", [1, 2])
# The window must outlast what the test does inside it (a readiness poll, 8 probes and a /rec beside 1,024 pipelined
# answers) on a starved machine: it only bounds how long that may take.
@pytest.mark.parametrize("drain", [0.0, 4.0])
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_answers_everything_received(
    keys: Path, tmp_path: Path, workers: int, drain: float, stop: signal.Signals
) -> None:
    require_tools("jose")
    _, exchange = load_keys(keys)
    kid = thumbprint(exchange)
    clients = [client_key() for _ in range(4)]
    bodies = [json.dumps(c).encode() for c in clients]
    answers = [_jose_exchange(exchange, c, tmp_path) for c in clients]
    bound = stop_bound(Settings(keys_dir=keys, drain_seconds=drain, request_timeout=REQUEST_TIMEOUT))
    with _server(keys, tmp_path / "log", drain, workers) as server, contextlib.ExitStack() as opened:
        idle = [_connect(server.port, opened) for _ in range(IDLE)]
        in_flight = [Client(_connect(server.port, opened)) for _ in range(IN_FLIGHT)]
        half_sent = [Client(_connect(server.port, opened)) for _ in range(HALF_SENT)]
        for client in half_sent:
            data = _rec(kid, bodies[0])
            # Cut in the headers: the rest arrives once the drain has begun.
            client.conn.sendall(data[:30])
            client.rest, client.expected = data[30:], [answers[0]]
        for index, client in enumerate(in_flight):
            pipelined: list[bytes] = []
            for n in range(PIPELINED):
                which = (index + n) % len(bodies)
                last = n == PIPELINED - 1
                if n % 8 == 7:
                    pipelined.append(ADV)
                    client.expected.append(None)
                else:
                    # every 4th connection on the general path; some connections ask to close after the last
                    pipelined.append(_rec(kid, bodies[which], chunked=index % 4 == 3, close=last and index % 4 == 1))
                    client.expected.append(answers[which])
            client.conn.sendall(b"".join(pipelined))

        os.kill(server.process.pid, stop)  # the parent only, as Kubernetes and systemd do (SIGINT: Ctrl+C)
        stopped = time.monotonic()

        if drain:
            deadline = time.monotonic() + 10
            while request(server.port, "GET", "/readyz").status != 503:
                assert time.monotonic() < deadline, "readiness never turned 503"
                time.sleep(0.02)
            # Not ready, on every worker, while the Tang routes are still served on new connections.
            assert [request(server.port, "GET", "/readyz").status for _ in range(8)] == [503] * 8
            rec = request(server.port, "POST", f"/rec/{kid}", bodies[1])
            assert (rec.status, rec.body) == (200, answers[1])
            for client in half_sent[: HALF_SENT // 2]:  # completed during the drain window
                client.conn.sendall(client.rest)
                client.rest = b""
        deadline = time.monotonic() + 10 + drain
        while not _refused(server.port):
            assert time.monotonic() < deadline, "the listener never closed"
            time.sleep(0.05)  # a tight loop of connections would fill the accept queue
        closed = time.monotonic() - stopped
        for client in half_sent:  # completed after the listener closed: still within the request deadline
            client.conn.sendall(client.rest)

        problems = {f"connection {i}: {p}" for i, c in enumerate(in_flight + half_sent) for p in _check(c)}
        idle_left = [i for i, conn in enumerate(idle) if _read_all(conn) != ([], None)]
        server.process.wait(timeout=bound + 5)
        exited = time.monotonic() - stopped
        log = server.log_text()
    answering = sum(int(n) for n in re.findall(r"closing the listener: (\d+) connections answering", log))
    print(f"{stop.name} workers={workers} drain={drain}: listener closed after {closed:.2f}s, exit after {exited:.2f}s "
          f"(bound {bound}s); {IN_FLIGHT * PIPELINED} requests in flight on {IN_FLIGHT} connections, "
          f"{HALF_SENT} half sent, {IDLE} idle; {answering} connections still answering at the close")  # fmt: skip
    assert sorted(problems) == [], "\n".join(sorted(problems))
    assert idle_left == [], "idle connections got something other than a clean close"
    assert server.process.returncode == 0
    assert "Traceback" not in log
    if not drain:
        assert answering > 0, "nothing was in flight when the listener closed: the test proves nothing"


def test_supervisor_killed_its_workers_drain(keys: Path, tmp_path: Path) -> None:
    """SIGKILL of the supervisor loses nothing: its workers get SIGTERM from the kernel and drain."""
    _, exchange = load_keys(keys)
    body = json.dumps(client_key()).encode()
    with _server(keys, tmp_path / "log", 1.0, 2) as server:
        os.kill(server.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while request(server.port, "GET", "/readyz").status != 503:
            assert time.monotonic() < deadline, "the workers did not notice"
            time.sleep(0.02)
        assert request(server.port, "POST", f"/rec/{thumbprint(exchange)}", body).status == 200
        while not _refused(server.port):
            assert time.monotonic() < deadline + 10, "the workers never stopped"
            time.sleep(0.05)
