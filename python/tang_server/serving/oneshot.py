"""`tangd`'s one connection without a server to hand it to: plain Tang requests answered without the event loop.

A process started per connection pays for every module it imports: uvicorn, starlette, asyncio and jwcrypto cost
ten times what the reference spends on a whole connection. What clevis sends (`GET /adv`, `GET /adv/{thp}`,
`POST /rec/{thp}` with a Content-Length body, HTTP/1.x, plain headers) is parsed here with blocking reads, routed by
the server's Tang routes and answered from a `KeySet` with the server's own code (`recovery.recover`), with the
bytes uvicorn writes for the same answer, and an access log line in the server's format. Only what such a
connection needs is imported: not the settings, the route table or the HTTP layer (their few values this module
needs are repeated here, and tests/test_inetd_handoff.py checks they agree). Anything else (another
route, a chunked body, `Expect`, an upgrade, an odd header, a slow request, a key directory that needs a key
generated) goes, together with the bytes read so far, to the full server (`server.serve_connection`), which
answers it exactly as before.

Signing the advertisement needs jwcrypto; its signatures are kept per advertised key set in `adv-*.json` files in
the runtime directory (`advcache.py`), so that only the first connection after a key change signs.
"""

from __future__ import annotations

import os
import re
import select
import time

from tang_server.keys.keyset import KeySet
from tang_server.serving import advcache

# What `tang-server serve` would use: the defaults of the settings of the same names (settings.py), which no `tangd`
# option changes. Not read from there: settings.py needs dataclasses, pathlib and typing, whose imports cost more
# than a connection. tests/test_inetd_handoff.py checks that they agree.
REQUEST_TIMEOUT = 10.0
KEEP_ALIVE_SECONDS = 5.0
MAX_HEADER_BYTES = 32768
MAX_BODY_BYTES = 65536
MAX_TARGET_BYTES = 4096
#: As http/responses.py (which imports starlette).
ADVERTISEMENT_TYPE = b"application/jose+json"
RECOVERY_TYPE = b"application/jwk+json"
#: The reason phrases of every status a Tang route answers here (http.HTTPStatus's, which imports an enum of 60).
_PHRASES = {200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 500: b"Internal Server Error"}

_REQUEST_LINE = re.compile(rb"(GET|POST) ([\x21-\x7e]+) HTTP/1\.([01])")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?[ \t]*")
#: Headers that change how the request is framed or answered: such requests go to the full server.
_UNUSUAL = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"))
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')  # as accesslog.py escapes a target
_KEY_ID = "/+([0-9A-Za-z_-]+)"  # as http/routing.py


class Unusual(Exception):
    """The connection needs the full server from here on."""


def tang_routes(prefix: str) -> tuple[tuple[str, re.Pattern[bytes]], ...]:
    """(method, pattern) of the Tang routes, the first three rows of `routing.route_table` (which imports the
    settings): a target they match with another method, or none of them matches, goes to the full server."""
    under = "/+" + re.escape(prefix.strip("/")) if prefix.strip("/") else ""
    return (
        ("POST", re.compile(f"{under}/+rec{_KEY_ID}".encode())),
        ("GET", re.compile(f"{under}/+adv/*".encode())),
        ("GET", re.compile(f"{under}/+adv{_KEY_ID}".encode())),
    )


def dispatch(routes: tuple[tuple[str, re.Pattern[bytes]], ...], method: str, target: bytes) -> str:
    """The key id ("" for `/adv`) of a Tang request; raises Unusual for anything else."""
    for route_method, pattern in routes:
        found = pattern.fullmatch(target)
        if found is not None:
            if method != route_method or len(target) >= MAX_TARGET_BYTES:
                raise Unusual
            return found.group(1).decode() if found.groups() else ""
    raise Unusual


