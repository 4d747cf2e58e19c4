"""Differential testing: the same bytes sent to our server and to the reference C `tangd` on the same key
directory, and `jose` (the library the reference is built on) as the byte-exact oracle for `/rec` and key ids.

The expectations of a differential test are the reference's answers, not numbers copied from our own output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tang_server.keys import keyfiles

from .support import (
    REFERENCE_TANGD,
    Response,
    Server,
    free_port,
    our_server,
    parse_response,
    raw_request,
    reference_server,
    require_tools,
    running,
)

HASHES = ("S1", "S224", "S256", "S384", "S512")
#: What the reference passes to `jose_jwk_exc` for `/rec`; `jose jwk exc -i` takes the same template.
EXCHANGE_TEMPLATE = '{"alg":"ECMR","key_ops":["deriveKey"]}'


def http(method: str, target: str, body: bytes | None = None, *headers: str, version: str = "HTTP/1.1") -> bytes:
    """The bytes of one request with `Connection: close` (HTTP/1.1), the target exactly as given."""
    lines = [f"{method} {target} {version}", "Host: 127.0.0.1", *headers]
    if version == "HTTP/1.1":
        lines.append("Connection: close")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


@dataclass
class Pair:
    """Our server and the reference, serving the same key directory."""

    ours: Server
    reference: Server

    def send(self, data: bytes) -> tuple[Response, Response]:
        """The same bytes on a fresh connection to each; (ours, the reference's) answers."""
        return parse_response(raw_request(self.ours.port, data)), parse_response(raw_request(self.reference.port, data))


@contextlib.contextmanager
def pair(keys: Path, logs: Path, *extra: str, workers: int = 1) -> Iterator[Pair]:
    require_tools("socat", str(REFERENCE_TANGD), "jose")
    logs.mkdir(parents=True, exist_ok=True)
    with (
        our_server(keys, logs / "ours.log", *extra, workers=workers) as ours,
        reference(keys, logs / "reference.log") as theirs,
    ):
        yield Pair(ours, theirs)


def reference(keys: Path, log: Path, *, as_user: Sequence[str] = ()) -> contextlib.AbstractContextManager[Server]:
    """The reference C server through socat (`support.reference_server`), optionally run by `as_user`, a command
    prefix that changes the user."""
    if not as_user:
        return reference_server(keys, log)
    require_tools("socat", str(REFERENCE_TANGD))
    port = free_port()
    serve = " ".join([*as_user, str(REFERENCE_TANGD), str(keys)])
    return running(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{serve}"], port, log)


def assert_same_answer(ours: Response, theirs: Response, what: object) -> None:
    """Same status; errors with an empty body and `Content-Length: 0`, successes with the same content type."""
    assert ours.status == theirs.status, (what, "ours", ours.status, "reference", theirs.status)
    for response in (ours, theirs):
        assert int(response.headers["content-length"]) == len(response.body), what
        if response.status != 200:
            assert response.body == b"", what
    if ours.status == 200:
        assert ours.headers["content-type"] == theirs.headers["content-type"], what


def jose_exchange(server_key: Mapping[str, Any], client: Mapping[str, Any]) -> bytes:
    """What the reference answers to `/rec`: `jose jwk exc` of the server's private key (-l) and the client's point.

    With a public-only `-l`, jose's ECMR exchange adds the two points instead, so the operand order matters.
    """
    require_tools("jose")
    with tempfile.TemporaryDirectory() as work:  # jose takes long JSON from files, not from its arguments
        server_file, client_file = Path(work) / "server.jwk", Path(work) / "client.jwk"
        server_file.touch(mode=0o600)
        server_file.write_text(json.dumps(dict(server_key)))
        client_file.write_text(json.dumps({k: v for k, v in client.items() if k != "d"}))
        command = ["jose", "jwk", "exc", "-i", EXCHANGE_TEMPLATE, "-l", str(server_file), "-r", str(client_file)]
        return subprocess.run(command, check=True, capture_output=True).stdout


def jose_thumbprint(key: Mapping[str, Any], hash_name: str = "S256") -> str:
    """The key id of a key as jose computes it (`jose jwk thp -a`), independent of our `jwk.thumbprint`."""
    require_tools("jose")
    public = json.dumps({k: v for k, v in key.items() if k != "d"})
    command = ["jose", "jwk", "thp", "-i", "-", "-a", hash_name]
    return subprocess.run(command, input=public, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def directory_without_keygen(files: Mapping[str, bytes]) -> Iterator[Path]:
    """A key directory holding `files` in which the reference cannot create keys (its `--no-auto-keygen`).

    The reference generates a pair whenever a request finds no visible key; it has no switch for that, but when
    the directory refuses the write it answers 500 instead. The directory is made outside pytest's private (0700)
    temporary tree so that `nobody`, under whom the reference runs when the tests run as root, can read it.
    """
    path = Path(tempfile.mkdtemp(prefix="tang-no-keygen-"))
    try:
        for name, content in files.items():
            (path / name).write_bytes(content)
            (path / name).chmod(0o444)
        path.chmod(0o555)
        yield path
    finally:
        path.chmod(0o755)
        shutil.rmtree(path)


def reference_server_without_keygen(keys: Path, log: Path) -> contextlib.AbstractContextManager[Server]:
    """The reference as a user that cannot write to `keys` (see `directory_without_keygen`)."""
    require_tools("setpriv")
    if os.geteuid() == 0:  # root writes anywhere: serve as nobody (Debian serves as _tang)
        return reference(keys, log, as_user=["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"])
    return reference(keys, log)


def read_response(conn: socket.socket) -> Response:
    """Exactly one response from a connection that may stay open (its body delimited by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed before a whole response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    response = parse_response(head + b"\r\n\r\n")
    length = int(response.headers["content-length"])
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "connection closed before the whole body"
        body += chunk
    assert len(body) == length, "more bytes than one response"
    return Response(response.status, response.headers, body)


def visible_and_hidden_pairs(base: Path) -> None:
    """base/keys: a visible pair (also alone in base/visible) and a hidden pair (alone, visible, in base/hidden)."""
    (base / "keys").mkdir()
    for path in keyfiles.generate_keys(base / "visible"):
        (base / "keys" / path.name).write_bytes(path.read_bytes())
    for path in keyfiles.generate_keys(base / "hidden"):
        (base / "keys" / f".{path.name}").write_bytes(path.read_bytes())
