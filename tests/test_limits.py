"""The limits of the README's "Limits and hostile input" not covered by the hostile table, at their defaults.

`--max-connections` (503 beyond), headers up to 32 KiB by default, idle kept-alive connections closed silently
after `--keep-alive-seconds`, and oversized bodies: read and discarded up to 1 MiB so the client sees its 413,
never read without bound.
"""

from __future__ import annotations

import contextlib
import errno
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .listening import launched
from .support import Response, Server, client_key, load_keys, parse_response, serve_command, statuses, thumbprint

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


def test_an_idle_connection_is_closed_by_the_keep_alive_time_not_the_request_deadline(
    keys: Path, tmp_path: Path
) -> None:
    """Both close an idle connection quietly; with a request deadline far beyond the wait's bound, only the
    keep-alive time can close it within that bound."""
    with (
        serving(keys, tmp_path / "log", "--keep-alive-seconds", "1", "--request-timeout", "600") as server,
        socket.create_connection(("127.0.0.1", server.port)) as conn,
    ):
        conn.settimeout(60)
        conn.sendall(ADV)
        assert read_response(conn).status == 200
        assert conn.recv(65536) == b""


def test_the_deadline_of_a_later_request_on_a_connection_is_kept(keys: Path, tmp_path: Path) -> None:
    """An answer moves the connection's deadline (checked by the worker's sweep, `protocol._Sweep`), and a later
    request must still be cut off at its own. The first request goes in the middle of the first deadline so that
    the second one's falls well after it (when deadlines had a timer per connection, that timer had to be armed
    again for it)."""
    timeout = 6.0
    with (
        serving(keys, tmp_path / "log", "--request-timeout", str(timeout)) as server,
        socket.create_connection(("127.0.0.1", server.port)) as conn,
    ):
        conn.settimeout(60)
        time.sleep(timeout / 3)  # not a timed check: the server answers the request below in any case
        conn.sendall(ADV)
        assert read_response(conn).status == 200
        conn.sendall(b"GET /adv HTTP/1.1\r\n")  # and never the rest
        assert read_response(conn).status == 408  # the socket's timeout only bounds a hang


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