class Connection:
    """The connection on standard input (answers to the socket itself, or to standard output for pipes)."""

    def __init__(self, directory: str, prefix: str) -> None:
        self.directory = directory
        self.output = 0 if _is_socket(0) else 1
        self.buffer = b""
        self.ended = False
        self.routes = tang_routes(prefix)
        self._keyset: KeySet | None = None

    def serve(self) -> None:
        """Answer plain requests until the client is done; raises Unusual with `buffer` unanswered."""
        signals = __import__("_signal")  # the signal module's enums cost an import this path need not pay
        signals.signal(signals.SIGTERM, _stop)  # a stopped unit ends the connection with status 0, as the server
        timeout = REQUEST_TIMEOUT
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if self.ended and not self.buffer:
                    return
                if self.ended or len(self.buffer) > MAX_HEADER_BYTES or not self._read(timeout):
                    if not self.buffer:
                        return  # idle: closed quietly, as the server does
                    raise Unusual
                continue
            began = time.perf_counter()
            method, target, version, headers = _parse_head(self.buffer[:head_end])
            length = _content_length(headers, MAX_BODY_BYTES)
            keep_alive = _keep_alive(version, headers)
            end = head_end + 4 + length
            while len(self.buffer) < end:
                if self.ended or not self._read(REQUEST_TIMEOUT):
                    raise Unusual
            thp = dispatch(self.routes, method, target)
            status, body, content_type = self._answer(method, thp, self.buffer[head_end + 4 : end])
            self.buffer = self.buffer[end:]
            _write(self.output, _response(status, body, content_type, keep_alive))
            _log(method, target, version, status, time.perf_counter() - began)
            if not keep_alive:
                return
            timeout = KEEP_ALIVE_SECONDS if not self.buffer else REQUEST_TIMEOUT

    def _answer(self, method: str, thp: str, body: bytes) -> tuple[int, bytes, bytes | None]:
        keyset = self.keyset()
        if method == "GET":
            found = keyset.advertisements.get(thp) if thp else keyset.default_advertisement
            if found is None:
                return (404 if thp else 500), b"", None
            return 200, found, ADVERTISEMENT_TYPE
        from tang_server.keys.recovery import recover  # only here: it imports http.HTTPStatus

        status, answer = recover(keyset, thp, body)
        return status, answer, RECOVERY_TYPE if status == 200 else None

    def keyset(self) -> KeySet:
        """The key set, read again when the directory changed since (as the server sees every change)."""
        if self._keyset is None or not advcache.unchanged(self.directory, self._keyset):
            keyset = advcache.load(self.directory)
            if not keyset.ready:
                raise Unusual  # no usable pair: the server generates one (auto_keygen) or says why
            self._keyset = keyset
        return self._keyset

    def _read(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for more bytes; False on timeout."""
        ready, _, _ = select.select([0], [], [], timeout)
        if not ready:
            return False
        data = os.read(0, 65536)
        if data:
            self.buffer += data
        else:
            self.ended = True
        return True


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _parse_head(head: bytes) -> tuple[str, bytes, str, dict[bytes, bytes]]:
    lines = head.split(b"\r\n")
    request = _REQUEST_LINE.fullmatch(lines[0])
    if request is None:
        raise Unusual
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        header = _HEADER.fullmatch(line)
        if header is None:
            raise Unusual  # folded, binary or malformed: httptools decides
        name = header.group(1).lower()
        if name in headers or name in _UNUSUAL:
            raise Unusual
        headers[name] = header.group(2) or b""
    return request.group(1).decode(), request.group(2), f"1.{request.group(3).decode()}", headers


def _content_length(headers: dict[bytes, bytes], limit: int) -> int:
    value = headers.get(b"content-length", b"0")
    if not value.isdigit() or len(value) > 9 or int(value) >= limit:
        raise Unusual
    return int(value)


def _keep_alive(version: str, headers: dict[bytes, bytes]) -> bool:
    connection = headers.get(b"connection", b"").lower()
    if connection not in (b"", b"close", b"keep-alive"):
        raise Unusual
    return version == "1.1" and connection != b"close"


def _response(status: int, body: bytes, content_type: bytes | None, keep_alive: bool) -> bytes:
    """Byte for byte what uvicorn writes for the same answer (see `direct.answer_bytes`)."""
    phrase = _PHRASES.get(status)
    if phrase is None:
        from http import HTTPStatus

        phrase = HTTPStatus(status).phrase.encode()
    status_line = b"HTTP/1.1 %d %s\r\n" % (status, phrase)
    parts = [status_line, b"content-length: %d\r\n" % len(body)]
    if content_type is not None:
        parts.append(b"content-type: " + content_type + b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.extend((b"\r\n", body))
    return b"".join(parts)


def _write(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _log(method: str, target: bytes, version: str, status: int, seconds: float) -> None:
    """The access log line `accesslog.AccessLog` writes (plain format); the peer is the socket's or '-'."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int((now % 1) * 1000):03d}Z"
    text = target[:256].decode("latin-1")
    if _UNSAFE.search(text):
        import json

        text = json.dumps(text)[1:-1]
    line = f'{stamp} {_peer()} "{method} {text} HTTP/{version}" {status} {seconds * 1000:.3f}ms\n'
    try:  # noqa: SIM105 - contextlib is an import this path need not pay
        _write(2, line.encode("ascii", "backslashreplace"))
    except OSError:  # a closed log must not lose the answer
        pass


def _peer() -> str:
    if not _is_socket(0):
        return "-"
    import _socket  # the socket module's enums cost an import this path need not pay

    sock = _socket.socket(fileno=os.dup(0))
    try:
        peer = sock.getpeername()
    except OSError:
        return "-"
    finally:
        sock.close()
    return str(peer[0]) if isinstance(peer, tuple) and peer else "-"


def _is_socket(fd: int) -> bool:
    try:
        return os.fstat(fd).st_mode & 0o170000 == 0o140000
    except OSError:
        return False
