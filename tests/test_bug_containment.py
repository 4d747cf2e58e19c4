""" "A bug becomes an empty 500 and a log line, never a traceback in a response": a fault injected in a real server.

The server runs in this process (uvicorn on a socket bound here, our protocol and application) so that the fault can
be injected by monkeypatching, with no test hook in the product code. Both paths are covered: the direct path
(`/rec` and `/adv` answered by the protocol) and the general path (a chunked `/rec` goes through the ASGI cycle).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from tang_server.http.app import TangApplication
from tang_server.http.protocol import TangHttpProtocol
from tang_server.serving.server import build_application
from tang_server.settings import Settings

from .support import client_key, load_keys, parse_response, thumbprint

SENTINEL = "injected fault 7f3a"


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(data)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def application(keys: Path) -> TangApplication:
    return build_application(Settings(keys_dir=keys, access_log=False))


@pytest.fixture
def live_port(application: TangApplication) -> Iterator[int]:
    config = uvicorn.Config(
        application,
        http=TangHttpProtocol,
        loop="uvloop",
        lifespan="off",
        log_config=None,
        access_log=False,
        proxy_headers=False,  # as server.py does: a wrapped application gets no direct path
    )
    server = uvicorn.Server(config)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
        time.sleep(0.02)
    yield int(listener.getsockname()[1])
    server.should_exit = True
    thread.join(timeout=20)
    listener.close()


class Exploding:
    """A key set every use of which is a bug: the fault is injected where every route needs it."""

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(SENTINEL)


def _assert_contained(answer: bytes, records: list[logging.LogRecord]) -> None:
    response = parse_response(answer)
    assert response.status == 500
    assert response.body == b""
    assert response.headers["content-length"] == "0"
    assert SENTINEL.encode() not in answer and b"Traceback" not in answer
    errors = [record for record in records if record.levelno >= logging.ERROR]
    assert len(errors) == 1, [record.getMessage() for record in errors]
    assert errors[0].exc_info is not None and SENTINEL in str(errors[0].exc_info[1])


def _send(port: int, target: str, body: bytes | None = None, chunked: bool = False) -> bytes:
    method = "GET" if body is None else "POST"
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    if body is None:
        return _exchange(port, head.encode() + b"\r\n")
    if chunked:  # no declared length: the general (ASGI) path
        framed = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        return _exchange(port, (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + framed)
    return _exchange(port, (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)


def test_a_bug_is_an_empty_500_and_one_log_line_on_every_path(
    keys: Path,
    application: TangApplication,
    live_port: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, exchange = load_keys(keys)
    body = json.dumps(client_key()).encode()
    rec = f"/rec/{thumbprint(exchange)}"
    healthy = [_send(live_port, rec, body), _send(live_port, rec, body, chunked=True), _send(live_port, "/adv")]
    assert [parse_response(answer).status for answer in healthy] == [200, 200, 200]
    monkeypatch.setattr(application.store, "_keyset", Exploding())
    cases: dict[str, tuple[str, bytes | None, bool]] = {
        "direct /rec": (rec, body, False),
        "general /rec": (rec, body, True),
        "direct /adv": ("/adv", None, False),
        "direct /adv/": ("/adv/", None, False),
        "general /status": ("/status", None, False),
        "general /readyz": ("/readyz", None, False),
    }
    for name, (target, payload, chunked) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.INFO):
            answer = _send(live_port, target, payload, chunked)
        try:
            _assert_contained(answer, caplog.records)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    monkeypatch.undo()
    assert parse_response(_send(live_port, "/adv")).status == 200  # the server itself is fine