# Each refused as it arrives: a target past the limit, headers past theirs, bytes that are not HTTP, a request
# that does not finish within the deadline.
REFUSALS = {
    "408": b"GET /adv HTTP/1.1\r\nHost: x\r\n",
    "414": b"GET /" + b"a" * 8192,
    "431": b"GET /adv HTTP/1.1\r\nX: " + b"a" * 40000,
    "400": b"hello\r\n\r\n",
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_a_refusal_is_not_lost_to_the_rest_of_the_request(keys: Path, tmp_path: Path, refusal: str) -> None:
    """Closing a socket with request bytes unread makes the kernel reset the connection, and a reset can destroy
    the refusal before the client reads it. Here the rest of the request arrives after the refusal: the server
    must read and drop it, and close only when the client has finished (an orderly end, not a reset)."""
    deadline = ("--request-timeout", "1")
    with (
        serving(keys, tmp_path / "log", *deadline) as server,
        socket.create_connection(("127.0.0.1", server.port)) as conn,
    ):
        conn.settimeout(30)
        conn.sendall(REFUSALS[refusal])
        assert read_response(conn).status == int(refusal)
        conn.sendall(b"a" * (256 << 10) + b"\r\n\r\n")  # the rest of what the client had to say
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(65536) == b""  # the server's end of the connection, after the client's
        assert ask(server.port, ADV).status == 200


def _trickle(conn: socket.socket) -> None:
    """Sends a byte every 50 ms until the server's end is gone (a reset), for at most 60 s (a hang's bound)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        conn.send(b"a")
        time.sleep(0.05)


def _flood(conn: socket.socket) -> None:
    """Sends up to 64 MiB."""
    for _ in range(1024):
        conn.sendall(b"a" * 65536)


def test_a_request_answered_early_then_malformed_gets_no_second_answer(keys: Path, tmp_path: Path) -> None:
    """A 404 needs no body and goes out before it arrives; when the body then breaks the framing, the connection
    ends without a 400 after the 404 (the client would take it for its next request's answer)."""
    with serving(keys, tmp_path / "log") as server, socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.settimeout(30)
        conn.sendall(b"POST /nothing HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert read_response(conn).status == 404
        conn.sendall(b"zz\r\n")  # not a chunk size
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(65536) == b""


@pytest.mark.parametrize(("target", "status"), [("/nope", 404), ("/adv", 405)])
def test_an_answer_before_the_body_with_connection_close_is_not_lost(
    keys: Path, tmp_path: Path, target: str, status: int
) -> None:
    """A request that cannot succeed is answered from its request line, before its body is read; with
    `Connection: close` the connection then ends while the body is still arriving. It must end in a lingering
    close, or the kernel's reset for the unread body can destroy the answer (seen once in a suite run beside busy
    loops: a reset instead of the 405)."""
    head = f"POST {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    with serving(keys, tmp_path / "log") as server, socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.settimeout(30)
        conn.sendall(head.encode())
        assert read_response(conn).status == status
        conn.sendall(b"9c40\r\n" + b" " * 40_000 + b"\r\n0\r\n\r\n")  # the body, after the answer
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(65536) == b""  # an orderly end, not a reset


# A target past the limit, alone or as a whole request followed by the start of the next one in the same read
# (the parser goes on after the refusal: what it finds must not put the bound off).
TOO_LONG = {
    "unfinished": REFUSALS["414"],
    "whole, then more": REFUSALS["414"] + b" HTTP/1.1\r\nHost: x\r\n\r\nGET /adv HTTP/1.1\r\n",
}


@pytest.mark.parametrize("request_sent", sorted(TOO_LONG))
def test_a_refused_connection_is_closed_even_if_the_client_never_finishes(
    keys: Path, tmp_path: Path, request_sent: str
) -> None:
    """The read after a refusal is bounded: a client that trickles bytes and never finishes has its connection
    closed after a while, and one that floods after 1 MiB (the bound of an oversized body's discard). A closed
    end shows as a reset for what the client sends next."""
    with serving(keys, tmp_path / "log") as server:
        for send in (_trickle, _flood):
            with socket.create_connection(("127.0.0.1", server.port)) as conn:
                conn.settimeout(60)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
                conn.sendall(TOO_LONG[request_sent])
                assert read_response(conn).status == 414
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    send(conn)
        assert ask(server.port, ADV).status == 200


def test_a_refusal_behind_an_unanswered_general_path_request_closes_without_an_answer(
    keys: Path, tmp_path: Path
) -> None:
    """The exception to the lingering close: an earlier pipelined request on the general path (here /metrics) is
    still being answered when the next one is refused. Its answer would have to come first and nothing can follow
    the end of our side, so the connection closes with no answer at all, not a 400 the client would take for its
    first request's; nothing raises in the server, which serves on."""
    with serving(keys, tmp_path / "log") as server:
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            conn.settimeout(60)  # bounds a hang only
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nhello\r\n\r\n")
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := conn.recv(65536):
                    received += chunk
        assert received == b""
        assert ask(server.port, ADV).status == 200
        log = server.log_text()
        assert "Traceback" not in log and "Invalid HTTP request received" in log


@pytest.mark.parametrize("path", ["/adv", "/metrics"])  # the direct path, and the general one (ASGI)
def test_a_client_that_never_reads_its_answers_is_reset(keys: Path, tmp_path: Path, path: str) -> None:
    """A client that pipelines thousands of requests and never reads the answers. On the direct path the server
    stops reading, its deadline closes the connection, and uvloop would then wait for ever to write the answers
    it holds (the kernel too, for those in the socket); on the general path the answering cycle waited for ever
    for the client to make room. Once the client has taken nothing for LINGER_SECONDS after the close, or for
    the request deadline while answers wait, the connection is reset, which the client sees as an error on its
    socket; the server serves on."""
    with serving(keys, tmp_path / "log", "--request-timeout", "2", "--keep-alive-seconds", "1") as server:
        with socket.socket() as conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
            conn.connect(("127.0.0.1", server.port))
            conn.settimeout(60)
            # Some 15 MB (/adv) or 30 MB (/metrics) of answers, far beyond every buffer on the way.
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * 5000)
            poller = select.poll()
            poller.register(conn, select.POLLERR | select.POLLHUP)
            assert poller.poll(120_000), "still open"  # a bound against a hang, not a timed check
            assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
        assert ask(server.port, ADV).status == 200
        assert "Traceback" not in server.log_text()


# A request the client stops in the middle of, then ends its side: and the statuses of everything it sent.
UNFINISHED = {
    "request line": (b"GE", [b"400"]),
    "headers": (b"GET /adv HTTP/1.1\r\nHost: x\r\n", [b"400"]),
    "body, direct path": (b"POST /rec/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789", [b"400"]),
    "body, general path": (
        b"POST /rec/abc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n01",
        [b"400"],
    ),
    "body, answered before it": (b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n01", [b"405"]),
    "after a whole request": (ADV + b"GET /adv HTTP/1.1\r\nHo", [b"200", b"400"]),
}


@pytest.mark.parametrize("case", sorted(UNFINISHED))
def test_a_request_the_client_ends_unfinished_is_400_at_once(keys: Path, tmp_path: Path, case: str) -> None:
    """A client that half-closes its connection in the middle of a request can never finish it: it gets 400 when
    its end arrives, not 408 at the deadline (an hour here, so that waiting for it would fail the test's bound),
    after the answers to what it sent whole; a request already answered gets no second answer."""
    data, expected = UNFINISHED[case]
    with (
        serving(keys, tmp_path / "log", "--request-timeout", "3600") as server,
        socket.create_connection(("127.0.0.1", server.port)) as conn,
    ):
        conn.settimeout(60)  # a hang's bound, far below the deadline
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    assert statuses(received) == expected
