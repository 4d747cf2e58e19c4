"""The limits of the README's "Limits and hostile input" not covered by the hostile table, at their defaults.

`--max-connections` (503 beyond), headers up to 32 KiB by default, idle kept-alive connections closed silently
after `--keep-alive-seconds`, and oversized bodies: read and discarded up to 1 MiB so the client sees its 413,
never read without bound.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .listening import launched
from .support import Response, Server, client_key, load_keys, parse_response, serve_command, thumbprint

ADV = b"GET /adv HTTP/1.1\r\nHost: x\r\n\r\n"


@contextlib.contextmanager
def serving(keys: Path, log: Path, *extra: str) -> Iterator[Server]:
    with launched(lambda port: serve_command(keys, port, *extra), log) as server:
        yield server


def read_response(conn: socket.socket) -> Response:
    """One whole response (head and Content-Length body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    response = parse_response(head + b"\r\n\r\n")
    while len(body) < int(response.headers.get("content-length", "0")):
        chunk = conn.recv(65536)
        assert chunk, "closed in the middle of a body"
        body += chunk
    return Response(response.status, response.headers, body)


def ask(port: int, data: bytes) -> Response:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(data)
        return read_response(conn)


def test_max_connections_answers_503_beyond(keys: Path, tmp_path: Path) -> None:
    limit = 3
    with serving(keys, tmp_path / "log", "--max-connections", str(limit)) as server:
        held = []
        try:
            # limit - 1 kept-alive connections, each answered: the limit's own connection is the next one.
            for _ in range(limit - 1):
                conn = socket.create_connection(("127.0.0.1", server.port), timeout=20)
                held.append(conn)
                conn.sendall(ADV)
                assert read_response(conn).status == 200
            assert ask(server.port, ADV).status == 200  # the limit-th concurrent connection
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=20)
            held.append(conn)
            conn.sendall(ADV)
            assert read_response(conn).status == 200  # again the limit-th: `limit` connections now open
            beyond = ask(server.port, ADV)
            assert beyond.status == 503
            _, exchange = load_keys(keys)
            body = json.dumps(client_key()).encode()
            rec = (f"POST /rec/{thumbprint(exchange)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
                   .encode() + body)  # fmt: skip
            assert ask(server.port, rec).status == 503  # the direct path too
        finally:
            for conn in held:
                conn.close()
        # Connections gone: served again (wait only for the server to notice the closes).
        deadline = time.monotonic() + 20
        while ask(server.port, ADV).status != 200:
            assert time.monotonic() < deadline, "still refusing after the connections closed"
            time.sleep(0.05)


def _with_header(size: int) -> bytes:
    return b"GET /adv HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * size + b"\r\nConnection: close\r\n\r\n"


def test_headers_up_to_32_kib_by_default(keys: Path, tmp_path: Path) -> None:
    with serving(keys, tmp_path / "log") as server:
        assert ask(server.port, _with_header(30 * 1024)).status == 200
        assert ask(server.port, _with_header(33 * 1024)).status == 431
        assert ask(server.port, _with_headers(30)).status == 200  # the limit is on all headers together
        assert ask(server.port, _with_headers(34)).status == 431


def _with_headers(kib: int) -> bytes:
    lines = b"".join(b"X-%d: " % i + b"b" * 1000 + b"\r\n" for i in range(kib))
    return b"GET /adv HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n"


def test_idle_kept_alive_connection_is_closed_silently(keys: Path, tmp_path: Path) -> None:
    """Default --keep-alive-seconds (5): the close is awaited with a deadline that only bounds a hang."""
    with serving(keys, tmp_path / "log") as server, socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.settimeout(20)
        conn.sendall(ADV)
        assert read_response(conn).status == 200
        conn.sendall(ADV)  # still open right after a request
        assert read_response(conn).status == 200
        conn.settimeout(60)
        assert conn.recv(65536) == b""  # closed, and without a word (no 408)


def _post_body(port: int, size: int) -> tuple[bytes, bool]:
    """POST a body of `size` bytes to /rec; returns what came back and whether the whole body could be sent."""
    head = f"POST /rec/abc HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
    chunk = b" " * 65536
    sent_all = True
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        try:
            conn.sendall(head)
            left = size
            while left:
                left -= conn.send(chunk[: min(left, len(chunk))])
            conn.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            sent_all = False
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                data += chunk
    return data, sent_all


def test_oversized_body_is_read_up_to_1_mib_so_the_client_sees_413(keys: Path, tmp_path: Path) -> None:
    with serving(keys, tmp_path / "log") as server:
        answer, sent_all = _post_body(server.port, (1 << 20) - 4096)
        assert sent_all
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:80]  # not lost to a reset: the body was read
        answer, sent_all = _post_body(server.port, 64 << 20)
        # Far beyond 1 MiB the server stops reading and closes: the client cannot push 64 MiB into it.
        assert not sent_all
        assert ask(server.port, ADV).status == 200
