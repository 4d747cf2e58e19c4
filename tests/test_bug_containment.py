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

from tang_server import app as app_module
from tang_server.app import TangApplication
from tang_server.protocol import TangHttpProtocol
from tang_server.server import build_application
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
    config = uvicorn.Config(application, http=TangHttpProtocol, loop="uvloop", lifespan="off", log_config=None,
                            access_log=False)  # fmt: skip
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


def _boom(*args: object, **kwargs: object) -> object:
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


def test_a_bug_in_recovery_is_an_empty_500_and_one_log_line(
    keys: Path, live_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, exchange = load_keys(keys)
    body = json.dumps(client_key()).encode()
    target = f"/rec/{thumbprint(exchange)}"
    healthy = f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    assert parse_response(_exchange(live_port, healthy.encode() + body)).status == 200
    monkeypatch.setattr(app_module, "recover", _boom)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        direct = _exchange(live_port, healthy.encode() + body)
    _assert_contained(direct, caplog.records)

    caplog.clear()
    chunked = (f"POST {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               f"{len(body):x}\r\n").encode() + body + b"\r\n0\r\n\r\n"  # fmt: skip
    with caplog.at_level(logging.INFO):
        general = _exchange(live_port, chunked)
    _assert_contained(general, caplog.records)


def test_a_bug_in_the_advertisement_is_an_empty_500_and_one_log_line(
    live_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(app_module.TangApplication, "_advertisement", _boom)
    for target in ("/adv", "/adv/"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            answer = _exchange(live_port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        _assert_contained(answer, caplog.records)


def test_a_bug_in_another_route_is_an_empty_500_and_one_log_line(
    application: TangApplication, live_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The general path for a route the protocol never answers directly."""
    monkeypatch.setattr(application.usage, "report", _boom)
    with caplog.at_level(logging.INFO):
        answer = _exchange(live_port, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    _assert_contained(answer, caplog.records)
